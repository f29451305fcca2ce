"""Average the class log-probabilities of several cloze finetunes (and, optionally, the TF-IDF baseline).

    python scripts/experiments/sentiment_ensemble.py runs/cloze-a runs/cloze-b              # two cloze finetunes
    python scripts/experiments/sentiment_ensemble.py runs/cloze-a --tfidf --output ens.json  # + char TF-IDF/logreg
    python scripts/experiments/sentiment_ensemble.py runs/cloze-* --tfidf --stack            # + weights fit on validation

Why: single finetunes of a 7M-parameter model differ by about a point from seed to seed and pattern to
pattern (test SE ≈ 0.9 points on 1,736 texts), and their errors are partly independent, so averaging
is the cheapest way to buy accuracy after training. Each folder is a ``finetune.py --task cloze`` output:
its ``run_config.json`` says which pattern, answers and ``--max_length`` it was trained with, and it is
scored with exactly those. ``--tfidf`` adds ``scripts/experiments/sentiment_baseline.py``'s TF-IDF + logistic
regression (fit on the train split) as one more member: a bag-of-characters model whose errors differ
most from the GLM's.

Members are weighted equally; the split is ``sentiment_splits()`` (the one finetune.py uses). Prints one
JSON object: accuracy and macro-F1 of every member and of the average, on validation and test.

``--stack`` also fits the members' weights instead of taking them equal: a logistic regression over the
members' log-probabilities, fit on the validation split (which no member trained on), applied once to
test. Equal weights are wrong when one member is much better or its scores have another scale (TF-IDF's
calibrated probabilities against a finetune's sharp ones). Its validation figure is 5-fold
cross-validated on validation, so it is not read off the rows it was fit on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from transformers import AutoModelForCausalLM, AutoTokenizer

from bilingual_glm.corpora.sentiment import sentiment_splits
from bilingual_glm.data.cloze import ClozeClassifier
from bilingual_glm.io import write_json_atomic
from bilingual_glm.modeling.kernels_bilingual_glm import fast_bf16

SPLITS = ("validation", "test")


def read_cloze_setup(folder: Path) -> dict:
    """The pattern, answers and max length a cloze finetune was trained with, from its run_config.json."""
    path = folder / "run_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; expected a `finetune.py --task cloze` output folder")
    config = json.loads(path.read_text(encoding="utf-8"))
    if "cloze" not in config:
        raise ValueError(f"{path}: no 'cloze' entry; expected a `finetune.py --task cloze` output folder")
    return {**config["cloze"], "max_length": config["finetune"]["max_length"]}


def cloze_log_probs(folder: Path, texts: list[str], batch_size: int) -> torch.Tensor:
    """``[N, C]`` class log-probabilities of one cloze finetune, scored as finetune.py scores it."""
    setup = read_cloze_setup(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    try:
        classifier = ClozeClassifier.from_setup(
            model, tokenizer, setup, max_length=setup["max_length"], pad_to_multiple_of=16
        )
    except ValueError as error:
        raise ValueError(f"{folder}: {error}") from None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast_bf16(torch.device("cpu"))):
        return classifier.log_probs(texts, batch_size)


def tfidf_log_probs(splits) -> dict[str, torch.Tensor]:
    """The TF-IDF + logistic-regression baseline, fit on train: ``{split: [N, C] log-probabilities}``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sentiment_baseline import build_models  # the baseline's own pipeline, not a copy

    model = build_models(10.0)["tfidf_logreg"]
    model.fit(list(splits["train"]["text"]), list(splits["train"]["label"]))
    return {split: torch.tensor(model.predict_log_proba(list(splits[split]["text"]))) for split in SPLITS}


def stacked_log_probs(
    validation: list[torch.Tensor], test: list[torch.Tensor], gold: torch.Tensor, folds: int = 5
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Members' ``[N, C]`` log-probs → (cross-validated validation log-probs, test log-probs, weights).

    The features are every member's log-probabilities side by side; the weights returned are the fitted
    coefficients' norm per member (how much each one counts), for the log.
    """
    features = torch.cat(validation, dim=-1).numpy()  # [N_val, members * C]
    stacker = LogisticRegression(C=1.0, max_iter=2000)
    smallest = int(torch.bincount(gold).min())
    if smallest < 2:
        raise ValueError(
            f"--stack: every class needs >= 2 validation texts to fit weights, the rarest has {smallest}"
        )
    folds = min(folds, smallest)
    splitter = StratifiedKFold(folds, shuffle=True, random_state=0)
    cross_validated = cross_val_predict(
        stacker, features, gold.numpy(), cv=splitter, method="predict_log_proba"
    )
    stacker.fit(features, gold.numpy())
    test_log_probs = stacker.predict_log_proba(torch.cat(test, dim=-1).numpy())
    per_member = stacker.coef_.reshape(stacker.coef_.shape[0], len(validation), -1)  # [classes', members, C]
    weights = [round(float(w), 4) for w in torch.tensor(per_member).norm(dim=(0, 2))]
    return torch.tensor(cross_validated), torch.tensor(test_log_probs), weights


def score(log_probs: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
    predicted = log_probs.argmax(-1)
    return {
        "accuracy": round((predicted == gold).float().mean().item(), 4),
        "macro_f1": round(float(f1_score(gold.numpy(), predicted.numpy(), average="macro")), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="finetune.py --task cloze output folders.")
    parser.add_argument("--tfidf", action="store_true", help="Add the TF-IDF + logreg baseline as a member.")
    parser.add_argument(
        "--stack",
        action="store_true",
        help="Also fit the members' weights on validation (logistic regression).",
    )
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument(
        "--max_samples", type=int, default=None, help="Score the first N texts of each split (quick checks)."
    )
    parser.add_argument("--output", type=Path, default=None, help="Also write the results as JSON here.")
    args = parser.parse_args(argv)

    splits = sentiment_splits()
    if args.max_samples is not None:
        splits = {
            name: split.select(range(min(args.max_samples, len(split)))) for name, split in splits.items()
        }
    members: dict[str, dict[str, torch.Tensor]] = {}
    for folder in args.folders:
        members[str(folder)] = {
            split: cloze_log_probs(folder, list(splits[split]["text"]), args.batch_size) for split in SPLITS
        }
    if args.tfidf:
        members["tfidf_logreg"] = tfidf_log_probs(splits)
    gold = {split: torch.tensor(splits[split]["label"]) for split in SPLITS}
    results: dict = {"members": {}, "ensemble": {}}
    for split in SPLITS:
        for name, log_probs in members.items():
            results["members"].setdefault(name, {})[split] = score(log_probs[split], gold[split])
        average = torch.stack([log_probs[split] for log_probs in members.values()]).mean(0)
        results["ensemble"][split] = score(average, gold[split])
    if args.stack:
        validation, test, weights = stacked_log_probs(
            [m["validation"] for m in members.values()],
            [m["test"] for m in members.values()],
            gold["validation"],
        )
        results["stacked"] = {
            "validation_cross_validated": score(validation, gold["validation"]),
            "test": score(test, gold["test"]),
            "weights": dict(zip(members, weights, strict=True)),
        }
    text = json.dumps(results, indent=2, ensure_ascii=False)
    print(text)
    if args.output is not None:
        write_json_atomic(args.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
