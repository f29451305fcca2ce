"""train.py and finetune.py under DeepSpeed ZeRO-2/3 and FSDP2, two CPU processes, the shipped launch configs.

Each sharded run is compared with one single-process run over the same global batch (2 x 4 = 1 x 8 blocks,
fp32, causal LM on full packed blocks, so every rank's mean is over as many tokens): the logged loss at
every step, the saved weights, and the held-out perplexity the sharded model computed in the run, which
the reloaded folder must reproduce. One ZeRO-3 run is SIGKILLed (the whole process group, as when a node
dies) and resumed. The guard tests are cheap and run in CI; the launches are ``slow`` (``make test-slow``).
DeepSpeed JIT-builds a small C++ op on first use (~2 min once, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import bilingual_glm  # noqa: F401  (registers the Auto classes)
from bilingual_glm.distributed import DistributedMismatchError

from .test_finetune import QUICK as FINETUNE_QUICK
from .test_finetune import finetune, load_without_package, make_pretrained_folder
from .test_reliability import wait_for
from .test_train import QUICK, ROOT, read_log

CONFIGS = ROOT / "examples" / "accelerate"
STEPS = 8
PARITY = ["--objective", "clm", "--mixed_precision", "no", "--max_steps", str(STEPS), "--logging_steps", "1"]
PARITY += ["--save_steps", "4"]
# DeepSpeed and FSDP run AdamW (--optimizer auto there); the single-process reference must too, not auto's Muon
PARITY += ["--optimizer", "adamw"]
LOSS_TOLERANCE = 1e-4  # measured on the 2-core CPU: <= 1e-6 (see docs/distributed.md)


def env(**extra: str) -> dict:
    base = {
        k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "WORLD_SIZE", "LOCAL_RANK")
    }
    return {**base, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def launcher(config: str, num_processes: int = 2) -> list[str]:
    """``accelerate launch --config_file examples/accelerate/<config>.yaml``: the file a GPU user takes."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / f"{config}.yaml"),
        "--num_processes",
        str(num_processes),
        "--mixed_precision",
        "no",
    ]


def train_command(out: Path, tokenizer: Path, batch: int, *extra: str) -> list[str]:
    return [str(ROOT / "train.py"), *QUICK, *PARITY, "--per_device_train_batch_size", str(batch)] + [
        "--output_dir",
        str(out),
        "--tokenizer",
        str(tokenizer),
        *extra,
    ]


def run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def step_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(out) if "loss" in r}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


# ------------------------------------------------------------------------------ the guard (CI)
def test_fsdp_config_without_fsdp_in_effect_stops_train_py_at_start(tmp_path, tokenizer_dir):
    """fsdp.yaml on one process: Accelerate runs DistributedType.NO and would train unsharded, exit 0."""
    result = subprocess.run(
        launcher("fsdp", num_processes=1) + train_command(tmp_path / "out", tokenizer_dir, 8),
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    # train.py exits 2; the launcher (torchrun underneath) reports that and exits 1 itself
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr, (
        result.stdout[-2000:] + result.stderr[-3000:]
    )
    (line,) = error_lines(result.stderr)
    assert line.startswith("train.py: error:") and "FSDP requested" in line and "actual NO" in line, line
    assert "fsdp_version 2" in line and "--num_processes" in line, line
    assert not (tmp_path / "out" / "log.jsonl").exists()  # stopped before the first step


def test_fsdp_request_without_fsdp_in_effect_stops_finetune_py(tmp_path, tokenizer_dir, monkeypatch):
    """The same launch environment (what ``accelerate launch --config_file fsdp.yaml`` exports) for the
    Trainer: it builds a plain single-process Accelerator, and finetune.py refuses to train."""
    pretrained = make_pretrained_folder(tmp_path / "pretrained", tokenizer_dir)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    argv = ["--model_name_or_path", str(pretrained), "--output_dir", str(tmp_path / "out"), *FINETUNE_QUICK]
    with pytest.raises(DistributedMismatchError, match=r"FSDP requested, NO in effect"):
        finetune.main(argv)
    assert not (tmp_path / "out" / "log.jsonl").exists()


# --------------------------------------------------------------------- sharded train.py (slow)
@pytest.fixture(scope="module")
def train_module():
    """The training library's data and evaluation pieces, with the argument parser."""
    from transformers import HfArgumentParser

    from bilingual_glm.training import data, evaluation
    from bilingual_glm.training.arguments import TrainArguments

    return types.SimpleNamespace(
        HfArgumentParser=HfArgumentParser,
        TrainArguments=TrainArguments,
        load_raw=data.load_raw,
        held_out_blocks=data.held_out_blocks,
        perplexity=evaluation.perplexity,
    )


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tokenizer_dir) -> Path:
    """The reference: one process, 8 blocks per step."""
    out = tmp_path_factory.mktemp("single") / "run"
    run([sys.executable, *train_command(out, tokenizer_dir, 8)])
    return out


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """Lazily launched 2-process runs, 4 blocks per process per step, shared by the tests below."""
    cache: dict[str, Path] = {}

    def get(config: str) -> Path:
        if config not in cache:
            out = tmp_path_factory.mktemp(config) / "run"
            run(launcher(config) + train_command(out, tokenizer_dir, 4))
            cache[config] = out
        return cache[config]

    return get


