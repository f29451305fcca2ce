"""What a run reports while it trains: ``log.jsonl`` (one JSON object per record, both scripts), the same
numbers to the Accelerate trackers asked for (``--report_to``: tensorboard, trackio, wandb, ...), the
window of steps a train.py record averages over, and ``loss.png`` at the end."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from numbers import Number
from pathlib import Path
from typing import Any

from bilingual_glm.io import write_jsonl


class RunLog:
    """``log.jsonl`` and the records in memory (for the loss plot); numbers also go to the trackers.

    Only the writer (the main process) writes. ``resume_step`` None starts a fresh file; a step keeps the
    records up to it and drops the later ones: a resumed run trains (and logs) those steps again.
    """

    def __init__(self, path: Path, writer: bool, resume_step: int | None = None, accelerator: Any = None):
        self.path, self.writer, self.history = path, writer, []
        self.accelerator = accelerator  # with trackers: each record's numbers go to accelerator.log too
        if not writer:
            return
        if resume_step is None:
            path.unlink(missing_ok=True)
        elif path.exists():
            records = [
                json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
            ]
            self.history = [record for record in records if record.get("step", 0) <= resume_step]
            write_jsonl(path, self.history)

    def append(self, record: dict[str, Any]) -> None:
        if not record:
            return
        if self.accelerator is not None and self.accelerator.trackers:
            numbers = {k: v for k, v in record.items() if isinstance(v, Number) and k != "step"}
            self.accelerator.log(numbers, step=record.get("step"))
        if self.writer:
            self.history.append(record)
            with self.path.open("a", encoding="utf-8") as log:
                log.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")


@dataclass
class StepResult:
    """One optimizer step: its mean loss over the micro-batches, tokens trained, the objective drawn."""

    loss: float
    tokens: int
    objective: str


class LogWindow:
    """Steps since the last log record: their mean loss and tokens/s become the next record."""

    def __init__(self, every: int, num_processes: int = 1) -> None:
        self.every, self.num_processes = every, num_processes
        self._reset()

    def _reset(self) -> None:
        self.loss, self.count, self.tokens, self.start = 0.0, 0, 0, time.perf_counter()

    def add(self, result: StepResult, clock: Any, lr: float) -> dict[str, Any]:
        """Count one step; every ``every`` steps (and at the last one) return the record and start anew."""
        self.loss, self.count, self.tokens = (
            self.loss + result.loss,
            self.count + 1,
            self.tokens + result.tokens,
        )
        if clock.step % self.every and not clock.done():
            return {}
        record = {
            "step": clock.step,
            "loss": self.loss / self.count,
            "lr": lr,
            "tokens_per_second": self.tokens * self.num_processes / (time.perf_counter() - self.start),
            "objective": result.objective,
            "rss_mb": rss_mb(),
            "train_minutes": round(clock.seconds / 60, 3),
        }
        self._reset()
        return record


class ExpertLoad:
    """Share of routed tokens each expert of each MoE layer received (``expert_load`` in ``log.jsonl``): over
    the logging window in step records, over the whole run (this process's batches) in the final one.

    A router collapsing onto a few experts shows here long before it shows in the loss; the loss-free bias
    update (``router_bias_update_rate``) should keep every share near ``1 / n_routed_experts``.
    """

    def __init__(self) -> None:
        self.window: dict[int, list[float]] = {}
        self.total: dict[int, list[float]] = {}

    def add(self, loads: dict[int, list[float]]) -> None:
        """One optimizer step's token counts, ``{layer index: [tokens per expert]}``."""
        for tally in (self.window, self.total):
            for layer, counts in loads.items():
                tally[layer] = [
                    a + b for a, b in zip(tally.get(layer, [0.0] * len(counts)), counts, strict=True)
                ]

    def take_window(self) -> dict[str, list[float]]:
        shares, self.window = self.shares(self.window), {}
        return shares

    def run_total(self) -> dict[str, list[float]]:
        return self.shares(self.total)

    @staticmethod
    def shares(tally: dict[int, list[float]]) -> dict[str, list[float]]:
        return {
            str(layer): [round(c / (sum(counts) or 1.0), 4) for c in counts]
            for layer, counts in tally.items()
        }


def rss_mb() -> float:
    """Current resident memory of this process (the soak test watches it stay flat)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def plot_loss(history: list[dict[str, Any]], path: Path) -> None:
    """``loss.png``: the train loss records against their step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["step"], r["loss"]) for r in history if "loss" in r]
    figure, axis = plt.subplots(figsize=(6, 4))
    if points:
        axis.plot(*zip(*points, strict=True), label="train loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(f"training loss ({path.parent.name})")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
