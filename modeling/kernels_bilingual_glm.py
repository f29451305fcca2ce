"""Faster paths BilingualGlm takes where they apply, each with the plain PyTorch op as its fallback.

- ``fast_bf16`` / ``onednn_fp32_wins``: the one rule for which device gets which path (read below).
- ``use_onednn_linears(model)`` (opt-in module swap, ``OneDnnLinear``): CPU fp32 linears on oneDNN instead
  of MKL's sgemm, where that wins. ``torch.ops.mkldnn._linear_pointwise`` is private, so it is probed once
  and ``F.linear`` is the (tested) fallback.
- ``use_fused_qkv(model)`` (opt-in, ``fused_linear``): q/k/v as one GEMM over the three weights for inputs
  of 64 rows or more (training, long prompts), where the three modules are plain linears.
- ``matmul_attention_forward`` + ``use_matmul_attention``: the body and rule of the attention
  ``utils_bilingual_glm`` registers as ``attn_implementation="cpu_bf16_matmul"``: SDPA's contract on CPU
  under bf16 as two bf16 matmuls (torch's CPU flash kernel computes in fp32 whatever the input dtype).
- ``linear_cross_entropy``: ``lm_head`` + cross-entropy a chunk of rows at a time, never the ``[N, V]``
  logits.
- ``swiglu``: ``silu(gate) * up`` of a fused ``[gate | up]`` projection, whose backward writes both halves'
  gradients into one buffer (autograd would concatenate them: one more pass over the widest activation).

Every one computes what the plain op computes (fp32 parity with transformers' native GLM holds to 1e-5;
the tests force each path on), in public torch API or with a tested public fallback. Measurements behind each choice: ``benchmarks/README.md``. This file ships
as Hub remote code next to ``modeling_bilingual_glm.py``, so it imports only torch.
"""

from __future__ import annotations

import functools
import os
import platform
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# ------------------------------------------------------------------------------------------- device
BF16_ENV = "BILINGUAL_GLM_BF16"  # "0" / "1": behave as if this machine had no / had native bf16 (CI)
_CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 flags; "bf16" is arm64's Features
_REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "bf16")

# The switches that cap what ATen, oneDNN and MKL may use, so one machine can run as an older CPU (CI runs
# every model test again under ``=AVX2`` on all three). Each x86 ISA level with the flags it adds; a cap
# keeps the flags up to its level. A library caps itself at start-up, so a rule must see the same cap:
# torch's own bf16 routing follows ONEDNN_MAX_CPU_ISA, and so do ``fast_bf16`` and ``onednn_fp32_wins``.
ISA_CAP_ENVS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
ISA_LEVELS = {  # level -> flags that need at least that level
    "sse": frozenset(),
    "avx2": frozenset({"avx2", "fma"}),
    "avx512": frozenset({"avx512f"}),
    "avx512_bf16": frozenset({"avx512_bf16"}),
    "amx": frozenset({"amx_tile", "amx_bf16"}),
}


def isa_cap(environ: dict[str, str] | None = None) -> str | None:
    """The narrowest ISA level any of ``ISA_CAP_ENVS`` allows (a key of ``ISA_LEVELS``), or None: no cap.

    Values as each library spells them (``avx2``, ``AVX2_VNNI``, ``AVX512_CORE_BF16``, ``AVX512_E1``,
    ``AVX512_CORE_AMX``, ``default``, ``SSE41``); anything naming neither AMX, BF16, AVX512 nor AVX2 caps at
    SSE, the conservative reading. MKL's ``AVX512_E2..E4`` read as plain AVX-512 (bf16 not assumed).
    """
    environ = os.environ if environ is None else environ
    levels = list(ISA_LEVELS)
    narrowest = None
    for name in ISA_CAP_ENVS:
        value = environ.get(name, "").strip().upper()
        if not value:
            continue
        if "AMX" in value:
            level = "amx"
        elif "BF16" in value:
            level = "avx512_bf16"
        else:
            level = "avx512" if "AVX512" in value else "avx2" if "AVX2" in value else "sse"
        if narrowest is None or levels.index(level) < levels.index(narrowest):
            narrowest = level
    return narrowest


