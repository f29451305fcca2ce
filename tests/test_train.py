"""End-to-end train.py runs on the tiny preset: every objective, the 2-process CPU path, outputs reloaded."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import bilingual_glm  # noqa: F401  (registers the Auto classes)
from bilingual_glm.infill import infill
from bilingual_glm.training.arguments import TrainArguments, apply_config_overrides, check_start_folder
from bilingual_glm.training.clock import TrainingClock
from bilingual_glm.training.precision import resolve_mixed_precision

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--preset", "tiny", "--block_size", "64", "--per_device_train_batch_size", "8"]
QUICK += [
    "--max_train_documents",
    "1500",
    "--eval_blocks",
    "8",
    "--num_proc",
    "1",
    "--sample_new_tokens",
    "8",
]


def run_train(args: list[str], launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = (launcher or [sys.executable]) + [str(ROOT / "train.py"), *QUICK, *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]


def test_glm_objective_loss_falls_and_outputs_reload(tmp_path, tokenizer_dir):
    out = tmp_path / "glm"
    run_train(
        [
            "--objective",
            "glm",
            "--max_steps",
            "40",
            "--logging_steps",
            "5",
            "--output_dir",
            str(out),
            "--tokenizer",
            str(tokenizer_dir),
            "--learning_rate",
            "3e-3",
        ]
    )
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "log.jsonl",
        "run_config.json",
        "loss.png",
    ):
        assert (out / name).is_file(), name
    losses = [record["loss"] for record in read_log(out) if "loss" in record]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.3, losses
    final = read_log(out)[-1]
    assert {"eval_ppl_zh", "eval_ppl_en"} <= set(final) and all(v > 1 for k, v in final.items() if "ppl" in k)
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["num_processes"] == 1 and run_config["objective"] == "glm"
    # the saved folder is a complete model: Auto classes load it, its tokenizer too
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.gmask_token_id == tokenizer.convert_tokens_to_ids("[gMASK]")
    assert model.config.vocab_size >= len(tokenizer)
    assert (out / "modeling_bilingual_glm.py").is_file()


@pytest.mark.parametrize(
    "objective", ["clm", "mlm", pytest.param("clm:0.5,glm:0.3,mlm:0.2", marks=pytest.mark.slow)]
)
def test_other_objectives_run(tmp_path, tokenizer_dir, objective):
    out = tmp_path / "run"
    run_train(
        [
            "--objective",
            objective,
            "--max_steps",
            "4",
            "--logging_steps",
            "2",
            "--output_dir",
            str(out),
            "--tokenizer",
            str(tokenizer_dir),
        ]
    )
    losses = [record["loss"] for record in read_log(out) if "loss" in record]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.slow  # CI time (Makefile): gloo, 2 processes
def test_two_process_cpu_run_records_num_processes(tmp_path, tokenizer_dir):
    out = tmp_path / "ddp"
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    os.environ["ACCELERATE_USE_CPU"] = "1"
    try:
        run_train(
            [
                "--objective",
                "glm",
                "--max_steps",
                "4",
                "--logging_steps",
                "2",
                "--output_dir",
                str(out),
                "--tokenizer",
                str(tokenizer_dir),
                "--mixed_precision",
                "no",
            ],
            launcher=launcher,
        )
    finally:
        os.environ.pop("ACCELERATE_USE_CPU")
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["num_processes"] == 2 and run_config["distributed_type"] == "MULTI_CPU"
    assert (out / "model.safetensors").is_file()


def test_bad_arguments_fail_with_one_clear_line(tmp_path, capsys):
    """Each fails before Accelerate starts (so in-process here); one run as a script checks the exit path."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--objective", "bert"],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "train.py: error: --objective: 'bert' is not one of ('clm', 'glm', 'mlm') (spec 'bert')"
    ], result.stderr[-2000:]
    import train  # the script's own entry point, in-process: each case fails before Accelerate starts

    for args, needle in [
        (["--resume_from_checkpoint", "latest", "--output_dir", str(tmp_path)], "no complete checkpoint"),
        (["--train_files", str(tmp_path / "missing.txt")], "missing.txt"),
        (["--resume_from_checkpoint", str(tmp_path)], "is not a complete checkpoint folder"),
        (["--tokenizer", str(tmp_path / "nope")], "--tokenizer"),
        (["--model_name_or_path", str(tmp_path)], "is not a model folder"),
    ]:
        assert train.cli(args) == 2, args
        stderr = capsys.readouterr().err
        assert stderr.startswith("train.py: error: ") and needle in stderr and stderr.count("\n") == 1, stderr


