"""Does each CPU fast path win on *this* CPU? Times it against the plain op it replaces and checks the rule.

The model takes two CPU paths by rule (``modeling/kernels_bilingual_glm.py``): fp32 linears on oneDNN
(``onednn_fp32_wins``: the CPU kinds where it was measured to win, ``ONEDNN_FP32_WINS``) and bf16 attention
as two bf16 matmuls (``fast_bf16``: native bf16 only); train.py's Muon runs its Newton-Schulz iteration in
bf16 by the same rule (``newton_schulz_dtype``), else in fp32. Rules, not timings at start-up, so a run's numbers
never depend on what a first measurement saw; this script is how a rule is checked on a new kind of CPU:
it prints the kind, whether the rule table knows it, and the rule's verdict next to each measurement, so a
user can report a row. The oneDNN rule is one switch for every linear, so it is judged on the whole
model's linears (``onednn_fp32_linear``, each projection times its count); the per-projection rows are its
parts. Shapes are the ``small`` preset's at 16 x 256 tokens (the benchmark's training batch). Prints one
JSON object and a table; exits 0 either way. Run it under the ISA caps (``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``) to check an AVX2-only kind on a newer CPU: the
rules read the same caps.

    python benchmarks/cpu_paths.py [--json kernels.json] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as benchmarks/run.py: fair on a shared machine

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bilingual_glm import BilingualGlmConfig  # noqa: E402
from bilingual_glm.modeling import kernels_bilingual_glm as kernels  # noqa: E402
from bilingual_glm.training.optimizers import MUON_DEFAULTS, newton_schulz_dtype, orthogonalize  # noqa: E402

WIN = 1.05  # a path "wins" when it is at least 5 % faster than what it replaces


def best_of(run: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` calls after two untimed ones (median: robust to a busy machine)."""
    for _ in range(2):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The model's oneDNN linear whatever the rule says (forward and both backward matmuls on oneDNN)."""
    return kernels._OneDnnLinear.apply(x, weight, None)


