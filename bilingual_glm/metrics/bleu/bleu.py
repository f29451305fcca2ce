"""Corpus BLEU with CJK characters as tokens (a local ``evaluate`` module, no Hub, no ``sacrebleu``).

Whitespace tokenization (the Hub ``bleu`` default) treats a whole Chinese sentence as one "word". Here,
as in sacreBLEU's ``zh`` tokenizer, each CJK character (Han, kana) is a token, words of other scripts are
tokens, and every punctuation mark is a token of its own::

    "我爱北京, Paris!"  ->  我 | 爱 | 北 | 京 | , | paris | !

BLEU (Papineni et al. 2002), corpus level: clipped n-gram counts (n = 1..max_order) summed over all
sentences, the geometric mean of the n-gram precisions, times the brevity penalty
``BP = exp(1 - r/c)`` when the total prediction length ``c`` is below the total reference length ``r``
(per sentence, the reference closest in length; ties to the shorter). ``smooth=True`` adds one to the
numerator and the denominator of every precision (Lin & Och 2004). Text is lower-cased unless
``lowercase=False``.

    >>> from bilingual_glm.metrics import load_metric
    >>> load_metric("bleu").compute(predictions=["我爱北京天安门"], references=[["我爱北京天安门"]])["bleu"]
    1.0

Output keys match the Hub ``bleu``: bleu, precisions, brevity_penalty, length_ratio,
translation_length, reference_length. Self-contained (``datasets`` + ``evaluate`` only).
"""

import math
import re
from collections import Counter

import datasets
import evaluate

_CJK = "[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]"
_TOKEN = re.compile(rf"{_CJK}|(?:(?!{_CJK})[^\W_])+|[^\w\s]|_")

_INPUTS = """
Args:
    predictions (`list[str]`): generated texts.
    references (`list[list[str]]` or `list[str]`): one or more references per prediction.
    max_order (`int`, defaults to 4): longest n-gram.
    smooth (`bool`, defaults to False): add-one smoothing of the n-gram precisions.
    lowercase (`bool`, defaults to True): compare lower-cased text.
Returns:
    bleu (`float`), precisions (`list[float]`), brevity_penalty, length_ratio (`float`),
    translation_length, reference_length (`int`).
"""


def tokenize(text: str, lowercase: bool = True) -> list[str]:
    return _TOKEN.findall(text.lower() if lowercase else text)


def ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(predictions, references, max_order=4, smooth=False, lowercase=True) -> dict:
    matches, possible = [0] * max_order, [0] * max_order
    prediction_length = reference_length = 0
    for prediction, refs in zip(predictions, references, strict=True):
        refs = [refs] if isinstance(refs, str) else refs
        predicted = tokenize(prediction, lowercase)
        tokenized_refs = [tokenize(ref, lowercase) for ref in refs]
        prediction_length += len(predicted)
        reference_length += min((abs(len(r) - len(predicted)), len(r)) for r in tokenized_refs)[1]
        for n in range(1, max_order + 1):
            max_ref_counts: Counter = Counter()
            for ref in tokenized_refs:
                max_ref_counts |= ngrams(ref, n)  # per n-gram, the max count over the references
            predicted_counts = ngrams(predicted, n)
            matches[n - 1] += sum((predicted_counts & max_ref_counts).values())
            possible[n - 1] += max(len(predicted) - n + 1, 0)
    if smooth:
        precisions = [(m + 1.0) / (p + 1.0) for m, p in zip(matches, possible, strict=True)]
    else:
        precisions = [m / p if p else 0.0 for m, p in zip(matches, possible, strict=True)]
    geometric_mean = (
        math.exp(sum(math.log(p) for p in precisions) / max_order) if min(precisions) > 0 else 0.0
    )
    ratio = prediction_length / reference_length if reference_length else 0.0
    brevity_penalty = 1.0 if ratio > 1.0 else (math.exp(1 - 1 / ratio) if ratio > 0 else 0.0)
    return {
        "bleu": geometric_mean * brevity_penalty,
        "precisions": precisions,
        "brevity_penalty": brevity_penalty,
        "length_ratio": ratio,
        "translation_length": prediction_length,
        "reference_length": reference_length,
    }


class Bleu(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Corpus BLEU with CJK characters as tokens (sacreBLEU-zh style tokenization).",
            citation="Papineni et al., BLEU: a Method for Automatic Evaluation of Machine Translation, 2002.",
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

    def _compute(self, predictions, references, max_order=4, smooth=False, lowercase=True):
        return corpus_bleu(predictions, references, max_order=max_order, smooth=smooth, lowercase=lowercase)