def in_run_perplexity_reproduced(train_module, folder: Path, in_run: dict) -> None:
    """The reloaded folder scores the held-out blocks as the sharded model did inside the run."""
    (args,) = train_module.HfArgumentParser(train_module.TrainArguments).parse_args_into_dataclasses(
        args=[*QUICK, "--per_device_train_batch_size", "4"]
    )
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    _, validation = train_module.load_raw(args)
    blocks = train_module.held_out_blocks(validation, tokenizer, args)
    plain = types.SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)
    for lang, subset in blocks.items():
        again = train_module.perplexity(model, subset, 4, plain)
        assert again == pytest.approx(in_run[f"eval_ppl_{lang}"], rel=1e-5), lang


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, engine",
    [("deepspeed_zero2", "DEEPSPEED"), ("deepspeed_zero3", "DEEPSPEED"), ("fsdp", "FSDP")],
)
def test_sharded_train_matches_single_process_and_saves_a_full_model(
    config, engine, single_run, sharded_runs, train_module, tmp_path
):
    out = sharded_runs(config)
    distributed = json.loads((out / "run_config.json").read_text())["distributed"]
    assert distributed["engine"] == engine and distributed["world_size"] == 2
    assert distributed["backend"] == "gloo"
    if config == "fsdp":  # really sharded: fully_shard on each decoder layer (+ the root)
        assert distributed["fsdp_version"] == 2 and distributed["sharding"] == "FULL_SHARD"
        assert distributed["fsdp_units"] >= 3 and distributed["wrap"] == ["BilingualGlmDecoderLayer"]
    else:
        assert distributed["zero_stage"] == int(config[-1])
    if config == "deepspeed_zero3":
        assert distributed["zero3_partitioned_parameters"] > 0

    reference, sharded = step_losses(single_run), step_losses(out)
    assert sorted(sharded) == list(range(1, STEPS + 1))
    difference = max(abs(sharded[step] - reference[step]) for step in reference)
    print(f"{config}: max |loss - single-process loss| over {STEPS} steps = {difference:.2e}")
    assert difference <= LOSS_TOLERANCE, (reference, sharded)

    # the output folder is the single-process one: full weights, code, tokenizer; Auto classes load it
    for name in ("config.json", "model.safetensors", "modeling_bilingual_glm.py", "tokenizer.json"):
        assert (out / name).is_file(), name
    weights, single = load_file(out / "model.safetensors"), load_file(single_run / "model.safetensors")
    assert weights.keys() == single.keys()
    for key, value in single.items():
        assert weights[key].shape == value.shape, key
        torch.testing.assert_close(weights[key], value, atol=1e-4, rtol=1e-4, msg=key)
    in_run_perplexity_reproduced(train_module, out, read_log(out)[-1])

    if config != "deepspeed_zero2":  # the gathered folders also load where the package is not installed
        ids = [[5, 17, 99, 3, 42, 8]]
        with torch.no_grad():
            expected = AutoModelForCausalLM.from_pretrained(out)(torch.tensor(ids)).logits[0, -1, :5].tolist()
        printed = load_without_package(
            tmp_path,
            f"""
            import torch
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
            with torch.no_grad():
                print(model(torch.tensor({ids})).logits[0, -1, :5].tolist())
            """,
        )
        assert json.loads(printed.strip().splitlines()[-1]) == pytest.approx(expected, abs=1e-5)


@pytest.mark.slow
def test_zero3_run_sigkilled_then_resumed_repeats_the_uninterrupted_losses(
    tmp_path, tokenizer_dir, sharded_runs
):
    straight = sharded_runs("deepspeed_zero3")
    out = tmp_path / "killed"
    victim = subprocess.Popen(
        launcher("deepspeed_zero3") + train_command(out, tokenizer_dir, 4),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the launcher and both ranks die together
    )
    wait_for(out / "checkpoint-4" / "training_state.json", victim)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (out / "model.safetensors").exists()  # it really died before the end
    assert (out / "checkpoint-4" / "pytorch_model").is_dir()  # DeepSpeed's per-rank ZeRO shards
    run(
        launcher("deepspeed_zero3")
        + train_command(out, tokenizer_dir, 4, "--resume_from_checkpoint", "latest")
    )
    resumed_from = json.loads((out / "run_config.json").read_text())["resumed_from"]
    assert resumed_from.endswith(("checkpoint-4", "checkpoint-8")), resumed_from
    assert step_losses(out) == step_losses(straight)  # every step, the resumed ones included
    assert (out / "model.safetensors").is_file()


# -------------------------------------------------------------------- finetune.py ZeRO-2 (slow)
@pytest.mark.slow
def test_finetune_under_zero2_matches_the_single_process_loss(tmp_path, tokenizer_dir):
    pretrained = make_pretrained_folder(tmp_path / "pretrained", tokenizer_dir)
    common = ["--model_name_or_path", str(pretrained), *FINETUNE_QUICK, "--report_to", "none"]
    common += ["--mixed_precision", "no"]  # fp32 on both sides, whatever bf16 this CPU has

    def losses(out: Path) -> dict[int, float]:
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if "loss" in r and "step" in r}

    single = tmp_path / "single"
    assert finetune.main([*common, "--per_device_train_batch_size", "8", "--output_dir", str(single)]) == 0
    sharded = tmp_path / "zero2"
    run(
        launcher("deepspeed_zero2")
        + [
            str(ROOT / "finetune.py"),
            *common,
            "--per_device_train_batch_size",
            "4",
            "--output_dir",
            str(sharded),
        ]
    )
    distributed = json.loads((sharded / "run_config.json").read_text())["distributed"]
    assert distributed["engine"] == "DEEPSPEED" and distributed["zero_stage"] == 2
    assert distributed["world_size"] == 2
    reference, again = losses(single), losses(sharded)
    difference = abs(again[1] - reference[1])
    print(f"finetune ZeRO-2: |step-1 loss - single-process| = {difference:.2e}")
    assert difference <= LOSS_TOLERANCE, (reference, again)
    assert again == pytest.approx(reference, abs=LOSS_TOLERANCE)
    model = AutoModelForSequenceClassification.from_pretrained(sharded)  # the saved folder is complete
    assert model.config.num_labels == 2
