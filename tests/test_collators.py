"""Property tests of the data collators: GLM blank infilling, MLM, causal packing.

Blank-infilling batches are decoded using only what the collator returns (positions, block positions,
prefix lengths, shift_labels) and must rebuild the source exactly; every collator emits one label form,
``shift_labels`` (the target of each position), checked against the model's loss.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bilingual_glm.configuration.configuration_bilingual_glm import GLM_SPECIAL_TOKENS
from bilingual_glm.data import SPAN_KINDS, BlankInfillingCollator, CausalCollator, MlmCollator, pack_causal
from bilingual_glm.data.blank_infilling import build_infilling_row, mask_goal

ID = {token: index for index, token in enumerate(GLM_SPECIAL_TOKENS)}
MASK_OF = {"token": ID["[MASK]"], "sentence": ID["[sMASK]"], "document": ID["[gMASK]"]}
SOP, EOP, PAD = ID["<sop>"], ID["<eop>"], ID["<pad>"]
END_IDS = (11, 12)  # stand-ins for "." and "。"

seeds = st.integers(0, 2**32 - 1)
word_ids = st.one_of(
    st.integers(13, 500), st.integers(13, 500), st.integers(13, 500), st.sampled_from(END_IDS)
)
sequences = st.lists(word_ids, max_size=200)
batches = st.lists(sequences, min_size=1, max_size=4)


def make_collator(seed: int | None = 0, **overrides) -> BlankInfillingCollator:
    return BlankInfillingCollator(seed=seed, sentence_end_ids=END_IDS, **{"mixture": (1, 1, 1), **overrides})


def decode_row(
    batch: dict[str, torch.Tensor], b: int
) -> tuple[list[int], list[tuple[int, list[int], list[int]]]]:
    """Part A and the Part B spans ``(mask position, inputs, targets)``, found from block positions only."""
    n_real = int(batch["attention_mask"][b].sum())
    prefix = int(batch["prefix_lengths"][b])
    ids = batch["input_ids"][b].tolist()
    position, block = batch["position_ids"][b].tolist()
    targets = batch["shift_labels"][b].tolist()
    spans: list[tuple[int, list[int], list[int]]] = []
    for j in range(prefix, n_real):
        if block[j] == 1:
            spans.append((position[j], [], []))
        spans[-1][1].append(ids[j])
        spans[-1][2].append(targets[j])
    return ids[:prefix], spans


def check_batch_layout(batch: dict[str, torch.Tensor], sources: list[list[int]]) -> None:
    """Shapes, right padding, label forms: everything that does not depend on the span_kind."""
    rows = len(sources)
    width = batch["input_ids"].shape[1]
    assert (
        batch["input_ids"].shape
        == batch["attention_mask"].shape
        == batch["shift_labels"].shape
        == (rows, width)
    )
    assert "labels" not in batch  # one label form: shift_labels
    assert batch["position_ids"].shape == (rows, 2, width)
    assert batch["prefix_lengths"].shape == (rows,)
    assert all(t.dtype == torch.long for t in batch.values())
    lengths = batch["attention_mask"].sum(1)
    assert width == max(1, int(lengths.max()))  # as wide as the longest row, no spare column
    for b in range(rows):
        n = int(lengths[b])
        assert batch["attention_mask"][b, :n].eq(1).all() and batch["attention_mask"][b, n:].eq(0).all()
        assert batch["input_ids"][b, n:].eq(PAD).all()
        assert batch["position_ids"][b, :, n:].eq(0).all()
        assert batch["shift_labels"][b, n:].eq(-100).all()  # no loss from padding positions


def check_infilling_row(
    batch: dict[str, torch.Tensor], b: int, source: list[int], span_kind: str
) -> list[tuple[int, int]]:
    """All GLM §1 invariants of one row; returns its spans as ``[start, end)`` in the source, in order."""
    mask_id = MASK_OF[span_kind]
    prefix = int(batch["prefix_lengths"][b])
    part_a, spans = decode_row(batch, b)
    assert batch["position_ids"][b, 0, :prefix].tolist() == list(range(prefix))
    assert batch["position_ids"][b, 1, :prefix].eq(0).all()
    assert batch["shift_labels"][b, :prefix].eq(-100).all()  # loss only on Part B
    mask_positions = [i for i, token in enumerate(part_a) if token in MASK_OF.values()]
    assert all(part_a[i] == mask_id for i in mask_positions)
    assert sorted(m for m, _, _ in spans) == mask_positions  # one span per mask token, each its own
    span_tokens = {}
    for mask_position, inputs, targets in spans:
        assert len(inputs) >= 2 and inputs[0] == SOP
        assert targets == inputs[1:] + [EOP]  # targets t1..tk <eop>
        span_tokens[mask_position] = inputs[1:]
    n_real = int(batch["attention_mask"][b].sum())
    block = batch["position_ids"][b, 1, prefix:n_real].tolist()
    assert block == [i for _, inputs, _ in spans for i in range(1, len(inputs) + 1)]  # 1..k+1 per span
    rebuilt, source_spans = [], []
    for i, token in enumerate(part_a):
        if i in span_tokens:
            source_spans.append((len(rebuilt), len(rebuilt) + len(span_tokens[i])))
            rebuilt += span_tokens[i]
        else:
            rebuilt.append(token)
    assert rebuilt == source
    assert all(
        nxt[0] > end for (_, end), nxt in zip(source_spans, source_spans[1:], strict=False)
    )  # ≥ 1 apart
    return source_spans


# ------------------------------------------------------------------------------------ blank infilling
@pytest.mark.parametrize("span_kind", SPAN_KINDS)
@settings(max_examples=250, deadline=None)
@given(sources=batches, seed=seeds)
def test_blank_infilling_invariants(span_kind, sources, seed):
    collator = make_collator(seed)
    batch = collator.collate([{"input_ids": s} for s in sources], span_kind=span_kind)
    check_batch_layout(batch, sources)
    for b, source in enumerate(sources):
        n = len(source)
        spans = check_infilling_row(batch, b, source, span_kind)
        lengths = [end - start for start, end in spans]
        covered, goal = sum(lengths), mask_goal(0.15, n)
        assert int(batch["prefix_lengths"][b]) == n - covered + len(spans)  # = len(Part A)
        if span_kind == "token":
            assert all(1 <= k <= 39 for k in lengths)
            assert goal <= covered <= goal + 38  # the last span can overshoot by at most max_span - 1
        elif span_kind == "sentence":
            assert covered >= goal
            for start, end in spans:  # whole sentences
                assert start == 0 or source[start - 1] in END_IDS
                assert end == n or source[end - 1] in END_IDS
        else:
            assert len(spans) == (1 if n else 0)
            if n >= 4:
                assert math.ceil(n / 2) <= covered <= n - 2


@settings(max_examples=150, deadline=None)
@given(sources=batches, seed=seeds)
def test_span_kind_drawn_once_per_batch(sources, seed):
    batch = make_collator(seed)([{"input_ids": s} for s in sources])
    check_batch_layout(batch, sources)
    used = set()
    for b in range(len(sources)):
        part_a, spans = decode_row(batch, b)
        used |= {part_a[m] for m, _, _ in spans}
    assert len(used) <= 1


@settings(max_examples=150, deadline=None)
@given(
    sources=batches,
    seed=seeds,
    span_kind=st.sampled_from(SPAN_KINDS),
    mask_ratio=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
    max_span=st.integers(1, 5),
)
def test_extreme_settings_never_break_the_layout(sources, seed, span_kind, mask_ratio, max_span):
    """Ratios where token spans can't fit trigger the fallback; rows must stay well formed."""
    collator = make_collator(seed, mask_ratio=mask_ratio, max_span=max_span, pad_to_multiple_of=8)
    batch = collator.collate([{"input_ids": s} for s in sources], span_kind=span_kind)
    assert batch["input_ids"].shape[1] % 8 == 0
    assert "labels" not in batch and batch["shift_labels"].shape == batch["input_ids"].shape
    for b, source in enumerate(sources):
        lengths = [end - start for start, end in check_infilling_row(batch, b, source, span_kind)]
        if span_kind == "token":
            assert all(k <= max_span for k in lengths)
            if mask_ratio <= 0.5:  # spans of max_span with gaps of 1 always fit this goal
                assert sum(lengths) >= mask_goal(mask_ratio, len(source))


