"""Does ``python train.py`` learn more per CPU minute than a plain loop around transformers' own GLM?

    python benchmarks/vs_native.py                       # both sides, 7 training minutes each (~17 min)
    python benchmarks/vs_native.py --minutes 3 --json vs.json
    python benchmarks/vs_native.py --ours_args "--objective clm --preset mini"   # an ablation of ours

One command, both sides, same machine, one after the other:

- **ours**: ``train.py`` with its defaults (plus ``--ours_args``), ``--max_train_minutes`` = ``--minutes``.
- **native**: the plain recipe a user would write first, in ``native_loop`` below: transformers'
  ``GlmForCausalLM`` (4 layers x 256, tied embeddings), a 16k byte-level BPE from ``tokenizers``, causal
  LM on packed 256-token blocks, batch 16, AdamW lr 1e-3, cosine over the same time budget, fp32.

Both train on the demo corpus' train split and are scored on its validation split (People's Daily and
Shakespeare, ~2% each, fixed by a hash of the text) in **bits per character**: the summed next-token
loss of every token of every held-out document, in bits, over the document's characters. Each document
starts after a separator token, so its first token is scored too; documents longer than a block are
scored in consecutive blocks. That makes tokenizers with different fertility comparable.

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bilingual_glm.corpora import load_demo_corpus  # noqa: E402
from bilingual_glm.modeling.kernels_bilingual_glm import cpu_info  # noqa: E402

LANGS = ("zh", "en")
BLOCK = 256


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


def held_out() -> dict[str, list[str]]:
    validation = load_demo_corpus("validation")
    return {lang: [row["text"] for row in validation if row["lang"] == lang] for lang in LANGS}


def score_folder(folder: Path, separator: str | None = None) -> dict[str, float]:
    """bits/char per language of a saved model folder (ours: its EOS separates documents)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    separator_id = tokenizer.convert_tokens_to_ids(separator) if separator else tokenizer.eos_token_id
    return {lang: bits_per_char(model, tokenizer, texts, separator_id) for lang, texts in held_out().items()}


# ---------------------------------------------------------------------------------- native side
def native_loop(output_dir: Path, minutes: float, max_steps: int | None = None, seed: int = 0) -> dict[str, Any]:
    """The plain recipe: byte-level BPE 16k, GlmForCausalLM 4 x 256, AdamW 1e-3, cosine over the budget."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GlmConfig, GlmForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    texts = [row["text"] for row in load_demo_corpus("train")]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=16384, special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
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
    budget, warmup, step, spent = minutes * 60.0, 0.02, 0, 0.0
    done = lambda: spent >= budget or (max_steps is not None and step >= max_steps)  # noqa: E731
    model.train()
    start = time.perf_counter()
    while not done():
        for index in torch.randperm(len(blocks)).split(16):
            if len(index) < 16 or done():
                continue
            share = max(spent / budget, step / max_steps if max_steps else 0.0)
            lr = share / warmup if share < warmup else 0.5 * (1 + math.cos(math.pi * (share - warmup) / (1 - warmup)))
            for group in optimizer.param_groups:
                group["lr"] = 1e-3 * lr
            batch = blocks[index]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step, spent = step + 1, time.perf_counter() - start
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    parameters = sum(p.numel() for p in model.parameters())
    return {"steps": step, "train_minutes": spent / 60, "parameters": parameters, "final_loss": loss.item()}


# ------------------------------------------------------------------------------------------ main
def run_side(side: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train one side in its own process (its memory and threads are its own), then score its folder."""
    folder = work / side
    start = time.perf_counter()
    if side == "ours":
        command = [sys.executable, str(ROOT / "train.py"), "--output_dir", str(folder)]
        command += ["--max_train_minutes", str(args.minutes), *shlex.split(args.ours_args)]
    else:
        command = [sys.executable, __file__, "--_native", str(folder), "--minutes", str(args.minutes)]
        if args.native_max_steps:
            command += ["--native_max_steps", str(args.native_max_steps)]
    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if side == "ours":
        info = json.loads((folder / "run_config.json").read_text())
        train = {"steps": info["steps_taken"], "train_minutes": info["train_minutes"]}
        train["parameters"] = info["parameters"]
        train["mixed_precision"] = info["mixed_precision_resolved"]
        bits = score_folder(folder)
    else:
        train = json.loads((folder / "native_run.json").read_text())
        bits = score_folder(folder, separator="<|endoftext|>")
    return {"bits_per_char": bits, "wall_seconds": round(wall, 1), **train}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=7.0, help="Training-loop minutes for each side.")
    parser.add_argument("--ours_args", default="", help="Extra train.py arguments (ablations).")
    parser.add_argument("--sides", default="native,ours", help="Which sides to run, in this order.")
    parser.add_argument("--work_dir", default=None, help="Keep both trained folders here (default: temp).")
    parser.add_argument("--json", default=None, help="Write the results here.")
    parser.add_argument(
        "--native_max_steps", type=int, default=None, help="Also stop the native loop after N steps (ablations)."
    )
    parser.add_argument("--_native", default=None, help=argparse.SUPPRESS)  # the native side's own process
    args = parser.parse_args()
    if args._native:
        folder = Path(args._native)
        result = native_loop(folder, args.minutes, args.native_max_steps)
        (folder / "native_run.json").write_text(json.dumps(result))
        return 0

    sides = [side.strip() for side in args.sides.split(",")]
    if not set(sides) <= {"ours", "native"}:
        raise SystemExit(f"--sides: expected ours and/or native, got {args.sides!r}")
    with tempfile.TemporaryDirectory() as temp:
        work = Path(args.work_dir or temp)
        results = {side: run_side(side, work, args) for side in sides}
    report = {
        "machine": {**cpu_info(), "load_average": os.getloadavg()},
        "minutes": args.minutes,
        "ours_args": args.ours_args,
        "results": results,
    }
    print(f"\nbits/char on the held-out demo split, {args.minutes:g} training minutes each ({cpu_info()['model']})")
    print(f"{'side':8} {'zh':>7} {'en':>7} {'steps':>6} {'params':>10} {'wall s':>7}")
    for side, result in results.items():
        bits = result["bits_per_char"]
        print(
            f"{side:8} {bits['zh']:7.3f} {bits['en']:7.3f} {result['steps']:6d} "
            f"{result['parameters']:10,d} {result['wall_seconds']:7.1f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
