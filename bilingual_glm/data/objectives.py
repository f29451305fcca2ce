"""The pretraining objectives (clm, glm, mlm) and the collator that draws one per micro-batch.

"Objective" is what a batch is trained for: ``clm`` (packed causal LM, ``CausalCollator``), ``glm`` (blank
infilling, ``BlankInfillingCollator``, whose own token/sentence/document draw is its *span kind*) or ``mlm``
(``MlmCollator``). ``ObjectiveMixtureCollator`` is the DataLoader's ``collate_fn``: collation (span sampling,
masking, padding) runs in the loader's workers, overlapping the training step, and is still reproducible:

- micro-batch ``k`` (1-based, counted over the whole run) draws its objective from ``objective_seed(seed, k)``,
  the same on every rank, and masks with ``collator_seed(seed, k, rank)``: a function of ``k`` alone, so a
  resumed run draws exactly what the uninterrupted one would have;
- the collator knows ``k`` without being told per batch: ``start(k0)`` before iterating the loader, then a
  DataLoader hands batch ``i`` of the iteration to worker ``i % num_workers`` (map-style datasets, in order),
  so worker ``w``'s ``j``-th call is micro-batch ``k0 + w + j * num_workers`` (``k0 + j`` without workers).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

OBJECTIVES = ("clm", "glm", "mlm")
OBJECTIVE_SEED_STRIDE = 1_000_003  # a prime > any micro-batch count: (seed, micro-batch) pairs never collide
RANK_SEED_STRIDE = 1_009  # a prime > any process count: ranks of one micro-batch never share a seed


def parse_objectives(spec: str) -> dict[str, float]:
    """'glm' → {glm: 1}; 'clm:0.5,glm:0.5' → weights (``--objective``)."""
    weights = {}
    for part in spec.split(","):
        name, _, weight = part.strip().partition(":")
        if name not in OBJECTIVES:
            raise ValueError(f"--objective: {name!r} is not one of {OBJECTIVES} (spec {spec!r})")
        weights[name] = float(weight) if weight else 1.0
    if not sum(weights.values()) > 0:
        raise ValueError(f"--objective: weights must sum to > 0, got {spec!r}")
    return weights


def objective_seed(seed: int, micro_batch: int) -> int:
    """Seed of the objective draw for micro-batch ``micro_batch`` (1-based) of a ``--seed`` run.

    The same on every rank (all ranks train one objective per step), and a function of the micro-batch
    count alone, so a resumed run draws what the uninterrupted one would have.
    """
    return seed * OBJECTIVE_SEED_STRIDE + micro_batch


def collator_seed(seed: int, micro_batch: int, process_index: int) -> int:
    """Seed of the collator's masking for one micro-batch on one rank: different on every rank (each masks
    its own blocks), reproducible on resume like ``objective_seed``."""
    return seed * OBJECTIVE_SEED_STRIDE + micro_batch * RANK_SEED_STRIDE + process_index


class ObjectiveMixtureCollator:
    """``collate_fn`` drawing an objective per micro-batch and collating with that objective's collator.

    Returns the objective's batch plus ``"objective"`` (its name, for the log). See the module docstring
    for how a batch's micro-batch number (and so its seeds) is known inside a worker.
    """

    def __init__(
        self,
        collators: Mapping[str, Callable[[Sequence[Any]], dict[str, torch.Tensor]]],
        weights: Mapping[str, float],
        seed: int,
        process_index: int = 0,
    ) -> None:
        missing = set(weights) - set(collators)
        if missing:
            raise ValueError(f"objectives {sorted(missing)} have no collator")
        self.collators, self.weights = dict(collators), dict(weights)
        self.seed, self.process_index = seed, process_index
        self.start(1)

    def start(self, micro_batch: int) -> None:
        """The next batch the loader collates is micro-batch ``micro_batch``: call before iterating it."""
        self._first, self._calls = micro_batch, 0

    def micro_batch(self) -> int:
        """The number of the batch being collated now (see the module docstring)."""
        info = torch.utils.data.get_worker_info()
        offset = self._calls if info is None else info.id + self._calls * info.num_workers
        self._calls += 1
        return self._first + offset

    def draw(self, micro_batch: int) -> str:
        """The objective of micro-batch ``micro_batch``: the same on every rank, for any number of workers."""
        rng = random.Random(objective_seed(self.seed, micro_batch))
        return rng.choices(list(self.weights), weights=list(self.weights.values()))[0]

    def __call__(self, examples: Sequence[Any]) -> dict[str, Any]:
        micro_batch = self.micro_batch()
        objective = self.draw(micro_batch)
        collator = self.collators[objective]
        if hasattr(collator, "reseed"):
            collator.reseed(collator_seed(self.seed, micro_batch, self.process_index))
        return {**collator(examples), "objective": objective}