def test_docstring_worked_example():
    class FixedOrder:
        def permutation(self, n):
            return np.array([1, 0])

    a, b, c, d, e, f = range(20, 26)
    row = build_infilling_row(np.array([a, b, c, d, e, f]), [(1, 3), (4, 5)], 1, SOP, EOP, FixedOrder())
    assert row.input_ids.tolist() == [a, 1, d, 1, f, SOP, e, SOP, b, c]
    assert row.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 3, 1, 1, 1]
    assert row.position_ids[1].tolist() == [0, 0, 0, 0, 0, 1, 2, 1, 2, 3]
    assert row.shift_labels.tolist() == [-100] * 5 + [e, EOP, b, c, EOP]
    assert row.prefix_length == 5


def test_token_span_statistics():
    """Coverage ≈ 15% and mean span length ≈ E[Poisson(3) | 1..39] ≈ 3.16 on long rows; Part B shuffled."""
    collator = make_collator(1)
    sources = [list(range(1000, 2000))] * 64
    batch = collator.collate([{"input_ids": s} for s in sources], span_kind="token")
    lengths = [
        end - start for b in range(64) for start, end in check_infilling_row(batch, b, sources[b], "token")
    ]
    coverage = sum(lengths) / (64 * 1000)
    assert 0.15 <= coverage <= 0.16
    assert 2.9 <= np.mean(lengths) <= 3.4
    in_source_order = 0
    for b in range(64):
        order = [m for m, _, _ in decode_row(batch, b)[1]]
        in_source_order += order == sorted(order)
    assert in_source_order == 0  # ~45 spans per row: a sorted shuffle is (almost surely) impossible


