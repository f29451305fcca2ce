"""Which checkpoint folder a run resumes from (``--resume_from_checkpoint`` of train.py and finetune.py)."""

from __future__ import annotations

import re
from pathlib import Path


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
