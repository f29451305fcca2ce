"""ROUGE-L with CJK characters as tokens (a local ``evaluate`` module, no Hub, no ``rouge_score``).

``rouge_score``'s default tokenizer keeps only ``[a-z0-9]`` and so scores every Chinese text 0. Here each
CJK character (Han, kana) is a token of its own and other scripts are split into words::

    "我爱北京 Tian'anmen!"  ->  我 | 爱 | 北 | 京 | tian | anmen        (tokenizer="mixed", the default)
    "我爱北京 Tian'anmen!"  ->  我 | 爱 | 北 | 京 | t | i | a | n | ' | ... (tokenizer="char")

Text is lower-cased; "mixed" drops punctuation (as ``rouge_score`` does), "char" keeps every
non-space character. ROUGE-L of one pair: with ``L`` = length of the longest common subsequence,
``P = L/len(prediction)``, ``R = L/len(reference)``, ``F = 2PR/(P+R)``. With several references the
one with the best F counts. Scores are averaged over examples.

    >>> from bilingual_glm.metrics import load_metric
    >>> load_metric("rouge_l").compute(predictions=["我爱北京"], references=["我爱上海"])["rouge_l"]
    0.5

Self-contained (``datasets`` + ``evaluate`` only).
"""

import re

import datasets
import evaluate

_CJK = "[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]"
_MIXED = re.compile(rf"{_CJK}|(?:(?!{_CJK})[^\W_])+")
_CHAR = re.compile(r"\S")

_INPUTS = """
Args:
    predictions (`list[str]`): generated texts.
    references (`list[str]` or `list[list[str]]`): one reference, or several, per prediction.
    tokenizer (`str`, defaults to "mixed"): "mixed" (CJK characters + words of other scripts, no
        punctuation) or "char" (every non-space character).
Returns:
    rouge_l (`float`): mean F-measure; rouge_l_precision, rouge_l_recall (`float`): their means.
"""


def tokenize(text: str, tokenizer: str = "mixed") -> list[str]:
    if tokenizer not in ("mixed", "char"):
        raise ValueError(f"tokenizer must be 'mixed' or 'char', got {tokenizer!r}")
    return (_MIXED if tokenizer == "mixed" else _CHAR).findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence by dynamic programming, one row at a time."""
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_pair(prediction: list[str], reference: list[str]) -> tuple[float, float, float]:
    """(precision, recall, F) of one tokenized pair; 0 when either side is empty."""
    common = lcs_length(prediction, reference)
    if not common:
        return 0.0, 0.0, 0.0
    precision, recall = common / len(prediction), common / len(reference)
    return precision, recall, 2 * precision * recall / (precision + recall)


class RougeL(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="ROUGE-L (LCS F-measure) with CJK characters as tokens.",
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries, 2004.",
            inputs_description=_INPUTS,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string"),
                        "references": datasets.Sequence(datasets.Value("string")),
                    }
                ),
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
                ),
            ],
        )

    def _compute(self, predictions, references, tokenizer="mixed"):
        totals = [0.0, 0.0, 0.0]
        for prediction, refs in zip(predictions, references, strict=True):
            refs = [refs] if isinstance(refs, str) else refs
            predicted = tokenize(prediction, tokenizer)
            best = max(
                (rouge_l_pair(predicted, tokenize(ref, tokenizer)) for ref in refs), key=lambda s: s[2]
            )
            totals = [total + score for total, score in zip(totals, best, strict=True)]
        count = max(len(predictions), 1)
        precision, recall, f_measure = (total / count for total in totals)
        return {"rouge_l": f_measure, "rouge_l_precision": precision, "rouge_l_recall": recall}
