"""Pretrain a BilingualGlm model from text with Accelerate: causal LM, GLM blank infilling, MLM.

    python train.py                                        # mini preset, embedded zh+en corpus, 7 minutes
    python train.py --max_train_minutes 30                 # the same, a longer time budget
    python train.py --model_name_or_path runs/train-mini --train_files reviews.jsonl ...  # go on, other text
    python train.py --preset tiny --objective glm --max_steps 40 --output_dir runs/tiny   # exactly reproducible
    python train.py ... --report_to tensorboard            # also to TensorBoard (runs/.../trackers)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train.py --preset tiny ...
    accelerate launch --config_file examples/accelerate/ddp.yaml train.py ...   # GPUs

Reads top to bottom: arguments → accelerator → data (tokenizer, tokenize, pack, loader) → model → loop
(log, evaluate, checkpoint) → final save, held-out perplexity, samples. The pieces live in
``bilingual_glm.training`` (one module per concern); this script composes them. A run is bounded by
optimizer steps (``--max_steps``: the same numbers every time) or by training minutes
(``--max_train_minutes``, the default: machines differ 5x in speed); with a time budget the lr schedule
follows the elapsed share of it. Outputs in ``--output_dir``: ``log.jsonl`` (one JSON object per logged
step), ``run_config.json``, ``loss.png``, ``checkpoint-{step}/`` (``accelerator.save_state``),
``trackers/`` (``--report_to``) and the final model + tokenizer + code.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from datasets.distributed import split_dataset_by_node
from transformers import HfArgumentParser

import bilingual_glm
from bilingual_glm import BilingualGlmForCausalLM, distributed
from bilingual_glm.modeling.kernels_bilingual_glm import use_fused_qkv, use_onednn_linears
from bilingual_glm.tokenizer import save_tokenizer, special_token_ids
from bilingual_glm.training import data as training_data
from bilingual_glm.training.arguments import TrainArguments, check_arguments, new_model_config, report_to
from bilingual_glm.training.checkpoint import TRAINING_STATE, find_checkpoint, restore_progress
from bilingual_glm.training.cli import run_cli
from bilingual_glm.training.clock import TrainingClock
from bilingual_glm.training.evaluation import evaluate, print_samples
from bilingual_glm.training.loop import Run, Trainee, train_loop
from bilingual_glm.training.optimizers import build_optimizers, parameter_counts, resolve_optimizer
from bilingual_glm.training.precision import resolve_mixed_precision
from bilingual_glm.training.run_config import environment, write_run_config
from bilingual_glm.training.run_log import ExpertLoad, RunLog, plot_loss


def main(argv: list[str] | None = None) -> int:
    (args,) = HfArgumentParser(TrainArguments).parse_args_into_dataclasses(args=argv)
    run = start_run(args)  # checks, accelerator (+ trackers), clock, output folder, resume point; seeds

    # --- data: text → tokenizer → packed blocks → loader (its collator draws the objective); held-out blocks
    tokenizer, blocks, eval_sets = prepare_data(run)

    # --- model: a fresh one from the preset and the tokenizer's ids, or the saved one; optimizer; lr schedule
    trainee = build_trainee(run, tokenizer, blocks, eval_sets)
    progress = restore_progress(run.accelerator, run.resume_path)  # load_state needs the prepared objects
    run_config = resolved_config(run, trainee.model)
    resume_step = progress.step if run.resume_path else None  # a resumed log keeps the steps up to here
    log = RunLog(run.output_dir / "log.jsonl", run.main_process, resume_step, run.accelerator)
    if run.main_process:
        write_run_config(run.output_dir, run_config)
        run.accelerator.print(
            json.dumps({k: v for k, v in run_config.items() if k != "model_config"}, default=str)
        )

    # --- loop: steps until the clock says done; log, evaluate, checkpoint on the way
    if not train_loop(run, trainee, log, progress):
        run.accelerator.end_training()
        return 130  # interrupted: checkpointed, resumable with --resume_from_checkpoint latest

    # --- save: held-out perplexity, the final model + tokenizer + code, the loss plot, samples
    finish(run, trainee, tokenizer, log, run_config)
    return 0


def start_run(args: TrainArguments) -> Run:
    """Check the arguments, start Accelerate (the distributed engine and trackers asked for), seed."""
    mixed_precision = resolve_mixed_precision(
        args.mixed_precision, os.environ.get("ACCELERATE_MIXED_PRECISION")
    )
    objectives = check_arguments(args)
    resume_path = None
    if args.resume_from_checkpoint:
        resume_path = find_checkpoint(Path(args.output_dir), args.resume_from_checkpoint, TRAINING_STATE)
    distributed.fix_launch_environment()
    trackers = report_to(args)  # offline ones (tensorboard, trackio) write under output_dir/trackers
    if "trackio" in trackers:  # read when trackio is imported
        os.environ.setdefault("TRACKIO_DIR", str(Path(args.output_dir).resolve() / "trackers" / "trackio"))
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=distributed.process_group_kwargs(),  # gloo for DeepSpeed/FSDP without GPUs
        log_with=trackers or None,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=f"{args.output_dir}/trackers"
        ),
    )
    clock = TrainingClock(args.max_steps, args.max_train_minutes, args.warmup_steps, accelerator)
    distributed.configure(accelerator, args.max_grad_norm, args.per_device_train_batch_size)
    distributed.check(accelerator, distributed.requested())  # never a silent fallback: exit 2 at start
    args.optimizer = resolve_optimizer(args.optimizer, accelerator.distributed_type.value)  # auto -> a name
    set_seed(args.seed)
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    else:
        datasets.disable_progress_bars()
    if trackers:
        config = {k: v for k, v in asdict(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(Path(args.output_dir).name, config=config)
    return Run(args, accelerator, clock, objectives, mixed_precision, resume_path)


def prepare_data(run: Run) -> tuple[Any, Any, dict[str, Any]]:
    """The tokenizer, the packed training blocks (this rank's share when streamed), the held-out blocks."""
    args, accelerator = run.args, run.accelerator
    with accelerator.main_process_first():
        train_text, validation_text = training_data.load_raw(args)
        vocab = args.vocab_size or bilingual_glm.PRESETS[args.preset]["vocab_size"]
        tokenizer = training_data.get_tokenizer(
            args, train_text, vocab, accelerator, run.resume_path is not None
        )
        blocks = training_data.train_blocks(train_text, tokenizer, args)
        eval_sets = training_data.held_out_blocks(validation_text, tokenizer, args)
    if args.streaming:
        blocks = split_dataset_by_node(
            blocks, rank=accelerator.process_index, world_size=accelerator.num_processes
        )
    return tokenizer, blocks, eval_sets


def build_trainee(run: Run, tokenizer: Any, blocks: Any, eval_sets: dict[str, Any]) -> Trainee:
    """The model, its optimizers (AdamW, or Muon for the hidden matrices + AdamW: ``optimizers.py``), one
    clock-driven lr schedule each and the loader, all prepared by Accelerate (the loader too unless streamed)."""
    args, accelerator = run.args, run.accelerator
    collate = training_data.objective_collator(args, tokenizer, run.objectives, accelerator.process_index)
    loader = training_data.train_loader(blocks, collate, args)
    model = new_or_saved_model(args, tokenizer)
    if accelerator.device.type == "cpu":
        use_onednn_linears(model)  # opt-in fast path; each call still follows the measured per-CPU rule
    use_fused_qkv(model)  # opt-in: q/k/v as one GEMM where that applies (not decoding, LoRA or ZeRO-3)
    fused = accelerator.device.type in ("cpu", "cuda")
    optimizers, schedulers = build_optimizers(model, args, run.clock.lr_factor, fused)
    count = len(optimizers)
    if args.streaming:
        model, *prepared = accelerator.prepare(model, *optimizers, *schedulers)
    else:
        model, *prepared = accelerator.prepare(model, *optimizers, loader, *schedulers)
        loader = prepared.pop(count)
    optimizers, schedulers = prepared[:count], prepared[count:]
    expert_load = ExpertLoad() if accelerator.unwrap_model(model).config.is_moe else None
    return Trainee(model, optimizers, schedulers, loader, eval_sets, expert_load)


def new_or_saved_model(args: TrainArguments, tokenizer: Any) -> BilingualGlmForCausalLM:
    """A fresh --preset model sized to the tokenizer, or the --model_name_or_path folder's weights."""
    if not args.model_name_or_path:
        return BilingualGlmForCausalLM(new_model_config(args, tokenizer, special_token_ids(tokenizer)))
    # fp32 master weights whatever the folder stores (converted checkpoints are often bf16): AdamW
    # updates need them, and --mixed_precision autocasts the matmuls as for a fresh model
    model = BilingualGlmForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"--model_name_or_path: its tokenizer has {len(tokenizer)} tokens, its model vocab_size {model.config.vocab_size}"
        )
    if args.block_size > model.config.max_position_embeddings:  # a Hub id: known only now
        raise ValueError(
            f"--block_size {args.block_size} is longer than the model's max_position_embeddings "
            f"{model.config.max_position_embeddings}"
        )
    return model


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
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type.value),  # NO, MULTI_CPU, MULTI_GPU, FSDP, ...
        "distributed": distributed.describe(accelerator, model),  # engine, stage/version, sharding in effect
        "device": str(accelerator.device),
        "resumed_from": str(run.resume_path) if run.resume_path else None,
        "parameters": distributed.parameter_count(unwrapped),
        # muon only: under ZeRO-3/FSDP (adamw) a rank's parameters are shards
        "parameters_per_optimizer": parameter_counts(unwrapped, run.args.optimizer)
        if run.args.optimizer == "muon"
        else None,
        "model_config": unwrapped.config.to_dict(),
        **environment(),
    }


