"""Where a run stands against its budget, and the lr schedule that reads its progress from there."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

# Training minutes when neither --max_steps nor --max_train_minutes is given: with data preparation,
# evaluation and samples the whole run stays under 10 minutes on a 2-core CPU, bf16 or not.
DEFAULT_TRAIN_MINUTES = 7.0
WARMUP_SHARE = 0.05  # default warmup: the first 5% of the steps or of the time budget


class TrainingClock:
    """Where a run stands (optimizer steps, training seconds) against ``--max_steps``/``--max_train_minutes``.

    The lr schedule (linear warmup, cosine to zero) reads its progress from here: the share of steps or
    of the time budget used, whichever is larger. So a slow machine walks the whole schedule in fewer
    steps instead of being cut off mid-way. Seconds go into every checkpoint, so a resumed run spends the
    rest of the same budget. With several processes every rank takes the slowest rank's seconds: all
    agree on the lr and on when to stop.
    """

    def __init__(
        self, max_steps: int | None, max_minutes: float | None, warmup_steps: int | None, accelerator: Any
    ) -> None:
        if max_steps is None and max_minutes is None:
            max_minutes = DEFAULT_TRAIN_MINUTES
        if max_steps is not None and max_steps <= 0:
            raise ValueError(f"--max_steps must be > 0, got {max_steps}")
        if max_minutes is not None and not max_minutes > 0:
            raise ValueError(f"--max_train_minutes must be > 0, got {max_minutes}")
        if warmup_steps is not None and warmup_steps < 0:
            raise ValueError(f"--warmup_steps must be >= 0, got {warmup_steps}")
        self.max_steps, self.max_minutes = max_steps, max_minutes
        self.budget = None if max_minutes is None else max_minutes * 60.0
        if warmup_steps is None and self.budget is None:
            # 5% of the steps, at least one; a one-step run has no room for warmup: its step takes the peak lr
            warmup_steps = max(1, max_steps // 20) if max_steps > 1 else 0
        self.warmup_steps = warmup_steps  # None: the first 5% of the time budget
        self.accelerator = accelerator
        self.step, self.seconds, self._since = 0, 0.0, time.perf_counter()

    def start(self, step: int = 0, seconds: float = 0.0) -> None:
        """Start counting (or go on from a checkpoint's step and seconds) now."""
        self.step, self.seconds, self._since = step, seconds, time.perf_counter()

    def tick(self) -> None:
        """One optimizer step done: count it and the time since the last tick (agreed across ranks)."""
        now = time.perf_counter()
        elapsed = torch.tensor([self.seconds + now - self._since], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            elapsed = self.accelerator.gather(elapsed).max()
        self.step, self.seconds, self._since = self.step + 1, float(elapsed), now

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (a checkpoint, a held-out evaluation) is not training: it neither uses up the
        budget nor moves the lr, so scoring a run along the way does not change what it learns per minute."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._since += time.perf_counter() - start

    def progress(self) -> float:
        """Share of the budget used, 0..1: steps or seconds, whichever is further along."""
        by_steps = self.step / self.max_steps if self.max_steps else 0.0
        by_time = self.seconds / self.budget if self.budget else 0.0
        return min(1.0, max(by_steps, by_time))

    def done(self) -> bool:
        return self.progress() >= 1.0

    def lr_factor(self, _scheduler_step: int = 0) -> float:
        """Multiplier of the peak lr for the next step (LambdaLR's callback; its own count is ignored).

        Steps only: transformers' ``get_cosine_schedule_with_warmup``, the same values (a warmup as long
        as the run or longer just keeps ramping, as there). With a time budget the cosine runs over the
        elapsed share of it, after a warmup of ``warmup_steps`` steps or of the budget's first 5%.
        """
        if self.budget is None:
            if self.step < self.warmup_steps:
                return self.step / self.warmup_steps
            decayed = (self.step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, decayed))))
        progress = self.progress()
        if self.warmup_steps is not None:
            if self.step < self.warmup_steps:
                return self.step / self.warmup_steps
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if progress < WARMUP_SHARE:
            return progress / WARMUP_SHARE
        return 0.5 * (1.0 + math.cos(math.pi * (progress - WARMUP_SHARE) / (1.0 - WARMUP_SHARE)))

    def summary(self) -> dict[str, Any]:
        return {"steps_taken": self.step, "train_minutes": round(self.seconds / 60, 3)}
