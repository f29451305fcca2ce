r"""GLM autoregressive blank infilling: turn plain token sequences into GLM training batches.

One span kind is drawn per batch from ``mixture = (token, sentence, document)`` (GLM-Base 1/0/0,
GLM-10B 0.5/0.3/0.2, GLM-Large-Chinese 0.4/0.3/0.3); every row of the batch uses it:

- **token** (``[MASK]``): span lengths from Poisson(λ=3) weights over ``1..max_span``, drawn until they
  cover ``ceil(mask_ratio · n)`` tokens; spans are placed at random, never overlapping and with at least
  one unmasked token between two spans.
- **sentence** (``[sMASK]``): the text is cut after every token in ``sentence_end_ids`` (tokens whose text
  ends with ``. ? ! ; : 。 ？ ！ ； … \n``); whole sentences, in random order, are taken until they cover
  ``ceil(mask_ratio · n)`` tokens. Chosen sentences that touch are merged into one span, so every span
  is a run of whole sentences and spans never touch.
- **document** (``[gMASK]``): one span of length uniform in ``[ceil(document_min_ratio · n), n - 2]``;
  with probability ``gpt_suffix_prob`` it is the suffix (``src [gMASK] <sop> tgt``), else it sits at a
  uniformly random place. (GLM also forces the suffix when a sample holds several documents; rows here
  are taken as one document each.)

Each span is replaced by one mask token (**Part A**); the spans, in shuffled order, follow as **Part B**,
each as input ``<sop> t1..tk`` with targets ``t1..tk <eop>``. A source ``a b c d e f`` with token spans
``[b c]`` and ``[e]``, Part B order ``[e]`` then ``[b c]`` (M = ``[MASK]``, S = ``<sop>``, E = ``<eop>``,
``-`` = -100)::

    column            0  1  2  3  4 | 5  6 | 7  8  9 | 10
    input_ids         a  M  d  M  f | S  e | S  b  c | pad
    position_ids[0]   0  1  2  3  4 | 3  3 | 1  1  1 | 0     <- Part B: the position of its mask token
    position_ids[1]   0  0  0  0  0 | 1  2 | 1  2  3 | 0     <- block position: 1..k+1 inside a span
    shift_labels      -  -  -  -  - | e  E | b  c  E | -     <- target OF this position
    attention_mask    1  1  1  1  1 | 1  1 | 1  1  1 | 0
    prefix_lengths = 5 (Part A: bidirectional; Part B: causal)

(the last column is the padding of a row one shorter than the batch's longest.) Part B's 2D positions
come from the model's ``span_position_ids``, the one definition of the span layout.

**Labels: one form.** ``shift_labels[b, j]`` is the target of position ``j`` (GLM's own ``targets``),
-100 in Part A and on padding. The model takes it as is (``forward(shift_labels=...)``); nothing is
shifted on the way. A Part B target is not "the next input token" (the last token of a span predicts
``<eop>``, which is never an input), so this is the form the objective is written in.

**Short sequences.** Token spans that cannot be placed (too many spans for the unmasked tokens left)
are redrawn up to 10 times; then the goal is covered by ``max_span``-long spans (the last shorter),
dropping spans from the end only if even those cannot be placed (possible only for ``mask_ratio`` near
1). A document span needs ``n >= 4`` for ``[n/2, n-2]`` to be non-empty; below that it is one token
(the whole row when ``n == 1``). Empty rows give an empty Part A and Part B (no loss).

**Lengths.** ``max_length`` truncates each source before corruption; a row of ``n`` source tokens and
``s`` spans takes ``n + 2s`` columns, and the batch is as wide as its longest row (``pad_to_multiple_of``
rounds that up).

**Randomness.** One ``numpy`` generator per collator from ``seed`` (``reseed`` restarts it). Inside a
``DataLoader`` worker the generator is re-derived from ``seed`` and the worker's torch seed, so workers
differ from each other and from epoch to epoch, and a run is reproducible under ``torch.manual_seed``
(a ``reseed`` inside the worker pins it to that seed instead: per-batch seeds).
Positions come from the spans the collator sampled, never from searching the ids for special tokens.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from bilingual_glm.configuration.configuration_bilingual_glm import (
    GLM_SPECIAL_TOKENS,
    GLM_TOKEN_FIELDS,
    SPECIAL_TOKEN_FIELDS,
)
from bilingual_glm.modeling.modeling_bilingual_glm import span_position_ids

# GLM's span kinds (the objective "glm" draws one per batch; "objective" names clm/glm/mlm, data/objectives.py)
SpanKind = Literal["token", "sentence", "document"]
SPAN_KINDS: tuple[SpanKind, ...] = ("token", "sentence", "document")
GLM_BASE_MIXTURE = (1.0, 0.0, 0.0)
GLM_10B_MIXTURE = (0.5, 0.3, 0.2)
GLM_LARGE_CHINESE_MIXTURE = (0.4, 0.3, 0.3)
SENTENCE_END_CHARS = (".", "?", "!", ";", ":", "。", "？", "！", "；", "…", "\n")
IGNORE_INDEX = -100
_MAX_ATTEMPTS = 10

Span = tuple[int, int]  # [start, end) in the source


# ------------------------------------------------------------------------------------ shared helpers
def resolve_token_id(tokenizer: Any, field_name: str, explicit: int | None) -> int:
    """The id of config field ``field_name``'s token (``SPECIAL_TOKEN_FIELDS``): an explicit id wins, then
    the tokenizer's id for that token, then our own vocabulary's (``GLM_SPECIAL_TOKENS``)."""
    token = SPECIAL_TOKEN_FIELDS[field_name]
    if explicit is not None:
        return int(explicit)
    if tokenizer is None:
        return GLM_SPECIAL_TOKENS.index(token)
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(
            f"{field_name}: {token!r} is not in the tokenizer's vocabulary; pass the id explicitly"
        )
    return int(token_id)


def resolve_pad_token_id(tokenizer: Any, explicit: int | None) -> int:
    """``pad_token_id`` from the argument, else the tokenizer's pad token, else our own ``<pad>``."""
    if explicit is not None:
        return int(explicit)
    if tokenizer is None:
        return GLM_SPECIAL_TOKENS.index(SPECIAL_TOKEN_FIELDS["pad_token_id"])
    if tokenizer.pad_token_id is None:
        raise ValueError("pad_token_id: the tokenizer has no pad token; pass pad_token_id explicitly")
    return int(tokenizer.pad_token_id)