def usable_flags(flags: set[str], cap: str | None) -> set[str]:
    """The CPU's x86 ISA flags the libraries may use under ``cap`` (all of them without one)."""
    if cap is None:
        return set(flags)
    levels = list(ISA_LEVELS)
    above = set().union(*(ISA_LEVELS[level] for level in levels[levels.index(cap) + 1 :]))
    return set(flags) - above


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """Vendor, family, model and the ISA flags the libraries may use (``/proc/cpuinfo`` under ``isa_cap``).

    The CPU decides which kernel is fastest, and machines differ from run to run, so every benchmark
    and log records this next to its figures; ``isa_cap`` says whether the kind was emulated by a cap,
    ``cpu_flags`` what the CPU itself has.
    """
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        text = ""

    def field(name: str) -> str:
        match = re.search(rf"^{name}\s*:(.*)$", text, flags=re.MULTILINE)
        return match.group(1).strip() if match else ""

    flags = set((field("flags") or field("Features")).split()) & set(_REPORTED_FLAGS)
    cap = isa_cap()
    return {
        "model": field("model name") or platform.processor() or platform.machine(),
        "vendor": field("vendor_id") or field("CPU implementer"),
        "family": field("cpu family"),
        "model_number": field("model"),
        "flags": sorted(usable_flags(flags, cap)),
        "cpu_flags": sorted(flags),
        "isa_cap": cap,
    }


def cpu_kind(cpu: dict[str, Any]) -> tuple[str, str]:
    """(vendor, widest usable ISA level): what decides which CPU kernel wins, e.g. ("AuthenticAMD", "avx2")."""
    flags = set(cpu["flags"])
    level = next(
        (level for level in reversed(ISA_LEVELS) if ISA_LEVELS[level] and ISA_LEVELS[level] & flags), "sse"
    )
    return cpu["vendor"], level


