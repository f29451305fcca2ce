"""Speed and memory of BilingualGlm against transformers' native ``GlmForCausalLM``: same config, same weights.

The native model is built from ours by ``bilingual_glm.conversion.to_transformers_glm`` (the ``moe_*`` rows:
``to_transformers_glm4_moe``, into ``Glm4MoeForCausalLM``), so both hold identical weights. Every timed row
alternates the two (A B A B ...) after a warm-up and reports the median of ``--repeats`` runs: other jobs on
the machine then slow both sides alike. Rows:

| name                    | ours                                      | reference                    | ratio      |
|-------------------------|-------------------------------------------|------------------------------|------------|
| `train_fp32`            | tokens/s of fwd+bwd+AdamW, fp32           | native, same                 | ours/ref   |
| `train_bf16`            | same under bf16 autocast                  | native, same                 | ours/ref   |
| `bf16_vs_fp32`          | ours bf16 tokens/s                        | ours fp32 tokens/s           | ours/ref   |
| `generate_b1`, `_b8`    | greedy new tokens/s, KV cache, fp32       | native                       | ours/ref   |
| `train_peak_memory`     | peak memory of a train step (MiB)         | native                       | ours/ref   |
| `glm_partB_logits`      | GLM blank-infilling step, logits on Part B | ours computing all logits   | ours/ref   |
| `mfu_bf16`              | model FLOP/s of ours' bf16 train step     | measured bf16 matmul peak    | fraction   |
| `mfu_fp32`              | model FLOP/s of ours' fp32 train step     | measured fp32 matmul peak    | fraction   |
| `pipeline_tokens_per_s` | tokenize + pack tokens/s, embedded corpus | --                           | = ours     |
| `moe_train_fp32`        | `train_fp32` at the MoE geometry          | native `Glm4MoeForCausalLM`  | ours/ref   |
| `moe_generate_b1`       | `generate_b1` at the MoE geometry         | native `Glm4MoeForCausalLM`  | ours/ref   |

Each model trains the way its own stack does: ours with ``return_logits=False`` (as ``train.py``: logits
only where there is a label), native through its standard ``labels=`` loss. Peak memory is measured in a
fresh process per model and run (CPU: peak RSS above the process's RSS before the model was built, read
from ``VmHWM``; CUDA: ``max_memory_allocated``) so the allocator state of one model never flatters the
other. The bf16-or-fp32 choice of the memory and Part B rows follows ``--mixed_precision`` (``auto``: bf16
where the hardware has it, as ``train.py`` does).

The ``moe_*`` rows run the same measurement at a Mixture-of-Experts geometry (``--moe_preset``; by default
``moe-tiny`` for the tiny preset, ``moe-mini`` otherwise). The JSON's ``compared`` says, per MoE row, which
experts kernel each side ran: ours loops over experts on rows sorted by expert; native runs transformers'
``config._experts_implementation`` (``grouped_mm`` by default in 5.25: ``torch.nn.functional.grouped_mm`` on
CPU).

Rows that need native bf16 (``train_bf16``, ``bf16_vs_fp32``, ``mfu_bf16``) are skipped on a device
without it (``fast_bf16``: no AVX512-BF16/AMX on a CPU), with the reason in the row and the table: there
bf16 is emulated, many times slower than fp32, and timing it says nothing a user would run.
``BILINGUAL_GLM_BF16=0``/``1`` runs the benchmark as on a machine without/with native bf16.

    python benchmarks/run.py --quick --json bench-quick.json    # <= 5 minutes on 2 CPU cores
    python benchmarks/run.py --json bench.json                  # small preset, batch 16 x 256
    python benchmarks/run.py --device cuda --json bench-cuda.json
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning: on a shared machine a spinning thread waits on a peer
# that another job has preempted, and every parallel region pays for it (2-3x slower steps at load 4 on
# 2 cores). Set OMP_WAIT_POLICY=ACTIVE to measure the spinning default on a machine of your own.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import Glm4MoeForCausalLM, GlmForCausalLM, HfArgumentParser  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from bilingual_glm import BilingualGlmConfig, BilingualGlmForCausalLM  # noqa: E402
from bilingual_glm.configuration.configuration_bilingual_glm import (  # noqa: E402
    GLM_SPECIAL_TOKENS,
    PRESETS,
)
from bilingual_glm.conversion import (  # noqa: E402
    glm_config_from_ours,
    to_transformers_glm,
    to_transformers_glm4_moe,
)
from bilingual_glm.modeling.kernels_bilingual_glm import (  # noqa: E402
    BF16_ENV,
    cpu_info,
    fast_bf16,
    onednn_fp32_wins,
    use_fused_qkv,
    use_onednn_linears,
)

ROW_NAMES = (
    "train_fp32",
    "train_bf16",
    "bf16_vs_fp32",
    "generate_b1",
    "generate_b8",
    "train_peak_memory",
    "glm_partB_logits",
    "mfu_bf16",
    "mfu_fp32",
    "pipeline_tokens_per_s",
    "moe_train_fp32",
    "moe_generate_b1",
)
# Rows of the MoE model: the dense row of the same name after the prefix, measured at --moe_preset.
MOE_PREFIX = "moe_"
MOE_ROWS = {name for name in ROW_NAMES if name.startswith(MOE_PREFIX)}
EXPERTS_IMPLEMENTATIONS = ("auto", "eager", "grouped_mm", "batched_mm")
NEEDS_NATIVE_BF16 = ("train_bf16", "bf16_vs_fp32", "mfu_bf16")
TRAIN_ROWS = {"train_fp32", "train_bf16", "bf16_vs_fp32", "mfu_bf16", "mfu_fp32"}
UNITS = {"train_bf16": "tokens/s", "bf16_vs_fp32": "tokens/s", "mfu_bf16": "FLOP/s"}
QUICK = dict(batch_size=8, warmup=1, memory_repeats=1, pipeline_documents=4000)
# Both sides, as train.py and Trainer (adamw_torch_fused) run it.
ADAMW = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)


@dataclass
class BenchArgs:
    """Everything a run depends on; written into the JSON next to the rows."""

    preset: str = field(
        default="small", metadata={"help": "Model size (configuration PRESETS): tiny, small, base."}
    )
    quick: bool = field(
        default=False,
        metadata={"help": f"<= 5 minutes on 2 CPU cores: overrides {QUICK} unless given explicitly."},
    )
    device: str = field(default="cpu", metadata={"help": "cpu or cuda."})
    json_path: str | None = field(
        default=None, metadata={"aliases": ["--json"], "help": "Write machine + rows as JSON to this path."}
    )
    rows: str = field(default="all", metadata={"help": "Comma-separated row names to run, or 'all'."})
    batch_size: int = field(default=16, metadata={"help": "Rows per training batch."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per training row (and GLM source row)."})
    repeats: int = field(default=7, metadata={"help": "Timed runs per side after warm-up (median reported)."})
    warmup: int = field(default=2, metadata={"help": "Untimed runs per side first."})
    gen_prompt: int = field(default=128, metadata={"help": "Prompt length of the generation rows."})
    gen_new: int = field(default=128, metadata={"help": "New tokens per generation (greedy, KV cache)."})
    memory_repeats: int = field(default=2, metadata={"help": "Fresh processes per side for the memory row."})
    mixed_precision: str = field(
        default="auto", metadata={"help": "Memory and Part B rows: bf16, no, or auto (bf16 where supported)."}
    )
    pipeline_documents: int | None = field(
        default=None, metadata={"help": "Documents of the embedded corpus to tokenize (default: all)."}
    )
    moe_preset: str = field(
        default="auto",
        metadata={
            "help": "Model size of the moe_* rows (a preset with routed experts); auto: moe-tiny when --preset "
            "is tiny, else moe-mini."
        },
    )
    moe_experts_implementation: str = field(
        default="auto",
        metadata={
            "help": "Native's experts kernel in the moe_* rows: auto (transformers' own default, grouped_mm in "
            "5.25), eager (its loop over experts), grouped_mm or batched_mm. Ours has one path."
        },
    )
    attn_implementation: str = field(
        default="auto",
        metadata={
            "help": "Attention kernel of both models; auto: each model's own default (ours: the named "
            "cpu_bf16_matmul rule, with oneDNN linears as train.py turns them on; native: sdpa)."
        },
    )
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's)."})
    peak_size: int | None = field(
        default=None,
        metadata={"help": "Side of the square matmul timed for the MFU peaks (CPU 2048, CUDA 4096)."},
    )
    seed: int = field(default=0, metadata={"help": "Seeds weights and batches."})
    compile: bool = field(
        default=False,
        metadata={"help": "torch.compile both models for the train_* rows (opt-in, slow start)."},
    )
    profile: int = field(
        default=0,
        metadata={
            "help": "Also profile fp32 (and, with native bf16, bf16) train steps, 3 per side alternated: the top N "
            "ops per step, and all ops' time split into what both sides share (GEMMs, attention, optimizer) and "
            "the rest."
        },
    )
    memory_worker: str | None = field(
        default=None, metadata={"help": "Internal: measure one side (ours|reference) in this process."}
    )


# ----------------------------------------------------------------------------------------- machine
def machine_info(device: torch.device) -> dict[str, Any]:
    """The CPU (model, vendor, family, the ISA flags that pick the kernels, any cap emulating an older
    kind) and what the rules chose."""
    cpu = cpu_info()
    info: dict[str, Any] = {
        "cpu": cpu["model"],
        "cpu_vendor": cpu["vendor"],
        "cpu_family": cpu["family"],
        "cpu_model_number": cpu["model_number"],
        "cpu_flags": cpu["flags"],
        "cpu_flags_unlimited": cpu["cpu_flags"],
        "isa_cap": cpu["isa_cap"],  # not None: this CPU ran as an older kind (emulated), see ISA_CAP_ENVS
        "fast_bf16": fast_bf16(device),
        "bf16_env": os.environ.get(BF16_ENV),
        "onednn_fp32_linear": device.type == "cpu" and onednn_fp32_wins(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ timing
Seconds = dict[str, float]


def alternate(
    runs: dict[str, Callable[[], Any]], args: BenchArgs, device: torch.device
) -> tuple[Seconds, Seconds]:
    """Median wall and CPU seconds of each callable, run A B A B ... (warm-up rounds first, untimed).

    CPU seconds (``process_time``, every thread of this process) barely move when other jobs preempt
    this one; they go into the JSON as ``cpu_time_ratios`` to tell a real difference from a noisy one.
    """
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(args.warmup + args.repeats):
        for name, run in runs.items():
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            synchronize(device)
            if round_index >= args.warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    median = statistics.median
    return {k: median(v) for k, v in wall.items()}, {k: median(v) for k, v in cpu.items()}


def skipped(name: str, unit: str, reason: str) -> dict:
    """A row that was not measured on this machine, and why."""
    return {"name": name, "ours": None, "reference": None, "ratio": None, "unit": unit, "skipped": reason}


def row(
    name: str, ours: float, reference: float | None, unit: str, ratio: float | None = None, cpu_ratio=None
) -> dict:
    """One result row; ``cpu_ratio`` (the same ratio from CPU seconds) is moved out of the rows by main."""
    if ratio is None:
        ratio = ours / reference if reference else ours
    result = {"name": name, "ours": ours, "reference": reference, "ratio": ratio, "unit": unit}
    return result if cpu_ratio is None else {**result, "_cpu_ratio": cpu_ratio}


# ------------------------------------------------------------------------------------------ models
def ours_attention(args: BenchArgs) -> str | None:
    return None if args.attn_implementation == "auto" else args.attn_implementation


def native_attention(args: BenchArgs) -> str:
    return "sdpa" if args.attn_implementation == "auto" else args.attn_implementation


def build_ours(args: BenchArgs, device: torch.device) -> BilingualGlmForCausalLM:
    """Ours as train.py builds it: its default attention, fused q/k/v, and the oneDNN linears on CPU."""
    torch.manual_seed(args.seed)
    config = BilingualGlmConfig.from_preset(args.preset, attn_implementation=ours_attention(args))
    model = BilingualGlmForCausalLM(config).to(device)
    use_fused_qkv(model)
    if device.type == "cpu":
        use_onednn_linears(model)
    return model


def build_native(ours: BilingualGlmForCausalLM, args: BenchArgs) -> GlmForCausalLM | Glm4MoeForCausalLM:
    """Native with ours' weights: ``GlmForCausalLM``, or ``Glm4MoeForCausalLM`` for a MoE config."""
    native = (to_transformers_glm4_moe if ours.config.is_moe else to_transformers_glm)(ours).to(ours.device)
    native.config._attn_implementation = native_attention(args)
    if ours.config.is_moe and args.moe_experts_implementation != "auto":
        native.set_experts_implementation(args.moe_experts_implementation)
    return native


