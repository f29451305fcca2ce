"""The one place where train.py and finetune.py meet DeepSpeed, FSDP2 and CPU-only machines.

Users launch both scripts with the Accelerate configs in ``examples/accelerate/`` (the files a GPU user
takes); this module holds what those launches need beyond ``Accelerator(...)``, and why:

* **gloo on CPU.** Accelerate picks no process-group backend when a DeepSpeed or FSDP launch finds no
  accelerator, and each process then trains alone (``DistributedType.NO``).
  :func:`process_group_kwargs` (train.py) and :func:`trainer_defaults` (finetune.py, Trainer)
  ask for ``gloo``, which DeepSpeed 0.19 and FSDP2 both run on (no oneCCL needed).
* **DeepSpeed fix-ups.** The configs say ``gradient_clipping: auto``; Accelerate's plugin turns an
  unfilled ``auto`` into 1.0 and drops an explicit 0.0 (falsy), so the script's ``--max_grad_norm`` is
  written into the DeepSpeed config here (:func:`configure`).
* **FSDP2 on CPU.** Accelerate only switches to FSDP for accelerator devices, so on CPU a ``fsdp.yaml``
  launch silently runs DDP or nothing. :func:`configure` switches such a run to Accelerate's own FSDP2
  path (``fully_shard`` per ``BilingualGlmDecoderLayer``, from the config's
  ``fsdp_transformer_layer_cls_to_wrap``), so ``prepare``/``save_state``/``get_state_dict`` are the library's.
* **Never a silent fallback.** :func:`check` compares the engine the launch asked for (the environment
  ``accelerate launch`` sets, or ``--deepspeed``/``--fsdp``) with the one in effect, and raises
  :class:`DistributedMismatchError` (a ``ValueError``: both scripts print one ``error:`` line and exit 2).
* **What ran.** :func:`describe` is the ``distributed`` block of ``run_config.json``: engine, ZeRO stage
  or FSDP version, world size, sharding strategy.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs


class DistributedMismatchError(ValueError):
    """The launch asked for one distributed engine and the run got another (or none)."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _launched_world_size() -> int:
    """Processes the launcher started (torchrun / accelerate launch set WORLD_SIZE); 1 for ``python x.py``."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _no_accelerator() -> bool:
    return not torch.cuda.is_available() and not (hasattr(torch, "xpu") and torch.xpu.is_available())


def requested(deepspeed: Any = None, fsdp: Any = None) -> dict[str, Any]:
    """What the launch asked for: the environment ``accelerate launch --config_file`` sets, plus a
    Trainer's ``--deepspeed``/``--fsdp`` (finetune.py). ``engine`` is DEEPSPEED, FSDP or None."""
    wanted: dict[str, Any] = {"engine": None, "world_size": _launched_world_size()}
    if _flag("ACCELERATE_USE_DEEPSPEED") or deepspeed:
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        wanted.update(engine="DEEPSPEED", zero_stage=int(stage) if stage else None)
    elif _flag("ACCELERATE_USE_FSDP") or fsdp:
        wanted.update(engine="FSDP", fsdp_version=int(os.environ.get("FSDP_VERSION", "1")))
    return wanted


def fix_launch_environment() -> None:
    """Call before ``Accelerator(...)``: the DeepSpeed configs say ``gradient_accumulation_steps: auto``,
    ``accelerate launch`` exports that as ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS=auto`` and
    ``Accelerator`` then fails on ``int('auto')``. Unset, the script's ``--gradient_accumulation_steps``
    fills DeepSpeed's ``auto`` (what the config's comment promises)."""
    if os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "").lower() == "auto":
        del os.environ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"]


def process_group_kwargs() -> list[InitProcessGroupKwargs]:
    """``kwargs_handlers`` for ``Accelerator``: gloo for a multi-process DeepSpeed/FSDP launch without GPUs.

    Only then: on a plain ``--multi_gpu`` CPU launch an explicit backend would leave every rank at
    ``DistributedType.NO`` (no DDP wrap, no data sharding), and with ``ACCELERATE_USE_CPU=1`` Accelerate
    already picks gloo itself.
    """
    if requested()["engine"] and _launched_world_size() > 1 and _no_accelerator():
        if not _flag("ACCELERATE_USE_CPU"):
            return [InitProcessGroupKwargs(backend="gloo")]
    return []


def trainer_defaults() -> dict[str, Any]:
    """Defaults for finetune.py's ``TrainingArguments`` (``parser.set_defaults``): ``ddp_backend=gloo`` for a
    multi-process ``accelerate launch`` DeepSpeed run without GPUs.

    Trainer builds its ``PartialState`` while the arguments are parsed and, for a launch config (not
    ``--deepspeed``), passes ``ddp_backend`` on as the backend; unset, each rank runs DeepSpeed alone with
    a world size of 1 (which :func:`check` reports). ``--deepspeed ds.json`` ignores ``ddp_backend``:
    on CPU use the launch config instead.
    """
    if requested()["engine"] == "DEEPSPEED" and _launched_world_size() > 1 and _no_accelerator():
        if not _flag("ACCELERATE_USE_CPU"):
            return {"ddp_backend": "gloo"}
    return {}


