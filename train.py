"""Pretrain a BilingualGlm model from text with Accelerate: causal LM, GLM blank infilling, MLM.

    python train.py                                        # mini preset, embedded zh+en corpus, 7 minutes
    python train.py --max_train_minutes 30                 # the same, a longer time budget
    python train.py --model_name_or_path runs/train-mini --train_files reviews.jsonl ...  # go on, other text
    python train.py --preset tiny --objective glm --max_steps 40 --output_dir runs/tiny   # exactly reproducible
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train.py --preset tiny ...
    accelerate launch --config_file examples/accelerate/ddp.yaml train.py ...   # GPUs

Reads top to bottom: arguments → accelerator → data (tokenizer, tokenize, pack) → model → loop
(log, evaluate, checkpoint) → final save, held-out perplexity, samples. A run is bounded by optimizer
steps (``--max_steps``: the same numbers every time) or by training minutes (``--max_train_minutes``, the
default: machines differ 5x in speed, and a fixed step count that takes 7 minutes on one takes 36 on
another); with a time budget the lr schedule follows the elapsed share of it. Outputs in ``--output_dir``:
``log.jsonl`` (one JSON object per logged step), ``run_config.json``, ``loss.png``,
``checkpoint-{step}/`` (``accelerator.save_state``) and the final model + tokenizer + code.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from datasets.distributed import split_dataset_by_node
from tqdm.auto import tqdm
from transformers import AutoTokenizer, HfArgumentParser

import bilingual_glm
from bilingual_glm import BilingualGlmConfig, BilingualGlmForCausalLM, distributed
from bilingual_glm.checkpoints import find_checkpoint
from bilingual_glm.corpora import load_demo_corpus, load_text_files
from bilingual_glm.data import BlankInfillingCollator, CausalCollator, MlmCollator, pack_causal
from bilingual_glm.data.files import write_json_atomic, write_jsonl
from bilingual_glm.infill import infill
from bilingual_glm.modeling.kernels_bilingual_glm import (
    cpu_info,
    fast_bf16,
    use_fused_qkv,
    use_onednn_linears,
)
from bilingual_glm.tokenizer import special_token_ids, train_tokenizer

OBJECTIVES = ("clm", "glm", "mlm")
# Training minutes when neither --max_steps nor --max_train_minutes is given: with data preparation,
# evaluation and samples the whole run stays under 10 minutes on a 2-core CPU, bf16 or not.
DEFAULT_TRAIN_MINUTES = 7.0


@dataclass
class TrainArguments:
    """Everything a run depends on; logged to ``run_config.json`` with the resolved values."""

    preset: str = field(
        default="mini",
        metadata={
            "help": "Model size: tiny, mini, small or base (mini learns most per CPU minute); "
            "unused with --model_name_or_path."
        },
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Go on pretraining a saved model folder (train.py/finetune.py output, a converted checkpoint) "
            "instead of a fresh --preset: its weights, config and tokenizer (domain-adaptive pretraining)."
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
        metadata={"help": "GLM token/sentence/document span mixture, drawn per batch (GLM-10B's default)."},
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
        default=None, metadata={"help": "Tokenizer folder to reuse; default: train one and save it."}
    )
    vocab_size: int | None = field(
        default=None, metadata={"help": "Vocab of a newly trained tokenizer (default: the preset's)."}
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
    block_size: int = field(default=256, metadata={"help": "Tokens per packed training block."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Blocks per process per step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per step."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate (AdamW)."})
    warmup_steps: int | None = field(
        default=None, metadata={"help": "Linear warmup steps (default: the first 5% of the run)."}
    )
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay on matrices (not norms/biases)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping."})
    mixed_precision: str = field(
        default="auto", metadata={"help": "no, bf16, fp16 or auto (bf16 where the hardware has it)."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log every N steps."})
    eval_steps: int = field(default=0, metadata={"help": "Evaluate every N steps (0: only at the end)."})
    eval_blocks: int = field(default=64, metadata={"help": "Held-out blocks per language for perplexity."})
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every N steps (0: never)."})
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
    sample_new_tokens: int = field(default=40, metadata={"help": "Tokens per sample generation at the end."})


# ----------------------------------------------------------------------------------------- setup
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
    """The folder and files the run reads, before Accelerate starts: a typo fails in a second, on every rank
    alike, instead of after the process group and the corpus. Contents are checked where they are read."""
    if args.tokenizer and not Path(args.tokenizer).is_dir():
        raise ValueError(f"--tokenizer: {args.tokenizer} is not a folder")
    for path in args.train_files or ():
        if not Path(path).is_file():
            raise ValueError(f"--train_files: {path}: no such file")


def resolve_mixed_precision(choice: str) -> str:
    """``auto``: what an ``accelerate launch`` config chose, else bf16 where the device has it natively
    (``fast_bf16``), else fp32: emulated bf16 on a CPU without AVX512-BF16/AMX is many times slower."""
    if choice not in ("auto", "no", "bf16", "fp16"):
        raise ValueError(f"--mixed_precision must be auto, no, bf16 or fp16, got {choice!r}")
    if choice != "auto":
        return choice
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):  # `accelerate launch` passes its config's choice
        return os.environ["ACCELERATE_MIXED_PRECISION"]
    return "bf16" if fast_bf16("cuda" if torch.cuda.is_available() else "cpu") else "no"


class TrainingClock:
    """Where a run stands (optimizer steps, training seconds) against ``--max_steps``/``--max_train_minutes``.

    The lr schedule (linear warmup, cosine to zero) reads its progress from here: the share of steps or
    of the time budget used, whichever is larger. So a slow machine walks the whole schedule in fewer
    steps instead of being cut off mid-way. Seconds go into every checkpoint, so a resumed run spends the
    rest of the same budget. With several processes every rank takes the slowest rank's seconds: all
    agree on the lr and on when to stop.
    """

    def __init__(
        self, max_steps: int | None, max_minutes: float | None, warmup_steps: int | None, accelerator: Any
    ) -> None:
        if max_steps is None and max_minutes is None:
            max_minutes = DEFAULT_TRAIN_MINUTES
        if max_steps is not None and max_steps <= 0:
            raise ValueError(f"--max_steps must be > 0, got {max_steps}")
        if max_minutes is not None and not max_minutes > 0:
            raise ValueError(f"--max_train_minutes must be > 0, got {max_minutes}")
        self.max_steps, self.max_minutes = max_steps, max_minutes
        self.budget = None if max_minutes is None else max_minutes * 60.0
        if warmup_steps is None and self.budget is None:
            warmup_steps = max(1, max_steps // 20)  # 5% of the steps
        self.warmup_steps = warmup_steps  # None: the first 5% of the time budget
        self.accelerator = accelerator
        self.step, self.seconds, self._since = 0, 0.0, time.perf_counter()

    def start(self, step: int = 0, seconds: float = 0.0) -> None:
        """Start counting (or go on from a checkpoint's step and seconds) now."""
        self.step, self.seconds, self._since = step, seconds, time.perf_counter()

    def tick(self) -> None:
        """One optimizer step done: count it and the time since the last tick (agreed across ranks)."""
        now = time.perf_counter()
        elapsed = torch.tensor([self.seconds + now - self._since], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            elapsed = self.accelerator.gather(elapsed).max()
        self.step, self.seconds, self._since = self.step + 1, float(elapsed), now

    def progress(self) -> float:
        by_steps = self.step / self.max_steps if self.max_steps else 0.0
        by_time = self.seconds / self.budget if self.budget else 0.0
        return min(1.0, max(by_steps, by_time))

    def done(self) -> bool:
        return self.progress() >= 1.0

    def lr_factor(self, _scheduler_step: int = 0) -> float:
        """Multiplier of the peak lr for the next step (LambdaLR's callback; its own count is ignored)."""
        progress = self.progress()
        if self.warmup_steps is None:  # warmup over the first 5% of the budget
            warmup = 0.05
        elif self.budget is None:  # steps only: transformers' cosine-with-warmup, the same values
            warmup = self.warmup_steps / self.max_steps
        else:  # warmup in steps, then cosine over the share of the budget
            if self.step < self.warmup_steps:
                return self.step / self.warmup_steps
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if progress < warmup:
            return progress / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / (1.0 - warmup)))

    def summary(self) -> dict[str, Any]:
        return {"steps_taken": self.step, "train_minutes": round(self.seconds / 60, 3)}


