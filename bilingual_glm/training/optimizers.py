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

Newton-Schulz precision per CPU kind: ``torch.optim.Muon`` runs its five Newton-Schulz iterations in bf16,
fast where bf16 is native and emulated (tens of times slower than fp32) on an AVX2-only CPU, where one
``mini`` step's orthogonalization cost more than the rest of the step (61 steps in 5 minutes against
AdamW's 187, under the AVX2 caps; docs/training.md). ``Muon`` below is torch's optimizer, unchanged where
``fast_bf16()`` says yes, and the same update with the iteration in fp32 where it says no.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bilingual_glm.modeling.kernels_bilingual_glm import fast_bf16

OPTIMIZERS = ("auto", "adamw", "muon")  # auto: muon where the engine allows it (resolve_optimizer)
SHARDING_ENGINES = ("DEEPSPEED", "FSDP")  # one optimizer only / matrices sharded: no Muon
MUON_ADJUST_LR = ("original", "match_rms_adamw")  # torch.optim.Muon's adjust_lr_fn options
ROUTER_SUFFIX = "mlp.gate.weight"  # the MoE router's scores (transformers' glm4_moe name)
# torch.optim.Muon's constructor defaults (ns_coefficients, ns_steps, eps, ...), read from torch, not copied
MUON_DEFAULTS = {name: p.default for name, p in inspect.signature(torch.optim.Muon).parameters.items()}

ParameterGroups = dict[str, list[tuple[str, nn.Parameter]]]


def is_hidden_matrix(name: str, parameter: torch.Tensor) -> bool:
    """Whether Muon takes this parameter: a 2-D weight inside a decoder layer, not the MoE router."""
    inside_layers = ".layers." in f".{name}"
    return parameter.dim() == 2 and inside_layers and not name.endswith(ROUTER_SUFFIX)


def split_parameters(model: nn.Module, optimizer: str) -> ParameterGroups:
    """The trainable parameters by where they go: ``muon`` (empty for adamw), ``adamw_decay``,
    ``adamw_no_decay``, each a list of (name, parameter) in the model's order."""
    if optimizer not in ("adamw", "muon"):
        raise ValueError(f"split_parameters needs a resolved optimizer (adamw or muon), got {optimizer!r}")
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


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` with the Newton-Schulz iteration in ``ns_dtype``.

    bf16 (the default) is torch's own ``step``. Any other dtype runs the same update, step for step as
    torch 2.13's ``_single_tensor_muon`` (nesterov momentum by ``lerp``, decoupled weight decay, the
    ``adjust_lr_fn`` scaling), with the iteration in that dtype: torch offers no switch for it, and on a CPU
    without native bf16 its bf16 matmuls are emulated. State and param groups are torch's, so a checkpoint
    resumes on either kind of CPU. ``tests/test_optimizers.py`` checks the loop against torch's in bf16.
    """

    def __init__(self, params: Any, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if self.ns_dtype == torch.bfloat16:
            return super().step(closure)
        return self.step_in(self.ns_dtype, closure)

    @torch.no_grad()
    def step_in(self, dtype: torch.dtype, closure: Callable[[], Any] | None = None) -> Any:
        """One step with the Newton-Schulz iteration in ``dtype`` (``step`` calls it for non-bf16)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                buffer = state["momentum_buffer"]
                buffer.lerp_(grad, 1 - momentum)
                update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                update = orthogonalize(
                    update, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype
                )
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-lr * muon_lr_ratio(group["adjust_lr_fn"], param.shape))
        return loss


def orthogonalize(
    matrix: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration (Keller Jordan's coefficients, as torch runs it) in ``dtype``:
    the wide orientation, so the Gram matrix is the small one, and scaled to spectral norm <= 1 first."""
    a, b, c = coefficients
    wide = matrix.size(0) <= matrix.size(1)
    x = matrix.to(dtype) if wide else matrix.to(dtype).T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if wide else x.T


def muon_lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's per-matrix lr scale: ``original`` sqrt(max(1, rows/cols)); ``match_rms_adamw``
    0.2 sqrt(max(rows, cols)), which gives the update AdamW's typical RMS."""
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


def newton_schulz_dtype() -> torch.dtype:
    """bf16 where it is native (``fast_bf16``: torch's Muon as is), else fp32: one layer's orthogonalization
    ran at 2 GFLOP/s in emulated bf16 against 152 in fp32 on Zen 4 capped at AVX2, 252 against 156 natively
    (``benchmarks/cpu_paths.py``, ``bf16_newton_schulz``; benchmarks/README.md, "per CPU kind")."""
    return torch.bfloat16 if fast_bf16() else torch.float32


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
            Muon(
                [p for _, p in groups["muon"]],
                ns_dtype=newton_schulz_dtype(),
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


def resolve_optimizer(optimizer: str, distributed_type: str) -> str:
    """``auto`` (the default) is Muon in one process or under DDP, AdamW under DeepSpeed and FSDP. Muon
    there is refused, not tried: DeepSpeed takes one optimizer only, and FSDP shards the matrices Muon
    orthogonalizes whole. Why Muon by default: docs/training.md, "Does it learn?" (issue 34's figures)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    sharded = distributed_type in SHARDING_ENGINES
    if optimizer == "auto":
        return "adamw" if sharded else "muon"
    if optimizer == "muon" and sharded:
        raise ValueError(
            f"--optimizer muon runs in one process or under DDP, not under {distributed_type} "
            "(use --optimizer adamw or auto there)"
        )
    return optimizer