def sentence_end_ids_from_tokenizer(tokenizer: Any) -> frozenset[int]:
    """Ids (special tokens excepted) whose decoded text ends with a sentence end (``SENTENCE_END_CHARS``).

    Trailing spaces are ignored. A byte-level vocabulary that splits ``。`` over several tokens has no id
    that decodes to it; such text is cut only at the ends the vocabulary can express.
    """
    special = set(tokenizer.all_special_ids)
    ids = sorted(set(tokenizer.get_vocab().values()) - special)
    texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    return frozenset(
        i for i, text in zip(ids, texts, strict=True) if text.rstrip(" ").endswith(SENTENCE_END_CHARS)
    )


def mask_goal(ratio: float, n: int) -> int:
    """``ceil(ratio · n)`` without float noise (0.15 · 20 is 3.0000000000000004)."""
    return math.ceil(round(ratio * n, 9))


def example_tokens(example: Any, max_length: int | None) -> np.ndarray:
    """The 1-D ``input_ids`` of one example (a mapping), truncated to ``max_length``."""
    if not isinstance(example, Mapping) or "input_ids" not in example:
        raise ValueError(f"examples must be mappings with 'input_ids', got {type(example).__name__}")
    tokens = np.asarray(example["input_ids"], dtype=np.int64)
    if tokens.ndim != 1:
        raise ValueError(f"input_ids of one example must be 1-D, got shape {tokens.shape}")
    return tokens if max_length is None else tokens[:max_length]