def test_document_suffix_probability_and_mixture_frequencies():
    collator = make_collator(2, mixture=(0.5, 0.3, 0.2))
    source = list(range(100, 140))
    suffixes = 0
    for _ in range(400):
        batch = collator.collate([{"input_ids": source}], span_kind="document")
        suffixes += (
            int(batch["prefix_lengths"][0]) == int(batch["position_ids"][0, 0, -2]) + 1
        )  # [gMASK] last
    assert 0.47 <= suffixes / 400 <= 0.65  # 0.5 suffix + a middle span that happens to end last (~0.06)
    counts = dict.fromkeys(MASK_OF.values(), 0)
    for _ in range(600):
        part_a, spans = decode_row(collator([{"input_ids": source}]), 0)
        counts[part_a[spans[0][0]]] += 1
    assert abs(counts[MASK_OF["token"]] / 600 - 0.5) < 0.07
    assert abs(counts[MASK_OF["sentence"]] / 600 - 0.3) < 0.07
    assert abs(counts[MASK_OF["document"]] / 600 - 0.2) < 0.07


@pytest.mark.parametrize("n", range(7))
@pytest.mark.parametrize("span_kind", SPAN_KINDS)
def test_short_rows(n, span_kind):
    collator = make_collator(n)
    sources = [list(range(100, 100 + n)), [11] * n]
    for _ in range(20):
        batch = collator.collate([{"input_ids": s} for s in sources], span_kind=span_kind)
        check_batch_layout(batch, sources)
        for b, source in enumerate(sources):
            check_infilling_row(batch, b, source, span_kind)


def test_reproducible_and_reseedable():
    examples = [{"input_ids": list(range(100, 160))}, {"input_ids": list(range(200, 230))}]
    first, second = make_collator(7), make_collator(7)
    runs = [first(examples) for _ in range(5)]
    assert all(
        torch.equal(x["input_ids"], y["input_ids"])
        for x, y in zip(runs, [second(examples) for _ in range(5)], strict=True)
    )
    assert not all(torch.equal(runs[0]["input_ids"], r["input_ids"]) for r in runs[1:])
    first.reseed(7)
    assert torch.equal(first(examples)["position_ids"], runs[0]["position_ids"])


def test_max_length_truncates_the_source():
    batch = make_collator(0, max_length=10).collate([{"input_ids": list(range(100, 150))}], span_kind="token")
    check_infilling_row(batch, 0, list(range(100, 110)), "token")


def test_dataloader_workers_draw_different_masks():
    collator = make_collator(3)
    data = [{"input_ids": list(range(100, 200))}] * 8
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=2, collate_fn=collator)
    batches = [batch["input_ids"] for batch in loader]
    assert len({tuple(batch[0].tolist()) for batch in batches}) == 4  # workers don't repeat each other
    torch.manual_seed(0)
    again = [batch["input_ids"] for batch in loader]
    assert all(torch.equal(x, y) for x, y in zip(batches, again, strict=True))  # reproducible run


def test_invalid_arguments_name_the_field():
    with pytest.raises(ValueError, match="sentence_end_ids"):
        BlankInfillingCollator(mixture=(0.5, 0.5, 0.0))
    with pytest.raises(ValueError, match="mixture"):
        BlankInfillingCollator(mixture=(0, 0, 0))
    with pytest.raises(ValueError, match="max_span"):
        BlankInfillingCollator(max_span=0)
    with pytest.raises(ValueError, match="sentence_end_ids"):
        BlankInfillingCollator().collate([{"input_ids": [20]}], span_kind="sentence")
    with pytest.raises(ValueError, match="span_kind"):
        BlankInfillingCollator().collate([{"input_ids": [20]}], span_kind="span")
    with pytest.raises(ValueError, match="vocab_size"):
        MlmCollator()
    with pytest.raises(ValueError, match="block_size"):
        pack_causal({"input_ids": [[20]]}, 0, 0)


