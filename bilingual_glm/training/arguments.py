"""train.py's flags (``TrainArguments``, parsed by ``HfArgumentParser``) and the checks that run on them
before anything is built: an edge value either trains or stops here with the flag's name."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bilingual_glm
from bilingual_glm.configuration.configuration_bilingual_glm import BilingualGlmConfig
from bilingual_glm.data.objectives import parse_objectives
from bilingual_glm.training.clock import DEFAULT_TRAIN_MINUTES
from bilingual_glm.training.optimizers import MUON_ADJUST_LR, OPTIMIZERS

TRAIN_PRESETS = ("tiny", "mini", "small", "base", "moe-tiny", "moe-mini")
TRACKERS = ("tensorboard", "trackio", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab")


@dataclass
class TrainArguments:
    """Everything a run depends on; logged to ``run_config.json`` with the resolved values."""

    preset: str = field(
        default="mini",
        metadata={
            "help": "Model size: tiny, mini, small, base, or the MoE moe-tiny, moe-mini (mini learns most "
            "per CPU minute); unused with --model_name_or_path."
        },
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Go on pretraining a saved model folder (train.py/finetune.py output, a converted "
            "checkpoint) instead of a fresh --preset: its weights, config and tokenizer."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Change preset fields, as run_clm.py does: 'num_hidden_layers=4,tie_word_embeddings=true'."
        },
    )
    objective: str = field(
        default="clm:0.8,glm:0.2",
        metadata={
            "help": "clm, glm, mlm, or a mixture drawn per batch, e.g. 'clm:0.5,glm:0.5'. The default keeps "
            "blank infilling alive at little cost to left-to-right quality (benchmarks/vs_native.py)."
        },
    )
    glm_mixture: str = field(
        default="0.5,0.3,0.2",
        metadata={"help": "GLM token/sentence/document span kinds, drawn per batch (GLM-10B's)."},
    )
    max_steps: int | None = field(
        default=None,
        metadata={"help": "Stop after N optimizer steps; given alone, the run is exactly reproducible."},
    )
    max_train_minutes: float | None = field(
        default=None,
        metadata={
            "help": "Stop after N minutes of training (the loop, not data preparation); the lr schedule "
            f"follows the elapsed share. Default {DEFAULT_TRAIN_MINUTES:g} when --max_steps is not given; "
            "with both, whichever comes first."
        },
    )
    output_dir: str = field(default="runs/train-mini", metadata={"help": "Where everything is written."})
    seed: int = field(default=42, metadata={"help": "Seeds model init, data order and masking."})
    tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer folder to reuse; default: train one."}
    )
    vocab_size: int | None = field(
        default=None, metadata={"help": "Vocab of a new tokenizer (default: the preset's)."}
    )
    train_files: list[str] | None = field(
        default=None, metadata={"help": "Local .txt/.jsonl/.json/.parquet files instead of the demo corpus."}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` name or local path."})
    dataset_config: str | None = field(default=None, metadata={"help": "Its configuration name."})
    text_column: str = field(default="text", metadata={"help": "Column holding the raw text."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset (corpora larger than RAM)."})
    max_train_documents: int | None = field(
        default=None, metadata={"help": "Use only the first N training documents (quick experiments, tests)."}
    )
    validation_fraction: float = field(
        default=0.02, metadata={"help": "Held-out share of --train_files/--dataset_name without a split."}
    )
    block_size: int = field(
        default=256, metadata={"help": "Tokens per packed training block (<= the model's positions)."}
    )
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Blocks per process per step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per step."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate (AdamW)."})
    warmup_steps: int | None = field(
        default=None,
        metadata={"help": "Linear warmup steps (default: a twentieth of the run, in steps or in time)."},
    )
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay on matrices (not norms/biases)."})
    optimizer: str = field(
        default="auto",
        metadata={
            "help": "auto: muon, except under DeepSpeed/FSDP (adamw); run_config.json records the one that "
            "ran. muon: torch.optim.Muon (Newton-Schulz in fp32 where bf16 is not native) for the decoder "
            "layers' 2-D weight matrices (attention q/k/v/o, MLP, shared experts), AdamW (--learning_rate) "
            "for the embedding, head, norms, biases, MoE router and routed experts. adamw: AdamW for every "
            "parameter (docs/training.md)."
        },
    )
    muon_learning_rate: float = field(
        default=0.02,
        metadata={
            "help": "Muon's peak lr (same schedule as AdamW's). 0.02: torch.optim.Muon's documented example "
            "and Keller Jordan's Muon README (modded-nanogpt's speedrun used 0.025-0.05 for its model)."
        },
    )
    muon_momentum: float = field(
        default=0.95,
        metadata={"help": "Muon's Nesterov momentum (torch's default, modded-nanogpt's value)."},
    )
    muon_weight_decay: float = field(
        default=0.01,
        metadata={
            "help": "Muon's decoupled decay, applied as lr x decay per step: 0.01 as in Keller Jordan's Muon "
            "README (torch's own default, 0.1, would decay 10x faster at lr 0.02)."
        },
    )
    muon_adjust_lr_fn: str = field(
        default="original",
        metadata={
            "help": "How Muon scales its lr per matrix shape (torch.optim.Muon's adjust_lr_fn): original "
            "(Keller Jordan's sqrt(max(1, rows/cols))) or match_rms_adamw (Moonshot's 0.2 sqrt(max(rows, "
            "cols)): AdamW-sized updates, so an AdamW lr fits)."
        },
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping."})
    mixed_precision: str = field(
        default="auto", metadata={"help": "no, bf16, fp16 or auto (bf16 where the hardware has it)."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log every N steps."})
    report_to: str = field(
        default="none",
        metadata={
            "help": "Also send the log records to these Accelerate trackers, comma-separated: "
            "tensorboard, trackio, wandb, ... (offline ones write under --output_dir/trackers); none."
        },
    )
    eval_steps: int = field(default=0, metadata={"help": "Evaluate every N steps (0: only at the end)."})
    eval_blocks: int = field(default=64, metadata={"help": "Held-out blocks per language for perplexity."})
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every N steps (0: never)."})
    save_minutes: float = field(
        default=0.0,
        metadata={
            "help": "Also checkpoint at the first step past every N training minutes (0: never); the "
            "minutes spent saving are not counted as training (benchmarks/vs_native.py scores these)."
        },
    )
    save_total_limit: int | None = field(
        default=None, metadata={"help": "Keep only the newest N checkpoints (default: keep all)."}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or 'latest' in --output_dir."}
    )
    skip_nonfinite_batches: bool = field(
        default=False,
        metadata={"help": "Skip a batch whose gradient is NaN/Inf instead of stopping the run."},
    )
    num_proc: int = field(default=2, metadata={"help": "Processes for tokenization (datasets.map)."})
    dataloader_num_workers: int = field(
        default=0,
        metadata={
            "help": "DataLoader workers that collate (mask, pad) while the model trains; 0: in the "
            "training process. The batches are the same for any number (not with --streaming)."
        },
    )
    sample_new_tokens: int = field(default=40, metadata={"help": "Tokens per sample generation at the end."})


# flag → smallest value it takes (None: the flag may also be left unset)
_MINIMUM = {
    "block_size": 2,
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "logging_steps": 1,
    "eval_steps": 0,
    "eval_blocks": 1,
    "save_steps": 0,
    "save_total_limit": 1,
    "max_train_documents": 1,
    "num_proc": 1,
    "dataloader_num_workers": 0,
    "sample_new_tokens": 0,
    "vocab_size": 64,
    "max_steps": 1,
    "warmup_steps": 0,
}


def check_arguments(args: TrainArguments) -> dict[str, float]:
    """Every check that needs no data and no model; returns the objective weights. Raises ``ValueError``
    naming the flag (or file) at fault, before Accelerate starts: a typo fails in a second on every rank."""
    for name, low in _MINIMUM.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise ValueError(f"--{name} must be >= {low}, got {value}")
    if not 0.0 < args.validation_fraction < 1.0:
        raise ValueError(f"--validation_fraction must be in (0, 1), got {args.validation_fraction}")
    if not args.learning_rate > 0:
        raise ValueError(f"--learning_rate must be > 0, got {args.learning_rate}")
    check_optimizer(args)
    if not args.save_minutes >= 0:
        raise ValueError(f"--save_minutes must be >= 0, got {args.save_minutes}")
    if args.preset not in TRAIN_PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(TRAIN_PRESETS)}, got {args.preset!r}")
    report_to(args)
    objectives = parse_objectives(args.objective)
    if args.model_name_or_path:
        check_start_folder(args)
    check_local_paths(args)
    check_block_size(args)
    return objectives


def check_optimizer(args: TrainArguments) -> None:
    """--optimizer and the Muon flags (checked even for adamw: a typo there is still a typo)."""
    if args.optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {args.optimizer!r}")
    if args.muon_adjust_lr_fn not in MUON_ADJUST_LR:
        raise ValueError(
            f"--muon_adjust_lr_fn must be one of {', '.join(MUON_ADJUST_LR)}, got {args.muon_adjust_lr_fn!r}"
        )
    if not args.muon_learning_rate > 0:
        raise ValueError(f"--muon_learning_rate must be > 0, got {args.muon_learning_rate}")
    if not 0 <= args.muon_momentum < 1:
        raise ValueError(f"--muon_momentum must be in [0, 1), got {args.muon_momentum}")
    if not args.muon_weight_decay >= 0:
        raise ValueError(f"--muon_weight_decay must be >= 0, got {args.muon_weight_decay}")


def report_to(args: TrainArguments) -> list[str]:
    """``--report_to`` as Accelerate's ``log_with`` list ([] for none)."""
    names = [name.strip() for name in args.report_to.split(",") if name.strip() and name.strip() != "none"]
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise ValueError(f"--report_to: {unknown} not among {('none', *TRACKERS)}")
    return names


