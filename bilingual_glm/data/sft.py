"""Chat SFT data: chat files, chat-template tokenization with assistant-only labels, packing, collator.

A chat is rendered with the tokenizer's chat template; ``labels`` are the token ids where the template
marks assistant output (``{% generation %}``) and -100 elsewhere. ``pack_chats`` optionally concatenates
whole chats into blocks with positions restarting at each chat.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch

from bilingual_glm.data.blank_infilling import IGNORE_INDEX
from bilingual_glm.data.files import ROW_SUFFIXES, hub_splits, read_file, require_columns, round_up


def load_chat_data(
    train_file: str | None = None,
    validation_file: str | None = None,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    messages_column: str = "messages",
    validation_fraction: float = 0.05,
    seed: int = 0,
) -> datasets.DatasetDict:
    """Chats as ``DatasetDict(train, validation)`` with one ``messages`` column.

    Each row: ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}``
    (JSON Lines, JSON or a ``datasets`` dataset). Raises ValueError naming the file and column when the
    data has no such column or a row is not a list of role/content messages.
    """
    if train_file is not None:
        files = {"train": train_file, "validation": validation_file}
        splits = {split: read_file(path, ROW_SUFFIXES) for split, path in files.items() if path is not None}
        sources = {split: str(path) for split, path in files.items() if path is not None}
    elif dataset_name is not None:
        splits = {k: v for k, v in hub_splits(dataset_name, dataset_config).items() if k != "test"}
        sources = {split: f"--dataset_name {dataset_name} [{split}]" for split in splits}
    else:
        raise ValueError('--task sft needs chat data: --train_file chats.jsonl (rows {"messages": [...]})')
    for split, dataset in splits.items():
        require_columns(dataset, sources[split], {"messages": messages_column})
        for row, messages in enumerate(dataset[messages_column]):
            if not isinstance(messages, list) or not all(
                isinstance(m, Mapping)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in messages
            ):
                raise ValueError(
                    f"{sources[split]}: row {row} of column {messages_column!r} is not a list of "
                    f"{{'role', 'content'}} messages: {str(messages)[:200]}"
                )
        splits[split] = dataset.select_columns([messages_column])
        if messages_column != "messages":
            splits[split] = splits[split].rename_column(messages_column, "messages")
    if "validation" not in splits:
        held_out = splits["train"].train_test_split(test_size=validation_fraction, seed=seed)
        splits["train"], splits["validation"] = held_out["train"], held_out["test"]
    return datasets.DatasetDict(splits)


def tokenize_chat(example: Mapping[str, Any], tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """Render one chat with the chat template; ``labels`` = ids on assistant tokens, -100 elsewhere."""
    rendered = tokenizer.apply_chat_template(
        list(example["messages"]), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = list(rendered["input_ids"])[:max_length]
    mask = list(rendered["assistant_masks"])[:max_length]
    return {
        "input_ids": ids,
        "labels": [token if keep else IGNORE_INDEX for token, keep in zip(ids, mask, strict=True)],
    }


def pack_chats(batch: Mapping[str, Sequence[Sequence[int]]], block_size: int) -> dict[str, list[list[int]]]:
    """For ``Dataset.map(batched=True)``: whole chats, in order, into blocks of at most ``block_size``.

    A chat never straddles two blocks; positions restart at 0 with every chat (as in pretraining packing,
    attention is not cut at chat boundaries)::

        chats        [a a a] [b b] [c c c c]       block_size 6
        blocks       a a a b b | c c c c
        position_ids 0 1 2 0 1 | 0 1 2 3
    """
    blocks: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    current: dict[str, list[int]] = {key: [] for key in blocks}
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        if current["input_ids"] and len(current["input_ids"]) + len(ids) > block_size:
            for key in blocks:
                blocks[key].append(current[key])
            current = {key: [] for key in blocks}
        current["input_ids"] += list(ids)[:block_size]
        current["labels"] += list(labels)[:block_size]
        current["position_ids"] += list(range(min(len(ids), block_size)))
    if current["input_ids"]:
        for key in blocks:
            blocks[key].append(current[key])
    return blocks


@dataclass
class SftCollator:
    """Right-pads ``input_ids`` (pad id), ``labels`` (-100) and ``position_ids`` (0, when present)."""

    pad_token_id: int
    pad_to_multiple_of: int = 1

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        width = round_up(max(len(example["input_ids"]) for example in examples), self.pad_to_multiple_of)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.tensor(
                [list(example[key]) + [value] * (width - len(example[key])) for example in examples],
                dtype=torch.long,
            )

        batch = {
            "input_ids": pad("input_ids", self.pad_token_id),
            "attention_mask": torch.tensor(
                [
                    [1] * len(example["input_ids"]) + [0] * (width - len(example["input_ids"]))
                    for example in examples
                ]
            ),
            "labels": pad("labels", IGNORE_INDEX),
        }
        if all("position_ids" in example for example in examples):
            batch["position_ids"] = pad("position_ids", 0)
        return batch


__all__ = ["SftCollator", "load_chat_data", "pack_chats", "tokenize_chat"]
