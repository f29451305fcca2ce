"""The resolved configuration each run writes to ``run_config.json``: what it depends on, with the values
actually used (modded-nanogpt logs its config and code version with every run)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import transformers

from bilingual_glm.io import write_json_atomic
from bilingual_glm.modeling.kernels_bilingual_glm import cpu_info


def environment(argv: list[str] | None = None) -> dict[str, Any]:
    """The machine and versions a run ran on, and its command line: the parts no argument records."""
    return {
        "cpu": cpu_info(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "argv": sys.argv if argv is None else argv,
    }


def write_run_config(output_dir: str | Path, run_config: dict[str, Any]) -> Path:
    """``output_dir/run_config.json``, written atomically (a crash never leaves half a file)."""
    path = Path(output_dir) / "run_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, run_config)
    return path
