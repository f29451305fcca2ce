r"""GLM cloze classification (GLM's NLU recipe, glm-reference §1): pattern encoder, collator, scorer.

The text goes into a pattern with one ``[MASK]`` (Part A, bidirectional), then ``<sop>`` at the mask's
position predicts the answer. A verbalizer word per class; the class scores are the answers'
log-probabilities::

      pattern   "{text}总之，很[MASK]。"      verbalizers: negative → 差, positive → 好
      tokens    房 间 很 干 净 总之 ， 很 [MASK] 。 <sop>
      position  0  1  2  3  4  5    6  7  8      9  8        row 0: <sop> sits at the mask's position
      block     0  0  0  0  0  0    0  0  0      0  1        row 1: 1 inside the answer span
      prefix_lengths = 10 (all of Part A sees all of Part A; <sop> sees Part A)

A single-token answer is read at the ``<sop>`` slot. A multi-token answer ``t1 .. tk`` gets a row of
its own, ``Part A <sop> t1 .. t(k-1)`` (positions: the mask's; blocks 1..k), and scores
``Σ log p(t_i | ...)``. Training is cross-entropy over the class scores; prediction is the best class.

Nothing searches for special-token ids to find positions: the pattern encoder knows where it put the mask.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bilingual_glm.data.files import round_up
from bilingual_glm.modeling.modeling_bilingual_glm import span_position_ids

_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LETTER = re.compile(r"[^\W\d_]")

# Cloze patterns per language: a space right before [MASK] belongs to the answer (byte-level BPE words carry
# their leading space), so " It was [MASK]." scores the tokens of " good" / " bad".
DEFAULT_CLOZE_TEMPLATES = {"zh": "{text}总之，很[MASK]。", "en": "{text} It was [MASK]."}
DEFAULT_VERBALIZERS = {
    "zh": {"negative": "差", "positive": "好"},
    "en": {"negative": "bad", "positive": "good"},
}


def detect_language(texts: Sequence[str], sample: int = 200) -> str:
    """Return "zh" when >= 30% of the letters in the first ``sample`` texts are CJK characters, else "en"."""
    joined = "".join(texts[:sample])
    letters = len(_LETTER.findall(joined))
    return "zh" if letters and len(_CJK.findall(joined)) >= 0.3 * letters else "en"


@dataclass
class ClozeEncoder:
    """Turns a text into GLM cloze inputs: Part A (pattern with the text and one ``[MASK]``) + ``<sop>``.

    Args:
        tokenizer: the model's tokenizer.
        template: contains ``{text}`` and ``[MASK]`` once each, e.g. ``"{text}总之，很[MASK]。"``.
        verbalizers: the answer word of each class, in class-id order.
        mask_token_id, sop_token_id: from the model config.
        max_length: cap on Part A + ``<sop>``; the text is truncated (its end is dropped) to fit.

    ``candidates`` holds each answer's token ids. A space just before ``[MASK]`` in the template moves into
    the answers (``"It was [MASK]."`` scores ``" good"``), as GPT-style tokenizers glue it to the word;
    ``pieces`` and ``answers`` are the pattern's parts and the answer strings after that move. The text
    and each literal part are tokenized separately.
    """

    tokenizer: Any
    template: str
    verbalizers: Sequence[str]
    mask_token_id: int
    sop_token_id: int
    max_length: int = 256
    candidates: list[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        pieces = re.split(r"(\{text\}|\[MASK\])", self.template)
        if pieces.count("{text}") != 1 or pieces.count("[MASK]") != 1:
            raise ValueError(
                f"--cloze_template must contain {{text}} and [MASK] once each, got {self.template!r}"
            )
        answer_prefix = ""
        mask_index = pieces.index("[MASK]")
        if pieces[mask_index - 1].endswith(" "):
            pieces[mask_index - 1], answer_prefix = pieces[mask_index - 1][:-1], " "
        self.pieces = [piece for piece in pieces if piece]  # the pattern's parts, the answers' space removed
        self.answers = [answer_prefix + word for word in self.verbalizers]
        self._pieces = [
            piece if piece in ("{text}", "[MASK]") else self._encode(piece) for piece in self.pieces
        ]
        self.candidates = [self._encode(answer) for answer in self.answers]
        if len(self.verbalizers) < 2 or any(not ids for ids in self.candidates):
            raise ValueError(f"--verbalizers: need >= 2 non-empty answers, got {list(self.verbalizers)}")
        if len({tuple(ids) for ids in self.candidates}) != len(self.candidates):
            raise ValueError(
                f"--verbalizers: answers must tokenize differently, got {list(self.verbalizers)}"
            )
        fixed = sum(len(piece) for piece in self._pieces if isinstance(piece, list)) + 2  # + [MASK] + <sop>
        if self.max_length <= fixed:
            raise ValueError(f"--max_length {self.max_length} leaves no room for text in the cloze pattern")
        self._text_budget = self.max_length - fixed

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def single_token(self) -> bool:
        return all(len(ids) == 1 for ids in self.candidates)

    def __call__(self, text: str) -> dict[str, Any]:
        part_a: list[int] = []
        mask_position = -1
        for piece in self._pieces:
            if piece == "{text}":
                part_a += self._encode(text)[: self._text_budget]
            elif piece == "[MASK]":
                mask_position = len(part_a)
                part_a.append(self.mask_token_id)
            else:
                part_a += piece
        length = len(part_a)
        sop = span_position_ids(mask_position, 1, 1)[0].tolist()  # [2, 1]: at the mask's position, block 1
        return {
            "input_ids": part_a + [self.sop_token_id],
            "position_ids": [list(range(length)) + sop[0], [0] * length + sop[1]],  # [2, L + 1]
            "prefix_lengths": length,
        }

    def encode_batch(self, batch: Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
        """For ``Dataset.map(batched=True)``: ``text`` (+ ``label``) → cloze inputs (+ ``labels``)."""
        encoded = [self(text) for text in batch["text"]]
        out = {
            key: [example[key] for example in encoded]
            for key in ("input_ids", "position_ids", "prefix_lengths")
        }
        if "label" in batch:
            out["labels"] = list(batch["label"])
        return out


@dataclass
class ClozeCollator:
    """Left-pads cloze examples into a batch; with multi-token answers, one row per (example, answer).

    Left padding puts every ``<sop>`` (and every answer's last input) in the last column, so the scorer
    reads the last ``max(len(answer))`` logits of each row. ``prefix_lengths`` is shifted by the padding
    (the prefix counts columns). Rows are example-major: row ``b * C + c`` = example ``b``, answer ``c``.
    ``pad_to_multiple_of`` rounds the width up (few distinct shapes: on CPU, oneDNN caches a kernel per
    bf16 matmul shape).
    """

    candidates: list[list[int]]
    pad_token_id: int
    pad_to_multiple_of: int = 1

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        single = all(len(ids) == 1 for ids in self.candidates)
        answers = [[]] if single else [answer[:-1] for answer in self.candidates]
        rows = [self._row(example, extra) for example in examples for extra in answers]
        width = round_up(max(len(ids) for ids, _, _ in rows), self.pad_to_multiple_of)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        position_ids = torch.zeros((len(rows), 2, width), dtype=torch.long)
        prefix_lengths = torch.zeros(len(rows), dtype=torch.long)
        for i, (ids, positions, prefix) in enumerate(rows):
            pad = width - len(ids)
            input_ids[i, pad:] = torch.tensor(ids)
            attention_mask[i, pad:] = 1
            position_ids[i, :, pad:] = positions
            prefix_lengths[i] = pad + prefix
        batch = {}
        if all("labels" in example for example in examples):
            # first key: Trainer's find_batch_size() reads the batch size (examples, not rows) from it
            batch["labels"] = torch.tensor([int(example["labels"]) for example in examples])
        batch.update(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            prefix_lengths=prefix_lengths,
        )
        return batch

    @staticmethod
    def _row(example: Mapping[str, Any], extra: list[int]) -> tuple[list[int], torch.Tensor, int]:
        """``(ids, position_ids [2, n], prefix)``: the encoded Part A + ``<sop>``, then ``extra`` answer
        tokens, the whole Part B laid out by ``span_position_ids`` from the mask's position."""
        prefix = int(example["prefix_lengths"])
        part_a = torch.tensor([row[:prefix] for row in example["position_ids"]], dtype=torch.long)  # [2, A]
        mask_position = int(example["position_ids"][0][prefix])  # where the encoder put <sop>
        part_b = span_position_ids(mask_position, 1, 1 + len(extra))[0]  # [2, 1 + len(extra)]
        return list(example["input_ids"]) + list(extra), torch.cat([part_a, part_b], dim=1), prefix


def cloze_scores(model: Any, inputs: Mapping[str, torch.Tensor], candidates: list[list[int]]) -> torch.Tensor:
    """``[B, C]`` log-probability of each answer (summed over its tokens) for a ``ClozeCollator`` batch."""
    longest = max(len(answer) for answer in candidates)
    inputs = {key: value for key, value in inputs.items() if key != "labels"}
    logits = model(**inputs, logits_to_keep=longest, use_cache=False).logits  # [R, longest, V]
    log_probs = logits.float().log_softmax(-1)
    if all(len(answer) == 1 for answer in candidates):
        first = torch.tensor([answer[0] for answer in candidates], device=log_probs.device)
        return log_probs[:, -1, first]  # [B, C]
    num = len(candidates)
    scores = []
    for c, answer in enumerate(candidates):
        tokens = torch.tensor(answer, device=log_probs.device)  # [k]
        rows = log_probs[c::num, longest - len(answer) :]  # [B, k, V]: the answer's last k slots
        scores.append(rows.gather(-1, tokens.expand(rows.shape[0], -1)[..., None]).squeeze(-1).sum(-1))
    return torch.stack(scores, dim=-1)  # [B, C]


class ClozeClassifier:
    """A causal LM as a classifier, the GLM cloze way: encoder → collator → answer scores, in one place.

    finetune.py (``--task cloze``) trains through it, app.py scores a text with it, and
    scripts/experiments/sentiment_ensemble.py scores a finetuned folder with it, so the three cannot drift
    apart. ``template`` holds ``{text}`` and ``[MASK]``; ``verbalizers`` are the answer words in label order.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        template: str,
        verbalizers: Sequence[str],
        max_length: int = 256,
        pad_to_multiple_of: int = 1,
    ) -> None:
        config = model.config
        if config.mask_token_id is None or config.sop_token_id is None:
            raise ValueError(
                f"{config.name_or_path or 'the model'}: config needs mask_token_id and sop_token_id for cloze"
            )
        self.model, self.tokenizer = model, tokenizer
        self.encoder = ClozeEncoder(
            tokenizer, template, verbalizers, config.mask_token_id, config.sop_token_id, max_length=max_length
        )
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id
        self.collator = ClozeCollator(self.encoder.candidates, pad_token_id, pad_to_multiple_of)

    @property
    def candidates(self) -> list[list[int]]:
        return self.encoder.candidates

    def scores(self, batch: Mapping[str, torch.Tensor], model: Any = None) -> torch.Tensor:
        """``[B, C]`` answer log-probabilities of a collated batch (``model``: e.g. Trainer's wrapped one)."""
        return cloze_scores(model if model is not None else self.model, batch, self.candidates)

    @torch.no_grad()
    def log_probs(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """``[N, C]`` class log-probabilities of ``texts``, renormalised over the answers."""
        rows = [self.encoder(text) for text in texts]
        out = []
        for start in range(0, len(rows), batch_size):
            batch = self.collator(rows[start : start + batch_size])
            out.append(self.scores(batch).float().log_softmax(-1))
        return torch.cat(out)

    def setup(self) -> dict[str, Any]:
        """What a run records (run_config.json) so the classifier can be rebuilt from the folder."""
        return {
            "template": self.encoder.template,
            "answers": self.encoder.answers,
            "candidates": self.candidates,
        }

    @classmethod
    def from_setup(
        cls, model: Any, tokenizer: Any, setup: Mapping[str, Any], **kwargs: Any
    ) -> ClozeClassifier:
        """Rebuild from a recorded ``setup``; the answers must tokenize to the recorded ids."""
        # ClozeEncoder moves a space before [MASK] into the answers itself: hand it the bare words
        spaced = setup["template"].split("[MASK]")[0].endswith(" ")
        words = [answer.removeprefix(" ") if spaced else answer for answer in setup["answers"]]
        classifier = cls(model, tokenizer, setup["template"], words, **kwargs)
        if "candidates" in setup and classifier.candidates != setup["candidates"]:
            raise ValueError(
                f"the tokenizer gives answer ids {classifier.candidates}, the run recorded {setup['candidates']}"
            )
        return classifier


__all__ = [
    "DEFAULT_CLOZE_TEMPLATES",
    "DEFAULT_VERBALIZERS",
    "ClozeClassifier",
    "ClozeCollator",
    "ClozeEncoder",
    "cloze_scores",
    "detect_language",
]
