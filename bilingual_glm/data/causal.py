r"""Packing for plain causal LM training: documents joined by ``<|endoftext|>``, cut into fixed blocks.

``pack_causal`` is meant for ``datasets.Dataset.map(batched=True)``; it changes the number of rows, so
drop the old columns::

    from functools import partial
    packed = tokenized.map(
        partial(pack_causal, block_size=512, eos_token_id=tokenizer.eos_token_id),
        batched=True, batch_size=1000, remove_columns=tokenized.column_names,
    )

Documents ``[a b c]``, ``[d e]``, ``[f g h i]`` with ``block_size=4`` (E = ``<|endoftext|>``)::

    stream        a b c E | d e E f | g h i E
    position_ids  0 1 2 3 | 0 1 2 0 | 0 1 2 3

Every document is followed by E. Positions count from the start of the document's visible part: they
restart after every E the packer appended (it knows where documents end; an id equal to E inside a
document does not restart them) and at the start of every block, since a block shows the model nothing
before it. The tokens left over after the last full block of each ``map`` batch are dropped. Attention
is not cut at document boundaries (plain packing). ``CausalCollator`` adds ``shift_labels`` (each
position's target: the next token of the block; -100 at the block's last position), the one label form
of every pretraining collator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bilingual_glm.data.blank_infilling import IGNORE_INDEX


def pack_causal(
    examples: Mapping[str, Sequence[Sequence[int]]], block_size: int, eos_token_id: int
) -> dict[str, list[list[int]]]:
    """Concatenate ``examples["input_ids"]`` (each document + eos) and cut into ``block_size`` blocks.

    Returns ``input_ids`` and ``position_ids``, one list per block.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    documents = [np.append(np.asarray(doc, dtype=np.int64), eos_token_id) for doc in examples["input_ids"]]
    if not documents:
        return {"input_ids": [], "position_ids": []}
    stream = np.concatenate(documents)
    starts_document = np.zeros(len(stream), dtype=bool)
    starts_document[np.cumsum([0] + [len(doc) for doc in documents[:-1]])] = True
    usable = len(stream) // block_size * block_size
    ids = stream[:usable].reshape(-1, block_size)
    starts = starts_document[:usable].reshape(-1, block_size)
    index = np.arange(block_size)
    last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)  # no document start yet: 0
    positions = index - last_start
    return {"input_ids": ids.tolist(), "position_ids": positions.tolist()}


@dataclass
class CausalCollator:
    """Stack packed blocks (all the same length) into ``[B, L]`` long tensors.

    ``input_ids``, ``shift_labels`` (``input_ids`` shifted left by one, -100 in the last column: the
    target of each position) and ``position_ids`` as packed (default: ``0..L-1``). No ``attention_mask``:
    packed blocks have no padding.
    """

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = {len(example["input_ids"]) for example in examples}
        if len(lengths) > 1:
            raise ValueError(
                f"input_ids: packed blocks must all have one length, got lengths {sorted(lengths)}"
            )
        input_ids = torch.tensor([list(example["input_ids"]) for example in examples], dtype=torch.long)
        batch = {"input_ids": input_ids, "shift_labels": F.pad(input_ids[:, 1:], (0, 1), value=IGNORE_INDEX)}
        if all("position_ids" in example for example in examples):
            batch["position_ids"] = torch.tensor(
                [list(example["position_ids"]) for example in examples], dtype=torch.long
            )
        else:
            batch["position_ids"] = torch.arange(input_ids.shape[1]).expand_as(input_ids).clone()
        return batch
