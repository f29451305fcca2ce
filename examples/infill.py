"""Fill blanks with GLM blank infilling: every [MASK] (a span), [sMASK] (a sentence), [gMASK] (the rest).

    python examples/infill.py runs/train-mini
    python examples/infill.py runs/train-mini --text "北京是[MASK]的首都。Paris is the capital of [MASK]."

The text with its blanks is Part A (bidirectional); each blank's span is generated after ``<sop>`` at the
blank's position, left to right, each seeing the spans before it. Needs the ``bilingual_glm`` package
(``bilingual_glm.infill``); the model folder itself may come from anywhere.
"""

import argparse

from transformers import AutoModelForCausalLM, AutoTokenizer

from bilingual_glm.infill import infill


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="Model folder or Hub id.")
    parser.add_argument("--text", action="append", help="Text with blanks (repeatable).")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="Longest span per blank.")
    args = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).eval()
    texts = args.text or [
        "新华社北京一月一日电，[MASK]发表了新年讲话。",
        "To be, or not to be, that is the [MASK].",
    ]
    for text in texts:
        filled, spans = infill(model, tokenizer, text, max_new_tokens=args.max_new_tokens, return_spans=True)
        print(f"{text!r}\n  spans: {spans!r}\n  filled: {filled!r}")


if __name__ == "__main__":
    main()
