"""The model card (``README.md``) that ``finetune.py`` writes next to a finetuned model, and pushes with it.

``CardInfo`` is what the card says besides the results; ``write_model_card`` adds the metrics it finds in
the folder's ``eval_results.json``/``test_results.json`` and writes the card (YAML metadata for the Hub,
then results, a usage snippet that runs without this package, and the training settings).

The usage snippet is chosen by task and by whether the folder holds a whole model or only a LoRA adapter
(``classification_usage``, ``chat_usage``, ``cloze_usage``: each task picks its own). The cloze snippet builds GLM's cloze input by hand, reading the 2D positions of the
``<sop>`` slot from the model's own ``span_position_ids`` (the code shipped in the folder), so the card
cannot disagree with the layout the model was trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub import ModelCard, ModelCardData

# metric-name endings that go into the card's results table
CARD_METRICS = ("_accuracy", "_macro_f1", "_loss", "_perplexity", "_rouge_l", "_bleu")
REPO_PLACEHOLDER = "path/or/hub-id"


@dataclass
class CardInfo:
    """What the model card says besides the results (read from the *_results.json files)."""

    task: str
    pipeline_tag: str
    datasets: list[str]
    metrics: list[str]
    base_model: str | None
    adapter_only: bool
    usage: str
    training: dict[str, Any]


def write_model_card(folder: Path, card: CardInfo) -> None:
    """``folder/README.md``: Hub metadata, the folder's results, how to load it, how it was trained."""
    data = ModelCardData(
        language=["zh", "en"],
        library_name="peft" if card.adapter_only else "transformers",
        pipeline_tag=card.pipeline_tag,
        datasets=card.datasets,
        metrics=card.metrics,
        base_model=card.base_model,
        tags=["bilingual_glm", "glm", "custom_code", card.task]
        + (["lora"] if card.training.get("lora_r") else []),
    )
    ModelCard(f"---\n{data.to_yaml()}\n---\n{card_body(card, read_results(folder))}").save(
        folder / "README.md"
    )


def read_results(folder: Path) -> dict[str, Any]:
    """The card's metrics (``CARD_METRICS``) from ``eval_results.json`` and ``test_results.json``."""
    results = {}
    for split in ("eval", "test"):
        path = folder / f"{split}_results.json"
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            results.update({k: v for k, v in saved.items() if k.endswith(CARD_METRICS)})
    return results


def card_body(card: CardInfo, results: dict[str, Any]) -> str:
    """The card's Markdown below the metadata."""
    rows = "\n".join(
        f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items()
    )
    training = "\n".join(f"- {k}: {v}" for k, v in card.training.items() if v is not None)
    base = card.base_model or card.training.get("model_name_or_path")
    what = (
        "A LoRA adapter; its base model folder carries the model code, so load it with `trust_remote_code=True`."
        if card.adapter_only
        else "The model code ships in this folder: load it with `trust_remote_code=True`; the "
        "`bilingual_glm` package is not needed."
    )
    return f"""
# BilingualGlm — {card.task}

A GLM-style bilingual (Chinese/English) model finetuned with `finetune.py --task {card.task}`
(base model: {base}). {what}

## Results

| metric | value |
|---|---|
{rows or "| (not evaluated) | |"}

## Use

```python
{card.usage.strip()}
```

## Training

{training}
- transformers {transformers.__version__}, torch {torch.__version__}
"""


# ------------------------------------------------------------------------------------ usage snippets
_ADAPTER_CLASSIFIER = """from peft import AutoPeftModelForSequenceClassification
# loads the base model named in adapter_config.json, then this adapter (LoRA + the trained score head)
model = AutoPeftModelForSequenceClassification.from_pretrained(
    "{repo}", trust_remote_code=True, num_labels={num_labels}, id2label={id2label!r}
)"""
_ADAPTER_CAUSAL_LM = """from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)  # base model + this adapter"""
_CLASSIFIER = """from transformers import pipeline
classify = pipeline("text-classification", model="{repo}", trust_remote_code=True)
print(classify("房间很干净，服务也很热情。"))"""
_CHAT = """from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{repo}", trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)
inputs = tokenizer.apply_chat_template([{{"role": "user", "content": "你好"}}], add_generation_prompt=True,
                                       return_dict=True, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))"""
_CLOZE = """import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{repo}", trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True).eval()
span_position_ids = sys.modules[type(model).__module__].span_position_ids  # GLM's span layout, shipped code
# GLM cloze: Part A = the pattern with the text and one [MASK] (bidirectional), then <sop> at the mask's position
text, part_a, mask_at = "房间很干净，服务也很热情。", [], 0
for piece in {pieces!r}:
    if piece == "[MASK]":
        mask_at = len(part_a)
        part_a.append(model.config.mask_token_id)
    else:
        part_a += tokenizer(piece.format(text=text), add_special_tokens=False).input_ids
ids = torch.tensor([part_a + [model.config.sop_token_id]])
part_a_positions = torch.stack([torch.arange(len(part_a)), torch.zeros(len(part_a), dtype=torch.long)])[None]
positions = torch.cat([part_a_positions, span_position_ids(mask_at, 1, 1)], dim=-1)  # [1, 2, T]
with torch.no_grad():
    logits = model(ids, position_ids=positions, prefix_lengths=torch.tensor([len(part_a)])).logits[0, -1]
answers = {answers!r}  # one per label, in label-id order
# score = log-prob of each answer's first token (multi-token answers: add the log-probs of the rest)
print([logits.log_softmax(-1)[tokenizer(a, add_special_tokens=False).input_ids[0]].item() for a in answers])"""


def classification_usage(adapter_only: bool, labels: list[str] | None) -> str:
    """Python that loads a saved classifier (or its LoRA adapter) and classifies a text."""
    if adapter_only:
        id2label = dict(enumerate(labels or []))
        return _ADAPTER_CLASSIFIER.format(repo=REPO_PLACEHOLDER, num_labels=len(id2label), id2label=id2label)
    return _CLASSIFIER.format(repo=REPO_PLACEHOLDER)


def chat_usage(adapter_only: bool) -> str:
    """Python that loads a saved chat model (or its LoRA adapter) and answers a message."""
    return (
        _ADAPTER_CAUSAL_LM.format(repo=REPO_PLACEHOLDER)
        if adapter_only
        else _CHAT.format(repo=REPO_PLACEHOLDER)
    )


def cloze_usage(adapter_only: bool, encoder: Any | None) -> str:
    """Python that scores a text the cloze way (``encoder``: the pattern and answers the run used)."""
    if adapter_only:
        return _ADAPTER_CAUSAL_LM.format(repo=REPO_PLACEHOLDER)
    pieces, answers = (encoder.pieces, encoder.answers) if encoder else (["{text}", "[MASK]"], [])
    return _CLOZE.format(repo=REPO_PLACEHOLDER, pieces=pieces, answers=answers)


__all__ = [
    "CARD_METRICS",
    "CardInfo",
    "card_body",
    "chat_usage",
    "classification_usage",
    "cloze_usage",
    "read_results",
    "write_model_card",
]
