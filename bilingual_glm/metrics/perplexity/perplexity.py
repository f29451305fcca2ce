"""Perplexity from per-token negative log-likelihoods (a local ``evaluate`` module, no model download).

The Hub's ``perplexity`` metric downloads a model and scores texts with it. This one takes the numbers a
training loop already has: for each sequence, the natural-log NLL of every supervised token::

    >>> from bilingual_glm.metrics import load_metric
    >>> import math
    >>> result = load_metric("perplexity").compute(predictions=[[math.log(2)] * 3, [math.log(8)]])
    >>> round(result["perplexity"], 6), round(result["mean_perplexity"], 6)
    (2.828427, 5.0)

- ``perplexity``: corpus level, ``exp(total NLL / total tokens)`` (every token weighs the same).
- ``mean_perplexity``: the mean of the per-sequence perplexities (every sequence weighs the same).
- ``perplexities``: one per non-empty sequence. Empty sequences are skipped.

Self-contained (``datasets`` + ``evaluate`` only).
"""

import math

import datasets
import evaluate

_INPUTS = """
Args:
    predictions (`list[list[float]]`): per sequence, the NLL (natural log) of each scored token.
Returns:
    perplexity (`float`): exp(sum of all NLLs / number of tokens); nan when there are no tokens.
    mean_perplexity (`float`): mean over sequences of exp(mean NLL of the sequence).
    perplexities (`list[float]`): per non-empty sequence.
    num_tokens (`int`): tokens scored.
"""


class Perplexity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Perplexity = exp(mean token negative log-likelihood), from precomputed NLLs.",
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, predictions):
        sequences = [list(map(float, nll)) for nll in predictions if len(nll)]
        num_tokens = sum(len(nll) for nll in sequences)
        if not num_tokens:
            return {
                "perplexity": float("nan"),
                "mean_perplexity": float("nan"),
                "perplexities": [],
                "num_tokens": 0,
            }
        perplexities = [math.exp(sum(nll) / len(nll)) for nll in sequences]
        return {
            "perplexity": math.exp(sum(sum(nll) for nll in sequences) / num_tokens),
            "mean_perplexity": sum(perplexities) / len(perplexities),
            "perplexities": perplexities,
            "num_tokens": num_tokens,
        }
