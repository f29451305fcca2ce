"""One object per finetuning task; ``TASKS`` maps ``--task`` to it (finetune.py never asks which task).

A task owns what differs between tasks: how its rows are read and tokenized, its collator, the model class,
the LoRA task type (and the head LoRA must train too), the Trainer subclass with its loss and metrics, the
evaluation added after training, what the run config records and the model card's fields.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import datasets
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, DataCollatorWithPadding

from bilingual_glm.data.blank_infilling import IGNORE_INDEX
from bilingual_glm.data.cloze import (
    DEFAULT_CLOZE_TEMPLATES,
    DEFAULT_VERBALIZERS,
    ClozeClassifier,
    detect_language,
)
from bilingual_glm.data.labeled import load_labeled_data
from bilingual_glm.data.sft import SftCollator, load_chat_data, pack_chats, tokenize_chat
from bilingual_glm.finetuning.arguments import FinetuneArguments
from bilingual_glm.finetuning.trainers import ClozeTrainer, FinetuneTrainer, SftTrainer
from bilingual_glm.metrics import load_metric
from bilingual_glm.model_card import chat_usage, classification_usage, cloze_usage
from bilingual_glm.training.data import first_n

logger = logging.getLogger("finetune")


@dataclass
class TaskData:
    """Tokenized splits and their collator; ``label_names`` (classification, cloze), the cloze classifier
    (cloze, once its model is loaded) and the raw validation chats (sft, for generation metrics)."""

    splits: datasets.DatasetDict
    collator: Any
    label_names: list[str] | None = None
    raw_validation: datasets.Dataset | None = None


class FinetuneTask:
    """The interface finetune.py drives; the subclasses fill it in."""

    name: ClassVar[str]
    pipeline_tag: ClassVar[str] = "text-generation"
    lora_task_type: ClassVar[str] = "CAUSAL_LM"  # peft.TaskType
    lora_modules_to_save: ClassVar[list[str] | None] = None
    default_max_length: ClassVar[int] = 256

    def prepare_data(self, args: FinetuneArguments, tokenizer: Any) -> TaskData:
        raise NotImplementedError

    def load_model(self, args: FinetuneArguments, data: TaskData) -> Any:
        return AutoModelForCausalLM.from_pretrained(args.model_name_or_path)

    def bind_model(self, args: FinetuneArguments, tokenizer: Any, model: Any, data: TaskData) -> None:
        """Data work that needs the loaded model (cloze: its mask/sop ids); after ``load_model``."""

    def build_trainer(
        self, common: dict[str, Any], args: FinetuneArguments, model: Any, data: TaskData
    ) -> Any:
        raise NotImplementedError

    def evaluation_extras(self, trainer: Any, args: FinetuneArguments, data: TaskData) -> dict[str, float]:
        """Metrics added to ``trainer.evaluate()``'s (sft: generated answers)."""
        return {}

    def run_config(self) -> dict[str, Any]:
        """Task-specific entries of run_config.json."""
        return {}

    def card_metrics(self, args: FinetuneArguments) -> list[str]:
        return ["accuracy", "f1"]

    def card_usage(self, adapter_only: bool, data: TaskData) -> str:
        raise NotImplementedError


def limited_splits(splits: datasets.DatasetDict, args: FinetuneArguments) -> datasets.DatasetDict:
    """``--max_train_samples`` / ``--max_eval_samples`` (validation and test) applied."""
    for split in splits:
        splits[split] = first_n(
            splits[split], args.max_train_samples if split == "train" else args.max_eval_samples
        )
    return splits


def load_labeled_splits(args: FinetuneArguments) -> tuple[datasets.DatasetDict, list[str]]:
    splits, label_names = load_labeled_data(
        args.train_file,
        args.validation_file,
        args.test_file,
        args.dataset_name,
        args.dataset_config,
        args.text_column,
        args.label_column,
        args.validation_fraction,
    )
    return limited_splits(splits, args), label_names