def parse_objectives(spec: str) -> dict[str, float]:
    """'glm' → {glm: 1}; 'clm:0.5,glm:0.5' → weights."""
    weights = {}
    for part in spec.split(","):
        name, _, weight = part.strip().partition(":")
        if name not in OBJECTIVES:
            raise ValueError(f"--objective: {name!r} is not one of {OBJECTIVES} (spec {spec!r})")
        weights[name] = float(weight) if weight else 1.0
    if not sum(weights.values()) > 0:
        raise ValueError(f"--objective: weights must sum to > 0, got {spec!r}")
    return weights


def apply_config_overrides(config: BilingualGlmConfig, overrides: str) -> BilingualGlmConfig:
    """``key=value,...`` onto the preset (transformers' ``update_from_string`` types each value by the field's
    current one), then the config's own validation, so a bad size fails here with the field's name."""
    try:
        config.update_from_string(overrides)
    except ValueError as error:
        raise ValueError(f"--config_overrides {overrides!r}: {error}") from None
    config.validate_bilingual_glm()
    return config


# ------------------------------------------------------------------------------------------ data
def load_raw(args: TrainArguments) -> tuple[Any, datasets.Dataset]:
    """(train, validation) text datasets; validation keeps a `lang` column when the source has one."""
    if args.train_files:
        every = load_text_files(args.train_files)
    elif args.dataset_name:
        every = datasets.load_dataset(
            args.dataset_name, args.dataset_config, split="train", streaming=args.streaming
        )
    else:
        train, validation = load_demo_corpus("train"), load_demo_corpus("validation")
        return _first(train, args.max_train_documents), validation
    columns = _column_names(every)
    if args.text_column not in columns:
        raise ValueError(f"--text_column: {args.text_column!r} is not a column of the data ({columns})")
    if args.text_column != "text":
        every = every.rename_column(args.text_column, "text")
    if args.streaming:
        held_out = datasets.Dataset.from_list(list(every.take(max(args.eval_blocks, 16))))
        return every.skip(len(held_out)), held_out
    split = every.train_test_split(test_size=args.validation_fraction, seed=0)
    return _first(split["train"], args.max_train_documents), split["test"]


