"""Crash safety of train.py: SIGKILL + resume is exact, Ctrl-C checkpoints, NaN stops cleanly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .test_train import QUICK, ROOT, read_log

RESUMABLE = [
    "--objective",
    "clm:0.5,glm:0.5",
    "--logging_steps",
    "1",
    "--save_steps",
    "4",
    "--max_steps",
    "12",
]


def command(out: Path, tokenizer: Path, *extra: str, nan_at: int | None = None) -> list[str]:
    """train.py's command line; ``nan_at``: through tests/inject_nan.py, micro-batch ``nan_at``'s loss NaN."""
    launcher = [sys.executable] if nan_at is None else [sys.executable, "-m", "tests.inject_nan", str(nan_at)]
    return [
        *launcher,
        str(ROOT / "train.py"),
        *QUICK,
        *RESUMABLE,
        "--output_dir",
        str(out),
        "--tokenizer",
        str(tokenizer),
        *extra,
    ]


def env(**extra: str) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def step_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(out) if "loss" in r}


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_sigkill_then_resume_latest_reaches_the_same_final_loss(tmp_path, tokenizer_dir):
    straight = subprocess.run(
        command(tmp_path / "straight", tokenizer_dir), env=env(), capture_output=True, text=True, timeout=600
    )
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "killed"
    victim = subprocess.Popen(
        command(out, tokenizer_dir), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_for(out / "checkpoint-4" / "training_state.json", victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (out / "model.safetensors").exists()  # it really died before the end
    resumed = subprocess.run(
        command(out, tokenizer_dir, "--resume_from_checkpoint", "latest"),
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "run_config.json").read_text())["resumed_from"].endswith(
        ("checkpoint-4", "checkpoint-8")
    )
    reference, again = step_losses(tmp_path / "straight"), step_losses(out)
    assert again[12] == reference[12]
    assert again == reference  # every step, the resumed ones included


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, tokenizer_dir):
    out = tmp_path / "interrupted"
    process = subprocess.Popen(
        command(out, tokenizer_dir, "--save_steps", "0", "--max_steps", "400"),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(out / "log.jsonl", process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    checkpoints = [p for p in out.glob("checkpoint-*") if (p / "training_state.json").exists()]
    assert len(checkpoints) == 1
    step = json.loads((checkpoints[0] / "training_state.json").read_text())["step"]
    assert 1 <= step < 400
    assert not list(out.glob(".tmp-checkpoint-*"))


def test_nan_loss_stops_naming_the_step_and_keeps_the_good_checkpoint(tmp_path, tokenizer_dir):
    out = tmp_path / "nan"
    result = subprocess.run(
        command(out, tokenizer_dir, nan_at=6),
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2
    assert "train.py: error: non-finite loss/gradient at step 6" in result.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    from safetensors.torch import load_file

    weights = load_file(out / "checkpoint-4" / "model.safetensors")
    assert all(t.isfinite().all() for t in weights.values())


def test_skip_nonfinite_batches_finishes_the_run_and_rotates_checkpoints(tmp_path, tokenizer_dir):
    out = tmp_path / "skip"
    result = subprocess.run(
        command(
            out,
            tokenizer_dir,
            "--skip_nonfinite_batches",
            "--save_steps",
            "2",
            "--save_total_limit",
            "2",
            "--max_steps",
            "8",
            nan_at=3,
        ),
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "non-finite gradient, batch skipped" in result.stdout + result.stderr
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, 9)) and all(v == v for v in losses.values())
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    state = json.loads((out / "checkpoint-8" / "training_state.json").read_text())
    assert state.pop("train_seconds") > 0  # the time budget a resumed run goes on spending
    assert state == {"step": 8, "micro_batches": 9}  # the skipped batch was drawn, not trained on
