"""Does ``python train.py`` learn more per CPU minute than a plain loop around transformers' own GLM, and
how many of its minutes does it need to reach what the plain loop reaches in ``--minutes``?

    python benchmarks/vs_native.py                       # both sides, 10 training minutes each, scored each minute
    python benchmarks/vs_native.py --seeds 0,1 --json vs.json --plot vs.png   # two seeds: the run-to-run noise
    python benchmarks/vs_native.py --ours_args "--optimizer muon"              # an ablation of ours
    python benchmarks/vs_native.py --ours_minutes 5 --seeds 0,1                # ours in 5 minutes vs native in 10
    python benchmarks/vs_native.py --minutes 7 --score_every 0                 # final bits/char only (no curve)

One command, both sides, same machine, one after the other (per seed: native, then ours):

- **ours**: ``train.py`` with its defaults (plus ``--ours_args``), ``--max_train_minutes`` = ``--ours_minutes``
  (default ``--minutes``),
  ``--seed`` = the seed, ``--save_minutes`` = ``--score_every``: a checkpoint at the first step past each
  mark, whose saving train.py's clock does not count as training.
- **native**: the plain recipe a user would write first, in ``native_loop`` below: transformers'
  ``GlmForCausalLM`` (4 layers x 256, tied embeddings), a 16k byte-level BPE from ``tokenizers``, causal
  LM on packed 256-token blocks, batch 16, AdamW lr 1e-3, cosine over the same time budget, in the precision
  a user of this CPU would pick: bf16 autocast where it is native (``fast_bf16()``), else fp32. It keeps a
  copy of its weights at the same marks, also outside its clock.

Both train on the demo corpus' train split and are scored on its validation split (People's Daily and
Shakespeare, ~2% each, fixed by a hash of the text) in **bits per character**: the summed next-token
loss of every token of every held-out document, in bits, over the document's characters. Each document
starts after a separator token, so its first token is scored too; documents longer than a block are
scored in consecutive blocks. That makes tokenizers with different fertility comparable. Every point of
both curves is scored after its side has finished training, in fp32.

**Minutes to quality**, per language: the target is native's final bits/char (mean over ``--seeds``); for
each seed of ours, the training minute of its first scored point at or below it ("not reached" if none).
The points are of one run, so at minute 5 of 10 its lr is still mid-cosine: a run given only 5 minutes
(``--ours_minutes 5``) has finished its schedule there and may sit lower. The PNG shows both sides' curves per language.

Equal budget means equal *training-loop* minutes; tokenizer training and packing come before the clock
on both sides, and the wall time of each side is reported too. Run it on a quiet machine: the two sides
run one after the other, so load that comes and goes favours one of them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bilingual_glm.corpora import load_demo_corpus  # noqa: E402
from bilingual_glm.modeling.kernels_bilingual_glm import cpu_info, fast_bf16  # noqa: E402
from bilingual_glm.training.loop import checkpoint_due  # noqa: E402

LANGS = ("zh", "en")
BLOCK = 256
NATIVE_SEPARATOR = "<|endoftext|>"


# --------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def bits_per_char(model: Any, tokenizer: Any, texts: list[str], separator_id: int) -> float:
    """Summed next-token loss (bits) over every token of every document, divided by its characters."""
    model.eval()
    total_nats, total_chars = 0.0, 0
    for text in texts:
        ids = [separator_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - 1, BLOCK):
            chunk = torch.tensor([ids[start : start + BLOCK + 1]])  # [1, <= BLOCK + 1]
            logits = model(input_ids=chunk[:, :-1], use_cache=False).logits.float()  # [1, T, V]
            nll = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
            total_nats += float(nll)
        total_chars += len(text)
    return total_nats / math.log(2) / total_chars


def held_out(documents: int | None = None) -> dict[str, list[str]]:
    """The validation split's texts per language (the first ``documents`` of each: quick runs only)."""
    validation = load_demo_corpus("validation")
    texts = {lang: [row["text"] for row in validation if row["lang"] == lang] for lang in LANGS}
    return {lang: rows[:documents] for lang, rows in texts.items()}


def score_folder(
    folder: Path,
    separator: str | None = None,
    weights: Sequence[Path] = (),
    documents: int | None = None,
) -> list[dict[str, float]]:
    """bits/char per language of a saved model folder (ours: its EOS separates documents), and of each of
    ``weights`` (safetensors files of the same model: earlier points of its run), in that order: the
    folder's own weights first."""
    from safetensors.torch import load_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    separator_id = tokenizer.convert_tokens_to_ids(separator) if separator else tokenizer.eos_token_id
    texts = held_out(documents)
    scores = []
    for source in (None, *weights):
        if source is not None:
            load_model(model, source)  # strict; tied weights saved once are filled from their twin
        scores.append(
            {lang: bits_per_char(model, tokenizer, rows, separator_id) for lang, rows in texts.items()}
        )
    return scores


