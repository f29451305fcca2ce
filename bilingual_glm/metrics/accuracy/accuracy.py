"""Accuracy: the share of predictions equal to their reference (a local ``evaluate`` module, no Hub).

    >>> from bilingual_glm.metrics import load_metric
    >>> load_metric("accuracy").compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'accuracy': 0.75}

Self-contained (imports only ``datasets`` and ``evaluate``), so the folder also works copied elsewhere:
``evaluate.load("path/to/accuracy")``.
"""

import datasets
import evaluate

_DESCRIPTION = "Accuracy = (number of predictions equal to their reference) / (number of predictions)."

_INPUTS = """
Args:
    predictions (`list[int]`): predicted class ids.
    references (`list[int]`): gold class ids, same length.
    normalize (`bool`, defaults to True): the share (True) or the count (False) of correct predictions.
    sample_weight (`list[float]`, optional): a weight per example.
Returns:
    accuracy (`float`, or `int` with normalize=False): 0.0 when there are no examples.
"""


class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        weights = [1.0] * len(predictions) if sample_weight is None else [float(w) for w in sample_weight]
        if len(weights) != len(predictions):
            raise ValueError(f"sample_weight has {len(weights)} values for {len(predictions)} predictions")
        correct = sum(w for p, r, w in zip(predictions, references, weights, strict=True) if p == r)
        if not normalize:
            return {"accuracy": correct if sample_weight is not None else int(correct)}
        total = sum(weights)
        return {"accuracy": float(correct / total) if total else 0.0}
