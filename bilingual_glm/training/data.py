"""train.py's data: text sources → tokenizer → packed blocks → the DataLoader, and the held-out blocks.

Every check that names a flag or a file runs here, before the model exists: a source that yields no
block, or fewer blocks than one batch, stops the run with the numbers instead of torch's sampler errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import AutoTokenizer

from bilingual_glm.corpora import load_demo_corpus, load_text_files
from bilingual_glm.data import BlankInfillingCollator, CausalCollator, MlmCollator, pack_causal
from bilingual_glm.data.objectives import ObjectiveMixtureCollator
from bilingual_glm.tokenizer import save_tokenizer, train_tokenizer

# Widths rounded up to a multiple of 64: on CPU, oneDNN keeps a kernel per bf16 matmul shape, and a
# width that changes every batch grows that cache (RSS) by hundreds of MB (see the soak figures).
PAD_TO_MULTIPLE_OF = 64


def first_n(dataset: datasets.Dataset, n: int | None, shuffle_seed: int | None = None) -> datasets.Dataset:
    """The first ``n`` rows (all when ``n`` is None or larger), of a copy shuffled with ``shuffle_seed``
    if given (the demo corpora are sorted by language: their first rows would all be Chinese)."""
    if n is None or n >= len(dataset):
        return dataset
    if n < 1:
        raise ValueError(f"a row limit must be >= 1, got {n}")
    return (dataset if shuffle_seed is None else dataset.shuffle(seed=shuffle_seed)).select(range(n))


def column_names(dataset: Any) -> list[str]:
    """Column names, also for streamed datasets whose features are only known from a first row."""
    return list(dataset.column_names or next(iter(dataset)).keys())


def load_raw(args: Any) -> tuple[Any, datasets.Dataset]:
    """(train, validation) text datasets; validation keeps a `lang` column when the source has one."""
    if args.train_files:
        every = load_text_files(args.train_files)
    elif args.dataset_name:
        every = datasets.load_dataset(
            args.dataset_name, args.dataset_config, split="train", streaming=args.streaming
        )
    else:
        train, validation = load_demo_corpus("train"), load_demo_corpus("validation")
        return first_n(train, args.max_train_documents, shuffle_seed=0), validation
    columns = column_names(every)
    if args.text_column not in columns:
        raise ValueError(f"--text_column: {args.text_column!r} is not a column of the data ({columns})")
    if args.text_column != "text":
        every = every.rename_column(args.text_column, "text")
    if args.streaming:
        held_out = datasets.Dataset.from_list(list(every.take(max(args.eval_blocks, 16))))
        return every.skip(len(held_out)), held_out
    if len(every) < 2:  # train_test_split needs a row on each side; one document trains and evaluates
        return first_n(every, args.max_train_documents, shuffle_seed=0), every
    split = every.train_test_split(test_size=args.validation_fraction, seed=0)
    return first_n(split["train"], args.max_train_documents, shuffle_seed=0), split["test"]


def get_tokenizer(args: Any, train_text: Any, vocab_size: int, accelerator: Any, resuming: bool) -> Any:
    """--tokenizer, else the one this run saved (other ranks, resumes), else train one and save it.

    Only the main process trains: every rank must use the very same ids.
    """
    if args.model_name_or_path:
        return AutoTokenizer.from_pretrained(args.model_name_or_path)
    if args.tokenizer:  # a folder: checked with the arguments
        return AutoTokenizer.from_pretrained(args.tokenizer)
    saved = Path(args.output_dir) / "tokenizer"
    if (resuming or not accelerator.is_main_process) and saved.is_dir():
        return AutoTokenizer.from_pretrained(saved)
    texts = (row["text"] for row in train_text) if args.streaming else train_text["text"]
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size, model_max_length=max(args.block_size * 4, 2048))
    if accelerator.is_main_process:
        save_tokenizer(tokenizer, saved)
    return tokenizer


def tokenize(dataset: Any, tokenizer: Any, streaming: bool, num_proc: int) -> Any:
    """Batched (multi-process unless streamed) tokenization: ``text`` → ``input_ids``, no special tokens."""
    map_kwargs: dict[str, Any] = {} if streaming else {"num_proc": num_proc}
    return dataset.map(
        lambda batch: {
            "input_ids": tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        },
        batched=True,
        remove_columns=column_names(dataset),
        **map_kwargs,
    )


def pack(tokenized: Any, tokenizer: Any, block_size: int, streaming: bool, num_proc: int) -> Any:
    """Documents (each + eos) concatenated and cut into ``block_size`` blocks (``pack_causal``)."""
    map_kwargs: dict[str, Any] = {} if streaming else {"num_proc": num_proc}
    return tokenized.map(
        partial(pack_causal, block_size=block_size, eos_token_id=tokenizer.eos_token_id),
        batched=True,
        batch_size=1000,
        remove_columns=["input_ids"],
        **map_kwargs,
    )


def train_blocks(text: Any, tokenizer: Any, args: Any) -> Any:
    """The packed training blocks; a source too small for one batch of blocks is an error naming it."""
    tokenized = tokenize(text, tokenizer, args.streaming, args.num_proc)
    blocks = pack(tokenized, tokenizer, args.block_size, args.streaming, args.num_proc)
    if args.streaming:
        return blocks
    if len(blocks) < args.per_device_train_batch_size:
        tokens = sum(len(ids) + 1 for ids in tokenized["input_ids"])  # + the eos after each document
        source = (
            "--train_files " + " ".join(args.train_files)
            if args.train_files
            else (f"--dataset_name {args.dataset_name}" if args.dataset_name else "the demo corpus")
        )
        raise ValueError(
            f"{source}: {len(text)} documents, {tokens} tokens make {len(blocks)} blocks of --block_size "
            f"{args.block_size}, fewer than one batch (--per_device_train_batch_size "
            f"{args.per_device_train_batch_size}): give more text or lower these"
        )
    return blocks


def held_out_blocks(validation: datasets.Dataset, tokenizer: Any, args: Any) -> dict[str, Any]:
    """Per-language packed blocks (one set named 'all' when the data has no `lang`)."""
    langs = sorted(set(validation["lang"])) if "lang" in validation.column_names else ["all"]
    blocks = {}
    for lang in langs:
        subset = (
            validation if lang == "all" else validation.filter(lambda row, lang=lang: row["lang"] == lang)
        )
        tokenized = tokenize(subset.select_columns(["text"]), tokenizer, False, args.num_proc)
        packed = pack(tokenized, tokenizer, args.block_size, False, args.num_proc)
        blocks[lang] = packed.select(range(min(args.eval_blocks, len(packed))))
    return blocks


def objective_collator(args: Any, tokenizer: Any, objectives: dict[str, float], process_index: int) -> Any:
    """The DataLoader's ``collate_fn``: one collator per objective, drawn per micro-batch (seeded)."""
    mixture = tuple(float(x) for x in args.glm_mixture.split(","))
    collators = {
        "clm": CausalCollator(),
        "glm": BlankInfillingCollator(tokenizer, mixture=mixture, pad_to_multiple_of=PAD_TO_MULTIPLE_OF),
        "mlm": MlmCollator(tokenizer, pad_to_multiple_of=PAD_TO_MULTIPLE_OF),
    }
    used = {name: collators[name] for name in objectives}
    return ObjectiveMixtureCollator(used, objectives, seed=args.seed, process_index=process_index)