def _column_names(dataset: Any) -> list[str]:
    """Column names, also for streamed datasets whose features are only known from a first row."""
    return list(dataset.column_names or next(iter(dataset)).keys())


def _first(dataset: datasets.Dataset, n: int | None) -> datasets.Dataset:
    """The first n rows of a shuffled copy (demo corpora are sorted by language)."""
    if n is None or n >= len(dataset):
        return dataset
    return dataset.shuffle(seed=0).select(range(n))


def get_tokenizer(
    args: TrainArguments, train_text: Any, vocab_size: int, accelerator: Accelerator, resuming: bool
) -> Any:
    """--tokenizer, else the one this run saved (other ranks, resumes), else train one and save it.

    Only the main process trains: every rank must use the very same ids.
    """
    if args.model_name_or_path:
        return AutoTokenizer.from_pretrained(args.model_name_or_path)
    if args.tokenizer:  # a folder: check_local_paths
        return AutoTokenizer.from_pretrained(args.tokenizer)
    saved = Path(args.output_dir) / "tokenizer"
    if (resuming or not accelerator.is_main_process) and saved.is_dir():
        return AutoTokenizer.from_pretrained(saved)
    texts = (row["text"] for row in train_text) if args.streaming else train_text["text"]
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size, model_max_length=max(args.block_size * 4, 2048))
    if accelerator.is_main_process:
        tokenizer.save_pretrained(saved)
    return tokenizer


def tokenize_and_pack(dataset: Any, tokenizer: Any, args: TrainArguments) -> Any:
    """Batched, multi-process tokenization, then packing into `block_size` blocks."""
    map_kwargs: dict[str, Any] = {} if args.streaming else {"num_proc": args.num_proc}
    columns = _column_names(dataset)
    tokenized = dataset.map(
        lambda batch: {
            "input_ids": tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        },
        batched=True,
        remove_columns=columns,
        **map_kwargs,
    )
    return tokenized.map(
        partial(pack_causal, block_size=args.block_size, eos_token_id=tokenizer.eos_token_id),
        batched=True,
        batch_size=1000,
        remove_columns=["input_ids"],
        **map_kwargs,
    )


def held_out_blocks(validation: datasets.Dataset, tokenizer: Any, args: TrainArguments) -> dict[str, Any]:
    """Per-language packed blocks (one set named 'all' when the data has no `lang`)."""
    langs = sorted(set(validation["lang"])) if "lang" in validation.column_names else ["all"]
    blocks = {}
    for lang in langs:
        subset = (
            validation if lang == "all" else validation.filter(lambda row, lang=lang: row["lang"] == lang)
        )
        subset = subset.select_columns(["text"])
        packed = tokenize_and_pack(subset, tokenizer, TrainArguments(**{**asdict(args), "streaming": False}))
        blocks[lang] = packed.select(range(min(args.eval_blocks, len(packed))))
    return blocks