def classification_metrics():
    """Accuracy and macro-F1 of the argmax prediction (Trainer's ``compute_metrics``)."""
    accuracy = load_metric("accuracy", keep_in_memory=True)
    macro_f1 = load_metric("macro_f1", keep_in_memory=True)

    def compute(prediction: Any) -> dict[str, float]:
        predicted, gold = np.argmax(prediction.predictions, axis=-1), prediction.label_ids
        return {
            **accuracy.compute(predictions=predicted, references=gold),
            **macro_f1.compute(predictions=predicted, references=gold),
        }

    return compute


class ClassificationTask(FinetuneTask):
    """A sequence-classification head on the pretrained model, trained with cross-entropy."""

    name = "classification"
    pipeline_tag = "text-classification"
    lora_task_type = "SEQ_CLS"
    lora_modules_to_save = ["score"]  # the new head is trained (and saved) in full

    def prepare_data(self, args: FinetuneArguments, tokenizer: Any) -> TaskData:
        splits, label_names = load_labeled_splits(args)

        def tokenize(batch: dict) -> dict:
            ids = tokenizer(batch["text"], truncation=True, max_length=args.max_length)["input_ids"]
            return {"input_ids": ids, "labels": batch["label"]}

        encoded = splits.map(tokenize, batched=True, remove_columns=["text", "label"])
        before = {split: len(dataset) for split, dataset in encoded.items()}
        encoded = encoded.filter(lambda row: len(row["input_ids"]) > 0)
        dropped = {split: before[split] - len(dataset) for split, dataset in encoded.items()}
        if any(dropped.values()):
            logger.warning("dropped rows with empty text: %s", dropped)
        collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=args.pad_to_multiple_of)
        return TaskData(encoded, collator, label_names)

    def load_model(self, args: FinetuneArguments, data: TaskData) -> Any:
        labels = data.label_names
        return AutoModelForSequenceClassification.from_pretrained(
            args.model_name_or_path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
        )

    def build_trainer(
        self, common: dict[str, Any], args: FinetuneArguments, model: Any, data: TaskData
    ) -> Any:
        # the model declares accepts_loss_kwargs = False (its loss is a per-batch mean)
        return FinetuneTrainer(**common, compute_metrics=classification_metrics())

    def card_usage(self, adapter_only: bool, data: TaskData) -> str:
        return classification_usage(adapter_only, data.label_names)


class ClozeTask(FinetuneTask):
    """GLM cloze: the pattern's ``[MASK]`` is filled by a verbalizer word per class (``ClozeClassifier``)."""

    name = "cloze"

    def __init__(self) -> None:
        self.classifier: ClozeClassifier | None = None
        self._texts: list[str] = []

    def prepare_data(self, args: FinetuneArguments, tokenizer: Any) -> TaskData:
        splits, label_names = load_labeled_splits(args)
        self._texts = list(splits["train"]["text"][:200])  # the language the default pattern is chosen by
        return TaskData(splits, None, label_names)

    def bind_model(self, args: FinetuneArguments, tokenizer: Any, model: Any, data: TaskData) -> None:
        """The classifier on ``model``: its encoder tokenizes the splits, its collator batches them."""
        language = detect_language(self._texts)
        labels = data.label_names
        if args.verbalizers:
            words = args.verbalizers.split(",")
        elif set(labels) <= set(DEFAULT_VERBALIZERS[language]):
            words = [DEFAULT_VERBALIZERS[language][label] for label in labels]
        else:
            raise ValueError(f"--verbalizers: give one answer word per label, in this order: {labels}")
        if len(words) != len(labels):
            raise ValueError(f"--verbalizers: {len(words)} answers for {len(labels)} labels {labels}")
        template = args.cloze_template or DEFAULT_CLOZE_TEMPLATES[language]
        self.classifier = ClozeClassifier(
            model, tokenizer, template, words, args.max_length, args.pad_to_multiple_of
        )
        encoder = self.classifier.encoder
        logger.info(
            "cloze pattern %r, answers %s -> token ids %s (%s)",
            encoder.template,
            list(encoder.verbalizers),
            encoder.candidates,
            "single-token: read at <sop>" if encoder.single_token else "multi-token: summed log-probs",
        )
        data.splits = data.splits.map(encoder.encode_batch, batched=True, remove_columns=["text", "label"])
        data.collator = self.classifier.collator

    def build_trainer(
        self, common: dict[str, Any], args: FinetuneArguments, model: Any, data: TaskData
    ) -> Any:
        return ClozeTrainer(**common, compute_metrics=classification_metrics(), classifier=self.classifier)

    def run_config(self) -> dict[str, Any]:
        return {"cloze": self.classifier.setup() if self.classifier else None}

    def card_usage(self, adapter_only: bool, data: TaskData) -> str:
        return cloze_usage(adapter_only, self.classifier.encoder if self.classifier else None)


