"""Bag-of-characters baselines for the sentiment corpus, on exactly the split finetune.py uses.

    python scripts/experiments/sentiment_baseline.py                    # train on train, report validation + test
    python scripts/experiments/sentiment_baseline.py --train_on train+validation
    python scripts/experiments/sentiment_baseline.py --output results.json

Two scikit-learn models over characters (Chinese has no spaces, so characters are the natural unit):

- ``tfidf_logreg``: TF-IDF of character 1-3-grams (sublinear tf) + LogisticRegression (C=``--C``).
- ``char_naive_bayes``: character 1-2-gram counts + multinomial naive Bayes (alpha=1).

The split is ``bilingual_glm.corpora.sentiment.sentiment_splits()``: deduplicated, conflicting texts dropped,
shuffled with ``random.Random(0)``, 1,736 test texts. Prints one JSON object (accuracy and macro-F1 per model and split).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.naive_bayes import MultinomialNB
from sklearn.pipeline import make_pipeline

from bilingual_glm.corpora.sentiment import read_sentiment_corpus, sentiment_splits


def build_models(c: float) -> dict:
    return {
        "tfidf_logreg": make_pipeline(
            TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, min_df=2),
            LogisticRegression(C=c, max_iter=2000),
        ),
        "char_naive_bayes": make_pipeline(
            CountVectorizer(analyzer="char", ngram_range=(1, 2)), MultinomialNB(alpha=1.0)
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_on", choices=["train", "train+validation"], default="train")
    parser.add_argument(
        "--C", type=float, default=10.0, help="Inverse regularisation of the logistic regression."
    )
    parser.add_argument("--output", type=Path, default=None, help="Also write the results as JSON here.")
    args = parser.parse_args(argv)

    splits = sentiment_splits()
    train_texts, train_labels = list(splits["train"]["text"]), list(splits["train"]["label"])
    if args.train_on == "train+validation":
        train_texts += splits["validation"]["text"]
        train_labels += splits["validation"]["label"]
    stats = read_sentiment_corpus()[2]
    results: dict = {
        "corpus": vars(stats),
        "sizes": {"train": len(train_texts), **{k: len(v) for k, v in splits.items() if k != "train"}},
        "train_on": args.train_on,
    }
    for name, model in build_models(args.C).items():
        start = time.perf_counter()
        model.fit(train_texts, train_labels)
        scores = {"fit_seconds": round(time.perf_counter() - start, 2)}
        for split in ("validation", "test"):
            predicted = model.predict(splits[split]["text"])
            gold = splits[split]["label"]
            scores[f"{split}_accuracy"] = round(float(accuracy_score(gold, predicted)), 4)
            scores[f"{split}_macro_f1"] = round(float(f1_score(gold, predicted, average="macro")), 4)
        results[name] = scores
    text = json.dumps(results, indent=2, ensure_ascii=False)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
