"""Classify texts with a finetuned classification folder (probabilities per label, batched).

    python examples/classify.py runs/sentiment "房间很干净，服务也很热情。" "太差了，再也不来了。"
    cat reviews.txt | python examples/classify.py runs/sentiment -

The model classifies from the hidden state of each row's last real token, so padding may sit on either
side; labels come from the folder's ``config.id2label``.
"""

import argparse
import sys

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="Folder written by finetune.py --task classification (or Hub id).")
    parser.add_argument("texts", nargs="*", help="Texts to classify; '-' reads one per line from stdin.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=256)
    args = parser.parse_args(argv)

    texts = args.texts or ["房间很干净，服务也很热情。", "太差了，再也不来了。", "The room was lovely."]
    if texts == ["-"]:
        texts = [line.strip() for line in sys.stdin if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, trust_remote_code=True).eval()
    labels = model.config.id2label
    for start in range(0, len(texts), args.batch_size):
        batch = texts[start : start + args.batch_size]
        inputs = tokenizer(
            batch, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt"
        )
        with torch.no_grad():
            probabilities = model(**inputs).logits.softmax(-1)  # [B, num_labels]
        for text, row in zip(batch, probabilities, strict=True):
            best = int(row.argmax())
            scores = ", ".join(f"{labels[i]}={p:.3f}" for i, p in enumerate(row.tolist()))
            print(f"{labels[best]}\t{scores}\t{text}")


if __name__ == "__main__":
    main()