def test_infill_replaces_every_blank_with_a_generated_span(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = bilingual_glm.BilingualGlmConfig.from_preset("tiny")
    torch.manual_seed(0)
    model = bilingual_glm.BilingualGlmForCausalLM(config).eval()
    text = "北京是[MASK]的首都，Paris is the capital of [MASK]."
    filled, spans = infill(model, tokenizer, text, max_new_tokens=3, return_spans=True)
    assert len(spans) == 2 and "[MASK]" not in filled
    assert filled.startswith("北京是") and filled.endswith(".")


def test_a_tokenizer_that_does_not_fit_the_model_is_refused(tokenizer_dir):
    from bilingual_glm.tokenizer import check_tokenizer_matches

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    check_tokenizer_matches(bilingual_glm.BilingualGlmConfig.from_preset("tiny"), tokenizer)  # fits
    with pytest.raises(ValueError, match="1024 tokens but the model's vocab_size is 512"):
        check_tokenizer_matches(
            bilingual_glm.BilingualGlmConfig.from_preset("tiny", vocab_size=512), tokenizer
        )
    shifted = bilingual_glm.BilingualGlmConfig.from_preset("tiny", gmask_token_id=40)
    with pytest.raises(ValueError, match="gmask_token_id is 40"):
        check_tokenizer_matches(shifted, tokenizer)
    with pytest.raises(ValueError, match="gmask_token_id is 40"):
        infill(bilingual_glm.BilingualGlmForCausalLM(shifted), tokenizer, "[gMASK]")


@pytest.mark.parametrize("streaming", [False, True])
def test_local_files_and_datasets_sources(tmp_path, tokenizer_dir, streaming):
    """--train_files (txt + jsonl) and --dataset_name on a local folder, also streamed."""
    from bilingual_glm.corpora import load_demo_corpus

    texts = load_demo_corpus("train").shuffle(seed=1).select(range(300))["text"]
    data = tmp_path / "data"
    data.mkdir()
    (data / "part.jsonl").write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8"
    )
    (tmp_path / "extra.txt").write_text("\n\n".join(texts[:50]), encoding="utf-8")
    source = (
        ["--dataset_name", str(data)]
        if streaming
        else ["--train_files", str(tmp_path / "extra.txt"), str(data / "part.jsonl")]
    )
    out = tmp_path / "run"
    run_train(
        [
            *source,
            *(["--streaming"] if streaming else []),
            "--objective",
            "clm",
            "--max_steps",
            "3",
            "--logging_steps",
            "1",
            "--output_dir",
            str(out),
            "--tokenizer",
            str(tokenizer_dir),
        ]
    )
    final = read_log(out)[-1]
    assert "eval_ppl_all" in final and final["eval_ppl_all"] > 1
    assert (out / "model.safetensors").is_file()


def test_time_budget_ends_the_run_and_a_resume_spends_the_rest(tmp_path, tokenizer_dir):
    """--max_train_minutes: the schedule walks to lr 0 in the budget, run_config says how many steps that
    took, and a resumed run counts the checkpoint's seconds as spent. Run as on a CPU without bf16."""
    out = tmp_path / "timed"
    common = ["--objective", "clm", "--logging_steps", "1", "--output_dir", str(out)]
    common += ["--tokenizer", str(tokenizer_dir), "--save_steps", "4", "--save_total_limit", "1"]
    os.environ["BILINGUAL_GLM_BF16"] = "0"
    try:
        run_train([*common, "--max_train_minutes", "0.1"])
        first = json.loads((out / "run_config.json").read_text())
        state = json.loads(next(out.glob("checkpoint-*/training_state.json")).read_text())
        run_train([*common, "--max_train_minutes", "0.2", "--resume_from_checkpoint", "latest"])
    finally:
        os.environ.pop("BILINGUAL_GLM_BF16")
    assert first["mixed_precision_resolved"] == "no" and first["cpu"]["model"]
    assert first["max_steps_resolved"] is None and first["max_train_minutes_resolved"] == 0.1
    assert first["steps_taken"] >= 4 and 0.1 <= first["train_minutes"] < 0.3, first
    rounding = 0.0005  # train_minutes are logged to 3 decimals
    assert 0 < state["train_seconds"] <= (first["train_minutes"] + rounding) * 60

    second = json.loads((out / "run_config.json").read_text())
    assert second["resumed_from"].endswith(f"checkpoint-{state['step']}")
    assert second["steps_taken"] > state["step"] and 0.2 <= second["train_minutes"] < 0.4, second
    records = [r for r in read_log(out) if "loss" in r]
    resumed = [r for r in records if r["step"] > state["step"]]
    assert resumed[0]["step"] == state["step"] + 1
    assert resumed[0]["train_minutes"] >= state["train_seconds"] / 60 - rounding  # already spent: counted
    minutes = [r["train_minutes"] for r in resumed]
    assert minutes == sorted(minutes)
    assert resumed[-1]["lr"] == 0.0 and max(r["lr"] for r in records) > 1e-3  # warmup, cosine, to zero