def finish(run: Run, trainee: Trainee, tokenizer: Any, log: RunLog, run_config: dict[str, Any]) -> None:
    """Held-out perplexity, then the model, tokenizer, run config, loss plot; samples to eyeball."""
    accelerator, clock = run.accelerator, run.clock
    final_eval = {
        "step": clock.step,
        **clock.summary(),
        **evaluate(trainee.model, trainee.eval_sets, run.args, accelerator),
    }
    if trainee.expert_load is not None:
        final_eval["expert_load"] = trainee.expert_load.run_total()
    state_dict = accelerator.get_state_dict(
        trainee.model
    )  # collective: gathers ZeRO-3 / FSDP shards on rank 0
    unwrapped = accelerator.unwrap_model(trainee.model)
    unwrapped.generation_config.eos_token_id = [tokenizer.eos_token_id]
    unwrapped.generation_config.pad_token_id = tokenizer.pad_token_id
    log.append(final_eval)
    if run.main_process:
        write_run_config(run.output_dir, {**run_config, **clock.summary()})
        unwrapped.save_pretrained(run.output_dir, state_dict=state_dict)
        save_tokenizer(tokenizer, run.output_dir)  # loads under transformers 4.57 and 5.x alike
        plot_loss(log.history, run.output_dir / "loss.png")
        accelerator.print("held-out: " + json.dumps({k: v for k, v in final_eval.items() if k != "step"}))
    if run.main_process or distributed.params_sharded(accelerator):  # sharded: every forward is collective
        print_samples(unwrapped, tokenizer, run.args.sample_new_tokens, accelerator)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def cli(argv: list[str] | None = None) -> int:
    """Bad input or a diverged run ends in one clear line on stderr and exit status 2, not a traceback."""
    return run_cli(main, "train.py", argv)


if __name__ == "__main__":
    sys.exit(cli())