# What each of transformers' experts implementations runs (integrations/moe.py, 5.25).
NATIVE_EXPERTS_KERNELS = {
    "eager": "Glm4MoeExperts.forward: a loop over the experts hit, index_add_ back",
    "batched_mm": "torch.bmm over each (token, slot) pair's gathered expert weights",
    "grouped_mm": "torch.nn.functional.grouped_mm",  # where torch has the kernel: native_grouped_mm_kernel
}


def native_grouped_mm_kernel(native: Glm4MoeForCausalLM) -> str:
    """``grouped_mm`` runs torch's kernel where it exists for this device and dtype, else transformers' loop
    of one ``torch.mm`` per expert; its private ``_can_use_grouped_mm`` decides, asked here with the real
    weights (eager mode: compiled fp32 always takes the loop)."""
    from transformers.integrations import moe as hf_moe

    can_use = getattr(hf_moe, "_can_use_grouped_mm", None)
    if can_use is None:
        return "unknown (transformers no longer has _can_use_grouped_mm)"
    layer = native.model.layers[native.config.first_k_dense_replace]
    weight = layer.mlp.experts.gate_up_proj.transpose(-2, -1)  # [E, in, out], as _grouped_linear passes it
    experts, width = weight.shape[0], weight.shape[1]
    offsets = torch.arange(1, experts + 1, dtype=torch.int32, device=weight.device)  # one row per expert
    if can_use(weight.new_zeros(experts, width), weight, offsets):
        return NATIVE_EXPERTS_KERNELS["grouped_mm"]
    return "transformers' grouped_mm_fallback: one torch.mm per expert"


