"""Smoke test of benchmarks/run.py: a tiny run end to end, checking the JSON it writes (not the timings)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--quick", "--threads", "1", "--batch_size", "2", "--seq_len", "32"]
TINY += ["--gen_prompt", "8", "--gen_new", "4", "--repeats", "1", "--warmup", "0"]
TINY += ["--memory_repeats", "1", "--pipeline_documents", "200", "--peak_size", "256"]
ROWS = [
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
]
MOE_ROWS = {"moe_train_fp32", "moe_generate_b1"}


NEEDS_NATIVE_BF16 = {"train_bf16", "bf16_vs_fp32", "mfu_bf16"}


def run_bench(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """benchmarks/run.py in a fresh process from the repository root, output captured."""
    command = [sys.executable, str(ROOT / "benchmarks" / "run.py"), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("native_bf16", ["1", "0"])
def test_tiny_run_writes_every_row_with_the_documented_schema(tmp_path, native_bf16):
    """Run as on a machine with native bf16 and as on one without (BILINGUAL_GLM_BF16), whatever this is:
    without it the bf16 rows are skipped with a reason, never timed (emulated bf16 hung here before)."""
    out = tmp_path / "bench.json"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "BILINGUAL_GLM_BF16": native_bf16,
    }
    result = run_bench(*TINY, "--json", str(out), env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    payload = json.loads(out.read_text())
    machine = payload["machine"]
    assert {
        "cpu",
        "cpu_vendor",
        "cpu_family",
        "cpu_flags",
        "isa_cap",
        "threads",
        "torch",
        "transformers",
        "device",
    } <= set(machine)
    assert machine["threads"] == 1 and machine["device"] == "cpu"
    assert machine["fast_bf16"] is (native_bf16 == "1")
    assert payload["settings"]["mixed_precision_resolved"] == ("bf16" if native_bf16 == "1" else "no")
    rows = payload["rows"]
    assert [row["name"] for row in rows] == ROWS
    measured = [row for row in rows if "skipped" not in row]
    skipped = {row["name"] for row in rows if "skipped" in row}
    assert skipped == (set() if native_bf16 == "1" else NEEDS_NATIVE_BF16)
    for row in rows:
        if row["name"] in skipped:
            assert row["ours"] is row["reference"] is row["ratio"] is None, row
            assert "no native bf16" in row["skipped"], row
            assert f"| `{row['name']}` | skipped: no native bf16" in result.stdout
    for row in measured:
        assert set(row) == {"name", "ours", "reference", "ratio", "unit"}, row
        assert isinstance(row["unit"], str) and row["unit"]
        assert math.isfinite(row["ours"]) and row["ours"] > 0, row
        if row["name"] == "pipeline_tokens_per_s":
            assert row["reference"] is None and row["ratio"] == row["ours"]
        else:
            assert math.isfinite(row["reference"]) and row["reference"] > 0, row
            assert math.isclose(row["ratio"], row["ours"] / row["reference"], rel_tol=1e-9), row
    by_name = {row["name"]: row for row in rows}
    if native_bf16 == "1":
        assert by_name["bf16_vs_fp32"]["ours"] == by_name["train_bf16"]["ours"]
        assert by_name["bf16_vs_fp32"]["reference"] == by_name["train_fp32"]["ours"]
    # MFU is a ratio of two timings: no bound on it here (a tiny bf16 step outran an emulated-bf16 "peak"
    # on a Zen 3, 1.88). Its arithmetic is the model's FLOPs over the step time, against a peak in FLOP/s.
    assert by_name["mfu_fp32"]["unit"] == "FLOP/s"
    timed = {"train_fp32", "train_bf16", "bf16_vs_fp32", "generate_b1", "generate_b8", "glm_partB_logits"}
    timed |= MOE_ROWS
    assert set(payload["cpu_time_ratios"]) == timed - skipped  # the noise check next to the wall-clock ratios
    cpu_ratios = payload["cpu_time_ratios"]
    assert all(math.isfinite(ratio) and ratio > 0 for ratio in cpu_ratios.values()), cpu_ratios
    # What each MoE row compared: the tiny run's MoE twin, and the experts kernel native ran (named, not assumed).
    assert payload["settings"]["moe_preset"] == "moe-tiny"
    assert set(payload["compared"]) == MOE_ROWS
    for compared in payload["compared"].values():
        assert compared["preset"] == "moe-tiny"
        assert compared["native_experts_implementation"] in {"eager", "grouped_mm", "batched_mm"}, compared
        for key in ("ours", "reference", "geometry", "native_experts_kernel"):
            assert isinstance(compared[key], str) and compared[key], compared
    for name in ("train_fp32", "moe_train_fp32"):  # the markdown table for the README
        assert f"| `{name}` |" in result.stdout


def test_moe_preset_without_experts_is_a_clear_error():
    """--moe_preset names a size for the MoE rows: a dense preset is refused before anything is built."""
    result = run_bench("--rows", "moe_train_fp32", "--moe_preset", "tiny", timeout=120)
    assert result.returncode == 2
    assert "--moe_preset" in result.stderr and "moe-mini" in result.stderr


def test_unknown_row_is_a_clear_error():
    result = run_bench("--rows", "train_fp64", timeout=120)
    assert result.returncode == 2
    assert "train_fp64" in result.stderr


@pytest.fixture
def bench():
    """benchmarks/run.py as a module. It sets env defaults (OMP_WAIT_POLICY, ...) on import: they are undone
    afterwards, so later tests see the environment they had."""
    environ, sys.path[:0] = dict(os.environ), [str(ROOT / "benchmarks")]
    try:
        import run

        yield run
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        sys.modules.pop("run", None)
        os.environ.clear()
        os.environ.update(environ)


@pytest.mark.slow  # CI time (Makefile): heavy; run by make test-slow
def test_memory_row_measures_live_bytes_not_where_the_allocator_kept_freed_blocks(bench):
    """Fresh workers of one side agree to well under a MiB. Under glibc's adaptive mmap threshold the same
    tiny bf16 worker read 51.8-56.6 MiB (±15 MiB on `small`), so before/after differences under that were noise."""
    args = bench.BenchArgs(preset="tiny", batch_size=8, seq_len=128)
    peaks = [bench.memory_peak(args, "ours", bf16=True) for _ in range(3)]
    assert all(peak > 1 for peak in peaks), peaks
    assert max(peaks) - min(peaks) < 1.0, peaks


def test_profile_split_sums_each_side_and_bounds_the_ratio_by_the_shared_ops(bench):
    """Op names as torch.profiler gives them on CPU (MKL, oneDNN, flash attention, fused AdamW)."""
    ours = {
        "aten::mm": 700.0,
        "aten::addmm": 50.0,
        "mkldnn::_linear_pointwise": 30.0,
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward": 80.0,
        "aten::_scaled_dot_product_flash_attention_for_cpu": 40.0,
        "aten::_fused_adamw_": 10.0,
        "aten::mul": 60.0,
        "aten::cat": 30.0,
    }
    reference = {"aten::mm": 760.0, "aten::scaled_dot_product_attention": 120.0, "aten::_foreach_mul_": 10.0}
    reference |= {"aten::_log_softmax": 60.0, "autograd::engine::evaluate_function: MmBackward0": 50.0}
    split = bench.profile_split(ours, reference)
    assert split["ours"] == {"gemm": 780.0, "attention": 120.0, "optimizer": 10.0, "other": 90.0, "total": 1000.0}
    assert split["reference"] == {"gemm": 760.0, "attention": 120.0, "optimizer": 10.0, "other": 110.0, "total": 1000.0}
    assert split["ceiling"] == pytest.approx(1000.0 / 910.0)  # reference's step over ours' shared part
    assert bench.profile_split({"aten::mul": 1.0}, reference)["ceiling"] is None  # nothing shared: no bound


def test_tiny_profile_writes_the_top_ops_and_the_split(tmp_path):
    """--profile on the tiny preset: fp32 only without native bf16 (emulated bf16 is never timed); the top
    ops and the split are per step, averaged over the profiled rounds."""
    out = tmp_path / "profile.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BILINGUAL_GLM_BF16": "0"}
    result = run_bench(*TINY, "--rows", "train_fp32", "--profile", "5", "--json", str(out), env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert set(payload["profile"]) == set(payload["profile_split"]) == {"fp32"}
    for side in ("ours", "reference"):
        top = payload["profile"]["fp32"][side]
        assert len(top) == 5 and all(op["self_ms"] >= 0 and 0 <= op["share"] <= 1 for op in top), top
        parts = payload["profile_split"]["fp32"][side]
        assert set(parts) == {"gemm", "attention", "optimizer", "other", "total"}
        assert parts["gemm"] > 0 and parts["total"] > 0
        assert sum(parts[name] for name in ("gemm", "attention", "optimizer", "other")) == pytest.approx(
            parts["total"], abs=0.05
        )
    split = payload["profile_split"]["fp32"]
    shared = split["ours"]["gemm"] + split["ours"]["attention"] + split["ours"]["optimizer"]
    assert split["ceiling"] == pytest.approx(split["reference"]["total"] / shared, rel=1e-3)
    assert "ours/reference if ours' 'other' ops cost nothing" in result.stdout
