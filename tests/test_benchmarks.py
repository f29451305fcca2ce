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
    command = [sys.executable, str(ROOT / "benchmarks" / "run.py"), *TINY, "--json", str(out)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
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
    command = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--rows", "moe_train_fp32"]
    command += ["--moe_preset", "tiny"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--moe_preset" in result.stderr and "moe-mini" in result.stderr


def test_unknown_row_is_a_clear_error():
    command = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--rows", "train_fp64"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "train_fp64" in result.stderr


@pytest.mark.slow  # CI time (Makefile): heavy; run by make test-slow
def test_memory_row_measures_live_bytes_not_where_the_allocator_kept_freed_blocks():
    """Fresh workers of one side agree to well under a MiB. Under glibc's adaptive mmap threshold the same
    tiny bf16 worker read 51.8-56.6 MiB (±15 MiB on `small`), so before/after differences under that were noise."""
    environ, sys.path[:0] = dict(os.environ), [str(ROOT / "benchmarks")]
    try:  # run.py sets env defaults (OMP_WAIT_POLICY, ...) on import: keep them out of later tests
        import run

        args = run.BenchArgs(preset="tiny", batch_size=8, seq_len=128)
        peaks = [run.memory_peak(args, "ours", bf16=True) for _ in range(3)]
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        sys.modules.pop("run", None)
        os.environ.clear()
        os.environ.update(environ)
    assert all(peak > 1 for peak in peaks), peaks
    assert max(peaks) - min(peaks) < 1.0, peaks
