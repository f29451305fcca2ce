"""Load a model folder (or Hub id) and continue a Chinese and an English prompt.

    python examples/generate.py runs/train-mini
    python examples/generate.py runs/train-mini --prompt "中国人民" --max_new_tokens 40 --sample

Works with or without the `bilingual_glm` package installed: the folder carries its code, hence
``trust_remote_code=True``. Batched prompts are left-padded (generation appends on the right).
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="Model folder or Hub id.")
    parser.add_argument("--prompt", action="append", help="Prompt (repeatable); default: one zh + one en.")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument(
        "--sample", action="store_true", help="Sample (top-p 0.9) instead of greedy decoding."
    )
    args = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).eval()
    prompts = args.prompt or ["中国人民", "To be, or not to be"]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.sample,
            top_p=0.9 if args.sample else None,
            repetition_penalty=1.2,
            pad_token_id=tokenizer.pad_token_id,
        )
    for prompt, row in zip(prompts, output, strict=True):
        continuation = tokenizer.decode(row[inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        print(f"{prompt!r} -> {continuation!r}")


if __name__ == "__main__":
    main()