# ------------------------------------------------------------------------------------ tokenizer path
@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["hello", "world.", "你好。", "x", "\n", "why?", "a…", "end;"]
    vocab = {word: i for i, word in enumerate(words)}
    vocab.update({token: 100 + i for i, token in enumerate(GLM_SPECIAL_TOKENS)})  # specials elsewhere
    vocab["[UNK]"] = 200
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="<pad>",
        mask_token="[MASK]",
        eos_token="<|endoftext|>",
        extra_special_tokens=list(GLM_SPECIAL_TOKENS),
    )


def test_ids_and_sentence_ends_from_tokenizer(tokenizer):
    collator = BlankInfillingCollator(tokenizer, mixture=(0.5, 0.5, 0.0), seed=0)
    assert (collator.mask_token_id, collator.smask_token_id, collator.gmask_token_id) == (101, 102, 103)
    assert (collator.sop_token_id, collator.eop_token_id, collator.pad_token_id) == (104, 105, 110)
    assert set(collator.sentence_end_ids) == {1, 2, 4, 5, 6, 7}
    source = [0, 3, 1, 0, 3, 3, 2, 3, 0, 5]
    batch = collator.collate([{"input_ids": source}], span_kind="sentence")
    _, spans = decode_row(batch, 0)
    assert all(inputs[0] == 104 and inputs[-1] in {1, 2, 5} for _, inputs, _ in spans)
    lazy = BlankInfillingCollator(tokenizer, seed=0)  # token-only mixture: sentence ends on first use
    assert lazy.sentence_end_ids is None
    lazy.collate([{"input_ids": source}], span_kind="sentence")
    assert lazy.sentence_end_ids == collator.sentence_end_ids
    mlm = MlmCollator(tokenizer, seed=0)
    assert mlm.vocab_size == 201 and {100, 101, 110, 200} <= mlm.special_token_ids
    assert set(mlm._replacements.tolist()) == set(range(8))
    with pytest.raises(ValueError, match="mask_token_id"):
        BlankInfillingCollator(_tokenizer_without("[MASK]", tokenizer))


def _tokenizer_without(token, tokenizer):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for t, i in tokenizer.get_vocab().items() if t != token}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="<pad>")


# ------------------------------------------------------------------------------------ MLM
mlm_sequences = st.lists(
    st.one_of(st.integers(11, 999), st.integers(11, 999), st.integers(0, 10)), max_size=150
)


@settings(max_examples=150, deadline=None)
@given(sources=st.lists(mlm_sequences, min_size=1, max_size=4), seed=seeds)
def test_mlm_invariants(sources, seed):
    batch = MlmCollator(vocab_size=1000, seed=seed)([{"input_ids": s} for s in sources])
    width = max(1, max(len(s) for s in sources))
    assert batch["input_ids"].shape == batch["shift_labels"].shape == (len(sources), width)
    assert "labels" not in batch  # one label form: shift_labels
    assert batch["position_ids"].tolist() == [list(range(width))] * len(sources)
    assert batch["prefix_lengths"].tolist() == [len(s) for s in sources]
    for b, source in enumerate(sources):
        n = len(source)
        inputs, targets = batch["input_ids"][b].tolist(), batch["shift_labels"][b].tolist()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (width - n)
        assert inputs[n:] == [PAD] * (width - n) and targets[n:] == [-100] * (width - n)
        eligible = [i for i, t in enumerate(source) if t > 10]
        selected = [i for i in range(n) if targets[i] != -100]
        assert set(selected) <= set(eligible)  # specials never selected
        assert len(selected) == (max(1, int(0.15 * len(eligible) + 0.5)) if eligible else 0)
        assert all(targets[i] == source[i] for i in selected)  # the target is the token in place
        assert all(inputs[i] == source[i] for i in range(n) if i not in selected)
        assert all(inputs[i] == ID["[MASK]"] or inputs[i] > 10 for i in selected)


def test_mlm_proportions():
    source = list(range(11, 1000)) * 20
    batch = MlmCollator(vocab_size=1000, seed=0)([{"input_ids": source}])
    inputs, targets = batch["input_ids"][0], batch["shift_labels"][0]
    selected = targets != -100
    assert abs(selected.float().mean().item() - 0.15) < 1e-3
    masked = (inputs[selected] == ID["[MASK]"]).float().mean().item()
    unchanged = (inputs[selected] == targets[selected]).float().mean().item()
    assert (
        abs(masked - 0.8) < 0.03 and abs(unchanged - 0.1) < 0.02 and abs(1 - masked - unchanged - 0.1) < 0.02
    )