@torch.no_grad()
def perplexity(
    model: torch.nn.Module, blocks: datasets.Dataset, batch_size: int, accelerator: Accelerator
) -> float:
    """exp(mean next-token loss) with plain causal attention and per-document positions."""
    model.eval()
    collate = CausalCollator()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = collate([blocks[i] for i in range(start, min(start + batch_size, len(blocks)))])
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        with accelerator.autocast():
            loss = model(**batch, return_logits=False, use_cache=False).loss
        n = int(batch["shift_labels"].ne(-100).sum())  # every position but each block's last
        total, count = total + loss.item() * n, count + n
    model.train()
    return math.exp(total / max(count, 1))


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    (args,) = HfArgumentParser(TrainArguments).parse_args_into_dataclasses(args=argv)
    run = start_run(args)  # accelerator, clock, output folder, resume point; seeds everything

    # --- data: text → tokenizer → packed blocks → loader; the objectives' collators; held-out blocks
    data = prepare_data(run)

    # --- model: a fresh one from the preset and the tokenizer's ids, or the saved one; optimizer; lr schedule
    model, optimizer, scheduler, data.loader = build_model(run, data)
    progress = restore_progress(run)  # after accelerator.prepare: load_state needs the prepared objects
    run_config = resolved_config(run, model)
    log = RunLog(run.output_dir / "log.jsonl", run.main_process, up_to_step=progress.step)
    if run.main_process:
        write_json_atomic(run.output_dir / "run_config.json", run_config)
        run.accelerator.print(
            json.dumps({k: v for k, v in run_config.items() if k != "model_config"}, default=str)
        )

    # --- loop: steps until the clock says done; log, evaluate, checkpoint on the way
    if not train_loop(run, model, optimizer, scheduler, data, log, progress):
        run.accelerator.end_training()
        return 130  # interrupted: checkpointed, resumable with --resume_from_checkpoint latest

    # --- save: held-out perplexity, the final model + tokenizer + code, the loss plot, samples
    finish(run, model, data, log, run_config)
    return 0


@dataclass
class Run:
    """What every stage of one run shares."""

    args: TrainArguments
    accelerator: Accelerator
    clock: TrainingClock
    objectives: dict[str, float]
    mixed_precision: str
    resume_path: Path | None

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)

    @property
    def main_process(self) -> bool:
        return self.accelerator.is_main_process


def start_run(args: TrainArguments) -> Run:
    """Check the arguments, start Accelerate (and the distributed engine asked for), seed, make the folder."""
    mixed_precision = resolve_mixed_precision(args.mixed_precision)
    objectives = parse_objectives(args.objective)
    if args.preset not in bilingual_glm.PRESETS or args.preset == "glm-4-9b":
        raise ValueError(f"--preset must be tiny, mini, small or base, got {args.preset!r}")
    if args.model_name_or_path:
        check_start_folder(args)
    check_local_paths(args)
    resume_path = None
    if args.resume_from_checkpoint:
        resume_path = find_checkpoint(
            Path(args.output_dir), args.resume_from_checkpoint, "training_state.json"
        )
    distributed.fix_launch_environment()
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=distributed.process_group_kwargs(),  # gloo for DeepSpeed/FSDP without GPUs
    )
    clock = TrainingClock(args.max_steps, args.max_train_minutes, args.warmup_steps, accelerator)
    distributed.configure(accelerator, args.max_grad_norm, args.per_device_train_batch_size)
    distributed.check(accelerator, distributed.requested())  # never a silent fallback: exit 2 at start
    set_seed(args.seed)
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    else:
        datasets.disable_progress_bars()
    return Run(args, accelerator, clock, objectives, mixed_precision, resume_path)


@dataclass
class RunData:
    """The tokenizer, the training loader (raw packed blocks), a collator per objective, held-out blocks."""

    tokenizer: Any
    loader: Any
    collators: dict[str, Any]
    eval_sets: dict[str, Any]


