"""Checkpoints: written whole (a temp folder, then one rename), found again (``latest``), resumed exactly.

``--resume_from_checkpoint`` of train.py and finetune.py both go through ``find_checkpoint``; train.py's
checkpoints are ``accelerator.save_state`` folders plus ``training_state.json`` (``Progress``), written last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bilingual_glm.io import write_json_atomic

TRAINING_STATE = "training_state.json"


def find_checkpoint(output_dir: Path, spec: str, marker: str) -> Path:
    """``spec`` is a checkpoint folder, or ``latest``: the highest ``checkpoint-N`` in ``output_dir``.

    Only folders holding ``marker`` count: it is the file their writer saves last (train.py's
    ``training_state.json``, Trainer's ``trainer_state.json``), so a save cut short never qualifies.
    """
    if spec != "latest":
        path = Path(spec)
        if not (path / marker).is_file():
            raise ValueError(
                f"--resume_from_checkpoint: {path} is not a complete checkpoint folder (no {marker})"
            )
        return path
    complete = [
        path
        for path in Path(output_dir).glob("checkpoint-*")
        if re.fullmatch(r"checkpoint-\d+", path.name) and (path / marker).is_file()
    ]
    if not complete:
        raise ValueError(f"--resume_from_checkpoint latest: no complete checkpoint-* in {output_dir}")
    return max(complete, key=lambda path: int(path.name.split("-")[1]))


@dataclass
class Progress:
    """Optimizer steps done, micro-batches drawn (more than steps x accumulation after skipped batches)
    and training seconds spent: what a checkpoint stores and a resumed run goes on from."""

    step: int = 0
    micro_batches: int = 0
    seconds: float = 0.0


def save_checkpoint(accelerator: Any, output_dir: Path, progress: Progress, keep: int | None = None) -> Path:
    """``save_state`` into a temp folder, then one rename: ``latest`` never sees half a checkpoint.

    Collective: every rank calls it. ``keep`` rotates out the oldest complete ones, after the new one is in.
    """
    final = output_dir / f"checkpoint-{progress.step}"
    tmp = output_dir / f".tmp-checkpoint-{progress.step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {
            "step": progress.step,
            "micro_batches": progress.micro_batches,
            "train_seconds": progress.seconds,
        }
        write_json_atomic(tmp / TRAINING_STATE, state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep:
            complete = sorted(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
            for old in complete[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def restore_progress(accelerator: Any, checkpoint: Path | None) -> Progress:
    """A fresh run's zeros, or the checkpoint's state (weights, optimizer, schedule, RNG) and counters.

    After ``accelerator.prepare``: ``load_state`` fills the prepared objects.
    """
    if checkpoint is None:
        return Progress()
    accelerator.load_state(str(checkpoint))
    state = json.loads((checkpoint / TRAINING_STATE).read_text())
    return Progress(state["step"], state["micro_batches"], state.get("train_seconds", 0.0))
