r"""BERT-style masked LM on the causal GLM model: full bidirectional attention, predict the token in place.

``mlm_probability`` (15%) of the non-special tokens of each row are selected (exactly
``round(p · m)`` of the ``m`` eligible ones, at least one when ``m > 0``); of those 80% become
``[MASK]``, 10% a random non-special token, 10% stay unchanged. Only selected positions have a target.

An MLM target belongs to the position itself, not to the next one, so the batch carries it as
``shift_labels`` (the target OF each position), the one label form of every pretraining collator; the
model uses it without shifting. Source ``a b c d`` with ``b`` selected and masked, in a batch whose longest
row has 5 tokens (M = ``[MASK]``, ``-`` = -100)::

    column          0  1  2  3 | 4
    input_ids       a  M  c  d | pad      attention_mask 1 1 1 1 0
    position_ids    0  1  2  3 | 4        prefix_lengths = 4 (every real token visible to every query)
    shift_labels    -  b  -  - | -
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import numpy as np
import torch

from bilingual_glm.configuration.configuration_bilingual_glm import GLM_SPECIAL_TOKENS
from bilingual_glm.data.blank_infilling import (
    IGNORE_INDEX,
    SeededCollator,
    batch_width,
    example_tokens,
    pad_rows,
    resolve_pad_token_id,
    resolve_token_id,
)


@dataclass
class MlmCollator(SeededCollator):
    """Collate ``[{"input_ids": [...]}, ...]`` into an MLM batch (see the module doc).

    Returns long tensors ``input_ids``, ``attention_mask``, ``position_ids`` (``[B, L]``, arange),
    ``prefix_lengths [B]`` (= row length) and ``shift_labels``. Random replacements
    are drawn from the tokenizer's vocabulary ids, or ``0..vocab_size-1`` when ``vocab_size`` is given,
    minus ``special_token_ids`` (default: the tokenizer's special ids; without a tokenizer our own
    ``GLM_SPECIAL_TOKENS`` ids, and then ``vocab_size`` must be given). ``[MASK]`` and pad are always
    special.
    """

    tokenizer: Any = field(default=None, repr=False)
    _: KW_ONLY
    mask_token_id: int | None = None
    pad_token_id: int | None = None
    vocab_size: int | None = None  # default: from the tokenizer's vocabulary
    special_token_ids: Collection[int] | None = field(default=None, repr=False)  # never selected
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8  # of the selected: → [MASK]
    random_replace_prob: float = 0.1  # of the selected: → random token (the rest stay unchanged)
    max_length: int | None = None  # truncate each sequence to this many tokens
    pad_to_multiple_of: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        tok = self.tokenizer
        self.mask_token_id = resolve_token_id(tok, "mask_token_id", self.mask_token_id)
        self.pad_token_id = resolve_pad_token_id(tok, self.pad_token_id)
        if self.special_token_ids is None:
            default = tok.all_special_ids if tok is not None else range(len(GLM_SPECIAL_TOKENS))
            self.special_token_ids = frozenset(int(i) for i in default)
        self.special_token_ids = frozenset(int(i) for i in self.special_token_ids)
        self.special_token_ids |= {self.mask_token_id, self.pad_token_id}
        if self.vocab_size is not None or tok is None:
            self._validate()  # names vocab_size when it is missing
            vocab_ids = np.arange(self.vocab_size, dtype=np.int64)
        else:
            vocab_ids = np.array(sorted(set(tok.get_vocab().values())), dtype=np.int64)
            self.vocab_size = int(vocab_ids.max()) + 1
            self._validate()
        self._special = np.array(sorted(self.special_token_ids), dtype=np.int64)
        self._replacements = np.setdiff1d(vocab_ids, self._special)
        if len(self._replacements) == 0:
            raise ValueError("special_token_ids: every vocabulary id is special; nothing to replace with")
        self.reseed(self.seed)

    def _validate(self) -> None:
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise ValueError(
                f"vocab_size must be a positive integer (or come from a tokenizer), got {self.vocab_size!r}"
            )
        for name in ("mlm_probability", "mask_replace_prob", "random_replace_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.mask_replace_prob + self.random_replace_prob > 1.0:
            raise ValueError(
                f"random_replace_prob: mask_replace_prob + random_replace_prob must be <= 1, "
                f"got {self.mask_replace_prob} + {self.random_replace_prob}"
            )
        for name in ("max_length", "pad_to_multiple_of"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        rng = self.generator()
        rows = [self.corrupt(example_tokens(example, self.max_length), rng) for example in examples]
        lengths = [len(inputs) for inputs, _ in rows]
        width = batch_width(lengths, self.pad_to_multiple_of)
        shift_labels = pad_rows([targets for _, targets in rows], width, IGNORE_INDEX)
        return {
            "input_ids": pad_rows([inputs for inputs, _ in rows], width, self.pad_token_id),
            "attention_mask": pad_rows([np.ones(n) for n in lengths], width, 0),
            "position_ids": torch.arange(width).expand(len(rows), width).clone(),
            "prefix_lengths": torch.tensor(lengths, dtype=torch.long).view(-1),
            "shift_labels": shift_labels,
        }

    def corrupt(self, tokens: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``(inputs, targets)`` of one row; ``targets`` = original id at selected positions, else -100."""
        eligible = np.flatnonzero(~np.isin(tokens, self._special))
        count = int(self.mlm_probability * len(eligible) + 0.5)
        if self.mlm_probability > 0 and len(eligible) > 0:
            count = max(count, 1)
        selected = rng.choice(eligible, size=count, replace=False) if count else eligible[:0]
        inputs, targets = tokens.copy(), np.full(len(tokens), IGNORE_INDEX, dtype=np.int64)
        targets[selected] = tokens[selected]
        action = rng.random(count)
        masked = selected[action < self.mask_replace_prob]
        randomised = selected[
            (action >= self.mask_replace_prob) & (action < self.mask_replace_prob + self.random_replace_prob)
        ]
        inputs[masked] = self.mask_token_id
        inputs[randomised] = rng.choice(self._replacements, size=len(randomised))
        return inputs, targets
