"""Labelled text for the classification and cloze tasks: local files, a ``datasets`` dataset, or the
sentiment corpus, normalised to ``text`` + integer ``label`` columns with the label names alongside."""

from __future__ import annotations

import logging

import datasets

from bilingual_glm.corpora.sentiment import SENTIMENT_LABELS, sentiment_splits
from bilingual_glm.data.files import ROW_SUFFIXES, hub_splits, read_file, require_columns

logger = logging.getLogger(__name__)


def _label_names(splits: dict[str, datasets.Dataset], label_column: str) -> list[str]:
    feature = splits["train"].features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values = sorted(
        {value for split in splits.values() for value in split[label_column] if value is not None}
    )
    return [str(value) for value in values]


def _read_splits(
    files: dict[str, str | None], dataset_name: str | None, dataset_config: str | None
) -> tuple[dict[str, datasets.Dataset], dict[str, str]]:
    """The raw splits, from the files when a train file is given, else from ``dataset_name``, and the name of
    each split's source for error messages."""
    if files["train"] is not None:
        splits = {split: read_file(path, ROW_SUFFIXES) for split, path in files.items() if path is not None}
        return splits, {split: str(path) for split, path in files.items() if path is not None}
    splits = hub_splits(dataset_name, dataset_config)
    if "train" not in splits:
        raise ValueError(f"--dataset_name {dataset_name}: no 'train' split (splits: {sorted(splits)})")
    return splits, {split: f"--dataset_name {dataset_name} [{split}]" for split in splits}


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
    files = {"train": train_file, "validation": validation_file, "test": test_file}
    splits, sources = _read_splits(files, dataset_name, dataset_config)
    for split, dataset in splits.items():
        require_columns(dataset, sources[split], {"text": text_column, "label": label_column})
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


__all__ = ["load_labeled_data"]
