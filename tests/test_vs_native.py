"""Smoke test of benchmarks/vs_native.py's minutes-to-quality mode at a tiny scale: the report's schema and
the PNG, never a quality or speed bound; and the minutes-to-quality rule on hand-made curves."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, load_script

vs_native = load_script(ROOT / "benchmarks" / "vs_native.py", "vs_native")

OURS = "--preset tiny --block_size 64 --per_device_train_batch_size 8 --max_train_documents 300"
OURS += " --eval_blocks 1 --num_proc 1 --sample_new_tokens 1 --objective clm"


@pytest.mark.slow  # ~55 s: four training processes and their scoring (CI keeps to ~10 minutes)
def test_two_seeds_both_sides_report_curves_minutes_to_quality_and_a_plot(tmp_path, tokenizer_dir):
    out, plot = tmp_path / "vs.json", tmp_path / "vs.png"
    ours = f"{OURS} --tokenizer {tokenizer_dir}"
    command = [sys.executable, str(ROOT / "benchmarks" / "vs_native.py"), "--minutes", "0.03"]
    command += ["--ours_minutes", "0.02"]  # ours' own budget: it ends before native does
    command += ["--score_every", "0.01", "--seeds", "0,1", "--ours_args", ours, "--json", str(out)]
    command += ["--plot", str(plot), "--native_train_documents", "200", "--held_out_documents", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["machine"]["model"] and report["seeds"] == [0, 1] and report["minutes"] == 0.03
    assert report["ours_minutes"] == 0.02
    assert plot.is_file() and plot.stat().st_size > 0 and report["plot"] == str(plot.resolve())
    for side in ("native", "ours"):
        runs = report["results"][side]
        assert [run["seed"] for run in runs] == [0, 1]
        for run in runs:
            assert {"bits_per_char", "steps", "parameters", "precision", "wall_seconds", "curve"} <= set(run)
            assert run["precision"] in ("fp32", "bf16", "no")
            curve = run["curve"]
            # the points passed (how many depends on this machine's speed), then the final model
            assert curve[-1]["step"] == run["steps"] and len({p["step"] for p in curve}) == len(curve)
            assert [p["minute"] for p in curve] == sorted(p["minute"] for p in curve)
            assert all({"step", "minute", "zh", "en"} <= set(point) for point in curve)
            assert {k: curve[-1][k] for k in ("zh", "en")} == run["bits_per_char"]
    for lang in ("zh", "en"):
        row = report["minutes_to_quality"][lang]
        assert len(row["ours_minutes"]) == 2 and row["native_final"]["std"] is not None
        assert row["reached"].endswith("/2")
    assert "minutes to quality" in result.stdout and "CPU: " in result.stdout


def test_minutes_to_quality_is_the_first_point_at_or_below_natives_mean_final():
    def run(finals, curve):
        return {"bits_per_char": finals, "curve": [{"minute": m, "zh": zh, "en": en} for m, zh, en in curve]}

    native = [run({"zh": 7.0, "en": 2.0}, []), run({"zh": 7.2, "en": 2.2}, [])]  # targets 7.1, 2.1
    ours = [
        run({"zh": 6.9, "en": 2.3}, [(1.0, 8.0, 3.0), (2.01, 7.1, 2.5), (3.0, 6.9, 2.3)]),
        run({"zh": 7.0, "en": 2.0}, [(1.0, 7.5, 2.9), (2.5, 7.05, 2.1), (3.0, 7.0, 2.0)]),
    ]
    report = vs_native.minutes_to_quality(native, ours)
    assert report["zh"]["target"] == 7.1 and report["zh"]["ours_minutes"] == [2.01, 2.5]
    assert report["en"]["ours_minutes"] == [None, 2.5] and report["en"]["reached"] == "1/2"
    assert report["zh"]["ours_minutes_summary"]["mean"] == 2.255
    assert report["en"]["ours_minutes_summary"]["std"] is None  # one seed reached it: no spread