def prepare_data(run: Run) -> RunData:
    args, accelerator = run.args, run.accelerator
    with accelerator.main_process_first():
        train_text, validation_text = load_raw(args)
        vocab = args.vocab_size or bilingual_glm.PRESETS[args.preset]["vocab_size"]
        tokenizer = get_tokenizer(args, train_text, vocab, accelerator, run.resume_path is not None)
        train_blocks = tokenize_and_pack(train_text, tokenizer, args)
        eval_sets = held_out_blocks(validation_text, tokenizer, args)
    if args.streaming:
        train_blocks = split_dataset_by_node(
            train_blocks, rank=accelerator.process_index, world_size=accelerator.num_processes
        )
    loader = torch.utils.data.DataLoader(
        train_blocks,
        batch_size=args.per_device_train_batch_size,
        shuffle=not args.streaming,
        collate_fn=list,  # raw blocks: the objective's collator runs in the loop, seeded by micro-batch
        drop_last=True,
    )
    # Widths rounded up to a multiple of 64: on CPU, oneDNN keeps a kernel per bf16 matmul shape, and a
    # width that changes every batch grows that cache (RSS) by hundreds of MB (see the soak figures).
    collators = {
        "clm": CausalCollator(),
        "glm": BlankInfillingCollator(
            tokenizer, mixture=tuple(float(x) for x in args.glm_mixture.split(",")), pad_to_multiple_of=64
        ),
        "mlm": MlmCollator(tokenizer, pad_to_multiple_of=64),
    }
    return RunData(tokenizer, loader, collators, eval_sets)


def build_model(run: Run, data: RunData) -> tuple[Any, Any, Any, Any]:
    """The model (``new_or_saved_model``), AdamW (no decay on norms, biases and
    embeddings), the clock-driven lr schedule; all prepared by Accelerate, the loader too unless streamed."""
    args, accelerator = run.args, run.accelerator
    model = new_or_saved_model(args, data.tokenizer)
    if accelerator.device.type == "cpu":
        use_onednn_linears(model)  # opt-in fast path; each call still follows the measured per-CPU rule
    use_fused_qkv(model)  # opt-in: q/k/v as one GEMM where that applies (not decoding, LoRA or ZeRO-3)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed_tokens" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
        betas=(0.9, 0.95),
        fused=accelerator.device.type in ("cpu", "cuda"),  # one kernel per step: ~4x the foreach path on CPU
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, run.clock.lr_factor)
    if args.streaming:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        return model, optimizer, scheduler, data.loader
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, data.loader, scheduler)
    return model, optimizer, scheduler, loader


def new_or_saved_model(args: TrainArguments, tokenizer: Any) -> BilingualGlmForCausalLM:
    """A fresh --preset model sized to the tokenizer, or the --model_name_or_path folder's weights."""
    if args.model_name_or_path:
        # fp32 master weights whatever the folder stores (converted checkpoints are often bf16): AdamW
        # updates need them, and --mixed_precision autocasts the matmuls as for a fresh model
        model = BilingualGlmForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32)
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(
                f"--model_name_or_path: its tokenizer has {len(tokenizer)} tokens, its model "
                f"vocab_size {model.config.vocab_size}"
            )
        return model
    vocab_size = max(bilingual_glm.PRESETS[args.preset]["vocab_size"], len(tokenizer))
    config = BilingualGlmConfig.from_preset(
        args.preset, vocab_size=vocab_size, **special_token_ids(tokenizer)
    )
    if args.config_overrides:
        config = apply_config_overrides(config, args.config_overrides)
    return BilingualGlmForCausalLM(config)


@dataclass
class Progress:
    """Optimizer steps done, micro-batches drawn (more than steps x accumulation after skipped batches)
    and training seconds spent: what a checkpoint stores and a resumed run goes on from."""

    step: int = 0
    micro_batches: int = 0
    seconds: float = 0.0


def restore_progress(run: Run) -> Progress:
    """A fresh run's zeros, or the checkpoint's state (weights, optimizer, schedule, RNG) and counters."""
    if run.resume_path is None:
        return Progress()
    run.accelerator.load_state(str(run.resume_path))
    state = json.loads((run.resume_path / "training_state.json").read_text())
    return Progress(state["step"], state["micro_batches"], state.get("train_seconds", 0.0))


def resolved_config(run: Run, model: Any) -> dict[str, Any]:
    """Everything the run depends on, as written to ``run_config.json`` and printed at the start."""
    accelerator, clock = run.accelerator, run.clock
    unwrapped = accelerator.unwrap_model(model)
    return {
        **asdict(run.args),
        "preset": None if run.args.model_name_or_path else run.args.preset,  # the folder's config was used
        "max_steps_resolved": clock.max_steps,
        "max_train_minutes_resolved": clock.max_minutes,
        "mixed_precision_resolved": run.mixed_precision,
        "cpu": cpu_info(),
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type.value),  # NO, MULTI_CPU, MULTI_GPU, FSDP, ...
        "distributed": distributed.describe(accelerator, model),  # engine, stage/version, sharding in effect
        "device": str(accelerator.device),
        "resumed_from": str(run.resume_path) if run.resume_path else None,
        "parameters": distributed.parameter_count(unwrapped),
        "model_config": unwrapped.config.to_dict(),
        "versions": {"torch": torch.__version__, "transformers": sys.modules["transformers"].__version__},
        "argv": sys.argv,
    }