def batch_width(lengths: Sequence[int], pad_to_multiple_of: int | None) -> int:
    """The longest row (at least 1 column), rounded up to a multiple of ``pad_to_multiple_of`` when given."""
    width = max(1, max(lengths, default=0))
    return -(-width // pad_to_multiple_of) * pad_to_multiple_of if pad_to_multiple_of else width


def pad_rows(rows: Sequence[np.ndarray], width: int, fill: int) -> torch.Tensor:
    """Right-pad 1-D rows to ``width``: ``[B, width]`` long tensor."""
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for b, row in enumerate(rows):
        out[b, : len(row)] = row
    return torch.from_numpy(out)


class SeededCollator:
    """A ``numpy`` generator from ``seed``, re-derived in each ``DataLoader`` worker (see module doc)."""

    def reseed(self, seed: int | None) -> None:
        """Restart the random stream (``None``: fresh entropy).

        Called inside a ``DataLoader`` worker (a per-batch seed, ``ObjectiveMixtureCollator``), that worker
        then draws from ``seed`` itself: the batch is the same whichever process collates it.
        """
        self._seed_sequence = np.random.SeedSequence(seed)
        self._main_rng = np.random.default_rng(self._seed_sequence)
        info = torch.utils.data.get_worker_info()
        self._worker_key: tuple[int, int] | None = None if info is None else (info.id, info.seed)
        self._worker_rng: np.random.Generator | None = None if info is None else self._main_rng

    def generator(self) -> np.random.Generator:
        """The generator for this process: the collator's own, or one per worker and epoch."""
        info = torch.utils.data.get_worker_info()
        if info is None:
            return self._main_rng
        if self._worker_key != (info.id, info.seed) or self._worker_rng is None:
            self._worker_key = (info.id, info.seed)
            sequence = np.random.SeedSequence([self._seed_sequence.entropy, info.seed])
            self._worker_rng = np.random.default_rng(sequence)
        return self._worker_rng


# ------------------------------------------------------------------------------------ span sampling
def poisson_span_weights(poisson_lambda: float, max_span: int) -> np.ndarray:
    """P(length = k) ∝ λ^k e^-λ / k! for k = 1..max_span (index k-1), normalised."""
    k = np.arange(1, max_span + 1)
    log_p = k * math.log(poisson_lambda) - np.array([math.lgamma(x + 1) for x in k])
    weights = np.exp(log_p - log_p.max())
    return weights / weights.sum()


def place_spans(n: int, lengths: Sequence[int], rng: np.random.Generator) -> list[Span] | None:
    """Random non-overlapping places for spans of ``lengths`` (in that order) with ≥ 1 token between
    two spans; ``None`` if they can't fit. The free tokens beyond the obligatory separators are spread
    over the gaps: gap before span i = offsets[i] - offsets[i-1] + 1 with sorted offsets."""
    count, free = len(lengths), n - int(sum(lengths))
    if free < count - 1:
        return None
    if count == 0:
        return []
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.sort(rng.integers(0, free - (count - 1) + 1, size=count))
    starts = offsets + np.concatenate([[0], np.cumsum(lengths)[:-1]]) + np.arange(count)
    return [(int(s), int(s + k)) for s, k in zip(starts, lengths, strict=True)]


def sample_token_spans(
    n: int, rng: np.random.Generator, weights: np.ndarray, mask_ratio: float
) -> list[Span]:
    """Poisson spans covering ≥ ``ceil(mask_ratio · n)`` tokens (fallbacks: see module doc)."""
    goal = mask_goal(mask_ratio, n)
    if goal == 0:
        return []
    for _ in range(_MAX_ATTEMPTS):
        lengths = rng.choice(len(weights), size=goal, p=weights) + 1  # each ≥ 1, so goal draws suffice
        lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), goal)) + 1]
        spans = place_spans(n, lengths, rng)
        if spans is not None:
            return spans
    max_span = len(weights)
    lengths = [max_span] * (goal // max_span) + ([goal % max_span] if goal % max_span else [])
    while (spans := place_spans(n, lengths, rng)) is None:
        lengths = lengths[:-1]
    return spans


def sample_sentence_spans(
    tokens: np.ndarray, rng: np.random.Generator, sentence_end_ids: np.ndarray, mask_ratio: float
) -> list[Span]:
    """Whole sentences in random order until ≥ ``ceil(mask_ratio · n)`` tokens; touching ones merged."""
    n = len(tokens)
    goal = mask_goal(mask_ratio, n)
    if goal == 0:
        return []
    ends = np.flatnonzero(np.isin(tokens, sentence_end_ids)) + 1
    bounds = np.unique(np.concatenate([[0], ends, [n]]))
    starts, stops = bounds[:-1], bounds[1:]
    chosen, covered = np.zeros(len(starts), dtype=bool), 0
    for i in rng.permutation(len(starts)):
        if covered >= goal:
            break
        chosen[i] = True
        covered += int(stops[i] - starts[i])
    spans: list[Span] = []
    for i in np.flatnonzero(chosen):
        if spans and spans[-1][1] == starts[i]:
            spans[-1] = (spans[-1][0], int(stops[i]))
        else:
            spans.append((int(starts[i]), int(stops[i])))
    return spans


def sample_document_span(
    n: int, rng: np.random.Generator, min_ratio: float, suffix_prob: float
) -> list[Span]:
    """One span of length uniform in ``[ceil(min_ratio · n), n - 2]``: the suffix with ``suffix_prob``."""
    if n == 0:
        return []
    longest = max(1, n - 2)
    shortest = min(longest, max(1, mask_goal(min_ratio, n)))
    length = int(rng.integers(shortest, longest + 1))
    suffix = rng.random() < suffix_prob
    start = n - length if suffix else int(rng.integers(0, n - length + 1))
    return [(start, start + length)]


# ------------------------------------------------------------------------------------ one row
@dataclass
class InfillingRow:
    """One corrupted row before padding (all arrays the same length)."""

    input_ids: np.ndarray  # [L]
    shift_labels: np.ndarray  # [L]: target of each position, -100 in Part A
    _: KW_ONLY
    position_ids: np.ndarray  # [2, L]: position, block position
    prefix_length: int  # len(Part A)


def build_infilling_row(
    tokens: np.ndarray,
    spans: Sequence[Span],
    mask_id: int,
    sop_id: int,
    eop_id: int,
    rng: np.random.Generator,
) -> InfillingRow:
    """Part A (each span → ``mask_id``) then the spans in shuffled order as ``<sop> t1..tk``.

    Part B's 2D positions come from ``span_position_ids`` (the model's one definition of the span layout),
    all spans of the row in one call.
    """
    pieces, mask_positions, cursor, length = [], [], 0, 0
    for start, end in spans:
        kept = tokens[cursor:start]
        pieces += [kept, np.array([mask_id])]
        mask_positions.append(length + len(kept))
        length, cursor = length + len(kept) + 1, end
    pieces.append(tokens[cursor:])
    a_ids = np.concatenate(pieces).astype(np.int64)
    n_a = len(a_ids)
    order = rng.permutation(len(spans))
    b_spans = [tokens[spans[i][0] : spans[i][1]] for i in order]
    ids = [a_ids, *(np.concatenate([[sop_id], span]) for span in b_spans)]
    targets = [np.full(n_a, IGNORE_INDEX), *(np.concatenate([span, [eop_id]]) for span in b_spans)]
    part_a_positions = np.stack([np.arange(n_a), np.zeros(n_a)])  # [2, n_a]: block position 0
    return InfillingRow(
        *(np.concatenate(parts).astype(np.int64) for parts in (ids, targets)),
        position_ids=np.concatenate(
            [part_a_positions, part_b_positions([mask_positions[i] for i in order], b_spans)], axis=1
        ),
        prefix_length=n_a,
    )


def part_b_positions(mask_positions: Sequence[int], spans: Sequence[np.ndarray]) -> np.ndarray:
    """``[2, Σ(k+1)]``: each span's ``<sop> t1..tk`` at its mask's position, block positions 1..k+1."""
    if not spans:
        return np.zeros((2, 0), dtype=np.int64)
    widths = np.array([len(span) + 1 for span in spans])  # <sop> + the span
    padded = span_position_ids(torch.as_tensor(mask_positions), 1, int(widths.max())).numpy()  # [S, 2, W]
    inside = np.arange(padded.shape[-1]) < widths[:, None]  # [S, W]
    return padded.transpose(1, 0, 2)[:, inside]  # [2, Σ widths], span after span


# ------------------------------------------------------------------------------------ the collator
@dataclass
class BlankInfillingCollator(SeededCollator):
    """Collate ``[{"input_ids": [...]}, ...]`` into a GLM blank-infilling batch (see the module doc).

    Returns long tensors ``input_ids [B, L]``, ``attention_mask [B, L]`` (right padding),
    ``position_ids [B, 2, L]``, ``prefix_lengths [B]`` and ``shift_labels [B, L]`` (target of each position).

    Token ids come from ``tokenizer`` (``[MASK]`` … ``<eop>``, its pad token) unless given explicitly;
    with neither, our own vocabulary's ids (``GLM_SPECIAL_TOKENS``). ``sentence_end_ids`` default to
    those computed from the tokenizer's vocabulary; without a tokenizer they must be given when the
    sentence span kind has non-zero probability.
    """

    tokenizer: Any = field(default=None, repr=False)
    _: KW_ONLY
    mask_token_id: int | None = None
    smask_token_id: int | None = None
    gmask_token_id: int | None = None
    sop_token_id: int | None = None
    eop_token_id: int | None = None
    pad_token_id: int | None = None
    mixture: tuple[float, float, float] = GLM_BASE_MIXTURE  # (token, sentence, document), drawn per batch
    mask_ratio: float = 0.15  # token and sentence span kinds: fraction of tokens to cover (at least)
    poisson_lambda: float = 3.0  # token span lengths ~ Poisson(λ) restricted to 1..max_span
    max_span: int = 39
    document_min_ratio: float = 0.5  # document span length uniform in [ratio · n, n - 2]
    gpt_suffix_prob: float = 0.5  # probability that the document span is the suffix
    max_length: int | None = None  # truncate each source sequence to this many tokens first
    pad_to_multiple_of: int | None = None  # round the batch width (the longest row) up
    seed: int | None = None
    sentence_end_ids: Collection[int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        tok = self.tokenizer
        for name in GLM_TOKEN_FIELDS:  # [MASK] [sMASK] [gMASK] <sop> <eop>
            setattr(self, name, resolve_token_id(tok, name, getattr(self, name)))
        self.pad_token_id = resolve_pad_token_id(tok, self.pad_token_id)
        self._validate()
        if self.sentence_end_ids is None and tok is not None and self.mixture[1] > 0:
            self.sentence_end_ids = sentence_end_ids_from_tokenizer(tok)  # now, not once per worker
        self._probabilities = np.asarray(self.mixture, dtype=np.float64) / float(sum(self.mixture))
        self._span_weights = poisson_span_weights(self.poisson_lambda, self.max_span)
        self.reseed(self.seed)

    def _validate(self) -> None:
        mixture = tuple(self.mixture)
        if len(mixture) != 3 or any(not p >= 0 for p in mixture) or not sum(mixture) > 0:
            raise ValueError(
                f"mixture must be 3 non-negative weights (token, sentence, document), got {mixture!r}"
            )
        self.mixture = mixture
        for name, low, high in (
            ("mask_ratio", 0.0, 1.0),
            ("document_min_ratio", 0.0, 1.0),
            ("gpt_suffix_prob", 0.0, 1.0),
        ):
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"{name} must be in [{low}, {high}], got {getattr(self, name)!r}")
        if not self.poisson_lambda > 0:
            raise ValueError(f"poisson_lambda must be > 0, got {self.poisson_lambda!r}")
        if isinstance(self.max_span, bool) or not isinstance(self.max_span, int) or self.max_span < 1:
            raise ValueError(f"max_span must be a positive integer, got {self.max_span!r}")
        for name in ("max_length", "pad_to_multiple_of"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if mixture[1] > 0 and self.sentence_end_ids is None and self.tokenizer is None:
            raise ValueError(
                "sentence_end_ids: needed when mixture gives the sentence span kind a non-zero weight "
                "(pass the ids, or a tokenizer to compute them from)"
            )

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        return self.collate(examples)

    def collate(
        self, examples: Sequence[Mapping[str, Any]], span_kind: SpanKind | None = None
    ) -> dict[str, torch.Tensor]:
        """Collate with the given span kind, or with one drawn from ``mixture`` (once for the batch)."""
        rng = self.generator()
        if span_kind is None:
            span_kind = SPAN_KINDS[int(rng.choice(3, p=self._probabilities))]
        elif span_kind not in SPAN_KINDS:
            raise ValueError(f"span_kind must be one of {SPAN_KINDS}, got {span_kind!r}")
        rows = [
            self.corrupt(example_tokens(example, self.max_length), span_kind, rng) for example in examples
        ]
        return self._pad(rows)

    def corrupt(self, tokens: np.ndarray, span_kind: SpanKind, rng: np.random.Generator) -> InfillingRow:
        """Sample the spans of one row for ``span_kind`` and build its Part A + Part B."""
        if span_kind == "token":
            spans, mask_id = (
                sample_token_spans(len(tokens), rng, self._span_weights, self.mask_ratio),
                self.mask_token_id,
            )
        elif span_kind == "sentence":
            spans = sample_sentence_spans(tokens, rng, self._sentence_ends(), self.mask_ratio)
            mask_id = self.smask_token_id
        else:
            spans = sample_document_span(len(tokens), rng, self.document_min_ratio, self.gpt_suffix_prob)
            mask_id = self.gmask_token_id
        return build_infilling_row(tokens, spans, mask_id, self.sop_token_id, self.eop_token_id, rng)

    def _sentence_ends(self) -> np.ndarray:
        """``sentence_end_ids`` as an array, computed from the tokenizer on first use if needed."""
        if self.sentence_end_ids is None:
            if self.tokenizer is None:
                raise ValueError("sentence_end_ids: the sentence span kind needs them (or a tokenizer)")
            self.sentence_end_ids = sentence_end_ids_from_tokenizer(self.tokenizer)
        return np.array(sorted(self.sentence_end_ids), dtype=np.int64)

    def _pad(self, rows: Sequence[InfillingRow]) -> dict[str, torch.Tensor]:
        width = batch_width([len(row.input_ids) for row in rows], self.pad_to_multiple_of)
        shift_labels = pad_rows([row.shift_labels for row in rows], width, IGNORE_INDEX)
        position = pad_rows([row.position_ids[0] for row in rows], width, 0)
        block = pad_rows([row.position_ids[1] for row in rows], width, 0)
        return {
            "input_ids": pad_rows([row.input_ids for row in rows], width, self.pad_token_id),
            "attention_mask": pad_rows([np.ones(len(row.input_ids)) for row in rows], width, 0),
            "position_ids": torch.stack([position, block], dim=1),  # [B, 2, L]
            "prefix_lengths": torch.tensor([row.prefix_length for row in rows], dtype=torch.long).view(-1),
            "shift_labels": shift_labels,
        }