def check_start_folder(args: TrainArguments) -> None:
    """--model_name_or_path brings its own config and tokenizer: the flags that make new ones would be ignored."""
    folder = Path(args.model_name_or_path)
    if folder.exists() and not (folder / "config.json").is_file():  # not a folder: a Hub id
        raise ValueError(f"--model_name_or_path: {folder} is not a model folder (no config.json)")
    for flag in ("config_overrides", "tokenizer", "vocab_size"):
        if getattr(args, flag) is not None:
            raise ValueError(
                f"--{flag} cannot be combined with --model_name_or_path (the folder has its own)"
            )


def check_local_paths(args: TrainArguments) -> None:
    """The folder and files the run reads exist; their contents are checked where they are read."""
    if args.tokenizer and not Path(args.tokenizer).is_dir():
        raise ValueError(f"--tokenizer: {args.tokenizer} is not a folder")
    for path in args.train_files or ():
        if not Path(path).is_file():
            raise ValueError(f"--train_files: {path}: no such file")


def apply_config_overrides(config: BilingualGlmConfig, overrides: str) -> BilingualGlmConfig:
    """``key=value,...`` onto the preset (transformers' ``update_from_string`` types each value by the field's
    current one), then the config's own validation, so a bad size fails here with the field's name."""
    try:
        config.update_from_string(overrides)
    except ValueError as error:
        raise ValueError(f"--config_overrides {overrides!r}: {error}") from None
    config.validate_bilingual_glm()
    return config