# ------------------------------------------------------------------------------------------ loop
OBJECTIVE_SEED_STRIDE = 1_000_003  # a prime > any micro-batch count: (seed, micro-batch) pairs never collide
RANK_SEED_STRIDE = 1_009  # a prime > any process count: ranks of one micro-batch never share a seed


def objective_seed(seed: int, micro_batch: int) -> int:
    """Seed of the objective draw for micro-batch ``micro_batch`` (1-based) of a ``--seed`` run.

    The same on every rank (all ranks train one objective per step), and a function of the micro-batch
    count alone, so a resumed run draws what the uninterrupted one would have.
    """
    return seed * OBJECTIVE_SEED_STRIDE + micro_batch


def collator_seed(seed: int, micro_batch: int, process_index: int) -> int:
    """Seed of the collator's masking for one micro-batch on one rank: different on every rank (each masks
    its own blocks), reproducible on resume like ``objective_seed``."""
    return seed * OBJECTIVE_SEED_STRIDE + micro_batch * RANK_SEED_STRIDE + process_index


def nan_loss_hook() -> Callable[[torch.Tensor, int], torch.Tensor]:
    """Fault injection for tests/test_reliability.py: ``BILINGUAL_GLM_TEST_NAN_AT_BATCH=N`` makes the loss
    of micro-batch ``N`` NaN (to test the non-finite gradient guard); unset, the loss passes unchanged."""
    nan_at = int(os.environ.get("BILINGUAL_GLM_TEST_NAN_AT_BATCH", "0"))
    return lambda loss, micro_batch: loss * float("nan") if micro_batch == nan_at else loss


@dataclass
class StepResult:
    """One optimizer step: its mean loss over the micro-batches, tokens trained, the objective drawn."""

    loss: float
    tokens: int
    objective: str


def train_loop(
    run: Run, model: Any, optimizer: Any, scheduler: Any, data: RunData, log: RunLog, progress: Progress
) -> bool:
    """Optimizer steps until the clock is done; False when a stop request (Ctrl-C, SIGTERM) ended it."""
    args, accelerator, clock = run.args, run.accelerator, run.clock
    stop, inject_fault = _StopRequest(), nan_loss_hook()
    micro_batches = _micro_batches(data.loader, accelerator, args, progress.micro_batches)
    bar = _progress_bar(clock, disable=not run.main_process)
    window = LogWindow()
    model.train()
    clock.start(progress.step, progress.seconds)
    while not clock.done():
        result = train_step(run, model, optimizer, scheduler, data, micro_batches, progress, inject_fault)
        if result is None:  # a non-finite gradient, skipped (--skip_nonfinite_batches): no step was taken
            continue
        progress.step = clock.step
        bar.update((clock.step if clock.budget is None else int(clock.seconds)) - bar.n)
        record = window.add(result, clock, scheduler, accelerator, bar, args.logging_steps)
        if args.eval_steps and progress.step % args.eval_steps == 0 and not clock.done():
            record = {"step": progress.step, **record, **_evaluate(model, data.eval_sets, args, accelerator)}
        log.append(record)
        if args.save_steps and progress.step % args.save_steps == 0:
            _save_checkpoint(
                accelerator, run.output_dir, clock, progress.micro_batches, args.save_total_limit
            )
        if stop.requested:
            accelerator.set_trigger()
        if accelerator.check_trigger():  # any rank interrupted: all save together, then leave
            _save_checkpoint(
                accelerator, run.output_dir, clock, progress.micro_batches, args.save_total_limit
            )
            checkpoint = run.output_dir / f"checkpoint-{progress.step}"
            accelerator.print(f"interrupted: saved {checkpoint}; resume with --resume_from_checkpoint latest")
            bar.close()
            return False
    bar.close()
    stop.restore()
    return True