def test_mixed_precision_auto_follows_the_one_bf16_rule(monkeypatch):
    for forced, expected in (("0", "no"), ("1", "bf16")):
        monkeypatch.setenv("BILINGUAL_GLM_BF16", forced)
        assert resolve_mixed_precision("auto") == expected
        assert resolve_mixed_precision("no") == "no"
    assert (
        resolve_mixed_precision("auto", launch_choice="no") == "no"
    )  # an accelerate launch config's choice wins
    with pytest.raises(ValueError, match="--max_train_minutes must be > 0"):
        TrainingClock(None, 0.0, None, accelerator=None)


def test_gradient_accumulation_counts_optimizer_steps_and_config_overrides_apply(tmp_path, tokenizer_dir):
    out = tmp_path / "accumulate"
    run_train(
        ["--max_steps", "4", "--gradient_accumulation_steps", "2", "--save_steps", "4", "--objective", "clm"]
        + ["--config_overrides", "num_hidden_layers=1,tie_word_embeddings=false"]
        + ["--output_dir", str(out), "--tokenizer", str(tokenizer_dir)]
    )
    assert json.loads((out / "run_config.json").read_text())["steps_taken"] == 4
    assert json.loads((out / "checkpoint-4" / "training_state.json").read_text())["micro_batches"] == 8
    saved = json.loads((out / "config.json").read_text())
    assert saved["num_hidden_layers"] == 1 and saved["tie_word_embeddings"] is False


def test_bad_config_overrides_name_the_flag():
    config = bilingual_glm.BilingualGlmConfig.from_preset("tiny")
    for overrides in ("no_such_field=3", "num_attention_heads=3"):
        with pytest.raises(ValueError, match="config_overrides|num_attention_heads"):
            apply_config_overrides(config, overrides)


def test_model_name_or_path_goes_on_from_the_folder_on_review_texts(tmp_path, tokenizer_dir):
    """Domain-adaptive pretraining: train.py --model_name_or_path starts from the folder's weights, config and
    tokenizer, on the sentiment train split written by ``python -m bilingual_glm.corpora.sentiment``."""
    from bilingual_glm.corpora.sentiment import main as write_sentiment

    data = tmp_path / "reviews"
    assert write_sentiment(["--output_dir", str(data)]) == 0
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 14064 and {row["label"] for row in rows} == {"negative", "positive"}
    assert not list(data.glob("*.tmp"))

    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--objective", "clm", "--max_steps", "2"]
    run_train([*common, "--output_dir", str(first), "--tokenizer", str(tokenizer_dir)])
    # lr ~0: the continued run must end where the folder's weights are (a fresh init would be far away)
    run_train(
        [*common, "--output_dir", str(second), "--model_name_or_path", str(first)]
        + ["--train_files", str(data / "train.jsonl"), "--preset", "small"]
        + ["--learning_rate", "1e-12", "--muon_learning_rate", "1e-12"]  # both optimizers' peaks
    )
    before = AutoModelForCausalLM.from_pretrained(first).state_dict()
    after = AutoModelForCausalLM.from_pretrained(second).state_dict()
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=1e-6, msg=name)
    assert (
        json.loads((second / "config.json").read_text())["hidden_size"]
        == json.loads((first / "config.json").read_text())["hidden_size"]
    )  # the folder's config, not --preset small's
    assert len(AutoTokenizer.from_pretrained(second)) == len(AutoTokenizer.from_pretrained(first))
    resolved = json.loads((second / "run_config.json").read_text())
    assert resolved["model_name_or_path"] == str(first) and resolved["preset"] is None

    args = TrainArguments(model_name_or_path=str(first), tokenizer=str(tokenizer_dir))
    with pytest.raises(ValueError, match="--tokenizer cannot be combined with --model_name_or_path"):
        check_start_folder(args)


# Each edge value either trains (exit 0) or stops with one line naming the flag or file (exit 2).
EDGE_DRIVER = """
import contextlib, io, json, sys
import train

for name, argv in json.loads(sys.argv[1]):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = train.cli(argv)
    print("EDGE " + json.dumps({"name": name, "status": status, "stderr": stderr.getvalue()}), flush=True)
"""