def linear_rows(config: BilingualGlmConfig, tokens: int, repeats: int) -> list[dict]:
    """fp32 forward + both backward matmuls of each projection: MKL (``F.linear``) vs oneDNN, then the whole
    model's linears (each projection's times its count in the model), which the rule is judged on: it is one
    switch for every linear (``use_onednn_linears``), so one projection near a tie decides nothing."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_size = config.num_attention_heads * config.head_dim
    qkv = q_size + 2 * config.num_key_value_heads * config.head_dim
    shapes = {"qkv": (hidden, qkv), "o": (q_size, hidden), "gate_up": (hidden, 2 * inter), "down": (inter, hidden)}
    shapes["lm_head"] = (hidden, config.vocab_size)
    counts = dict.fromkeys(shapes, config.num_hidden_layers) | {"lm_head": 1}
    rows, seconds, total_flops = [], {"fast": 0.0, "plain": 0.0}, 0
    for name, (k, n) in shapes.items():
        x = torch.randn(tokens, k, requires_grad=True)
        weight = torch.randn(n, k, requires_grad=True)
        grad = torch.randn(tokens, n)

        def step(function: Callable, x=x, weight=weight, grad=grad) -> None:
            torch.autograd.grad(function(x, weight), (x, weight), grad)

        mkl = best_of(lambda step=step: step(F.linear), repeats)
        onednn = best_of(lambda step=step: step(onednn_linear), repeats)
        flops = 3 * 2 * tokens * k * n
        seconds["fast"] += counts[name] * onednn
        seconds["plain"] += counts[name] * mkl
        total_flops += counts[name] * flops
        rows.append(
            {
                "path": f"onednn_fp32_linear[{name}]",
                "fast_gflops": flops / onednn / 1e9,
                "plain_gflops": flops / mkl / 1e9,
                "speedup": mkl / onednn,
            }
        )
    rows.append(
        {
            "path": "onednn_fp32_linear",
            "fast_gflops": total_flops / seconds["fast"] / 1e9,
            "plain_gflops": total_flops / seconds["plain"] / 1e9,
            "speedup": seconds["plain"] / seconds["fast"],
        }
    )
    return rows


def attention_row(config: BilingualGlmConfig, batch: int, length: int, repeats: int) -> dict:
    """bf16 forward + backward of causal GQA attention: two bf16 matmuls vs SDPA under bf16 autocast."""
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(batch, heads, length, dim, generator=generator, requires_grad=True)
    key = torch.randn(batch, kv_heads, length, dim, generator=generator, requires_grad=True)
    value = torch.randn(batch, kv_heads, length, dim, generator=generator, requires_grad=True)
    grad = torch.randn(batch, length, heads, dim).bfloat16()
    module = torch.nn.Module()
    module.training, module.attention_dropout = True, 0.0

    def matmuls() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = kernels.matmul_attention_forward(module, query, key, value, None, dim**-0.5)[0]
        torch.autograd.grad(out, (query, key, value), grad)

    def sdpa() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
        torch.autograd.grad(out.transpose(1, 2), (query, key, value), grad)

    fast, plain = best_of(matmuls, repeats), best_of(sdpa, repeats)
    flops = 3 * 4 * batch * heads * length * length * dim  # two matmuls, forward + 2x backward
    return {
        "path": "bf16_matmul_attention",
        "fast_gflops": flops / fast / 1e9,
        "plain_gflops": flops / plain / 1e9,
        "speedup": plain / fast,
    }


def newton_schulz_row(config: BilingualGlmConfig, repeats: int) -> dict:
    """One layer's Muon orthogonalization (q, k, v, o, gate_up, down): bf16, as torch.optim.Muon runs it,
    vs fp32 (``optimizers.Muon`` where bf16 is not native)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shapes = [(q, hidden), (kv, hidden), (kv, hidden), (hidden, q), (2 * inter, hidden), (hidden, inter)]
    generator = torch.Generator().manual_seed(0)
    matrices = [torch.randn(shape, generator=generator) for shape in shapes]
    ns = (MUON_DEFAULTS["ns_coefficients"], MUON_DEFAULTS["ns_steps"], MUON_DEFAULTS["eps"])

    def run(dtype: torch.dtype) -> None:
        for matrix in matrices:
            orthogonalize(matrix, *ns, dtype)

    fast, plain = best_of(lambda: run(torch.bfloat16), repeats), best_of(lambda: run(torch.float32), repeats)
    flops = sum(ns[1] * (4 * min(m, n) ** 2 * max(m, n) + 2 * min(m, n) ** 3) for m, n in shapes)
    return {
        "path": "bf16_newton_schulz",
        "fast_gflops": flops / fast / 1e9,
        "plain_gflops": flops / plain / 1e9,
        "speedup": plain / fast,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", dest="json_path", help="Write the result here too.")
    parser.add_argument("--repeats", type=int, default=20, help="Timed calls per path (median reported).")
    parser.add_argument("--tokens", type=int, default=16 * 256, help="Rows of the linears (batch x length).")
    args = parser.parse_args()
    config = BilingualGlmConfig.from_preset("small")
    rules = {
        "onednn_fp32_linear": kernels.onednn_fp32_wins(),
        "bf16_matmul_attention": kernels.fast_bf16(),
        "bf16_newton_schulz": newton_schulz_dtype() == torch.bfloat16,
    }
    rows = linear_rows(config, args.tokens, args.repeats)
    rows.append(
        attention_row(config, batch=args.tokens // 256, length=256, repeats=max(3, args.repeats // 4))
    )
    rows.append(newton_schulz_row(config, max(3, args.repeats // 4)))
    for row in rows:  # a "[projection]" row is one part of the rule's measurement: shown, not judged
        path, part = row["path"].split("[")[0], "[" in row["path"]
        rule, wins = rules[path], row["speedup"] >= WIN
        row.update(rule_takes_it=rule, wins=wins, rule_agrees=None if part else rule == wins)
    cpu = kernels.cpu_info()
    kind = kernels.cpu_kind(cpu)
    payload = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__}
    payload["kind"] = {"vendor": kind[0], "isa": kind[1], "measured": kind in kernels.ONEDNN_FP32_WINS}
    payload["rows"] = rows
    print(json.dumps(payload, indent=2))
    known = (
        "a measured kind" if payload["kind"]["measured"] else "never measured: the rule keeps the plain op"
    )
    emulated = f", emulated under an ISA cap at {cpu['isa_cap']}" if cpu["isa_cap"] else ""
    print(
        f"CPU: {cpu['model']} (family {cpu['family']} model {cpu['model_number']}, flags {cpu['flags']}"
        f"{emulated}); kind {kind}: {known}"
    )
    print("| path | fast GFLOP/s | plain GFLOP/s | speedup | rule takes it | rule agrees |")
    print("|---|---:|---:|---:|---|---|")
    for r in rows:
        print(
            f"| `{r['path']}` | {r['fast_gflops']:.0f} | {r['plain_gflops']:.0f} | {r['speedup']:.2f} "
            f"| {r['rule_takes_it']} | {'(part)' if r['rule_agrees'] is None else r['rule_agrees']} |"
        )
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)


if __name__ == "__main__":
    main()
