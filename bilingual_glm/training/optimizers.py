"""The optimizers train.py steps: AdamW alone (``--optimizer adamw``, the default), or ``torch.optim.Muon``
for the decoder layers' 2-D weight matrices and AdamW for everything else (``--optimizer muon``). Each
optimizer gets its own ``LambdaLR`` reading the same clock (``TrainingClock.lr_factor``), so both follow one
warmup/cosine shape, each from its own peak lr.

Where each parameter goes (``split_parameters``; names as on the ``tiny`` and ``moe-tiny`` presets)::

    parameter                                       shape       --optimizer adamw   --optimizer muon
    model.embed_tokens.weight                       (V, H)      AdamW, no decay     AdamW, no decay
    layers.N.self_attn.{q,k,v,o}_proj.weight        2-D         AdamW, decay        Muon
    layers.N.mlp.{gate_up,down}_proj.weight         2-D         AdamW, decay        Muon
    layers.N.mlp.shared_experts.*_proj.weight       2-D         AdamW, decay        Muon
    layers.N.mlp.gate.weight        (MoE router)    (E, H)      AdamW, decay        AdamW, decay
    layers.N.mlp.experts.{gate_up,down}_proj        (E, ., .)   AdamW, decay        AdamW, decay
    biases, layer norms, q/k norms                  1-D         AdamW, no decay     AdamW, no decay
    lm_head.weight (untied presets)                 (V, H)      AdamW, decay        AdamW, decay

Why that split:

- **Muon is for hidden matrices.** Its update orthogonalizes the gradient of a matrix that maps one hidden
  space to another. The embedding is a lookup (each row moves only when its token occurs) and the head
  maps into the vocabulary: Keller Jordan's Muon post, torch's ``Muon`` docs and modded-nanogpt keep both,
  and every 1-D parameter, on AdamW.
- **The router stays on AdamW.** Its (experts x hidden) rows are per-expert scores behind a sigmoid, with
  GLM-4.5's loss-free bias step (``router_bias_update_rate``) balancing the load against them; an
  orthogonalized update moves every expert's score direction by the same amount whatever its gradient.
  A choice, not a measurement: revisit it with an MoE ablation.
- **The routed experts stay on AdamW.** They are one 3-D parameter per layer, and ``torch.optim.Muon``
  (torch 2.13) refuses any parameter that is not 2-D; per-expert Newton-Schulz would be optimizer code of
  ours, which the issue rules out (Muon is taken from torch, a maintained dependency). The shared experts
  are plain 2-D linears and go to Muon.

AdamW's part keeps the rule of the AdamW-only run: decay on matrices except the embedding, none on 1-D
parameters, so ``--optimizer adamw`` builds exactly the optimizer train.py always built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("adamw", "muon")
MUON_ADJUST_LR = ("original", "match_rms_adamw")  # torch.optim.Muon's adjust_lr_fn options
ROUTER_SUFFIX = "mlp.gate.weight"  # the MoE router's scores (transformers' glm4_moe name)

ParameterGroups = dict[str, list[tuple[str, nn.Parameter]]]


def is_hidden_matrix(name: str, parameter: torch.Tensor) -> bool:
    """Whether Muon takes this parameter: a 2-D weight inside a decoder layer, not the MoE router."""
    inside_layers = ".layers." in f".{name}"
    return parameter.dim() == 2 and inside_layers and not name.endswith(ROUTER_SUFFIX)


def split_parameters(model: nn.Module, optimizer: str) -> ParameterGroups:
    """The trainable parameters by where they go: ``muon`` (empty for adamw), ``adamw_decay``,
    ``adamw_no_decay``, each a list of (name, parameter) in the model's order."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    groups: ParameterGroups = {"muon": [], "adamw_decay": [], "adamw_no_decay": []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if optimizer == "muon" and is_hidden_matrix(name, parameter):
            groups["muon"].append((name, parameter))
        elif parameter.dim() >= 2 and "embed_tokens" not in name:
            groups["adamw_decay"].append((name, parameter))
        else:
            groups["adamw_no_decay"].append((name, parameter))
    return groups


def build_optimizers(
    model: nn.Module, args: Any, lr_factor: Callable[[int], float], fused: bool
) -> tuple[list[torch.optim.Optimizer], list[torch.optim.lr_scheduler.LambdaLR]]:
    """AdamW (always first: its lr is the one logged), then Muon when ``args.optimizer`` is muon; one
    ``LambdaLR`` per optimizer on the same ``lr_factor``. ``fused``: AdamW's one-kernel path (CPU, CUDA)."""
    groups = split_parameters(model, args.optimizer)
    adamw_groups = [
        {"params": [p for _, p in groups["adamw_decay"]], "weight_decay": args.weight_decay},
        {"params": [p for _, p in groups["adamw_no_decay"]], "weight_decay": 0.0},
    ]
    adamw = torch.optim.AdamW(
        [group for group in adamw_groups if group["params"]],
        lr=args.learning_rate,
        betas=(0.9, 0.95),
        fused=fused,  # one kernel per step: ~4x the foreach path on CPU
    )
    optimizers: list[torch.optim.Optimizer] = [adamw]
    if groups["muon"]:
        optimizers.append(
            torch.optim.Muon(
                [p for _, p in groups["muon"]],
                lr=args.muon_learning_rate,
                momentum=args.muon_momentum,
                weight_decay=args.muon_weight_decay,
                adjust_lr_fn=args.muon_adjust_lr_fn,
            )
        )
    schedulers = [torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor) for optimizer in optimizers]
    return optimizers, schedulers


def parameter_counts(model: nn.Module, optimizer: str) -> dict[str, int]:
    """Parameters per optimizer, for ``run_config.json``: ``{"adamw": n, "muon": m}``."""
    groups = split_parameters(model, optimizer)
    counts = {"adamw": sum(p.numel() for _, p in groups["adamw_decay"] + groups["adamw_no_decay"])}
    if optimizer == "muon":
        counts["muon"] = sum(p.numel() for _, p in groups["muon"])
    return counts


def check_engine(optimizer: str, distributed_type: str) -> None:
    """Muon runs in one process or under DDP (every rank holds whole matrices). DeepSpeed takes one
    optimizer only, and FSDP shards the matrices Muon orthogonalizes whole: refused, not tried."""
    if optimizer == "muon" and distributed_type in ("DEEPSPEED", "FSDP"):
        raise ValueError(
            f"--optimizer muon runs in one process or under DDP, not under {distributed_type} "
            "(use --optimizer adamw there)"
        )