def test_edge_values_train_or_stop_with_a_clear_error(tmp_path, tokenizer_dir):
    """One process runs every case through train.py's own entry point (fp32, so they share Accelerate's state)."""
    files = {
        "one_line.txt": "就一行。\n",
        "empty.txt": "",
        "blank_lines.txt": "\n\n   \n\n",
        "gappy.txt": "\n\n".join(["北京是中国的首都。To be, or not to be."] * 60) + "\n\n\n\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    base = ["--preset", "tiny", "--block_size", "64", "--per_device_train_batch_size", "4", "--num_proc", "1"]
    base += [
        "--eval_blocks",
        "1",
        "--sample_new_tokens",
        "1",
        "--mixed_precision",
        "no",
        "--objective",
        "clm:0.5,glm:0.5",
    ]
    base += ["--tokenizer", str(tokenizer_dir), "--max_train_documents", "200"]
    cases = {  # name: (extra arguments, None when it trains, else what the one error line must name)
        "one_step": (["--max_steps", "1"], None),
        "warmup_longer_than_run": (["--max_steps", "3", "--warmup_steps", "10"], None),
        "budget_shorter_than_a_step": (["--max_train_minutes", "0.0001"], None),
        "batch_of_one": (["--max_steps", "2", "--per_device_train_batch_size", "1"], None),
        "one_document": (
            ["--max_steps", "2", "--max_train_documents", "1", "--per_device_train_batch_size", "8"],
            "--per_device_train_batch_size",
        ),
        "gappy_file": (["--max_steps", "2", "--train_files", str(tmp_path / "gappy.txt")], None),
        "one_line_file": (
            ["--max_steps", "2", "--train_files", str(tmp_path / "one_line.txt")],
            "one_line.txt",
        ),
        "empty_file": (["--max_steps", "2", "--train_files", str(tmp_path / "empty.txt")], "empty.txt"),
        "blank_lines_file": (
            ["--max_steps", "2", "--train_files", str(tmp_path / "blank_lines.txt")],
            "blank_lines.txt",
        ),
        "block_past_positions": (["--max_steps", "1", "--block_size", "100000"], "--block_size 100000"),
        "zero_logging_steps": (["--max_steps", "1", "--logging_steps", "0"], "--logging_steps"),
        "negative_warmup": (["--max_steps", "1", "--warmup_steps", "-1"], "--warmup_steps"),
    }
    argvs = [
        [name, [*base, *extra, "--output_dir", str(tmp_path / name)]] for name, (extra, _) in cases.items()
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", EDGE_DRIVER, json.dumps(argvs)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line.removeprefix("EDGE ") for line in result.stdout.splitlines() if line.startswith("EDGE ")]
    outcomes = {outcome["name"]: outcome for outcome in map(json.loads, lines)}
    assert outcomes.keys() == cases.keys(), result.stdout[-3000:]
    for name, (_, needle) in cases.items():
        outcome = outcomes[name]
        if needle is None:
            assert outcome["status"] == 0, (name, outcome)
            assert (tmp_path / name / "model.safetensors").is_file(), name
            losses = [r["loss"] for r in read_log(tmp_path / name) if "loss" in r]
            assert losses and all(math.isfinite(loss) for loss in losses), (name, losses)
        else:
            errors = [line for line in outcome["stderr"].splitlines() if "error" in line.lower()]
            assert outcome["status"] == 2 and len(errors) == 1, (name, outcome)
            assert errors[0].startswith("train.py: error: ") and needle in errors[0], (name, errors)
    assert "max_position_embeddings 512" in outcomes["block_past_positions"]["stderr"]
    assert "tokens" in outcomes["one_line_file"]["stderr"]  # how much text there was, against --block_size


@pytest.mark.slow  # CI time (Makefile): heavy; run by make test-slow
def test_report_to_tensorboard_writes_the_logged_numbers(tmp_path, tokenizer_dir):
    """--report_to tensorboard: Accelerate's tracker writes an event file under output_dir/trackers holding
    the same loss and lr records as log.jsonl (which stays)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    run_train(
        ["--report_to", "tensorboard", "--max_steps", "20", "--logging_steps", "5", "--objective", "clm"]
        + ["--output_dir", str(out), "--tokenizer", str(tokenizer_dir)]
    )
    events = list((out / "trackers").rglob("events.out.tfevents.*"))
    assert events, sorted(str(p) for p in out.rglob("*"))
    scalars = {}
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in accumulator.Scalars(tag)]
    logged = [r for r in read_log(out) if "loss" in r]
    assert [step for step, _ in scalars["loss"]] == [5, 10, 15, 20] == [r["step"] for r in logged]
    for (_, value), record in zip(scalars["loss"], logged, strict=True):
        assert value == pytest.approx(record["loss"], rel=1e-6)
    assert [step for step, _ in scalars["lr"]] == [5, 10, 15, 20]
    final = read_log(out)[-1]
    assert scalars["eval_ppl_zh"][-1][1] == pytest.approx(final["eval_ppl_zh"], rel=1e-6)


def test_help_prints_every_flag(capsys):
    """``python train.py --help`` (a help string with a bare ``%`` once broke argparse's formatting)."""
    import train

    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert all(flag in printed for flag in ("--report_to", "--dataloader_num_workers", "--warmup_steps"))