def fast_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 math on ``device`` is native, i.e. faster than fp32 rather than emulated.

    CUDA: what torch reports. CPU: AVX512-BF16 or AMX-BF16 (x86), BF16 (arm64), as usable under
    ``isa_cap``. Without these, CPU bf16 matmuls are emulated and many times slower than fp32 (AMD Zen 3).
    Every bf16 default in the package (train.py's ``--mixed_precision auto``, finetune.py, the benchmarks,
    the bf16 attention path) asks this one function. ``BILINGUAL_GLM_BF16=0`` makes it say no and ``=1``
    yes on any device, so one machine can run the code paths of the other kind (CI does both); unset or
    ``auto``: detect. Forcing it changes only our choices: the libraries still run this CPU's kernels.
    """
    forced = os.environ.get(BF16_ENV, "auto").strip().lower()
    if forced not in ("auto", "", "0", "1"):
        raise ValueError(f"{BF16_ENV} must be 0, 1 or auto, got {forced!r}")
    if forced in ("0", "1"):
        return forced == "1"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(_CPU_BF16_FLAGS & set(cpu_info()["flags"]))
    return False


# Does oneDNN's fp32 matmul beat MKL's sgemm on the model's shapes (fwd + both bwd matmuls, 2 cores)? One
# entry per measured kind (``cpu_kind``), figures in benchmarks/README.md ("per CPU kind"); pinned one row
# per kind in tests/test_hardware.py. A kind not listed was never measured and keeps torch's default.
ONEDNN_FP32_WINS = {
    # Zen 5 (EPYC 9B45): 2.3x; Zen 4 (EPYC family 25 model 17): wins on every projection
    ("AuthenticAMD", "avx512_bf16"): True,
    # Zen 3 (EPYC family 25 model 1): 0.82-0.87; Zen 4 capped at AVX2: 0.91-1.05, no projection wins
    ("AuthenticAMD", "avx2"): False,
    # Xeon with AMX (family 6 model 143 / 167): MKL faster
    ("GenuineIntel", "amx"): False,
}


def onednn_fp32_wins() -> bool:
    """Whether CPU fp32 linears should run on oneDNN rather than torch's default (MKL's sgemm).

    Keyed to the CPU kind (vendor and widest usable ISA: ``cpu_kind``), not the vendor alone: on AMD with
    AVX-512 (Zen 4, Zen 5) oneDNN was measured faster, on AVX2-only AMD (Zen 3, or a newer AMD under the
    AVX2 caps) MKL was as fast or faster, on Intel with AMX MKL was faster. Unmeasured kinds get the plain
    op (``ONEDNN_FP32_WINS``).
    """
    return ONEDNN_FP32_WINS.get(cpu_kind(cpu_info()), False)


# ------------------------------------------------------------------------------------------- linear
def _probe_onednn_linear() -> Any:
    """torch's oneDNN linear op (``torch.ops.mkldnn._linear_pointwise``, the kernel inductor uses), or None.

    It is not public API, so it is looked up and called once on a tiny input: a torch without it, or with
    another signature, gets ``None`` and every caller falls back to ``F.linear`` (tested by forcing None).
    """
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    try:
        probe = torch.ones(2, 2)
        return (
            op if op is not None and torch.equal(op(probe, probe, None, "none", [], ""), probe * 2) else None
        )
    except (RuntimeError, TypeError):
        return None


_ONEDNN_LINEAR = _probe_onednn_linear()
_ONEDNN_MIN_MACS = 1 << 19  # below this a oneDNN call's fixed ~12 µs costs more than MKL's slower math


def _use_onednn(a: torch.Tensor, b: torch.Tensor) -> bool:
    """fp32 on CPU where oneDNN wins (``onednn_fp32_wins``), a matmul big enough, outside autocast and
    compilation, oneDNN enabled.

    torch sends CPU fp32 matmuls to MKL's sgemm; on AMD Zen 5 that ran at 45 % of oneDNN's fp32 matmul
    (same shapes, same IEEE fp32 arithmetic); on AVX2-only AMD and on Intel MKL is the faster. bf16 already goes to oneDNN, and autocast and
    ``torch.compile`` pick their own kernels. ``torch.backends.mkldnn.flags(enabled=False)`` turns this off.
    """
    return (
        _ONEDNN_LINEAR is not None
        and a.device.type == "cpu"
        and onednn_fp32_wins()
        and a.dtype == b.dtype == torch.float32
        and a.numel() * b.shape[0] >= _ONEDNN_MIN_MACS
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def _onednn_nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ bᵀ (+ bias)`` on oneDNN, for ``a [..., k]``, ``b [n, k]`` (either may be a transposed view)."""
    return _ONEDNN_LINEAR(a, b, bias, "none", [], "")


def _matmul_nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ bᵀ (+ bias)`` through oneDNN where ``_use_onednn`` says so, else ``F.linear``. No autograd:
    callers own the backward."""
    return _onednn_nt(a, b, bias) if _use_onednn(a, b) else F.linear(a, b, bias)


class _OneDnnLinear(torch.autograd.Function):
    """``F.linear`` with forward and both backward matmuls on oneDNN (see ``_use_onednn``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_nt(x, weight, bias)  # ``linear`` already chose this path

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])  # [N, out]
        grad_x = grad_weight = grad_bias = None
        # oneDNN directly: backward may run inside the caller's autocast region, which must not recast.
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_nt(grad_rows, weight.T).view(x.shape)  # [N, in]
        if ctx.needs_input_grad[1]:
            rows = x.reshape(-1, x.shape[-1])  # [N, in]
            # The kernel copies a transposed first operand (the second is read in place): hand it the
            # narrower of the two activations, at the price of transposing a weight-sized result.
            if rows.shape[1] < grad_rows.shape[1]:
                grad_weight = _onednn_nt(rows.T, grad_rows.T).T.contiguous()
            else:
                grad_weight = _onednn_nt(grad_rows.T, rows.T)  # [out, in]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, on oneDNN for CPU fp32 where ``_use_onednn`` says so (the same arithmetic)."""
    if not _use_onednn(x, weight):
        return F.linear(x, weight, bias)
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _OneDnnLinear.apply(x, weight, bias)
    return _onednn_nt(x, weight, bias)  # decoding: no autograd node to build