def configure(accelerator: Accelerator, max_grad_norm: float, micro_batch_size: int) -> None:
    """Fix-ups between ``Accelerator(...)`` and ``prepare``: DeepSpeed's ``auto`` values, FSDP2 on CPU.

    Call it on every rank, right after constructing the Accelerator.
    """
    state = accelerator.state
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        config = state.deepspeed_plugin.deepspeed_config
        if config.get("gradient_clipping", "auto") == "auto":
            config["gradient_clipping"] = float(max_grad_norm)  # 0.0 included: DeepSpeed then never clips
        if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            config["train_micro_batch_size_per_gpu"] = (
                micro_batch_size  # streaming: the loader isn't prepared
            )
    wanted = requested()
    if (
        wanted["engine"] == "FSDP"
        and wanted.get("fsdp_version") == 2
        and accelerator.device.type == "cpu"
        and accelerator.num_processes > 1
        and accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU)
    ):
        # Accelerate's FSDP switch (state.py) only fires for accelerator devices. Everything it would
        # have set is the plugin (read from the same FSDP_* environment) and the distributed type; from
        # here on prepare() takes its fsdp2_prepare_model path, i.e. torch's fully_shard per layer.
        plugin = FullyShardedDataParallelPlugin()
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = plugin
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def describe(accelerator: Accelerator, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """The engine in effect, for ``run_config.json`` (what ran, not what was asked for).

    With the prepared ``model`` it also counts what was really sharded: FSDP2 units (``fully_shard``
    modules) or ZeRO-3 partitioned parameters, so a run that only *configured* sharding shows it.
    """
    kind = accelerator.distributed_type
    info: dict[str, Any] = {
        "engine": kind.value,  # NO, MULTI_CPU, MULTI_GPU, DEEPSPEED, FSDP, ...
        "world_size": accelerator.num_processes,
        "backend": getattr(accelerator.state, "backend", None),
        "zero_stage": None,
        "fsdp_version": None,
        "sharding": "replicated" if kind != DistributedType.NO else "none",
    }
    if kind == DistributedType.DEEPSPEED:
        stage = int(accelerator.state.deepspeed_plugin.zero_stage)
        info["zero_stage"] = stage
        info["sharding"] = {
            0: "replicated",
            1: "optimizer state",
            2: "optimizer state + gradients",
            3: "optimizer state + gradients + parameters",
        }[stage]
    elif kind == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        info["fsdp_version"] = plugin.fsdp_version
        if plugin.fsdp_version == 2:
            info["sharding"] = "FULL_SHARD" if plugin.reshard_after_forward else "SHARD_GRAD_OP"
        else:
            info["sharding"] = str(plugin.sharding_strategy.name)
        info["wrap"] = getattr(plugin, "transformer_cls_names_to_wrap", None)
        info["state_dict_type"] = str(getattr(plugin.state_dict_type, "name", plugin.state_dict_type))
    if model is not None and kind == DistributedType.FSDP:
        from torch.distributed.fsdp import FSDPModule

        info["fsdp_units"] = sum(isinstance(module, FSDPModule) for module in model.modules())
    if model is not None and info["zero_stage"] == 3:
        info["zero3_partitioned_parameters"] = sum(hasattr(p, "ds_id") for p in model.parameters())
    return info


def check(accelerator: Accelerator, wanted: dict[str, Any]) -> dict[str, Any]:
    """Raise :class:`DistributedMismatchError` unless the run got the engine ``wanted`` (see :func:`requested`).

    Returns :func:`describe` of the run for ``run_config.json``.
    """
    got = describe(accelerator)
    problems = []
    if wanted["world_size"] != got["world_size"]:
        problems.append(f"{wanted['world_size']} processes launched, {got['world_size']} in the run")
    if wanted["engine"] is not None and wanted["engine"] != got["engine"]:
        problems.append(f"{wanted['engine']} requested, {got['engine']} in effect")
    if wanted["engine"] == "DEEPSPEED" and wanted.get("zero_stage") not in (None, got["zero_stage"]):
        problems.append(f"ZeRO stage {wanted['zero_stage']} requested, {got['zero_stage']} in effect")
    if wanted["engine"] == "FSDP" == got["engine"] and wanted["fsdp_version"] != got["fsdp_version"]:
        problems.append(f"FSDP version {wanted['fsdp_version']} requested, {got['fsdp_version']} in effect")
    if problems:
        asked = wanted["engine"] or "plain data parallel"
        raise DistributedMismatchError(
            f"distributed launch not in effect: {'; '.join(problems)} (requested {asked}"
            + (f" fsdp_version {wanted['fsdp_version']}" if wanted.get("fsdp_version") else "")
            + f", actual {got['engine']} with {got['world_size']} process(es)). "
            + _hint(wanted, got)
        )
    return got


def _hint(wanted: dict[str, Any], got: dict[str, Any]) -> str:
    if wanted["engine"] == "FSDP" and got["world_size"] == 1:
        return "FSDP shards over processes: launch with --num_processes >= 2."
    if wanted["engine"] == "FSDP" and wanted.get("fsdp_version") != 2:
        return "Without GPUs only fsdp_version: 2 runs (FSDP2 fully_shard); set it in the config."
    if wanted["engine"] == "DEEPSPEED" and _flag("ACCELERATE_USE_CPU"):
        return "DeepSpeed does not run under ACCELERATE_USE_CPU=1 (Accelerate then uses DDP): unset it."
    return "See docs/distributed.md."


def params_sharded(accelerator: Accelerator) -> bool:
    """Parameters live in shards (ZeRO-3, FSDP): every forward is collective, so all ranks must run it."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    return (
        accelerator.distributed_type == DistributedType.DEEPSPEED
        and int(accelerator.state.deepspeed_plugin.zero_stage) == 3
    )


def parameter_count(model: torch.nn.Module) -> int:
    """Full parameter count, also under ZeRO-3 (partitioned parameters are empty; ``ds_numel`` is the size)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