# ------------------------------------------------------------------------------------ causal packing
documents = st.lists(st.lists(st.integers(0, 500), max_size=40), max_size=12)  # id 0 = eos may occur inside


def expected_positions(docs: list[list[int]], block_size: int) -> list[int]:
    """Offset within the document's visible part, from the document lengths (never from the ids)."""
    positions = [i for doc in docs for i in range(len(doc) + 1)]
    usable = len(positions) // block_size * block_size
    out, previous = [], None
    for k in range(usable):
        restart = k % block_size == 0 or positions[k] == 0
        out.append(0 if restart else previous + 1)
        previous = out[-1]
    return out


@settings(max_examples=150, deadline=None)
@given(docs=documents, block_size=st.integers(1, 64))
def test_pack_causal(docs, block_size):
    packed = pack_causal({"input_ids": docs}, block_size=block_size, eos_token_id=0)
    stream = [t for doc in docs for t in [*doc, 0]]
    assert len(packed["input_ids"]) == len(stream) // block_size
    assert all(len(block) == block_size for key in packed for block in packed[key])
    flat = [t for block in packed["input_ids"] for t in block]
    assert flat == stream[: len(flat)]
    assert set(packed) == {"input_ids", "position_ids"}  # no labels column: the collator derives targets
    assert [p for block in packed["position_ids"] for p in block] == expected_positions(docs, block_size)


def test_pack_causal_with_datasets_and_collator():
    from datasets import Dataset

    docs = [[20, 21, 22], [23, 24], [25, 26, 27, 28]]
    dataset = Dataset.from_dict({"input_ids": docs, "text": ["a", "b", "c"]})
    packed = dataset.map(
        partial(pack_causal, block_size=4, eos_token_id=0), batched=True, remove_columns=dataset.column_names
    )
    assert packed["input_ids"] == [[20, 21, 22, 0], [23, 24, 0, 25], [26, 27, 28, 0]]
    assert packed["position_ids"] == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3]]
    batch = CausalCollator()(list(packed))
    assert batch["input_ids"].shape == batch["shift_labels"].shape == batch["position_ids"].shape == (3, 4)
    assert "labels" not in batch
    assert torch.equal(batch["shift_labels"][:, :-1], batch["input_ids"][:, 1:])  # target = the next token
    assert batch["shift_labels"][:, -1].eq(-100).all()  # a block's last token has no target in the block
    with pytest.raises(ValueError, match="one length"):
        CausalCollator()([{"input_ids": [1, 2]}, {"input_ids": [1]}])


# ------------------------------------------------------------------------------------ with the model
def test_shift_labels_give_the_model_the_cross_entropy_of_each_positions_target():
    """The one label form end to end: the model's loss is the mean cross-entropy of every position's
    logits against its ``shift_labels`` entry (nothing shifted on the way), for every collator, and it
    equals the loss of the HF form (``labels``, which the model shifts) wherever that form can hold the
    targets (causal blocks, whose targets are the next tokens)."""
    from bilingual_glm.modeling.modeling_bilingual_glm import BilingualGlmConfig, BilingualGlmForCausalLM

    torch.manual_seed(0)
    model = BilingualGlmForCausalLM(BilingualGlmConfig.from_preset("tiny")).eval()
    examples = [{"input_ids": list(range(20, 80))}, {"input_ids": [20, 21, 11, 23, 24, 12, 25]}]
    blocks = pack_causal({"input_ids": [e["input_ids"] for e in examples]}, block_size=16, eos_token_id=0)
    causal = CausalCollator()(
        [dict(zip(blocks, row, strict=True)) for row in zip(*blocks.values(), strict=True)]
    )
    for batch in (make_collator(0)(examples), MlmCollator(vocab_size=1024, seed=0)(examples), causal):
        inputs = {k: v for k, v in batch.items() if k != "shift_labels"}
        with torch.no_grad():
            loss = model(**batch).loss
            logits = model(**inputs).logits
        expected = F.cross_entropy(logits.flatten(0, 1), batch["shift_labels"].flatten(), ignore_index=-100)
        assert torch.isfinite(loss) and torch.allclose(loss, expected, atol=1e-5)
    with torch.no_grad():
        from_labels = model(
            **{k: v for k, v in causal.items() if k != "shift_labels"}, labels=causal["input_ids"]
        )
    assert torch.allclose(from_labels.loss, expected, atol=1e-6)