class OneDnnLinear(nn.Linear):
    """``nn.Linear`` whose forward is ``linear``: oneDNN for CPU fp32 where it wins, ``F.linear`` otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_onednn_linears(model: nn.Module) -> int:
    """Opt in to oneDNN fp32 linears: turn every plain ``nn.Linear`` of ``model`` into a ``OneDnnLinear``.

    The modules stay the same objects (only their class changes), so parameters, tied weights, hooks and
    state-dict names are untouched and the swap can be undone by setting ``__class__`` back. Subclasses
    (LoRA, quantized layers) are left alone. Each call still follows ``_use_onednn``: on CPUs where oneDNN
    loses (``onednn_fp32_wins``: Intel, AVX2-only AMD, unmeasured kinds), under autocast, or for small matmuls it runs ``F.linear``.
    Returns how many modules were switched.
    """
    switched = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDnnLinear
            switched += 1
    return switched


def is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` (or ``OneDnnLinear``) whose weight a fused kernel may use in place of its forward:
    not a subclass (LoRA, quantized) and no patched instance ``forward`` (accelerate offloading).

    Forward hooks registered on such a module do not run on the fused paths (torch has no public way to
    list them): wrap the module instead (as PEFT does) to keep them."""
    return type(module) in (nn.Linear, OneDnnLinear) and "forward" not in vars(module)


def fused_linear(x: torch.Tensor, linears: tuple[nn.Module, ...]) -> tuple[torch.Tensor, ...] | None:
    """The outputs of linears that read the same ``x``, from one GEMM over their concatenated weights; or
    None where that does not pay or is not safe, and the caller runs the modules.

    One GEMM passes over ``x`` once and gives one input gradient instead of several summed; under bf16
    autocast it also casts ``x`` once. Measured on q/k/v (benchmarks/README.md): 2-5% of a bf16 training
    step on a 2-core Intel Xeon with AMX. Not taken for a few rows (decoding: reading the weights is the cost,
    and concatenating them would double it), nor for modules a wrapper owns (``is_plain_linear``: LoRA,
    quantized, offloaded), nor for weights not held whole here (ZeRO-3 / FSDP1 placeholders, which their
    owners fill only for the module's own forward), nor for a mix of biased and unbiased linears.
    """
    if x.numel() < 64 * x.shape[-1] or not all(map(is_plain_linear, linears)):
        return None
    whole = all(m.weight.shape == (m.out_features, m.in_features) for m in linears)
    biased = {m.bias is not None for m in linears}
    if not whole or len(biased) != 1:
        return None
    weight = torch.cat([m.weight for m in linears])  # [sum(out), in]
    bias = torch.cat([m.bias for m in linears]) if biased == {True} else None
    project = linear if all(type(m) is OneDnnLinear for m in linears) else F.linear  # as the modules would
    return project(x, weight, bias).split([m.out_features for m in linears], dim=-1)


def use_fused_qkv(model: nn.Module, enabled: bool = True) -> int:
    """Opt in to ``fused_linear`` for q/k/v: every module of ``model`` with a ``fuse_qkv`` switch (the
    attention) runs its three projections as one GEMM where ``fused_linear`` allows. Parameters and
    state-dict names stay ``q_proj``/``k_proj``/``v_proj`` (converted checkpoints, PEFT targets);
    ``enabled=False`` undoes it. Returns how many modules were switched.
    """
    switched = 0
    for module in model.modules():
        if hasattr(module, "fuse_qkv"):
            module.fuse_qkv = enabled
            switched += 1
    return switched


# ---------------------------------------------------------------------------------------- attention
_MATMUL_ATTENTION_MAX_SCORES = 1 << 25  # beyond this many scores per call, SDPA's tiling wins on memory


