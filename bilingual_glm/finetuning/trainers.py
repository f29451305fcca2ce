"""The Trainer subclasses of the tasks, and the callback that writes Trainer's log records to ``log.jsonl``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from bilingual_glm.data.cloze import ClozeClassifier
from bilingual_glm.model_card import CardInfo, write_model_card
from bilingual_glm.tokenizer import portable_tokenizer_config
from bilingual_glm.training.run_log import RunLog


class JsonlLogger(TrainerCallback):
    """Every Trainer log record (train loss, eval metrics, ...) into ``log.jsonl``: train.py's ``RunLog``."""

    def __init__(self, log: RunLog) -> None:
        self.log = log

    def on_log(self, args: TrainingArguments, state: Any, control: Any, logs: dict | None = None, **kw: Any):
        if state.is_world_process_zero and logs:
            self.log.append({"step": state.global_step, "epoch": state.epoch, **logs})


class FinetuneTrainer(Trainer):
    """Trainer whose model card (``README.md``, also what ``push_to_hub`` uploads) is ours."""

    def __init__(self, *args: Any, card: CardInfo, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.card = card

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        if self.is_world_process_zero():
            write_model_card(Path(self.args.output_dir), self.card)

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        """Trainer's save (model + tokenizer), the tokenizer config then made portable: it loads under
        transformers 4.57 and 5.x alike (``portable_tokenizer_config``)."""
        super()._save(output_dir, state_dict=state_dict)
        portable_tokenizer_config(output_dir if output_dir is not None else self.args.output_dir)


class SftTrainer(FinetuneTrainer):
    """Chat SFT: ``eval_perplexity`` = exp(``eval_loss``), from the loss Trainer computed anyway (each
    batch's mean NLL of its answer tokens, averaged over batches by size): no second pass, no logits kept.
    Added in ``evaluation_loop``, so every evaluation (``--eval_on_start``, ``--eval_strategy``) logs it."""

    def evaluation_loop(self, *args: Any, metric_key_prefix: str = "eval", **kwargs: Any) -> Any:
        output = super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        loss = output.metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None:
            output.metrics[f"{metric_key_prefix}_perplexity"] = math.exp(loss)
        return output


class ClozeTrainer(FinetuneTrainer):
    """GLM cloze: the loss is cross-entropy over the verbalizers' scores; predictions are those scores."""

    def __init__(self, *args: Any, classifier: ClozeClassifier, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.classifier = classifier
        self.model_accepts_loss_kwargs = False  # a per-batch mean over examples: Trainer scales it for GA

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        scores = self.classifier.scores(inputs, model=model)  # [B, C]
        loss = F.cross_entropy(scores, inputs["labels"], label_smoothing=self.args.label_smoothing_factor)
        return (loss, {"logits": scores}) if return_outputs else loss
