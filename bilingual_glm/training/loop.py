"""train.py's loop: optimizer steps until the clock is done; log, evaluate and checkpoint on the way."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bilingual_glm.training.checkpoint import Progress, save_checkpoint
from bilingual_glm.training.clock import TrainingClock
from bilingual_glm.training.data import micro_batches
from bilingual_glm.training.evaluation import evaluate
from bilingual_glm.training.run_log import ExpertLoad, LogWindow, RunLog, StepResult
from bilingual_glm.training.stop import StopRequest


@dataclass
class Run:
    """What every stage of one run shares: the arguments, Accelerate, the clock, where it resumes from."""

    args: Any
    accelerator: Any
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


@dataclass
class Trainee:
    """The prepared model, optimizers (AdamW first; Muon second with ``--optimizer muon``), their lr
    schedules (one each, in the same order), the training loader and the held-out blocks."""

    model: Any
    optimizers: list[Any]
    schedulers: list[Any]
    loader: Any
    eval_sets: dict[str, Any]
    expert_load: ExpertLoad | None = None  # MoE models: tokens per expert, for the log


def train_loop(run: Run, trainee: Trainee, log: RunLog, progress: Progress) -> bool:
    """Optimizer steps until the clock is done; False when a stop request (Ctrl-C, SIGTERM) ended it."""
    args, accelerator, clock = run.args, run.accelerator, run.clock
    batches = micro_batches(trainee.loader, accelerator, progress.micro_batches, args.streaming)
    window = LogWindow(args.logging_steps, accelerator.num_processes)
    trainee.model.train()
    clock.start(progress.step, progress.seconds)
    with StopRequest() as stop, progress_bar(clock, disable=not run.main_process) as bar:
        while not clock.done():
            result = train_step(run, trainee, batches, progress)
            if result is None:  # a non-finite gradient, skipped (--skip_nonfinite_batches): no step was taken
                continue
            previous_seconds = progress.seconds
            progress.step, progress.seconds = clock.step, clock.seconds
            bar.update((clock.step if clock.budget is None else int(clock.seconds)) - bar.n)
            record = window.add(result, clock, trainee.schedulers[0].get_last_lr()[0])
            if record:
                bar.set_postfix(
                    step=clock.step, loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_second']:.0f}"
                )
            if record and trainee.expert_load is not None:
                record["expert_load"] = trainee.expert_load.take_window()
            if args.eval_steps and progress.step % args.eval_steps == 0 and not clock.done():
                with clock.paused():
                    metrics = evaluate(trainee.model, trainee.eval_sets, args, accelerator)
                record = {"step": progress.step, **record, **metrics}
            log.append(record)
            if checkpoint_due(args, progress.step, progress.seconds, previous_seconds):
                with clock.paused():
                    save_checkpoint(accelerator, run.output_dir, progress, args.save_total_limit)
            if stop.requested:
                accelerator.set_trigger()
            if accelerator.check_trigger():  # any rank interrupted: all save together, then leave
                saved = save_checkpoint(accelerator, run.output_dir, progress, args.save_total_limit)
                accelerator.print(f"interrupted: saved {saved}; resume with --resume_from_checkpoint latest")
                return False
    return True


def checkpoint_due(args: Any, step: int, seconds: float, previous_seconds: float) -> bool:
    """Every ``--save_steps`` steps, and at the first step past each ``--save_minutes`` mark of training
    time (``seconds`` is agreed across ranks, so all ranks save together)."""
    if args.save_steps and step % args.save_steps == 0:
        return True
    if args.save_minutes:
        interval = args.save_minutes * 60.0
        return int(seconds // interval) > int(previous_seconds // interval)
    return False


def train_step(
    run: Run, trainee: Trainee, batches: Iterator[dict[str, Any]], progress: Progress
) -> StepResult | None:
    """``--gradient_accumulation_steps`` micro-batches, one objective each (drawn by the collator), then the
    optimizer step.

    Returns None, having taken no step, when the gradient is not finite and ``--skip_nonfinite_batches``
    is set (without it: ``FloatingPointError``, before the optimizer could touch the weights).
    """
    args, accelerator, model = run.args, run.accelerator, trainee.model
    step_loss, step_tokens = 0.0, 0
    for _ in range(args.gradient_accumulation_steps):
        batch = next(batches)
        progress.micro_batches += 1
        objective = batch.pop("objective")
        with accelerator.accumulate(model):
            loss = model(**batch, return_logits=False, use_cache=False).loss
            accelerator.backward(loss)
            if not gradient_is_finite(run, model, objective, progress.step + 1):
                zero_grad(trainee)
                return None
            for optimizer in trainee.optimizers:
                optimizer.step()  # Accelerate makes it a no-op until the last micro-batch
            if accelerator.sync_gradients:  # count optimizer steps, not micro-batches
                run.clock.tick()  # before the schedulers: they read the new step and time
                balance_experts(accelerator.unwrap_model(model), trainee.expert_load)
            for scheduler in trainee.schedulers:
                scheduler.step()
            zero_grad(trainee)
        step_loss += accelerator.reduce(loss.detach(), "mean").item() / args.gradient_accumulation_steps
        mask = batch.get("attention_mask")
        step_tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    return StepResult(step_loss, step_tokens, objective)


def zero_grad(trainee: Trainee) -> None:
    for optimizer in trainee.optimizers:
        optimizer.zero_grad(set_to_none=True)


def balance_experts(model: Any, expert_load: ExpertLoad | None) -> None:
    """After an optimizer step of an MoE model: tally the step's expert load, then take GLM-4.5's loss-free
    balancing step (``router_bias_update_rate``; 0 only resets the counts)."""
    if expert_load is None:
        return
    expert_load.add(model.expert_load())
    model.update_router_biases()


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


def progress_bar(clock: TrainingClock, disable: bool) -> tqdm:
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
