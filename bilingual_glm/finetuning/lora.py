"""LoRA through PEFT: which modules, which task type (the task says), and merging at the end."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bilingual_glm.finetuning.arguments import FinetuneArguments
from bilingual_glm.tokenizer import save_tokenizer

logger = logging.getLogger("finetune")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def apply_lora(model: Any, args: FinetuneArguments, task: Any, gradient_checkpointing: bool) -> Any:
    """PEFT LoRA on the standard names, with the task's type and the modules it trains in full (a new head)."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_r,
        lora_dropout=args.lora_dropout,
        target_modules=[name.strip() for name in args.lora_target_modules.split(",") if name.strip()],
        task_type=TaskType[task.lora_task_type],
        modules_to_save=task.lora_modules_to_save,
    )
    if gradient_checkpointing:
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


def merge_lora(trainer: Any, tokenizer: Any, output_dir: Path) -> None:
    """Adapter → ``output_dir/adapter``; the merged full model becomes what the Trainer saves and pushes."""
    if trainer.args.should_save:
        trainer.model.save_pretrained(output_dir / "adapter")
        save_tokenizer(tokenizer, output_dir / "adapter")
        for name in ADAPTER_FILES:  # an earlier save of the adapter at the top level would shadow the model
            (output_dir / name).unlink(missing_ok=True)
    trainer.model = trainer.model.merge_and_unload()