def use_matmul_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None
) -> bool:
    """The rule of ``attn_implementation="cpu_bf16_matmul"``: two bf16 matmuls instead of SDPA on a CPU with
    native bf16, under bf16 compute, no dropout, causal or a bool mask.

    torch's CPU flash kernel is no faster in bf16 than in fp32 (measured on AVX512-BF16), so under bf16
    autocast it misses the bf16 matmul units (~2x oneDNN fp32 here); at training lengths two bf16 matmuls are
    2-3x faster. fp32 keeps SDPA: there torch's batched matmuls go to MKL, and the two tied (measured).
    Without native bf16 (``fast_bf16``) the bf16 matmuls are emulated and flash attention's fp32 math wins.
    GPUs, decoding, long sequences and per-head or float masks keep SDPA too.
    """
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    batch, heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    if attention_mask is None:
        mask_ok = q_len == kv_len  # SDPA's is_causal
    else:
        mask_ok = (
            attention_mask.dtype == torch.bool and attention_mask.dim() == 4 and attention_mask.shape[1] == 1
        )
    dropout = module.training and module.attention_dropout > 0
    small = batch * heads * q_len * kv_len <= _MATMUL_ATTENTION_MAX_SCORES
    if not (device == "cpu" and dtype == torch.bfloat16 and not dropout and q_len > 1 and mask_ok and small):
        return False
    return fast_bf16("cpu")


