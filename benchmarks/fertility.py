"""Tokenizer fertility: our byte-level BPE vs SentencePiece, same vocabulary size, same training text.

Both tokenizers are trained on the demo corpus train split (People's Daily 1998-01 + Shakespeare) and
measured on its fixed validation split:

- **zh tokens / char**: tokens of the Chinese documents ÷ their non-whitespace characters (Han
  characters, full-width punctuation and digits).
- **en tokens / word**: tokens of the English documents ÷ their whitespace-separated words.
- **round trip**: documents for which ``decode(encode(text)) == text`` exactly.

SentencePiece runs twice: with its defaults (``nmt_nfkc`` normalization, extra whitespace removed) and
"LLaMA-style" (identity normalization, byte fallback, digits split, whitespace kept). Both get
``character_coverage=0.9995`` and the 11 GLM special tokens as user-defined symbols, as ours has them.

    python benchmarks/fertility.py --vocab_size 8192 --json fertility.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece as spm
from transformers import HfArgumentParser
from transformers.utils import logging as hf_logging

from bilingual_glm.configuration.configuration_bilingual_glm import GLM_SPECIAL_TOKENS
from bilingual_glm.corpora import load_demo_corpus
from bilingual_glm.tokenizer import train_tokenizer


@dataclass
class FertilityArgs:
    vocab_size: int = field(default=8192, metadata={"help": "Vocabulary size of every tokenizer compared."})
    json_path: str | None = field(
        default=None, metadata={"aliases": ["--json"], "help": "Also write the results as JSON to this path."}
    )
    sp_model_type: str = field(default="bpe", metadata={"help": "SentencePiece model type: bpe or unigram."})
    num_threads: int = field(
        default=os.cpu_count() or 1, metadata={"help": "SentencePiece training threads."}
    )


@dataclass
class Result:
    tokenizer: str
    zh_tokens_per_char: float
    en_tokens_per_word: float
    zh_round_trip: str
    en_round_trip: str
    train_seconds: float


Encoder = Callable[[str], list[int]]
Decoder = Callable[[list[int]], str]


def measure(
    name: str, encode: Encoder, decode: Decoder, seconds: float, docs: dict[str, list[str]]
) -> Result:
    """Fertility and exact round trip of one tokenizer on the validation documents."""
    counts, exact = {}, {}
    for lang, texts in docs.items():
        ids = [encode(text) for text in texts]
        counts[lang] = sum(map(len, ids))
        exact[lang] = f"{sum(decode(i) == t for i, t in zip(ids, texts, strict=True))}/{len(texts)}"
    zh_chars = sum(len(re.sub(r"\s", "", text)) for text in docs["zh"])
    en_words = sum(len(text.split()) for text in docs["en"])
    return Result(
        tokenizer=name,
        zh_tokens_per_char=round(counts["zh"] / zh_chars, 4),
        en_tokens_per_word=round(counts["en"] / en_words, 4),
        zh_round_trip=exact["zh"],
        en_round_trip=exact["en"],
        train_seconds=round(seconds, 1),
    )


def run_ours(args: FertilityArgs, train: Sequence[str], docs: dict[str, list[str]]) -> Result:
    start = time.perf_counter()
    tokenizer = train_tokenizer(train, vocab_size=args.vocab_size, model_max_length=10**9)
    seconds = time.perf_counter() - start
    return measure(
        f"bilingual_glm byte-level BPE ({len(tokenizer)})",
        lambda text: tokenizer.encode(text, add_special_tokens=False),
        lambda ids: tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False),
        seconds,
        docs,
    )


SP_VARIANTS: dict[str, dict[str, object]] = {
    "defaults": {},
    "LLaMA-style": dict(
        normalization_rule_name="identity",
        byte_fallback=True,
        split_digits=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
    ),
}


def run_sentencepiece(
    args: FertilityArgs, variant: str, train_file: Path, workdir: Path, docs: dict[str, list[str]]
) -> Result:
    prefix = workdir / f"sp-{variant}"
    start = time.perf_counter()
    spm.SentencePieceTrainer.train(
        input=str(train_file),
        model_prefix=str(prefix),
        model_type=args.sp_model_type,
        vocab_size=args.vocab_size,
        character_coverage=0.9995,
        user_defined_symbols=list(GLM_SPECIAL_TOKENS),
        max_sentence_length=1 << 16,
        num_threads=args.num_threads,
        minloglevel=2,
        **SP_VARIANTS[variant],
    )
    seconds = time.perf_counter() - start
    model = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    name = f"SentencePiece {args.sp_model_type}, {variant} ({model.get_piece_size()})"
    return measure(name, model.encode, model.decode, seconds, docs)


def cpu_model() -> str:
    """CPU name for the results file (``platform.processor()`` is empty on most Linux systems)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def markdown_table(results: Sequence[Result], vocab_size: int) -> str:
    lines = [
        f"| tokenizer (vocab {vocab_size}) | zh tokens / char | en tokens / word | zh exact round trip "
        "| en exact round trip | train s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.tokenizer} | {r.zh_tokens_per_char:.3f} | {r.en_tokens_per_word:.3f} | {r.zh_round_trip} "
            f"| {r.en_round_trip} | {r.train_seconds} |"
        )
    return "\n".join(lines)


def main(args: FertilityArgs) -> list[Result]:
    hf_logging.set_verbosity_error()  # long validation documents exceed model_max_length: not an error here
    print(json.dumps({"args": dataclasses.asdict(args)}, indent=None))
    train = load_demo_corpus("train")["text"]
    validation = load_demo_corpus("validation")
    docs = {lang: [row["text"] for row in validation if row["lang"] == lang] for lang in ("zh", "en")}
    print(f"train documents: {len(train)}, validation: zh {len(docs['zh'])}, en {len(docs['en'])}")

    results = [run_ours(args, train, docs)]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        train_file = workdir / "train.txt"  # SentencePiece trains on lines
        train_file.write_text("\n".join(line for text in train for line in text.splitlines() if line.strip()))
        for variant in SP_VARIANTS:
            results.append(run_sentencepiece(args, variant, train_file, workdir, docs))

    table = markdown_table(results, args.vocab_size)
    print(table)
    if args.json_path:
        machine = {"platform": platform.platform(), "cpu": cpu_model(), "cpus": os.cpu_count()}
        payload = {
            "args": dataclasses.asdict(args),
            "machine": machine,
            "results": list(map(dataclasses.asdict, results)),
        }
        Path(args.json_path).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    return results


if __name__ == "__main__":
    (parsed,) = HfArgumentParser(FertilityArgs).parse_args_into_dataclasses()
    main(parsed)
