"""Regression fixture: the losses of the first steps of one tiny, deterministic train.py run.

A refactor that is meant to preserve behaviour (collators, masks, labels, loss, lr schedule, data order)
must reproduce these numbers; one that changes them fails here, with the step and objective named.
The expected values live in ``tests/assets/train_losses_tiny.json`` (torchtitan-style ``tests/assets/``).

Why these settings:

- ``--max_steps`` only (no time budget): the lr schedule is then a function of the step alone.
- ``--mixed_precision no``: fp32, so the numbers do not depend on whether the CPU has native bf16.
- ``--optimizer adamw``: the default Muon orthogonalizes in bf16 or fp32 by CPU kind (``newton_schulz_dtype``),
  which would make the numbers depend on it too. The fixture was recorded with AdamW, the default then.
- all three objectives mixed: the per-batch objective draw, the GLM and MLM collators' seeded masking and
  the causal collator all feed the losses, and the drawn objective of every step is checked exactly.
- the tokenizer is trained here from a fixed slice of the demo corpus (400 documents, vocab 512; BPE
  training is deterministic), so no tokenizer file has to be checked in.

Tolerance: ``RTOL = 1e-4`` relative. Measured on the 2-core Intel Xeon (AVX-512) dev machine: two runs
are bit-identical; one thread against two, and the oneDNN fp32 linear against MKL's, moved the numbers
by at most 4.8e-7 relative (step 7's loss, the zh held-out perplexity). CI lands on other CPUs (AVX2-only
AMD Zen 3 sums in other orders, unmeasured here), so the bound leaves ~200x that headroom, while a real
change (a label or mask off by one, a different seed draw) moves the losses by 1e-3 or more.

Regenerate after an *intended* change of the numbers (and say why in the commit message)::

    BILINGUAL_GLM_REGENERATE=1 .venv/bin/python -m pytest -p no:xdist tests/test_regression.py
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "assets" / "train_losses_tiny.json"
REGENERATE_ENV = "BILINGUAL_GLM_REGENERATE"
RTOL = 1e-4
TOKENIZER = {"documents": 400, "shuffle_seed": 0, "vocab_size": 512}
TRAIN_ARGS = [
    "--optimizer",  # not the default (auto: Muon), whose Newton-Schulz precision follows the CPU kind
    "adamw",
    "--preset",
    "tiny",
    "--objective",
    "clm:0.4,glm:0.4,mlm:0.2",
    "--max_steps",
    "8",
    "--logging_steps",
    "1",
    "--mixed_precision",
    "no",
    "--seed",
    "0",
    "--block_size",
    "64",
    "--per_device_train_batch_size",
    "4",
    "--max_train_documents",
    "200",
    "--eval_blocks",
    "2",
    "--num_proc",
    "1",
    "--sample_new_tokens",
    "1",
]


def _train_tokenizer(path: Path) -> None:
    from bilingual_glm.corpora import load_demo_corpus
    from bilingual_glm.tokenizer import train_tokenizer

    corpus = load_demo_corpus("train").shuffle(seed=TOKENIZER["shuffle_seed"])
    texts = corpus.select(range(TOKENIZER["documents"]))["text"]
    train_tokenizer(texts, vocab_size=TOKENIZER["vocab_size"]).save_pretrained(path)


def _run(tmp_path: Path, *extra: str) -> dict:
    """Train, then read back what the fixture records: per-step loss/objective/lr and the final eval."""
    tokenizer, out = tmp_path / "tokenizer", tmp_path / "run"
    _train_tokenizer(tokenizer)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(ROOT / "train.py"), *TRAIN_ARGS]
    command += ["--tokenizer", str(tokenizer), "--output_dir", str(out), *extra]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [
        {key: record[key] for key in ("step", "objective", "loss", "lr")}
        for record in records
        if "loss" in record
    ]
    final = records[-1]
    return {
        "steps": steps,
        "eval": {key: value for key, value in final.items() if key.startswith("eval_ppl_")},
    }


@pytest.mark.parametrize("workers", [0, 2], ids=["collated-in-process", "collated-in-2-workers"])
def test_first_steps_reproduce_the_recorded_losses(tmp_path, workers):
    """The same numbers whether the DataLoader collates in the training process or in worker processes."""
    observed = _run(tmp_path, "--dataloader_num_workers", str(workers))
    if workers and os.environ.get(REGENERATE_ENV) == "1":
        pytest.skip("the fixture is written from the in-process run")
    if os.environ.get(REGENERATE_ENV) == "1":
        payload = {
            "about": "train.py losses of the first steps; see tests/test_regression.py (how to regenerate)",
            "train_args": TRAIN_ARGS,
            "tokenizer": TOKENIZER,
            **observed,
        }
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        FIXTURE.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        pytest.skip(f"{REGENERATE_ENV}=1: wrote {FIXTURE.relative_to(ROOT)}")
    expected = json.loads(FIXTURE.read_text(encoding="utf-8"))
    assert expected["train_args"] == TRAIN_ARGS and expected["tokenizer"] == TOKENIZER, (
        f"the run's settings changed: regenerate the fixture ({REGENERATE_ENV}=1)"
    )
    assert len(observed["steps"]) == len(expected["steps"])
    for got, want in zip(observed["steps"], expected["steps"], strict=True):
        where = f"step {want['step']} ({want['objective']})"
        assert got["step"] == want["step"] and got["objective"] == want["objective"], (where, got)
        assert math.isclose(got["loss"], want["loss"], rel_tol=RTOL, abs_tol=0.0), (where, got, want)
        assert math.isclose(got["lr"], want["lr"], rel_tol=RTOL, abs_tol=1e-12), (where, got, want)
    assert observed["eval"].keys() == expected["eval"].keys()
    for key, want in expected["eval"].items():
        assert math.isclose(observed["eval"][key], want, rel_tol=RTOL, abs_tol=0.0), (key, observed["eval"])
