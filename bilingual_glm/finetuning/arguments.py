"""finetune.py's own flags (``FinetuneArguments``); the optimisation is ``TrainingArguments``, parsed with them."""

from __future__ import annotations

from dataclasses import dataclass, field

LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_up_proj,down_proj"
TASK_NAMES = ("classification", "cloze", "sft")  # the registry's keys (bilingual_glm.finetuning.tasks.TASKS)


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
        if self.task not in TASK_NAMES:
            raise ValueError(f"--task must be one of {TASK_NAMES}, got {self.task!r}")
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
