"""Greedy single-turn answers from one or more model folders, side by side (the numbers in docs/chat.md).

    python scripts/experiments/chat_samples.py runs/chat-pretrain runs/chat-sft --message 你好吗? --message "Hello"

Each message is its own one-turn chat, rendered with the chat template; decoding is greedy and stops at
eos or a role token, exactly as app.py's chat tab does. Prints one JSON line per (model, message).
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import bilingual_glm  # noqa: F401  (registers model_type "bilingual_glm")

ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


@torch.no_grad()
def answer(model: torch.nn.Module, tokenizer, message: str, max_new_tokens: int) -> str:
    """One greedy answer to ``message`` as the only user turn."""
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    stops = [tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(list(ROLE_TOKENS))]
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="Model folders (train.py / finetune.py outputs).")
    parser.add_argument("--message", action="append", required=True, help="A user message (repeatable).")
    parser.add_argument("--max_new_tokens", type=int, default=40)
    args = parser.parse_args(argv)
    for path in args.models:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        for message in args.message:
            reply = answer(model, tokenizer, message, args.max_new_tokens)
            print(json.dumps({"model": path, "message": message, "answer": reply}, ensure_ascii=False))


if __name__ == "__main__":
    main()
