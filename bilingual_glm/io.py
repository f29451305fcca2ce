"""Every file and folder the package writes appears whole or not at all: written under a temporary name
beside its destination, then renamed (``os.replace`` is atomic within a filesystem). A crash, a full disk
or Ctrl-C leaves the old file, or nothing, never half a file that a later run would trust.

- ``write_text_atomic`` / ``write_json_atomic`` / ``write_jsonl``: one file.
- ``atomic_folder`` (+ ``check_destination``): a whole folder (converted checkpoints, weight soups).
- ``ShardWriter``: safetensors shards of a streamed conversion, renamed to HF names at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def write_text_atomic(path: Path, text: str) -> None:
    """``path`` gets ``text`` (UTF-8) whole or not at all: written to a hidden name beside it, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, payload: Any) -> None:
    """One indented JSON document (run configs, training states); values JSON lacks become strings."""
    write_text_atomic(path, json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """JSON Lines, one object per row, as the loaders here read them back."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _default_mode(mode: int) -> int:
    """``mode`` filtered by the process umask, as for a file or folder created normally."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def check_destination(dst: Path) -> None:
    """Refuse (before any work) a destination that exists and is not an empty folder."""
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists and is not an empty folder")


@contextlib.contextmanager
def atomic_folder(dst: Path) -> Iterator[Path]:
    """A hidden temporary folder next to ``dst``: renamed to ``dst`` when the block succeeds, removed on any
    error (or Ctrl-C), so ``dst`` never holds half a conversion. ``dst`` must pass ``check_destination``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.partial-"))
    os.chmod(tmp, _default_mode(0o777))  # mkdtemp makes it 0700
    try:
        yield tmp
        if dst.exists():
            dst.rmdir()  # empty, checked by check_destination
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ShardWriter:
    """Buffer tensors; write a safetensors shard whenever the next tensor would pass ``max_bytes``."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = self.total_size = 0
        self.shards: list[Path] = []
        self.weight_map: dict[str, int] = {}  # name -> shard number

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffered + nbytes > self.max_bytes:
            self.flush()
        self.buffer[name] = tensor.contiguous()
        self.buffered += nbytes
        self.total_size += nbytes
        self.weight_map[name] = len(self.shards)

    def flush(self) -> None:
        if self.buffer:
            path = self.folder / f".shard-{len(self.shards):05d}.safetensors.tmp"
            save_file(self.buffer, str(path), metadata={"format": "pt"})
            self.shards.append(path)
            self.buffer, self.buffered = {}, 0

    def finish(self) -> list[str]:
        """Rename shards to HF names (``model.safetensors`` or ``model-0000k-of-0000N``) and index them."""
        self.flush()
        count = len(self.shards)
        names = ["model.safetensors"] if count == 1 else [
            f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)
        ]  # fmt: skip
        for path, name in zip(self.shards, names, strict=True):
            os.chmod(path, _default_mode(0o666))  # safetensors writes 0600; make it like any new file
            os.replace(path, self.folder / name)
        if count > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {name: names[shard] for name, shard in sorted(self.weight_map.items())},
            }
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names