# ---------------------------------------------------------------------------------- native side
def native_loop(
    output_dir: Path,
    minutes: float,
    max_steps: int | None = None,
    seed: int = 0,
    score_every: float = 0.0,
    documents: int | None = None,
) -> dict[str, Any]:
    """The plain recipe: byte-level BPE 16k, GlmForCausalLM 4 x 256, AdamW 1e-3, cosine over the budget,
    bf16 autocast where this CPU has native bf16, else fp32.

    ``score_every`` minutes: the weights at the first step past each mark go to ``point-{step}.safetensors``
    (outside the clock, as train.py's ``--save_minutes``). ``documents``: train on the first N only (tests).
    """
    from safetensors.torch import save_model
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GlmConfig, GlmForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    texts = [row["text"] for row in load_demo_corpus("train")][:documents]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=16384, special_tokens=[NATIVE_SEPARATOR], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=NATIVE_SEPARATOR)
    stream = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += [tokenizer.eos_token_id] + ids
    blocks = torch.tensor(stream[: len(stream) // BLOCK * BLOCK]).view(-1, BLOCK)  # [N, BLOCK]
    config = GlmConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024,
        tie_word_embeddings=True, pad_token_id=None, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = GlmForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    bf16 = fast_bf16()  # what a user of this CPU would pick: bf16 only where it is native
    marks = SimpleNamespace(save_steps=0, save_minutes=score_every)  # train.py's rule for time points
    budget, warmup, step, spent, points = minutes * 60.0, 0.02, 0, 0.0, []
    done = lambda: spent >= budget or (max_steps is not None and step >= max_steps)  # noqa: E731
    model.train()
    start = time.perf_counter()
    while not done():
        for index in torch.randperm(len(blocks)).split(16):
            if len(index) < 16 or done():
                continue
            share = max(spent / budget, step / max_steps if max_steps else 0.0)
            lr = (
                share / warmup
                if share < warmup
                else 0.5 * (1 + math.cos(math.pi * (share - warmup) / (1 - warmup)))
            )
            for group in optimizer.param_groups:
                group["lr"] = 1e-3 * lr
            batch = blocks[index]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            previous, step, spent = spent, step + 1, time.perf_counter() - start
            if checkpoint_due(marks, step, spent, previous) and not done():
                paused = time.perf_counter()
                save_model(model, str(output_dir / f"point-{step}.safetensors"))
                points.append(
                    {"step": step, "train_minutes": spent / 60, "weights": f"point-{step}.safetensors"}
                )
                start += time.perf_counter() - paused  # saving is not training
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "steps": step,
        "train_minutes": spent / 60,
        "parameters": parameters,
        "final_loss": loss.item(),
        "precision": "bf16" if bf16 else "fp32",
        "points": points,
    }


# ------------------------------------------------------------------------------------ ours' side
def ours_points(folder: Path) -> list[dict[str, Any]]:
    """train.py's ``--save_minutes`` checkpoints: step, training minutes and weights of each, in order."""
    points = []
    for checkpoint in folder.glob("checkpoint-*"):
        state = json.loads((checkpoint / "training_state.json").read_text())
        weights = str((checkpoint / "model.safetensors").relative_to(folder))
        points.append(
            {"step": state["step"], "train_minutes": state["train_seconds"] / 60, "weights": weights}
        )
    return sorted(points, key=lambda point: point["step"])


# ------------------------------------------------------------------------------------------ main
def run_side(side: str, seed: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train one side in its own process (its memory and threads are its own), then score its folder and
    the points along its run."""
    folder = work / f"{side}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if side == "ours":
        command = [sys.executable, str(ROOT / "train.py"), "--output_dir", str(folder), "--seed", str(seed)]
        command += ["--max_train_minutes", str(args.ours_minutes), "--save_minutes", str(args.score_every)]
        command += shlex.split(args.ours_args)
    else:
        command = [sys.executable, __file__, "--_native", str(folder), "--minutes", str(args.minutes)]
        command += ["--seeds", str(seed), "--score_every", str(args.score_every)]
        if args.native_max_steps:
            command += ["--native_max_steps", str(args.native_max_steps)]
        if args.native_train_documents:
            command += ["--native_train_documents", str(args.native_train_documents)]
    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if side == "ours":
        info = json.loads((folder / "run_config.json").read_text())
        train = {"steps": info["steps_taken"], "train_minutes": info["train_minutes"]}
        train["parameters"] = info["parameters"]
        train["precision"] = info["mixed_precision_resolved"]
        points, separator = ours_points(folder), None
    else:
        train = json.loads((folder / "native_run.json").read_text())
        points, separator = train.pop("points"), NATIVE_SEPARATOR
    points = [point for point in points if point["step"] < train["steps"]]  # the last one: the final model
    final, *along = score_folder(
        folder, separator, [folder / p["weights"] for p in points], args.held_out_documents
    )
    curve = [
        {"step": p["step"], "minute": round(p["train_minutes"], 3), **bits}
        for p, bits in zip(points, along, strict=True)
    ]
    curve.append({"step": train["steps"], "minute": round(train["train_minutes"], 3), **final})
    if not args.work_dir:  # the points' checkpoints are large (optimizer state): gone once scored
        for checkpoint in folder.glob("checkpoint-*"):
            shutil.rmtree(checkpoint)
    return {"seed": seed, "bits_per_char": final, "wall_seconds": round(wall, 1), **train, "curve": curve}


def spread(values: list[float]) -> dict[str, float | None]:
    """Mean, sample standard deviation (None for one value), min and max."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def minutes_to_quality(native: list[dict[str, Any]], ours: list[dict[str, Any]]) -> dict[str, Any]:
    """Per language: native's final bits/char over its seeds (the target = their mean), and for each seed of
    ours the minute of its first scored point at or below the target (None: not reached)."""
    report = {}
    for lang in LANGS:
        target = statistics.fmean(run["bits_per_char"][lang] for run in native)
        per_seed = []
        for run in ours:
            reached = [point["minute"] for point in run["curve"] if point[lang] <= target]
            per_seed.append(reached[0] if reached else None)
        minutes = [minute for minute in per_seed if minute is not None]
        report[lang] = {
            "native_final": spread([run["bits_per_char"][lang] for run in native]),
            "ours_final": spread([run["bits_per_char"][lang] for run in ours]),
            "target": target,
            "ours_minutes": per_seed,
            "ours_minutes_summary": spread(minutes) if minutes else None,
            "reached": f"{len(minutes)}/{len(per_seed)}",
        }
    return report


def plot_curves(results: dict[str, list[dict[str, Any]]], machine: str, path: Path) -> None:
    """bits/char against training minutes, one panel per language, one line per side and seed, native's
    final (mean over seeds) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"native": "tab:gray", "ours": "tab:blue"}
    figure, axes = plt.subplots(1, len(LANGS), figsize=(11, 4))
    for axis, lang in zip(axes, LANGS, strict=True):
        for side, runs in results.items():
            for index, run in enumerate(runs):
                minutes = [point["minute"] for point in run["curve"]]
                bits = [point[lang] for point in run["curve"]]
                label = side if index == 0 else None
                axis.plot(minutes, bits, marker="o", markersize=3, color=colors[side], label=label, alpha=0.8)
        if "native" in results:
            target = statistics.fmean(run["bits_per_char"][lang] for run in results["native"])
            axis.axhline(target, color=colors["native"], linestyle="--", linewidth=1, label="native final")
        axis.set_title(f"{lang} held-out")
        axis.set_xlabel("training minutes")
        axis.set_ylabel("bits per character")
        axis.legend()
    figure.suptitle(machine, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def print_report(report: dict[str, Any]) -> None:
    """The table of final figures per side and seed, then minutes-to-quality per language."""
    machine, args = report["machine"], report
    seeds = ",".join(str(seed) for seed in report["seeds"])
    minutes = {"native": args["minutes"], "ours": args["ours_minutes"]}
    budget = ", ".join(f"{side} {minutes[side]:g}" for side in report["results"]) + " training minutes"
    print(f"\nbits/char on the held-out demo split, {budget}, seeds {seeds}")
    print(f"CPU: {machine['model']} (family {machine.get('family')} model {machine.get('model_number')}; "
          f"flags {' '.join(machine.get('flags', []))}; isa_cap {machine.get('isa_cap')})")  # fmt: skip
    print(f"{'side':8} {'seed':>4} {'zh':>7} {'en':>7} {'steps':>6} {'params':>10} {'wall s':>7} precision")
    for side, runs in report["results"].items():
        for run in runs:
            bits = run["bits_per_char"]
            print(
                f"{side:8} {run['seed']:4d} {bits['zh']:7.3f} {bits['en']:7.3f} {run['steps']:6d} "
                f"{run['parameters']:10,d} {run['wall_seconds']:7.1f} {run['precision']}"
            )
    quality = report.get("minutes_to_quality")
    if not quality:
        return
    print(
        f"\nminutes to quality: ours' first point (every {args['score_every']:g} min) at or below native's final"
    )
    for lang, row in quality.items():
        native = row["native_final"]
        noise = f" ± {native['std']:.3f}" if native["std"] is not None else ""
        minutes = ", ".join("not reached" if m is None else f"{m:.2f} min" for m in row["ours_minutes"])
        summary = row["ours_minutes_summary"]
        tail = ""
        if summary and len(row["ours_minutes"]) > 1:
            std = f", std {summary['std']:.2f}" if summary["std"] is not None else ""
            tail = f" (mean {summary['mean']:.2f}, range {summary['min']:.2f}-{summary['max']:.2f}{std})"
        print(f"{lang}: native final {native['mean']:.3f}{noise}; ours per seed: {minutes}{tail}; "
              f"reached in {row['reached']} seeds")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="Training-loop minutes for each side.")
    parser.add_argument(
        "--seeds", default="0", help="Comma-separated seeds; each runs both sides (>= 2: noise)."
    )
    parser.add_argument(
        "--score_every", type=float, default=1.0,
        help="Score both sides every N training minutes (0: only the final models, no minutes-to-quality).",
    )  # fmt: skip
    parser.add_argument(
        "--ours_minutes", type=float, default=None,
        help="Ours' training minutes when not --minutes: e.g. 5 against native's 10, so ours' schedule ends "
        "at the budget it claims rather than mid-cosine.",
    )  # fmt: skip
    parser.add_argument("--ours_args", default="", help="Extra train.py arguments (ablations).")
    parser.add_argument("--sides", default="native,ours", help="Which sides to run, in this order.")
    parser.add_argument(
        "--work_dir", default=None, help="Keep the trained folders and points here (default: temp)."
    )
    parser.add_argument("--json", default=None, help="Write the results here.")
    parser.add_argument(
        "--plot", default="vs_native.png", help="The curves as a PNG (with --score_every > 0)."
    )
    parser.add_argument(
        "--native_max_steps",
        type=int,
        default=None,
        help="Also stop the native loop after N steps (ablations).",
    )
    parser.add_argument(
        "--native_train_documents", type=int, default=None,
        help="Native side: train on the first N demo documents only (quick runs and tests).",
    )  # fmt: skip
    parser.add_argument(
        "--held_out_documents", type=int, default=None,
        help="Score only the first N held-out documents per language (quick runs and tests; default all).",
    )  # fmt: skip
    parser.add_argument("--_native", default=None, help=argparse.SUPPRESS)  # the native side's own process
    args = parser.parse_args(argv)
    args.seed_list = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    if not args.seed_list:
        parser.error("--seeds: at least one seed")
    if args.score_every < 0:
        parser.error("--score_every must be >= 0")
    if args.ours_minutes is None:
        args.ours_minutes = args.minutes
    if not args.minutes > 0 or not args.ours_minutes > 0:
        parser.error("--minutes and --ours_minutes must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._native:
        folder = Path(args._native)
        result = native_loop(
            folder, args.minutes, args.native_max_steps, args.seed_list[0], args.score_every,
            args.native_train_documents,
        )  # fmt: skip
        (folder / "native_run.json").write_text(json.dumps(result))
        return 0

    sides = [side.strip() for side in args.sides.split(",")]
    if not set(sides) <= {"ours", "native"}:
        raise SystemExit(f"--sides: expected ours and/or native, got {args.sides!r}")
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as temp:
        work = Path(args.work_dir or temp)
        for seed in args.seed_list:  # per seed both sides, so slow drifts in the machine's load hit both
            for side in sides:
                results[side].append(run_side(side, seed, work, args))
    machine = cpu_info()
    report = {
        "machine": {**machine, "load_average": os.getloadavg()},
        "minutes": args.minutes,
        "ours_minutes": args.ours_minutes,
        "seeds": args.seed_list,
        "score_every": args.score_every,
        "ours_args": args.ours_args,
        "results": results,
        "minutes_to_quality": None,
        "plot": None,
    }
    if args.score_every and set(sides) == {"ours", "native"}:
        report["minutes_to_quality"] = minutes_to_quality(results["native"], results["ours"])
    if args.score_every and args.plot:
        plot_curves(results, f"{machine['model']} ({' '.join(machine.get('flags', []))})", Path(args.plot))
        report["plot"] = str(Path(args.plot).resolve())
    print_report(report)
    if report["plot"]:
        print(f"curves: {report['plot']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