def train_loader(blocks: Any, collate: ObjectiveMixtureCollator, args: Any) -> torch.utils.data.DataLoader:
    """Shuffled (seedable, resumable) full batches, collated in ``--dataloader_num_workers`` workers.

    Streams stay in the main process: each worker would read the whole stream again.
    """
    workers = 0 if args.streaming else args.dataloader_num_workers
    return torch.utils.data.DataLoader(
        blocks,
        batch_size=args.per_device_train_batch_size,
        shuffle=not args.streaming,
        collate_fn=collate,
        drop_last=True,
        num_workers=workers,
    )


def micro_batches(loader: Any, accelerator: Any, consumed: int, streaming: bool) -> Iterator[dict[str, Any]]:
    """Endless micro-batches; on resume, skip exactly the ones the finished steps consumed.

    Before each pass the collator learns the number of the first micro-batch it will collate.
    """
    collate, drawn, epoch = loader.collate_fn, consumed, 0
    if not streaming:
        if len(loader) == 0:  # one batch in all, but several processes to share it
            raise ValueError(
                "the training data yields no full batch per process: lower --per_device_train_batch_size"
            )
        epoch, consumed = divmod(consumed, len(loader))
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        iterator = accelerator.skip_first_batches(loader, consumed) if consumed else loader
        collate.start(drawn + 1)
        for batch in iterator:
            drawn += 1
            yield batch
        consumed, epoch = 0, epoch + 1
