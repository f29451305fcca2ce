"""Local ``evaluate`` metric modules: they load from this folder, never from the Hub.

``evaluate.load("accuracy")`` downloads its script from the Hub; these are loaded by path instead, so
they work offline (``HF_HUB_OFFLINE=1``) and are pinned to this package's version::

    from bilingual_glm.metrics import load_metric
    load_metric("accuracy").compute(predictions=[1, 0], references=[1, 1])   # {'accuracy': 0.5}

| name         | inputs                                   | returns                                   |
|--------------|------------------------------------------|-------------------------------------------|
| `accuracy`   | class ids                                | `accuracy`                                |
| `macro_f1`   | class ids                                | `macro_f1` (mean of per-class F1)         |
| `perplexity` | per-sequence token NLLs (natural log)    | `perplexity` (token-weighted), `mean_perplexity` |
| `rouge_l`    | texts; CJK characters are tokens         | `rouge_l`, `rouge_l_precision/recall`     |
| `bleu`       | texts; CJK characters are tokens         | `bleu`, `precisions`, `brevity_penalty`, ... |

Each folder holds one self-contained script (``<name>/<name>.py``), so a folder copied anywhere also
loads with ``evaluate.load("path/to/<name>")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES: tuple[str, ...] = ("accuracy", "macro_f1", "perplexity", "rouge_l", "bleu")


def metric_path(name: str) -> Path:
    """Folder of the metric ``name``; ``ValueError`` naming the known ones for anything else."""
    if name not in METRIC_NAMES:
        raise ValueError(f"metric must be one of {METRIC_NAMES}, got {name!r}")
    return METRICS_DIR / name


def load_metric(name: str, **kwargs: Any) -> Any:
    """``evaluate.load`` of the local module ``name`` (kwargs go to ``evaluate.load``)."""
    import evaluate  # imported lazily: `evaluate` is an optional dependency ("finetune" extra)

    return evaluate.load(str(metric_path(name)), **kwargs)


__all__ = ["METRIC_NAMES", "METRICS_DIR", "load_metric", "metric_path"]
