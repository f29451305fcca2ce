"""Macro-F1: the unweighted mean of the per-class F1 scores (a local ``evaluate`` module, no Hub).

    >>> from bilingual_glm.metrics import load_metric
    >>> load_metric("macro_f1").compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'macro_f1': 0.7333333333333334}

Per class c: precision = TP/(TP+FP), recall = TP/(TP+FN), F1 = 2PR/(P+R) (0 where undefined, as
scikit-learn's ``zero_division=0``). Classes are the union of the labels seen in predictions and
references, or ``labels=[...]`` when given. Rewards a classifier that is good on every class, not just
on the majority one. Self-contained (``datasets`` + ``evaluate`` only).
"""

import datasets
import evaluate

_DESCRIPTION = "Macro-averaged F1: the mean over classes of each class's F1 score."

_INPUTS = """
Args:
    predictions (`list[int]`): predicted class ids.
    references (`list[int]`): gold class ids, same length.
    labels (`list[int]`, optional): the classes to average over (default: every class seen).
    return_per_class (`bool`, defaults to False): also return `per_class_f1` (a dict class -> F1).
Returns:
    macro_f1 (`float`): in [0, 1]; 0.0 when there are no classes.
"""


class MacroF1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, labels=None, return_per_class=False):
        classes = sorted(set(predictions) | set(references)) if labels is None else list(labels)
        per_class = {}
        for label in classes:
            tp = sum(1 for p, r in zip(predictions, references, strict=True) if p == label and r == label)
            predicted = sum(1 for p in predictions if p == label)
            actual = sum(1 for r in references if r == label)
            precision = tp / predicted if predicted else 0.0
            recall = tp / actual if actual else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            per_class[label] = f1
        result = {"macro_f1": float(sum(per_class.values()) / len(per_class)) if per_class else 0.0}
        if return_per_class:
            result["per_class_f1"] = per_class
        return result