def train_step(
    run, model, optimizer, scheduler, data, micro_batches, progress, inject_fault
) -> StepResult | None:
    """``--gradient_accumulation_steps`` micro-batches, one objective each, then the optimizer step.

    Returns None, having taken no step, when the gradient is not finite and ``--skip_nonfinite_batches``
    is set (without it: ``FloatingPointError``, before the optimizer could touch the weights).
    """
    args, accelerator = run.args, run.accelerator
    step_loss, step_tokens = 0.0, 0
    for _ in range(args.gradient_accumulation_steps):
        examples = next(micro_batches)
        progress.micro_batches += 1
        seed = objective_seed(args.seed, progress.micro_batches)
        weights = list(run.objectives.values())
        objective = random.Random(seed).choices(list(run.objectives), weights=weights)[0]
        collator = data.collators[objective]
        if hasattr(collator, "reseed"):
            collator.reseed(collator_seed(args.seed, progress.micro_batches, accelerator.process_index))
        batch = {k: v.to(accelerator.device) for k, v in collator(examples).items()}
        with accelerator.accumulate(model):
            loss = inject_fault(
                model(**batch, return_logits=False, use_cache=False).loss, progress.micro_batches
            )
            accelerator.backward(loss)
            if not gradient_is_finite(run, model, objective, progress.step + 1):
                optimizer.zero_grad(set_to_none=True)
                return None
            optimizer.step()  # Accelerate makes it a no-op until the last micro-batch
            if accelerator.sync_gradients:  # count optimizer steps, not micro-batches
                run.clock.tick()  # before the scheduler: it reads the new step and time
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step_loss += accelerator.reduce(loss.detach(), "mean").item() / args.gradient_accumulation_steps
        mask = batch.get("attention_mask")
        step_tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    return StepResult(step_loss, step_tokens, objective)


def gradient_is_finite(run: Run, model: Any, objective: str, step: int) -> bool:
    """Clip the gradient once it is complete (all ranks see the same reduced one, so all agree) and check it.

    A non-finite one raises ``FloatingPointError``, or with ``--skip_nonfinite_batches`` returns False.
    """
    accelerator = run.accelerator
    if not accelerator.sync_gradients:
        return True
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), run.args.max_grad_norm)
    if grad_norm is None or torch.isfinite(torch.as_tensor(grad_norm)):  # DeepSpeed returns a float
        return True
    if not run.args.skip_nonfinite_batches:
        raise FloatingPointError(
            f"non-finite loss/gradient at step {step} ({objective}); stopped before the optimizer step, so "
            "the weights and every checkpoint stay finite (--skip_nonfinite_batches skips such batches instead)"
        )
    accelerator.print(f"step {step}: non-finite gradient, batch skipped")
    return False