def matmul_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA's contract (bool mask, or ``None`` = causal) as two bf16 matmuls around the bf16 softmax.

    The scores stay in bf16 (what a bf16 matmul gives; the softmax kernel accumulates in fp32), so no
    ``[Tq, Tk]`` tensor is ever converted. The ``G`` query heads sharing a K/V head are stacked along the
    rows (``[B, KV, G·Tq, D]``): GQA needs no K/V copies, and autograd sums ``∂k``, ``∂v`` over the group.
    Plain autograd ops: backward keeps the probabilities (2·Tq·Tk bytes per head; flash attention
    recomputes them). The mask is added as a bf16 bias, whose backward is the identity.
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if attention_mask is None:  # causal, Tq == Tk
        blocked = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).triu_(1)
    else:
        blocked = ~attention_mask[:, :, None]  # [B|1, 1, 1, Tq, Tk]
    with torch.autocast(query.device.type, enabled=False):
        bias = torch.zeros(blocked.shape, dtype=torch.bfloat16, device=query.device)
        bias.masked_fill_(blocked, torch.finfo(torch.bfloat16).min)
        stacked = (query * scaling).bfloat16().reshape(batch, kv_heads, -1, head_dim)  # [B, KV, G*Tq, D]
        scores = torch.matmul(stacked, key.bfloat16().transpose(-1, -2))  # [B, KV, G*Tq, Tk]
        scores = scores.view(batch, kv_heads, heads // kv_heads, q_len, kv_len).add_(bias)
        probs = torch.softmax(scores.view(batch, kv_heads, -1, kv_len), dim=-1)
        output = torch.matmul(probs, value.bfloat16())  # [B, KV, G*Tq, D]
    output = output.view(batch, heads, q_len, head_dim)
    return output.transpose(1, 2).contiguous(), None  # [B, Tq, H, D]


# ------------------------------------------------------------------------------------------- SwiGLU
class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` for ``gate_up = [gate | up]``, with autograd's own products in backward.

    Autograd differentiates ``chunk`` by concatenating the two halves' gradients, a read and a write of the
    ``[N, 2·I]`` gradient per layer, the widest tensor of the step. Here each half is written into its place
    of one buffer instead: the same ops in the same order (``∂up = g·silu(gate)``,
    ``∂gate = silu_backward(g·up, gate)``), so the same bits. Capped at AVX2 (small preset, one layer's
    ``[2048, 2048]`` fwd + bwd): 7.4-7.9 against 9.0-13.3 ms (benchmarks/README.md).
    """

    @staticmethod
    def forward(ctx: Any, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        activated = F.silu(gate)
        ctx.save_for_backward(gate_up, activated)  # what autograd would keep: gate, up (views) and silu(gate)
        return activated * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        gate_up, activated = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad_gate_up = torch.empty_like(gate_up)
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
        torch.mul(grad, activated, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return grad_gate_up


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``[..., 2·I]`` → ``[..., I]``; the one-buffer backward where a gradient is
    wanted, the plain expression otherwise (inference, export)."""
    if torch.is_grad_enabled() and gate_up.requires_grad:
        return _SwiGLU.apply(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# --------------------------------------------------------------------------------------------- loss
# Logits per loss chunk: 16 MiB in fp32 (512 rows of an 8k vocabulary). Swept 2^20..2^25 for 2,040 rows x 8k
# (fwd + bwd; benchmarks/README.md, "The loss chunk, swept"): capped at AVX2 (MKL) 2^22 is fastest, 6-9 % under 2^21;
# on AVX-512 (oneDNN) 2^21 and 2^22 tie; smaller chunks pay the [V, d] operand once per chunk.
_LOSS_CHUNK_LOGITS = 1 << 22


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weightᵀ`` a chunk of rows at a time, gradients in forward.

    The ``[N, V]`` logits never exist at once (in fp32 that is 128 MiB for 4096 rows of an 8k vocabulary,
    plus as much again for their softmax and gradient): each chunk's logits become its loss and its
    gradient (softmax minus one-hot), which is multiplied out into ``∂hidden`` and ``∂weight`` before
    the next chunk. The loss is the graph's last node, so backward only scales those by ``∂loss``.
    """

    @staticmethod
    def forward(ctx: Any, hidden, weight, targets, compute_dtype: torch.dtype, chunk: int) -> torch.Tensor:
        # hidden [N, d], weight [V, d], targets [N]: the rows of supervised positions only
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        inputs, matrix = hidden.to(compute_dtype), weight.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        accumulate = torch.promote_types(compute_dtype, torch.float32)  # softmax in fp32 (or better)
        # ∂weight accumulates transposed ([d, V]): the matmul then reads the big chunk gradient in place
        # and copies only the [n, d] rows; one transpose at the end.
        grad_weight = weight.new_zeros(weight.shape[::-1], dtype=accumulate) if want_weight else None
        loss = hidden.new_zeros((), dtype=accumulate)
        for start in range(0, inputs.shape[0], chunk):
            rows, target = inputs[start : start + chunk], targets[start : start + chunk, None]
            n = rows.shape[0]
            # Zero rows up to a multiple of 64: oneDNN keeps a kernel per bf16 matmul shape, and a row
            # count that changes every batch grew that cache (RSS) by hundreds of MB in a soak run.
            rows = F.pad(rows, (0, 0, 0, -n % 64))  # [n_padded, d]
            logits = _matmul_nt(rows, matrix).to(accumulate)  # [n_padded, V]
            log_probs = torch.log_softmax(logits, dim=-1)
            loss -= log_probs[:n].gather(-1, target).sum()
            if want_hidden or want_weight:
                grad_logits = log_probs.exp_()
                grad_logits[:n].scatter_add_(-1, target, torch.full_like(target, -1.0, dtype=accumulate))
                grad_logits[n:] = 0  # padding rows carry no gradient
                grad_logits = grad_logits.to(compute_dtype)
                if want_hidden:
                    grad_hidden[start : start + n] = _matmul_nt(grad_logits, matrix.T)[:n]
                if want_weight:
                    grad_weight += _matmul_nt(rows.T, grad_logits.T)  # [d, V]
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.T.contiguous())
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype)
        grad_weight = None if grad_weight is None else (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weightᵀ`` against ``targets`` (rows ``[N, d]``, ``[N]``), in the
    autocast dtype when autocast is on (the softmax in fp32 or better)."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    chunk = max(64, _LOSS_CHUNK_LOGITS // weight.shape[0] // 64 * 64)  # whole multiples of 64 rows
    return _LinearCrossEntropy.apply(hidden, weight, targets, dtype, chunk)
