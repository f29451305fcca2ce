"""The ChatterBot zh+en chat corpus: parsing, cleaning, the fixed split, and the file form finetune.py reads."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from bilingual_glm.corpora.dialogues import (
    is_validation_dialogue,
    load_dialogues,
    main,
    parse_corpus_file,
    read_dialogues,
    write_dialogue_jsonl,
)
from bilingual_glm.data.sft import load_chat_data, tokenize_chat


def write_corpus(root: Path, folder: str, files: dict[str, str]) -> Path:
    (root / folder).mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / folder / name).write_text(text, encoding="utf-8")
    return root


def test_packaged_corpus_is_deduplicated_alternating_and_split_by_opening_turn():
    train, validation = load_dialogues("train"), load_dialogues("validation")
    rows = list(train) + list(validation)
    counts = {lang: sum(row["lang"] == lang for row in rows) for lang in ("zh", "en")}
    assert counts == {"zh": 465, "en": 898}  # chatterbot-corpus 1.3.3 after cleaning (module docstring)
    assert 0.05 < len(validation) / len(rows) < 0.15
    for row in rows:
        roles = [message["role"] for message in row["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
        assert all(message["content"] == message["content"].strip() != "" for message in row["messages"])
    chats = [json.dumps(row["messages"], ensure_ascii=False) for row in rows]
    assert len(set(chats)) == len(chats)
    assert sum(len(row["messages"]) > 2 for row in rows) >= 40  # multi-turn chains survive
    openers = {
        split: {row["messages"][0]["content"] for row in data}
        for split, data in (("t", train), ("v", validation))
    }
    assert not openers["t"] & openers["v"]  # no question is both trained on and held out
    assert all(is_validation_dialogue(opener) for opener in openers["v"])


def test_split_does_not_depend_on_language_order_or_selection():
    both = load_dialogues("validation", ["en", "zh"])
    zh_only = load_dialogues("validation", "zh")
    assert [row["messages"] for row in both if row["lang"] == "zh"] == zh_only["messages"]
    assert set(load_dialogues("validation", ["zh", "en"])["lang"]) == {"zh", "en"}


def test_multi_turn_chain_becomes_alternating_messages_and_a_last_unanswered_turn_is_dropped(tmp_path):
    root = write_corpus(
        tmp_path,
        "english",
        {
            "a.yml": "conversations:\n- - ' Hi '\n  - Hello\n  - How are you?\n  - Fine.\n  - Bye\n"
            "- - Hi\n  - Hello\n  - How are you?\n  - Fine.\n",  # same four turns after the cut: a duplicate
        },
    )
    dialogues = read_dialogues("en", root)
    assert len(dialogues) == 1
    assert dialogues[0].topic == "a"
    assert dialogues[0].messages() == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Fine."},
    ]


def test_a_malformed_entry_is_skipped_with_a_warning_naming_file_and_entry(tmp_path, caplog):
    path = tmp_path / "t.yml"
    path.write_text("conversations:\n- just a string\n- - only one turn\n- - Q?\n  - A.\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="bilingual_glm.corpora.dialogues"):
        assert parse_corpus_file(path) == [("Q?", "A.")]
    assert f"{path}: conversation 0 skipped" in caplog.text
    assert f"{path}: conversation 1 skipped" in caplog.text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        (b"conversations: [\n", "not valid YAML"),
        (b"\xff\xfe conversations", "not valid UTF-8"),
        (b"- - a\n  - b\n", "expected a YAML mapping with a 'conversations' list"),
        (b"categories: [x]\n", "expected a YAML mapping with a 'conversations' list"),
        (b"conversations:\n- - lonely\n- [1, 2]\n", "no conversation with >= 2 non-empty string turns"),
    ],
)
def test_bad_files_fail_naming_the_file_and_what_was_expected(tmp_path, content, message):
    path = tmp_path / "bad.yml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        parse_corpus_file(path)
    assert str(path) in str(error.value)


def test_bad_arguments_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        load_dialogues("test")
    with pytest.raises(ValueError, match="languages must be a non-empty subset"):
        load_dialogues("train", ["fr"])
    with pytest.raises(ValueError, match=r"english: no \*\.yml dialogue files"):
        load_dialogues("train", ["en"], data_dir=tmp_path)


def test_jsonl_files_feed_finetune_chat_loading_with_labels_on_answers_only(tmp_path, tokenizer_dir):
    paths = write_dialogue_jsonl(tmp_path / "chat")
    splits = load_chat_data(str(paths["train"]), str(paths["validation"]))
    assert len(splits["train"]) == len(load_dialogues("train"))
    assert splits["validation"]["messages"] == load_dialogues("validation")["messages"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    chat = splits["train"][0]["messages"]
    encoded = tokenize_chat({"messages": chat}, tokenizer, max_length=1024)
    answer_ids = [token for token in encoded["labels"] if token != -100]
    expected = "".join(f"\n{m['content']}<|endoftext|>" for m in chat if m["role"] == "assistant")
    assert tokenizer.decode(answer_ids) == expected


def test_command_line_writes_both_splits_and_reports_bad_folders(tmp_path, capsys):
    assert main(["--output_dir", str(tmp_path / "out"), "--languages", "zh"]) == 0
    printed = capsys.readouterr().out
    lines = (tmp_path / "out" / "validation.jsonl").read_text(encoding="utf-8").splitlines()
    assert f"validation.jsonl: {len(lines)} chats {{'zh': {len(lines)}}}" in printed
    assert main(["--output_dir", str(tmp_path / "x"), "--data_dir", str(tmp_path / "none")]) == 2
    assert "dialogues: error:" in capsys.readouterr().err