def experts_compared(native: Glm4MoeForCausalLM, args: BenchArgs) -> dict[str, str]:
    """What a MoE row compares: the geometry, ours' experts path, and the kernel native's experts ran.

    transformers picks native's path when the model is built (``config._experts_implementation``:
    ``grouped_mm`` by default in 5.25, unless ``--moe_experts_implementation`` names another).
    """
    config = native.config
    implementation = config._experts_implementation
    if implementation == "grouped_mm":
        kernel = native_grouped_mm_kernel(native)
    else:
        kernel = NATIVE_EXPERTS_KERNELS.get(implementation, implementation)
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    geometry = (
        f"{config.n_routed_experts} routed experts (top-{config.num_experts_per_tok}) + {config.n_shared_experts} "
        f"shared of width {config.moe_intermediate_size}, {moe_layers} of {config.num_hidden_layers} layers MoE"
    )
    return {
        "preset": args.preset,
        "geometry": geometry,
        "ours": "BilingualGlmExperts: (token, slot) pairs sorted by expert, one F.linear pair per expert",
        "reference": f"Glm4MoeForCausalLM, experts_implementation={implementation}: {kernel}",
        "native_experts_implementation": implementation,
        "native_experts_kernel": kernel,
    }


def random_ids(
    args: BenchArgs, vocab_size: int, batch: int, length: int, device: torch.device
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(len(GLM_SPECIAL_TOKENS), vocab_size, (batch, length), generator=generator)
    return ids.to(device)


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def train_step(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device, bf16: bool
) -> Callable[[], None]:
    """One fwd+bwd+AdamW step, each model trained the way its own stack trains it."""
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    ours = isinstance(getattr(model, "_orig_mod", model), BilingualGlmForCausalLM)  # compiled or not
    extra = {"return_logits": False} if ours else {}
    model.train()

    def step() -> None:
        with autocast(device, bf16):
            loss = model(**batch, use_cache=False, **extra).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def matmul_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """PaLM-style training FLOPs per token: 6 x (weights used in matmuls) + 12 x layers x width x seq_len.

    Weights = every ``nn.Linear`` (``lm_head`` included, the embedding lookup not); attention is counted
    over the full square (no causal discount), as in the PaLM appendix and nanoGPT's ``estimate_mfu``.
    """
    config = model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6 * linear + attention


def matmul_peak(device: torch.device, size: int, repeats: int, dtype: torch.dtype) -> float:
    """Best FLOP/s of a square matmul in ``dtype`` on this device (the denominator of MFU)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for index in range(repeats + 2):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        if index >= 2:
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# -------------------------------------------------------------------------------------------- rows
def bench_train(args: BenchArgs, device: torch.device, wanted: set[str]) -> list[dict]:
    """The train_* and mfu_* rows; bf16 ones only where bf16 is native (skipped rows say why)."""
    rows = []
    if not fast_bf16(device):
        reason = f"no native bf16 on this {device.type} (emulated bf16 is slower than fp32)"
        rows += [skipped(name, UNITS[name], reason) for name in NEEDS_NATIVE_BF16 if name in wanted]
        wanted = wanted - set(NEEDS_NATIVE_BF16)
    if not wanted:
        return rows
    ours = build_ours(args, device)
    native = build_native(ours, args)
    ids = random_ids(args, ours.config.vocab_size, args.batch_size, args.seq_len, device)
    batch = {"input_ids": ids, "labels": ids}
    tokens = ids.numel()
    if args.compile:  # both sides alike; compilation happens in the warm-up rounds
        ours, native = torch.compile(ours), torch.compile(native)
    seconds, cpu = {}, {}
    peak_size = args.peak_size or (4096 if device.type == "cuda" else 2048)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {p: matmul_peak(device, peak_size, 15, dtypes[p]) for p in dtypes if f"mfu_{p}" in wanted}
    for precision in ("fp32", "bf16"):
        if not wanted & {f"train_{precision}", "bf16_vs_fp32", f"mfu_{precision}"}:
            continue
        bf16 = precision == "bf16"
        steps = {
            "ours": train_step(ours, batch, device, bf16),
            "reference": train_step(native, batch, device, bf16),
        }
        seconds[precision], cpu[precision] = alternate(steps, args, device)
        gc.collect()
        ours_tps, ref_tps = (tokens / seconds[precision][side] for side in ("ours", "reference"))
        cpu_ratio = cpu[precision]["reference"] / cpu[precision]["ours"]
        if f"train_{precision}" in wanted:
            rows.append(row(f"train_{precision}", ours_tps, ref_tps, "tokens/s", cpu_ratio=cpu_ratio))
    if "bf16_vs_fp32" in wanted:
        bf16_tps, fp32_tps = tokens / seconds["bf16"]["ours"], tokens / seconds["fp32"]["ours"]
        cpu_ratio = cpu["fp32"]["ours"] / cpu["bf16"]["ours"]
        rows.append(row("bf16_vs_fp32", bf16_tps, fp32_tps, "tokens/s", cpu_ratio=cpu_ratio))
    for precision, peak in peaks.items():
        achieved = matmul_flops_per_token(ours, args.seq_len) * tokens / seconds[precision]["ours"]
        peak = max(peak, matmul_peak(device, peak_size, 15, dtypes[precision]))  # best of before and after
        rows.append(row(f"mfu_{precision}", achieved, peak, "FLOP/s"))
    return rows


def greedy(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
        )


def bench_generate(args: BenchArgs, device: torch.device, wanted: set[str]) -> list[dict]:
    """Greedy decoding of ``gen_new`` tokens after a ``gen_prompt`` prompt, fp32, dynamic KV cache."""
    ours = build_ours(args, device).eval()
    native = build_native(ours, args).eval()
    for model in (ours, native):  # exactly gen_new tokens: no early stop
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = ours.config.pad_token_id
    rows = []
    for batch in (1, 8):
        if f"generate_b{batch}" not in wanted:
            continue
        ids = random_ids(args, ours.config.vocab_size, batch, args.gen_prompt, device)
        ours_tokens, native_tokens = greedy(ours, ids, args.gen_new), greedy(native, ids, args.gen_new)
        if not torch.equal(ours_tokens, native_tokens):  # fp32 kernels round differently: near-ties flip
            first = int((ours_tokens != native_tokens).any(0).nonzero()[0]) - args.gen_prompt
            note = f"note: generate_b{batch} ({args.preset}): tokens differ from new token {first} on"
            print(note, file=sys.stderr)
        runs = {
            side: partial(greedy, model, ids, args.gen_new)
            for side, model in (("ours", ours), ("reference", native))
        }
        warmed = dataclasses.replace(args, warmup=max(args.warmup - 1, 0))  # the check above warmed up
        seconds, cpu = alternate(runs, warmed, device)
        new_tokens = batch * args.gen_new
        rows.append(
            row(
                f"generate_b{batch}",
                new_tokens / seconds["ours"],
                new_tokens / seconds["reference"],
                "new tokens/s",
                cpu_ratio=cpu["reference"] / cpu["ours"],
            )
        )
    return rows


def bench_moe(args: BenchArgs, device: torch.device, wanted: set[str]) -> list[dict]:
    """The moe_* rows: the dense rows of the same name (``bench_train``, ``bench_generate``) at the MoE preset.

    Each row carries ``_compared`` (what ran on each side, ``experts_compared``), which main moves into the
    JSON's ``compared`` as it moves ``_cpu_ratio`` into ``cpu_time_ratios``.
    """
    dense = {name.removeprefix(MOE_PREFIX) for name in wanted & MOE_ROWS}
    moe_args = dataclasses.replace(args, preset=args.moe_preset)
    rows = bench_train(moe_args, device, dense & TRAIN_ROWS) + bench_generate(moe_args, device, dense)
    compared = experts_compared(build_native(build_ours(moe_args, device), moe_args), moe_args)
    return [{**r, "name": MOE_PREFIX + r["name"], "_compared": compared} for r in rows]


# glibc serves allocations of at least this size with their own mmap and unmaps them on free, so RSS follows the
# bytes alive. With its default (adaptive) threshold, freed blocks stay in the heap by chance: the same worker's
# peak then moved by +-15 MiB from run to run (small, bf16), more than the models differ. Ignored off glibc.
MALLOC_MMAP_THRESHOLD = "65536"


def memory_peak(args: BenchArgs, side: str, bf16: bool) -> float:
    """One fresh worker process's peak MiB above its pre-build RSS (``side``: ours or reference)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--memory_worker", side]
    command += ["--preset", args.preset, "--device", args.device, "--seed", str(args.seed)]
    command += ["--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len)]
    command += ["--mixed_precision", "bf16" if bf16 else "no"]
    command += ["--attn_implementation", args.attn_implementation]
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = {"MALLOC_MMAP_THRESHOLD_": MALLOC_MMAP_THRESHOLD, **os.environ}  # a caller's own setting wins
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"memory worker ({side}) failed:\n{result.stdout}\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def bench_memory(args: BenchArgs, device: torch.device, bf16: bool) -> list[dict]:
    """Peak memory of a train step, each side in fresh processes, alternated."""
    peaks: dict[str, list[float]] = {"ours": [], "reference": []}
    for _ in range(args.memory_repeats):
        for side in peaks:
            peaks[side].append(memory_peak(args, side, bf16))
    ours, reference = (statistics.median(peaks[side]) for side in ("ours", "reference"))
    return [row("train_peak_memory", ours, reference, "MiB")]


def _rss_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def memory_worker(args: BenchArgs, device: torch.device) -> None:
    """Build one side, run two train steps, print its peak memory above the pre-build baseline as JSON."""
    bf16 = args.mixed_precision == "bf16"
    config = BilingualGlmConfig.from_preset(args.preset, attn_implementation=ours_attention(args))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = _rss_kib("VmRSS") * 1024
    torch.manual_seed(args.seed)
    if args.memory_worker == "ours":
        model: torch.nn.Module = BilingualGlmForCausalLM(config)
        use_fused_qkv(model)
        if device.type == "cpu":
            use_onednn_linears(model)
    else:
        model = GlmForCausalLM(glm_config_from_ours(config))
        model.config._attn_implementation = native_attention(args)
    model.to(device)
    ids = random_ids(args, config.vocab_size, args.batch_size, args.seq_len, device)
    step = train_step(model, {"input_ids": ids, "labels": ids}, device, bf16)
    for _ in range(2):
        step()
    synchronize(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _rss_kib("VmHWM") * 1024
    print(json.dumps({"side": args.memory_worker, "peak_mib": (peak - baseline) / 2**20}))


def glm_batch(args: BenchArgs, vocab_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A token-level (GLM-Base) blank-infilling batch from random sources of ``seq_len`` tokens."""
    from bilingual_glm.data import GLM_BASE_MIXTURE, BlankInfillingCollator

    sources = random_ids(args, vocab_size, args.batch_size, args.seq_len, torch.device("cpu"))
    collator = BlankInfillingCollator(mixture=GLM_BASE_MIXTURE, seed=args.seed)
    batch = collator([{"input_ids": row.tolist()} for row in sources])
    return {key: value.to(device) for key, value in batch.items()}


def bench_partb(args: BenchArgs, device: torch.device, bf16: bool) -> list[dict]:
    """A GLM train step with logits on supervised (Part B) positions only vs logits everywhere."""
    model = build_ours(args, device)
    batch = glm_batch(args, model.config.vocab_size, device)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels")}
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    model.train()

    def part_b() -> None:
        with autocast(device, bf16):
            loss = model(**batch, use_cache=False, return_logits=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def all_logits() -> None:  # what a standard HF causal LM loss does
        with autocast(device, bf16):
            logits = model(**inputs, use_cache=False).logits
            loss = F.cross_entropy(
                logits.float().flatten(0, 1), batch["shift_labels"].flatten(), ignore_index=-100
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, cpu = alternate({"ours": part_b, "reference": all_logits}, args, device)
    tokens = int(batch["attention_mask"].sum())
    ours, reference = tokens / seconds["ours"], tokens / seconds["reference"]
    cpu_ratio = cpu["reference"] / cpu["ours"]
    return [row("glm_partB_logits", ours, reference, "tokens/s", cpu_ratio=cpu_ratio)]


def bench_pipeline(args: BenchArgs) -> list[dict]:
    """Tokenize + pack (``pack_causal``, block ``seq_len``) the embedded corpus in batches of 1000."""
    from bilingual_glm.corpora import load_demo_corpus
    from bilingual_glm.data import pack_causal
    from bilingual_glm.tokenizer import train_tokenizer

    texts = load_demo_corpus("train")["text"]
    if args.pipeline_documents:
        texts = texts[: args.pipeline_documents]
    vocab_size = BilingualGlmConfig.from_preset(args.preset).vocab_size
    tokenizer = train_tokenizer(texts[::10], vocab_size=vocab_size)  # untimed: a tokenizer to time with
    packed_tokens = 0

    def pipeline() -> None:
        nonlocal packed_tokens
        packed_tokens = 0
        for start in range(0, len(texts), 1000):
            ids = tokenizer(texts[start : start + 1000], add_special_tokens=False, verbose=False)["input_ids"]
            blocks = pack_causal(
                {"input_ids": ids}, block_size=args.seq_len, eos_token_id=tokenizer.eos_token_id
            )
            packed_tokens += sum(map(len, blocks["input_ids"]))

    runs = dataclasses.replace(args, warmup=1, repeats=3)
    seconds = alternate({"ours": pipeline}, runs, torch.device("cpu"))[0]["ours"]
    value = packed_tokens / seconds
    return [row("pipeline_tokens_per_s", value, None, "tokens/s", ratio=value)]


# What both sides run on the same kernels, by profiler op name (substrings): the GEMM library (MKL, or oneDNN
# where ours' rule takes it), torch's SDPA kernels, the fused AdamW. Everything else ("other": norms, RoPE,
# activations, the loss's softmax, copies, the autograd engine) is where the two models' code differs.
SHARED_OPS = {
    "gemm": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise"),
    "attention": ("scaled_dot_product",),
    "optimizer": ("aten::_fused_adam", "aten::_foreach_", "Optimizer."),
}


def op_category(op: str) -> str:
    """``gemm``, ``attention``, ``optimizer`` (``SHARED_OPS``) or ``other``."""
    for category, names in SHARED_OPS.items():
        if any(name in op for name in names):
            return category
    return "other"


def profile_split(ours: dict[str, float], reference: dict[str, float]) -> dict[str, Any]:
    """Each side's self ms per category (``op_category``) and the ceiling of the ratio.

    The ceiling is reference's step over ours' shared part (``SHARED_OPS``): the ratio ours would reach if all
    its "other" work cost nothing. Where it is near 1.1, no change to the model's own ops can reach 1.1.
    """
    split: dict[str, Any] = {}
    for side, ops in (("ours", ours), ("reference", reference)):
        totals = dict.fromkeys([*SHARED_OPS, "other"], 0.0)
        for op, ms in ops.items():
            totals[op_category(op)] += ms
        split[side] = {name: round(ms, 2) for name, ms in totals.items()} | {"total": round(sum(ops.values()), 2)}
    shared = sum(split["ours"][name] for name in SHARED_OPS)
    split["ceiling"] = split["reference"]["total"] / shared if shared else None
    return split


PROFILE_ROUNDS = 3  # profiled steps per side, alternated: one step's split moved by ±10 % on a noisy machine


def profile_train_step(
    args: BenchArgs, device: torch.device, precisions: tuple[str, ...] = ("bf16", "fp32")
) -> tuple[dict[str, dict[str, list[dict]]], dict[str, dict[str, Any]]]:
    """torch.profiler over ``PROFILE_ROUNDS`` train steps per precision and side, alternated after a
    warm-up step, per step: top ops by self time, as ``{"bf16": {"ours": [...], "reference": [...]},
    "fp32": {...}}``, and per precision the ``profile_split`` of all ops."""
    from torch.profiler import ProfilerActivity, profile

    ours = build_ours(args, device)
    native = build_native(ours, args)
    ids = random_ids(args, ours.config.vocab_size, args.batch_size, args.seq_len, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tops: dict[str, dict[str, list[dict]]] = {}
    splits: dict[str, dict[str, Any]] = {}
    for precision in precisions:
        steps = {
            side: train_step(model, {"input_ids": ids, "labels": ids}, device, bf16=precision == "bf16")
            for side, model in (("ours", ours), ("reference", native))
        }
        self_ms: dict[str, Counter] = {side: Counter() for side in steps}
        calls: dict[str, Counter] = {side: Counter() for side in steps}
        for step in steps.values():
            step()
        for _ in range(PROFILE_ROUNDS):
            for side, step in steps.items():
                with profile(activities=activities) as profiler:
                    step()
                    synchronize(device)
                for e in profiler.key_averages():
                    self_ms[side][e.key] += (e.self_cpu_time_total + e.self_device_time_total) / 1e3 / PROFILE_ROUNDS
                    calls[side][e.key] += e.count
        tops[precision] = {}
        for side, ops in self_ms.items():
            total = sum(ops.values()) or 1
            top = [
                {
                    "op": op,
                    "self_ms": round(ms, 2),
                    "share": round(ms / total, 4),
                    "calls": calls[side][op] // PROFILE_ROUNDS,
                }
                for op, ms in ops.most_common(args.profile)
            ]
            tops[precision][side] = top
            print(f"profile, {side}, {args.preset} {precision} train step ({total:.1f} ms of self time):")
            for op in top:
                print(f"  {op['self_ms']:9.1f} ms  {op['share']:6.1%}  {op['calls']:5d}x  {op['op']}")
        split = splits[precision] = profile_split(self_ms["ours"], self_ms["reference"])
        for side in steps:
            parts = ", ".join(f"{name} {ms:.1f}" for name, ms in split[side].items())
            print(f"profile split, {side}, {precision} (self ms per step): {parts}")
        ceiling = "n/a" if split["ceiling"] is None else f"{split['ceiling']:.3f}"
        print(f"{precision}: ours/reference if ours' 'other' ops cost nothing: {ceiling}")
    return tops, splits


# -------------------------------------------------------------------------------------------- main
def resolve(args: BenchArgs, explicit: set[str]) -> BenchArgs:
    if args.quick:
        args = dataclasses.replace(args, **{k: v for k, v in QUICK.items() if k not in explicit})
    if args.mixed_precision not in ("auto", "bf16", "no"):
        raise ValueError(f"--mixed_precision must be auto, bf16 or no, got {args.mixed_precision!r}")
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats}, {args.warmup}")
    unknown = set(args.rows.split(",")) - set(ROW_NAMES) - {"all"}
    if unknown:
        raise ValueError(f"--rows: unknown row(s) {sorted(unknown)}; choose from {ROW_NAMES}")
    if args.moe_preset == "auto":  # the MoE twin of the run's size, as the dense rows follow --preset
        args = dataclasses.replace(args, moe_preset="moe-tiny" if args.preset == "tiny" else "moe-mini")
    if not PRESETS.get(args.moe_preset, {}).get("n_routed_experts"):
        moe_presets = [name for name, preset in PRESETS.items() if preset.get("n_routed_experts")]
        raise ValueError(
            f"--moe_preset must be a preset with routed experts {moe_presets}, got {args.moe_preset!r}"
        )
    if args.moe_experts_implementation not in EXPERTS_IMPLEMENTATIONS:
        raise ValueError(
            f"--moe_experts_implementation must be one of {EXPERTS_IMPLEMENTATIONS}, "
            f"got {args.moe_experts_implementation!r}"
        )
    return args


def markdown(rows: list[dict]) -> str:
    lines = ["| name | ours | reference | ratio | unit |", "|---|---:|---:|---:|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| `{r['name']}` | skipped: {r['skipped']} | — | — | {r['unit']} |")
            continue
        reference = "—" if r["reference"] is None else f"{r['reference']:.4g}"
        lines.append(f"| `{r['name']}` | {r['ours']:.4g} | {reference} | {r['ratio']:.3f} | {r['unit']} |")
    return "\n".join(lines)


def main(args: BenchArgs) -> dict[str, Any]:
    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_worker:
        memory_worker(args, device)
        return {}
    wanted = set(ROW_NAMES) if args.rows == "all" else set(args.rows.split(","))
    bf16 = args.mixed_precision == "bf16" or (args.mixed_precision == "auto" and fast_bf16(device))
    machine = machine_info(device)
    settings = {**dataclasses.asdict(args), "mixed_precision_resolved": "bf16" if bf16 else "no"}
    print(json.dumps({"machine": machine, "settings": settings}))
    started = time.perf_counter()
    groups: list[tuple[set[str], Callable[[], list[dict]]]] = [
        (TRAIN_ROWS, lambda: bench_train(args, device, wanted & TRAIN_ROWS)),
        ({"generate_b1", "generate_b8"}, lambda: bench_generate(args, device, wanted)),
        ({"train_peak_memory"}, lambda: bench_memory(args, device, bf16)),
        ({"glm_partB_logits"}, lambda: bench_partb(args, device, bf16)),
        ({"pipeline_tokens_per_s"}, lambda: bench_pipeline(args)),
        (MOE_ROWS, lambda: bench_moe(args, device, wanted)),
    ]
    rows: list[dict] = []
    for names, bench in groups:
        if wanted & names:
            group_start = time.perf_counter()
            rows += bench()
            print(f"{sorted(wanted & names)}: {time.perf_counter() - group_start:.1f} s", flush=True)
    rows.sort(key=lambda r: ROW_NAMES.index(r["name"]))
    cpu_time_ratios = {r["name"]: r.pop("_cpu_ratio") for r in rows if "_cpu_ratio" in r}
    compared = {r["name"]: r.pop("_compared") for r in rows if "_compared" in r}
    machine["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    settings["seconds"] = round(time.perf_counter() - started, 1)
    print(markdown(rows))
    print(f"{settings['seconds']} s; load average {machine['loadavg_start']} -> {machine['loadavg_end']}")
    print("ratios from CPU seconds: " + json.dumps({k: round(v, 3) for k, v in cpu_time_ratios.items()}))
    for name, sides in compared.items():
        print(f"{name}: ours {sides['ours']}; reference {sides['reference']} ({sides['geometry']})")
    payload: dict[str, Any] = {
        "machine": machine,
        "settings": settings,
        "rows": rows,
        "cpu_time_ratios": cpu_time_ratios,
        "compared": compared,
    }
    if args.profile:  # the dense steps unless only MoE rows were asked for; the MoE fp32 step with MoE rows
        precisions = ("bf16", "fp32") if fast_bf16(device) else ("fp32",)  # emulated bf16: as the rows skip it
        profile, split = profile_train_step(args, device, precisions) if wanted - MOE_ROWS else ({}, {})
        if wanted & MOE_ROWS:
            moe_args = dataclasses.replace(args, preset=args.moe_preset)
            moe, moe_split = profile_train_step(moe_args, device, precisions=("fp32",))
            profile.update({MOE_PREFIX + precision: tops for precision, tops in moe.items()})
            split.update({MOE_PREFIX + precision: parts for precision, parts in moe_split.items()})
        payload["profile"], payload["profile_split"] = profile, split
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(payload, indent=2) + "\n")
    return payload


if __name__ == "__main__":
    parser = HfArgumentParser(BenchArgs)
    (parsed,) = parser.parse_args_into_dataclasses()
    given = {arg.lstrip("-").split("=")[0] for arg in sys.argv[1:] if arg.startswith("--")}
    try:
        main(resolve(parsed, given))
    except ValueError as error:
        print(f"run.py: error: {error}", file=sys.stderr)
        sys.exit(2)