def check_block_size(args: TrainArguments) -> None:
    """A block longer than the model's positions would build quadratic attention masks far past RAM (13 GB+
    for 100,000 tokens on ``tiny``) before failing: refuse it while nothing is built."""
    limit = max_positions(args)
    if limit is not None and args.block_size > limit:
        raise ValueError(
            f"--block_size {args.block_size} is longer than the model's max_position_embeddings {limit}: "
            f"use --block_size {limit} or less"
        )


def max_positions(args: TrainArguments) -> int | None:
    """max_position_embeddings of the model the run will train (None: a Hub id, known only once loaded)."""
    if args.model_name_or_path:
        config = Path(args.model_name_or_path) / "config.json"
        if not config.is_file():
            return None
        return json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")
    config = BilingualGlmConfig.from_preset(args.preset)
    if args.config_overrides:
        config = apply_config_overrides(config, args.config_overrides)
    return config.max_position_embeddings


def new_model_config(args: TrainArguments, tokenizer: Any, special_ids: dict[str, int]) -> BilingualGlmConfig:
    """The --preset config sized to the tokenizer, with its special-token ids and --config_overrides."""
    vocab_size = max(bilingual_glm.PRESETS[args.preset]["vocab_size"], len(tokenizer))
    config = BilingualGlmConfig.from_preset(args.preset, vocab_size=vocab_size, **special_ids)
    return apply_config_overrides(config, args.config_overrides) if args.config_overrides else config