class LogWindow:
    """Steps since the last log record: their mean loss and tokens/s become the next record."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.loss, self.count, self.tokens, self.start = 0.0, 0, 0, time.perf_counter()

    def add(
        self,
        result: StepResult,
        clock: TrainingClock,
        scheduler: Any,
        accelerator: Any,
        bar: tqdm,
        every: int,
    ) -> dict:
        """Count one step; every ``every`` steps (and at the last one) return the record and start anew."""
        self.loss, self.count, self.tokens = (
            self.loss + result.loss,
            self.count + 1,
            self.tokens + result.tokens,
        )
        if clock.step % every and not clock.done():
            return {}
        record = {
            "step": clock.step,
            "loss": self.loss / self.count,
            "lr": scheduler.get_last_lr()[0],
            "tokens_per_second": self.tokens * accelerator.num_processes / (time.perf_counter() - self.start),
            "objective": result.objective,
            "rss_mb": _rss_mb(),
            "train_minutes": round(clock.seconds / 60, 3),
        }
        bar.set_postfix(
            step=clock.step, loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_second']:.0f}"
        )
        self._reset()
        return record


class RunLog:
    """``log.jsonl``, one JSON object per record, and the records in memory (for the loss plot).

    Only the main process writes. A resumed run first trims the file to the checkpoint's step: the steps
    after it are trained (and logged) again.
    """

    def __init__(self, path: Path, writer: bool, up_to_step: int) -> None:
        self.path, self.writer, self.history = path, writer, []
        if writer and path.exists():
            records = [
                json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
            ]
            self.history = [record for record in records if record.get("step", 0) <= up_to_step]
            write_jsonl(path, self.history)

    def append(self, record: dict[str, Any]) -> None:
        if record and self.writer:
            self.history.append(record)
            with self.path.open("a", encoding="utf-8") as log:
                log.write(json.dumps(record, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------------ final
def finish(run: Run, model: Any, data: RunData, log: RunLog, run_config: dict[str, Any]) -> None:
    """Held-out perplexity, then the model, tokenizer, run config, loss plot; samples to eyeball."""
    accelerator, clock, tokenizer = run.accelerator, run.clock, data.tokenizer
    final_eval = {
        "step": clock.step,
        **clock.summary(),
        **_evaluate(model, data.eval_sets, run.args, accelerator),
    }
    state_dict = accelerator.get_state_dict(model)  # collective: gathers ZeRO-3 / FSDP shards on rank 0
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.generation_config.eos_token_id = [tokenizer.eos_token_id]
    unwrapped.generation_config.pad_token_id = tokenizer.pad_token_id
    if run.main_process:
        write_json_atomic(run.output_dir / "run_config.json", {**run_config, **clock.summary()})
        log.append(final_eval)
        unwrapped.save_pretrained(run.output_dir, state_dict=state_dict)
        tokenizer.save_pretrained(run.output_dir)
        _plot_loss(log.history, run.output_dir / "loss.png")
        accelerator.print("held-out: " + json.dumps({k: v for k, v in final_eval.items() if k != "step"}))
    if run.main_process or distributed.params_sharded(accelerator):  # sharded: every forward is collective
        _print_samples(unwrapped, tokenizer, run.args, accelerator)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _micro_batches(loader: Any, accelerator: Accelerator, args: TrainArguments, consumed: int):
    """Endless micro-batches; on resume, skip exactly the ones the finished steps consumed."""
    epoch = 0
    if not args.streaming:
        per_epoch = len(loader)
        if per_epoch == 0:
            raise ValueError("the training data yields no full batch: lower --per_device_train_batch_size")
        epoch, consumed = divmod(consumed, per_epoch)
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        iterator = accelerator.skip_first_batches(loader, consumed) if consumed else loader
        yield from iterator
        consumed, epoch = 0, epoch + 1


def _evaluate(model: Any, eval_sets: dict[str, Any], args: TrainArguments, accelerator: Accelerator) -> dict:
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


def _save_checkpoint(
    accelerator: Accelerator, output_dir: Path, clock: TrainingClock, consumed: int, keep: int | None = None
) -> None:
    """save_state into a temp folder, then one rename: `latest` never sees half a checkpoint."""
    step = clock.step
    final, tmp = output_dir / f"checkpoint-{step}", output_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "micro_batches": consumed, "train_seconds": clock.seconds}
        write_json_atomic(tmp / "training_state.json", state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep:  # rotate only after the new one is complete
            complete = sorted(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
            for old in complete[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _progress_bar(clock: TrainingClock, disable: bool) -> tqdm:
    """Steps against --max_steps, or seconds against the time budget when there is one."""
    if clock.budget is None:
        return tqdm(total=clock.max_steps, initial=clock.step, disable=disable, desc="train", unit="step")
    return tqdm(
        total=int(clock.budget),
        initial=int(clock.seconds),
        disable=disable,
        desc="train",
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s of the time budget [{elapsed}<{remaining}{postfix}]",
    )


def _rss_mb() -> float:
    """Current resident memory of this process (the soak test watches it stay flat)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class _StopRequest:
    """Ctrl-C or SIGTERM (preemption) asks the loop to checkpoint at the end of the current step."""

    def __init__(self) -> None:
        self.requested = False
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    @staticmethod
    def restore() -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)


def _plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["step"], r["loss"]) for r in history if "loss" in r]
    figure, axis = plt.subplots(figsize=(6, 4))
    if points:
        axis.plot(*zip(*points, strict=True), label="train loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(f"training loss ({path.parent.name})")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _print_samples(model: Any, tokenizer: Any, args: TrainArguments, accelerator: Accelerator) -> None:
    """Greedy continuations in both languages and one blank filled, to eyeball what was learned."""
    model.eval()
    for prompt in ("中国人民", "To be, or not to be"):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(accelerator.device)
        with torch.no_grad(), accelerator.autocast():
            output = model.generate(
                **ids, max_new_tokens=args.sample_new_tokens, do_sample=False, repetition_penalty=1.2
            )
        accelerator.print(f"sample: {tokenizer.decode(output[0], skip_special_tokens=True)!r}")
    text = "新华社北京一月一日电，[MASK]发表了新年讲话。"
    with accelerator.autocast():
        filled, spans = infill(model, tokenizer, text, max_new_tokens=16, return_spans=True)
    accelerator.print(f"infill: {text!r} -> {spans!r}")


def cli(argv: list[str] | None = None) -> int:
    """Bad input or a diverged run ends in one clear line on stderr and exit status 2, not a traceback."""
    try:
        return main(argv)
    except (ValueError, FloatingPointError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
