"""Held-out perplexity (during and after training) and the samples printed at the end of a run."""

from __future__ import annotations

import math
from typing import Any

import datasets
import torch

from bilingual_glm import distributed
from bilingual_glm.data import CausalCollator
from bilingual_glm.data.blank_infilling import IGNORE_INDEX
from bilingual_glm.infill import infill

SAMPLE_PROMPTS = ("中国人民", "To be, or not to be")
SAMPLE_BLANK = "新华社北京一月一日电，[MASK]发表了新年讲话。"


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: datasets.Dataset, batch_size: int, accelerator: Any) -> float:
    """exp(mean next-token loss) with plain causal attention and per-document positions."""
    model.eval()
    collate = CausalCollator()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = collate([blocks[i] for i in range(start, min(start + batch_size, len(blocks)))])
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        with accelerator.autocast():
            loss = model(**batch, return_logits=False, use_cache=False).loss
        n = int(batch["shift_labels"].ne(IGNORE_INDEX).sum())  # every position but each block's last
        total, count = total + loss.item() * n, count + n
    model.train()
    return math.exp(total / max(count, 1))


def evaluate(model: Any, eval_sets: dict[str, Any], args: Any, accelerator: Any) -> dict[str, float]:
    """Held-out perplexity per language, on the main process (others wait; all ranks when sharded)."""
    metrics = {}
    if accelerator.is_main_process or distributed.params_sharded(accelerator):  # sharded: all ranks forward
        unwrapped = accelerator.unwrap_model(model)
        for lang, blocks in eval_sets.items():
            metrics[f"eval_ppl_{lang}"] = perplexity(
                unwrapped, blocks, args.per_device_train_batch_size, accelerator
            )
    accelerator.wait_for_everyone()
    return metrics


def print_samples(model: Any, tokenizer: Any, max_new_tokens: int, accelerator: Any) -> None:
    """Greedy continuations in both languages and one blank filled, to eyeball what was learned."""
    model.eval()
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(accelerator.device)
        with torch.no_grad(), accelerator.autocast():
            output = model.generate(
                **ids, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.2
            )
        accelerator.print(f"sample: {tokenizer.decode(output[0], skip_special_tokens=True)!r}")
    with accelerator.autocast():
        _, spans = infill(model, tokenizer, SAMPLE_BLANK, max_new_tokens=16, return_spans=True)
    accelerator.print(f"infill: {SAMPLE_BLANK!r} -> {spans!r}")
