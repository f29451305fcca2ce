"""Bilingual chat data for ``finetune.py --task sft``: the ChatterBot dialogue corpus (zh + en), offline.

The pip package ``chatterbot-corpus`` (BSD-3) ships small hand-written dialogues as YAML, one file per
topic and language (``chatterbot_corpus/data/<language>/<topic>.yml``)::

    categories: [greetings]
    conversations:
    - - 你好吗?              turn 1  -> user
      - 我还不错，你呢?       turn 2  -> assistant
      - 我也不错.             turn 3  -> user
      - 那太好了.             turn 4  -> assistant

Each conversation is a chain where every line answers the one before, so turns alternate user /
assistant starting with the user; a last, unanswered user turn is dropped (every chat then ends with an
answer, which is what SFT learns and what ``finetune.py --generation_eval_samples`` compares).

Cleaning, measured on 1.3.3: exact duplicate conversations are dropped (the English ``tech_support.yml``
repeats 10 exchanges 1,050 times), and entries that are not a list of >= 2 non-empty strings are skipped
with a warning naming the file and entry (one in the English ``trivia.yml`` is a bare string). What is
left: zh 465 chats, en 898 chats (zh-TW 454; it translates the zh files, so mixing zh and zh-TW leaks
held-out content into training).

The held-out split is a fixed function of the conversation's *first user turn* (a salted hash, ~1 in
10), so it never moves with file order or language selection, and conversations that open with the same
question (common here: "What is AI?" has several answer chains) all land on the same side.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import yaml

from bilingual_glm.data.files import package_dir
from bilingual_glm.io import write_jsonl

logger = logging.getLogger(__name__)

# our language code -> the corpus's folder name
DIALOGUE_LANGUAGES: dict[str, str] = {"zh": "chinese", "en": "english", "zh-TW": "traditionalchinese"}
DEFAULT_LANGUAGES: tuple[str, ...] = ("zh", "en")
SPLITS: tuple[str, ...] = ("train", "validation")
VALIDATION_BUCKETS = 10  # 1 conversation opener in 10 is held out
_SPLIT_SALT = b"bilingual_glm/dialogues-v1"
_PACKAGE = "chatterbot_corpus"
FEATURES = datasets.Features(
    {
        "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        "lang": datasets.Value("string"),
        "topic": datasets.Value("string"),
    }
)


@dataclass(frozen=True)
class Dialogue:
    """One conversation: its turns (user first, alternating), language code and topic (the file's stem)."""

    turns: tuple[str, ...]
    lang: str
    topic: str

    def messages(self) -> list[dict[str, str]]:
        """The ``{"role", "content"}`` list the chat template renders; roles alternate from ``user``."""
        return [
            {"role": "user" if index % 2 == 0 else "assistant", "content": turn}
            for index, turn in enumerate(self.turns)
        ]


def corpus_dir() -> Path:
    """The installed corpus's ``data`` folder, found without importing the package (only files needed)."""
    return package_dir(_PACKAGE, "The chat corpus needs", distribution="chatterbot-corpus") / "data"


def parse_corpus_file(path: str | Path) -> list[tuple[str, ...]]:
    """The conversations of one ChatterBot YAML file, each cut to an even number of stripped turns.

    Raises:
        ValueError: naming the file, when it is missing, not valid YAML/UTF-8, has no ``conversations``
            list, or holds no conversation of >= 2 non-empty strings. A single malformed entry is skipped
            with a warning instead (the shipped corpus has one), so one typo does not lose a topic.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not valid UTF-8 (near byte offset {error.start})") from error
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from error
    conversations = document.get("conversations") if isinstance(document, dict) else None
    if not isinstance(conversations, list):
        raise ValueError(f"{path}: expected a YAML mapping with a 'conversations' list of lists of strings")
    kept: list[tuple[str, ...]] = []
    for index, entry in enumerate(conversations):
        turns = [turn.strip() for turn in entry if isinstance(turn, str)] if isinstance(entry, list) else []
        if not isinstance(entry, list) or len(turns) != len(entry) or len(turns) < 2 or not all(turns):
            logger.warning(
                "%s: conversation %d skipped: expected a list of >= 2 non-empty strings, got %.80r",
                path,
                index,
                entry,
            )
            continue
        kept.append(tuple(turns[: len(turns) // 2 * 2]))
    if not kept:
        raise ValueError(f"{path}: no conversation with >= 2 non-empty string turns")
    return kept


def is_validation_dialogue(first_turn: str) -> bool:
    """Fixed held-out membership from the opening user turn (see the module docstring)."""
    digest = hashlib.blake2b(first_turn.encode("utf-8"), digest_size=8, key=_SPLIT_SALT).digest()
    return int.from_bytes(digest, "big") % VALIDATION_BUCKETS == 0


def read_dialogues(lang: str, data_dir: str | Path | None = None) -> tuple[Dialogue, ...]:
    """Every distinct conversation of one language, files in sorted name order, file order within each.

    ``data_dir`` defaults to the installed corpus; a folder given here must hold ``<folder>/*.yml``
    with ``<folder>`` the corpus's name for ``lang`` (``chinese``, ``english``, ``traditionalchinese``).
    """
    if lang not in DIALOGUE_LANGUAGES:
        raise ValueError(f"languages: {lang!r} is not one of {tuple(DIALOGUE_LANGUAGES)}")
    return _read_dialogues(lang, str(Path(data_dir).resolve()) if data_dir is not None else None)


@functools.lru_cache(maxsize=8)
def _read_dialogues(lang: str, data_dir: str | None) -> tuple[Dialogue, ...]:
    """Parsed once per process and folder: both splits come from one read (and one warning per bad entry)."""
    folder = (Path(data_dir) if data_dir is not None else corpus_dir()) / DIALOGUE_LANGUAGES[lang]
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise ValueError(f"{folder}: no *.yml dialogue files for language {lang!r}")
    seen: set[tuple[str, ...]] = set()
    dialogues: list[Dialogue] = []
    for path in files:
        for turns in parse_corpus_file(path):
            if turns not in seen:
                seen.add(turns)
                dialogues.append(Dialogue(turns, lang, path.stem))
    return tuple(dialogues)


@functools.lru_cache(maxsize=8)
def _load(split: str, languages: tuple[str, ...], data_dir: str | None) -> datasets.Dataset:
    want_validation = split == "validation"
    rows: dict[str, list] = {"messages": [], "lang": [], "topic": []}
    for lang in languages:
        for dialogue in read_dialogues(lang, data_dir):
            if is_validation_dialogue(dialogue.turns[0]) == want_validation:
                rows["messages"].append(dialogue.messages())
                rows["lang"].append(dialogue.lang)
                rows["topic"].append(dialogue.topic)
    return datasets.Dataset.from_dict(rows, features=FEATURES)


def load_dialogues(
    split: str = "train",
    languages: Sequence[str] = DEFAULT_LANGUAGES,
    data_dir: str | Path | None = None,
) -> datasets.Dataset:
    """The chat corpus as a ``Dataset`` with columns ``messages`` (role/content list), ``lang``, ``topic``.

    Args:
        split: ``"train"`` or ``"validation"`` (the fixed ~10% of :func:`is_validation_dialogue`).
        languages: any of ``"zh"``, ``"en"``, ``"zh-TW"``; rows grouped in this order. Shuffle to train.
        data_dir: a corpus folder laid out like the package's ``data/`` (default: the installed one).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    languages = (languages,) if isinstance(languages, str) else tuple(languages)
    unknown = [lang for lang in languages if lang not in DIALOGUE_LANGUAGES]
    if unknown or not languages:
        raise ValueError(
            f"languages must be a non-empty subset of {tuple(DIALOGUE_LANGUAGES)}, got {languages!r}"
        )
    folder = None if data_dir is None else str(Path(data_dir).resolve())
    return _load(split, tuple(dict.fromkeys(languages)), folder)


def write_dialogue_jsonl(
    output_dir: str | Path,
    languages: Sequence[str] = DEFAULT_LANGUAGES,
    data_dir: str | Path | None = None,
) -> dict[str, Path]:
    """``train.jsonl`` and ``validation.jsonl`` in ``output_dir``, one ``{"messages", "lang", "topic"}`` per line.

    This is the file form ``finetune.py --task sft --train_file ... --validation_file ...`` reads; the
    extra columns are ignored there and let an evaluation report per language.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in SPLITS:
        paths[split] = output_dir / f"{split}.jsonl"
        write_jsonl(paths[split], load_dialogues(split, languages, data_dir))
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python -m bilingual_glm.corpora.dialogues --output_dir data/chat``: write the split as JSON Lines."""
    parser = argparse.ArgumentParser(description="Write the ChatterBot zh+en chats as SFT JSON Lines.")
    parser.add_argument("--output_dir", required=True, help="Folder for train.jsonl and validation.jsonl.")
    parser.add_argument(
        "--languages",
        nargs="+",
        default=list(DEFAULT_LANGUAGES),
        help=f"Any of {tuple(DIALOGUE_LANGUAGES)} (default: zh en).",
    )
    parser.add_argument("--data_dir", default=None, help="Corpus folder (default: the installed package).")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    try:
        paths = write_dialogue_jsonl(args.output_dir, args.languages, args.data_dir)
    except ValueError as error:
        print(f"dialogues: error: {error}", file=sys.stderr)
        return 2
    for path in paths.values():
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        counts = {lang: sum(row["lang"] == lang for row in rows) for lang in args.languages}
        print(f"{path}: {len(rows)} chats {counts}")
    return 0


__all__ = [
    "DEFAULT_LANGUAGES",
    "DIALOGUE_LANGUAGES",
    "Dialogue",
    "corpus_dir",
    "is_validation_dialogue",
    "load_dialogues",
    "parse_corpus_file",
    "read_dialogues",
    "write_dialogue_jsonl",
]


if __name__ == "__main__":
    sys.exit(main())