class SftTask(FinetuneTask):
    """Chat SFT: the loss on the assistant turns only; perplexity and, optionally, generated answers."""

    name = "sft"
    default_max_length = 1024

    def prepare_data(self, args: FinetuneArguments, tokenizer: Any) -> TaskData:
        splits = load_chat_data(
            args.train_file,
            args.validation_file,
            args.dataset_name,
            args.dataset_config,
            args.messages_column,
            args.validation_fraction,
        )
        splits = limited_splits(splits, args)
        raw_validation = splits["validation"]
        encoded = splits.map(
            tokenize_chat,
            fn_kwargs={"tokenizer": tokenizer, "max_length": args.max_length},
            remove_columns=["messages"],
        )
        encoded = encoded.filter(lambda row: any(label != IGNORE_INDEX for label in row["labels"]))
        for split in ("train", "validation"):
            if not len(encoded[split]):
                raise ValueError(f"--task sft: no {split} chat has an assistant answer within --max_length")
        if args.packing:
            encoded["train"] = encoded["train"].map(
                pack_chats,
                batched=True,
                fn_kwargs={"block_size": args.max_length},
                remove_columns=["input_ids", "labels"],
            )
        return TaskData(
            encoded, SftCollator(tokenizer.pad_token_id, args.pad_to_multiple_of), None, raw_validation
        )

    def build_trainer(
        self, common: dict[str, Any], args: FinetuneArguments, model: Any, data: TaskData
    ) -> Any:
        return SftTrainer(**common)

    def evaluation_extras(self, trainer: Any, args: FinetuneArguments, data: TaskData) -> dict[str, float]:
        if not args.generation_eval_samples:
            return {}
        tokenizer = trainer.processing_class
        generated = generation_metrics(
            trainer.model, tokenizer, data.raw_validation, args.generation_eval_samples
        )
        return {f"eval_{k}": v for k, v in generated.items()}

    def card_metrics(self, args: FinetuneArguments) -> list[str]:
        return ["perplexity"] + (["rouge", "bleu"] if args.generation_eval_samples else [])

    def card_usage(self, adapter_only: bool, data: TaskData) -> str:
        return chat_usage(adapter_only)


@torch.no_grad()
def generation_metrics(model: Any, tokenizer: Any, chats: datasets.Dataset, n: int, max_new_tokens: int = 64):
    """Generate the last assistant answer of the first ``n`` chats; ROUGE-L and BLEU against the real ones."""
    prompts, references = [], []
    for messages in chats["messages"][: n * 4]:
        if messages and messages[-1]["role"] == "assistant" and len(prompts) < n:
            prompts.append(messages[:-1])
            references.append(messages[-1]["content"])
    if not prompts:
        return {}
    model.eval()
    device = next(model.parameters()).device
    predictions = []
    for messages in prompts:
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        ).to(device)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        predictions.append(
            tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        )
    rouge = load_metric("rouge_l", keep_in_memory=True).compute(
        predictions=predictions, references=references
    )
    bleu = load_metric("bleu", keep_in_memory=True).compute(predictions=predictions, references=references)
    return {"rouge_l": rouge["rouge_l"], "bleu": bleu["bleu"]}


TASKS: dict[str, type[FinetuneTask]] = {task.name: task for task in (ClassificationTask, ClozeTask, SftTask)}
