"""Tiny-config model tester: shapes, masks, positions, cache, generation, kernels, checkpointing, heads."""

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DynamicCache,
    StaticCache,
)

import bilingual_glm
from bilingual_glm import BilingualGlmConfig, BilingualGlmForCausalLM, BilingualGlmForSequenceClassification
from bilingual_glm.modeling import kernels_bilingual_glm as kernels
from bilingual_glm.modeling import modeling_bilingual_glm as modeling
from bilingual_glm.modeling.modeling_bilingual_glm import build_attention_mask
from bilingual_glm.modeling.utils_bilingual_glm import attention_mask_for

from .conftest import perturbed_model

VOCAB = BilingualGlmConfig.from_preset("tiny").vocab_size


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(11, VOCAB, (batch, length), generator=generator)


# ------------------------------------------------------------------------------------ auto classes
def test_auto_classes_build_our_models():
    config = AutoConfig.for_model("bilingual_glm", **bilingual_glm.PRESETS["tiny"])
    assert isinstance(config, BilingualGlmConfig)
    assert isinstance(AutoModelForCausalLM.from_config(config), BilingualGlmForCausalLM)
    assert type(AutoModel.from_config(config)).__name__ == "BilingualGlmModel"
    classifier = AutoModelForSequenceClassification.from_config(config)
    assert isinstance(classifier, BilingualGlmForSequenceClassification)


def test_presets_have_the_documented_sizes():
    def count(name: str) -> int:
        with torch.device("meta"):
            model = BilingualGlmForCausalLM(BilingualGlmConfig.from_preset(name))
        return sum(p.numel() for p in model.parameters())

    assert count("tiny") < 1_000_000
    assert 10e6 <= count("small") <= 30e6
    assert 95e6 <= count("base") <= 125e6
    assert 9.0e9 <= count("glm-4-9b") <= 9.8e9


# ------------------------------------------------------------------------------------------ shapes
def test_forward_shapes_hidden_states_and_attentions(tiny_model):
    tiny_model.config._attn_implementation = "eager"
    out = tiny_model(tokens(2, 7), output_hidden_states=True, output_attentions=True)
    config = tiny_model.config
    assert out.logits.shape == (2, 7, config.vocab_size)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert out.hidden_states[-1].shape == (2, 7, config.hidden_size)
    assert out.attentions[0].shape == (2, config.num_attention_heads, 7, 7)
    assert torch.allclose(out.attentions[0].sum(-1), torch.ones(2, config.num_attention_heads, 7))


def test_forward_is_deterministic(tiny_model):
    ids = tokens(2, 9)
    assert torch.equal(tiny_model(ids).logits, tiny_model(ids).logits)


def test_return_dict_false_gives_tuple(tiny_model):
    ids = tokens(1, 5)
    logits = tiny_model(ids, return_dict=False, use_cache=False)[0]
    assert torch.equal(logits, tiny_model(ids).logits)


def test_logits_to_keep(tiny_model):
    ids = tokens(2, 8)
    full = tiny_model(ids).logits
    assert torch.allclose(tiny_model(ids, logits_to_keep=1).logits, full[:, -1:], atol=1e-6)
    picked = torch.tensor([0, 3])
    assert torch.allclose(tiny_model(ids, logits_to_keep=picked).logits, full[:, picked], atol=1e-6)


# -------------------------------------------------------------------------------------------- loss
def test_loss_is_shifted_cross_entropy_with_ignore_index(tiny_model):
    ids = tokens(2, 10)
    labels = ids.clone()
    labels[0, :4] = -100
    out = tiny_model(ids, labels=labels)
    expected = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, VOCAB).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert torch.allclose(out.loss, expected, atol=1e-6)
    sparse = tiny_model(ids, labels=labels, return_logits=False)
    assert sparse.logits is None and torch.allclose(sparse.loss, expected, atol=1e-6)
    # Trainer's num_items_in_batch: sum of token losses divided by the given count
    n_tokens = (labels[:, 1:] != -100).sum()
    summed = tiny_model(ids, labels=labels, num_items_in_batch=torch.tensor(1)).loss
    assert torch.allclose(summed / n_tokens, expected, atol=1e-6)
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
    assert torch.allclose(tiny_model(ids, shift_labels=shifted).loss, expected, atol=1e-6)


# ----------------------------------------------------------------------------------- 2D positions
def test_zero_block_positions_equal_1d_positions(tiny_model):
    ids = tokens(2, 9)
    positions = torch.arange(9).expand(2, 9)
    two_d = torch.stack((positions, torch.zeros_like(positions)), dim=1)  # [B, 2, T]
    assert torch.equal(
        tiny_model(ids, position_ids=two_d).logits, tiny_model(ids, position_ids=positions).logits
    )


def test_block_positions_change_outputs(tiny_model):
    ids = tokens(1, 6)
    positions = torch.tensor([[0, 1, 2, 3, 3, 3]])
    zero = torch.stack((positions, torch.zeros_like(positions)), dim=1)
    blocks = torch.stack((positions, torch.tensor([[0, 0, 0, 0, 1, 2]])), dim=1)
    first, second = tiny_model(ids, position_ids=zero).logits, tiny_model(ids, position_ids=blocks).logits
    assert torch.equal(first[:, :4], second[:, :4])
    assert not torch.allclose(first[:, 4:], second[:, 4:])


# ------------------------------------------------------------------------------------ prefix masks
def test_mask_builder_matches_the_documented_picture():
    mask = build_attention_mask(None, torch.tensor([3]), 1, 6, 0, 6, torch.device("cpu"))[0, 0]
    expected = torch.tensor(
        [
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_prefix_is_bidirectional_and_blind_to_what_follows(tiny_model, implementation):
    tiny_model.config._attn_implementation = implementation
    ids = tokens(2, 10)
    prefix = torch.tensor([4, 6])
    base = tiny_model(ids, prefix_lengths=prefix).logits
    changed = ids.clone()
    changed[0, 4:] = tokens(1, 6, seed=7)
    changed[1, 6:] = tokens(1, 4, seed=8)
    after = tiny_model(changed, prefix_lengths=prefix).logits
    assert torch.equal(base[0, :4], after[0, :4]) and torch.equal(base[1, :6], after[1, :6])
    # inside the prefix, an early position sees a later prefix token
    early = ids.clone()
    early[0, 3] = (early[0, 3] + 1) % VOCAB
    assert not torch.allclose(tiny_model(early, prefix_lengths=prefix).logits[0, 0], base[0, 0])
    # after the prefix attention is causal: a later token never changes an earlier one
    late = ids.clone()
    late[0, 8] = (late[0, 8] + 1) % VOCAB
    assert torch.equal(tiny_model(late, prefix_lengths=prefix).logits[0, :8], base[0, :8])


def test_full_length_prefix_is_a_bidirectional_encoder(tiny_model):
    ids = tokens(1, 8)
    full = torch.tensor([8])
    base = tiny_model(ids, prefix_lengths=full).logits
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % VOCAB
    assert not torch.allclose(tiny_model(changed, prefix_lengths=full).logits[0, 0], base[0, 0])


def test_zero_prefix_is_plain_causal(tiny_model):
    ids = tokens(2, 7)
    assert torch.allclose(
        tiny_model(ids, prefix_lengths=torch.tensor([0, 0])).logits, tiny_model(ids).logits, atol=1e-6
    )


def test_custom_4d_mask_is_used_as_given(tiny_model):
    tiny_model.config._attn_implementation = "eager"
    ids = tokens(1, 6)
    bool_mask = build_attention_mask(None, torch.tensor([3]), 1, 6, 0, 6, torch.device("cpu"))
    additive = torch.zeros(bool_mask.shape).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    assert torch.allclose(
        tiny_model(ids, attention_mask=additive).logits,
        tiny_model(ids, prefix_lengths=torch.tensor([3])).logits,
        atol=1e-6,
    )


# --------------------------------------------------------------------------------- kernels agree
def test_eager_and_sdpa_agree_with_padding_prefix_and_2d_positions(tiny_model):
    ids = tokens(2, 9)
    padding = torch.ones(2, 9, dtype=torch.long)
    padding[1, :3] = 0
    positions = torch.stack((torch.arange(9).expand(2, 9), torch.randint(0, 3, (2, 9))), dim=1)
    kwargs = dict(attention_mask=padding, position_ids=positions, prefix_lengths=torch.tensor([5, 6]))
    results = {}
    for implementation in ("eager", "sdpa"):
        tiny_model.config._attn_implementation = implementation
        results[implementation] = tiny_model(ids, **kwargs).logits
    real = padding.bool()
    assert torch.allclose(results["eager"][real], results["sdpa"][real], atol=1e-5)
    assert not results["sdpa"].isnan().any()


needs_onednn = pytest.mark.skipif(kernels._ONEDNN_LINEAR is None, reason="this torch has no oneDNN linear")


@pytest.fixture
def onednn_on(monkeypatch):
    """The oneDNN path on whatever this CPU is (the vendor rule turns it off on Intel)."""
    monkeypatch.setattr(kernels, "onednn_fp32_wins", lambda: True)


@pytest.fixture
def onednn_everywhere(onednn_on, monkeypatch):
    """Tiny shapes fall under the size threshold of the oneDNN path: lift it."""
    monkeypatch.setattr(kernels, "_ONEDNN_MIN_MACS", 0)


@needs_onednn
@pytest.mark.parametrize("shape", [(3, 17, 40), (5, 40), (1, 1, 40)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_f_linear_values_and_gradients(shape, bias, onednn_everywhere):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).requires_grad_()
    weight = torch.randn(24, 40, generator=generator).requires_grad_()
    b = torch.randn(24, generator=generator).requires_grad_() if bias else None
    grad = torch.randn(*shape[:-1], 24, generator=generator)
    results = []
    for function in (kernels.linear, F.linear):
        out = function(x, weight, b)
        leaves = [x, weight] + ([b] if bias else [])
        results.append([out.detach()] + list(torch.autograd.grad(out, leaves, grad)))
        if function is kernels.linear:
            assert type(out.grad_fn).__name__ == "_OneDnnLinearBackward"
    for ours, reference in zip(*results, strict=True):
        assert ours.shape == reference.shape
        assert torch.allclose(ours, reference, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_onednn_linear_steps_aside_for_autocast_disabled_mkldnn_and_small_matmuls(onednn_on):
    x, weight = torch.randn(64, 128), torch.randn(256, 128, requires_grad=True)  # 2M multiply-adds
    assert type(kernels.linear(x, weight).grad_fn).__name__ == "_OneDnnLinearBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.linear(x, weight).dtype == torch.bfloat16
    with torch.backends.mkldnn.flags(enabled=False):
        assert type(kernels.linear(x, weight).grad_fn).__name__ != "_OneDnnLinearBackward"
    assert kernels.linear(x.double(), weight.detach().double()).dtype == torch.float64
    assert type(kernels.linear(x[:1], weight).grad_fn).__name__ != "_OneDnnLinearBackward"  # 32k: MKL


@needs_onednn
def test_model_gradients_agree_with_and_without_the_onednn_path(onednn_everywhere):
    ids = tokens(2, 30)

    def grads() -> torch.Tensor:
        model = perturbed_model().train()
        assert kernels.use_onednn_linears(model) > 0  # the opt-in module swap
        model(ids, labels=ids, return_logits=False).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    fast = grads()
    with torch.backends.mkldnn.flags(enabled=False):
        reference = grads()
    assert torch.allclose(fast, reference, atol=1e-6, rtol=1e-4)


def test_onednn_linears_fall_back_to_f_linear_without_the_private_op(onednn_everywhere, monkeypatch):
    """``torch.ops.mkldnn._linear_pointwise`` is private: a torch without it (probed as None) runs
    ``F.linear`` in every swapped module, with the same values."""
    monkeypatch.setattr(kernels, "_ONEDNN_LINEAR", None)
    model = perturbed_model()
    ids = tokens(2, 30)
    with torch.no_grad():
        reference = model(ids).logits
        assert kernels.use_onednn_linears(model) > 0
        assert isinstance(model.model.layers[0].mlp.down_proj, kernels.OneDnnLinear)
        assert torch.equal(model(ids).logits, reference)
    x, weight = torch.randn(64, 128), torch.randn(256, 128, requires_grad=True)
    assert type(kernels.linear(x, weight).grad_fn).__name__ != "_OneDnnLinearBackward"


def test_fused_qkv_gives_the_three_projections_numbers_and_keeps_the_state_dict(monkeypatch):
    """``use_fused_qkv`` (train.py turns it on): one GEMM over the q/k/v weights. fp32 loss and gradients
    as with three modules; under bf16 autocast no further from fp32 than the three modules are."""
    ids = tokens(2, 40)  # 80 rows: training-sized, so the fused GEMM runs
    fused_calls = []

    def spy(x, linears):
        fused_calls.append(kernels.fused_linear(x, linears))
        return fused_calls[-1]

    monkeypatch.setattr(modeling, "fused_linear", spy)

    def loss_and_grads(fused: bool, autocast: bool) -> torch.Tensor:
        model = perturbed_model().train()
        names = list(model.state_dict())
        if fused:
            assert kernels.use_fused_qkv(model) == model.config.num_hidden_layers
        assert list(model.state_dict()) == names
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids, labels=ids, return_logits=False).loss
        loss.backward()
        return torch.cat([loss.detach().view(1)] + [p.grad.flatten() for p in model.parameters()])

    exact = loss_and_grads(fused=False, autocast=False)
    assert not fused_calls  # off unless asked for
    fused = loss_and_grads(fused=True, autocast=False)
    assert len(fused_calls) == 2 and all(call is not None for call in fused_calls)
    assert torch.allclose(fused, exact, atol=1e-6, rtol=1e-4)
    three_bf16, fused_bf16 = (loss_and_grads(fused=f, autocast=True) for f in (False, True))
    assert (fused_bf16 - exact).norm() <= 1.25 * (three_bf16 - exact).norm()
    assert (fused_bf16 - exact).norm() <= 0.02 * exact.norm()


def test_fused_qkv_steps_aside_for_decoding_wrapped_mixed_and_placeholder_projections():
    """Where one GEMM would not pay or not be safe, ``fused_linear`` says None and the modules run."""
    from peft import LoraConfig, get_peft_model

    model = perturbed_model()
    attention = model.model.layers[0].self_attn
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    x = torch.randn(2, 40, model.config.hidden_size)
    query, key, value = kernels.fused_linear(x, projections)
    assert torch.allclose(query, attention.q_proj(x), atol=1e-6) and torch.allclose(
        value, attention.v_proj(x)
    )
    assert kernels.fused_linear(x[:, :8], projections) is None  # 16 rows: a decoding-sized input
    unbiased = torch.nn.Linear(model.config.hidden_size, 8, bias=False)
    assert kernels.fused_linear(x, (attention.q_proj, unbiased)) is None
    placeholder = torch.nn.Linear(model.config.hidden_size, 8)
    placeholder.weight.data = torch.empty(0)  # how ZeRO-3 leaves a weight outside its module's forward
    assert kernels.fused_linear(x, (attention.q_proj, placeholder)) is None
    kernels.use_fused_qkv(model)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    attention = lora.base_model.model.model.layers[0].self_attn
    assert kernels.fused_linear(x, (attention.q_proj, attention.k_proj, attention.v_proj)) is None
    ids = tokens(2, 40)
    with torch.no_grad():
        fused_on = lora(ids).logits
        assert kernels.use_fused_qkv(lora, enabled=False) == model.config.num_hidden_layers
        assert torch.equal(lora(ids).logits, fused_on)  # the LoRA update is not lost


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_linear_cross_entropy_matches_full_logits(dtype, monkeypatch):
    """Chunks of 64 rows and a row count that is no multiple of 64: the loss and gradients of full logits
    + cross_entropy (fp32), or no further from exact than those are (bf16)."""
    vocab, dim, n_rows = 200, 24, 300
    monkeypatch.setattr(kernels, "_LOSS_CHUNK_LOGITS", 100 * vocab)  # rounded down to 64 rows a chunk
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(n_rows, dim, generator=generator).to(dtype).float().requires_grad_()
    weight = (torch.randn(vocab, dim, generator=generator) * 0.3).to(dtype).float().requires_grad_()
    targets = torch.randint(0, vocab, (n_rows,), generator=generator)

    def loss_and_grads(function, autocast: bool, cast=lambda t: t) -> list[torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = function(cast(hidden), cast(weight))
        return [
            loss.detach().double(),
            *(g.double() for g in torch.autograd.grad(loss * 0.5, (hidden, weight))),
        ]

    def full(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(F.linear(h, w).float(), targets, reduction="sum")

    bf16 = dtype == torch.bfloat16
    ours = loss_and_grads(lambda h, w: kernels.linear_cross_entropy(h, w, targets), bf16)
    reference = loss_and_grads(full, bf16)
    exact = [
        torch.as_tensor(t)
        for t in loss_and_grads(lambda h, w: full(h, w).double(), False, torch.Tensor.double)
    ]
    for mine, theirs, truth in zip(ours, reference, exact, strict=True):
        if bf16:  # both round to bf16 along the way: ours may not be further from exact than native's
            assert (mine - truth).norm() <= 1.5 * (theirs - truth).norm() + 1e-6
        else:
            assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-5), (mine - theirs).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_gives_autograds_bits_forward_and_backward(dtype):
    """The one-buffer backward runs autograd's own products: the same bits as ``silu(gate) * up``."""
    generator = torch.Generator().manual_seed(0)
    gate_up = torch.randn(3, 70, 2 * 37, generator=generator).to(dtype).requires_grad_()
    grad = torch.randn(3, 70, 37, generator=generator).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    plain = up * F.silu(gate)
    (expected,) = torch.autograd.grad(plain, gate_up, grad)
    ours = kernels.swiglu(gate_up)
    (got,) = torch.autograd.grad(ours, gate_up, grad)
    assert torch.equal(ours, plain) and torch.equal(got, expected)
    assert ours.grad_fn is not None and "SwiGLU" in type(ours.grad_fn).__name__
    with torch.no_grad():  # inference takes the plain expression
        assert kernels.swiglu(gate_up).grad_fn is None and torch.equal(kernels.swiglu(gate_up), plain)


@pytest.mark.parametrize("half_split", [None, 4])
def test_rotary_over_the_whole_head_equals_the_sliced_path(half_split):
    """With no dims passing, rotation skips the slice and the cat; the rotated dims and their gradients
    are the bits of the sliced path (the same head with one more, passing, pair of dims). Both read the same
    strides, as q and k are views of one projection in the model: torch's complex multiply rounds a
    contiguous input differently from a strided one."""
    generator = torch.Generator().manual_seed(0)
    cos, sin = torch.randn(2, 1, 5, 4, generator=generator), torch.randn(2, 1, 5, 4, generator=generator)
    wider = torch.randn(2, 3, 5, 10, generator=generator).requires_grad_()
    x = wider.detach()[..., :8].requires_grad_()
    whole = modeling.apply_rotary_pos_emb(x, cos, sin, half_split)
    sliced = modeling.apply_rotary_pos_emb(wider, cos, sin, half_split)
    grad = torch.randn(2, 3, 5, 10, generator=generator)
    assert torch.equal(whole, sliced[..., :8]) and torch.equal(sliced[..., 8:], wider[..., 8:])
    assert whole.is_contiguous()  # what SDPA reads without a copy
    (grad_whole,) = torch.autograd.grad(whole, x, grad[..., :8])
    (grad_sliced,) = torch.autograd.grad(sliced, wider, grad)
    assert torch.equal(grad_whole, grad_sliced[..., :8])


# ----------------------------------------------------------------------------------------- cache
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_incremental_decoding_matches_full_forward(tiny_model, implementation):
    tiny_model.config._attn_implementation = implementation
    ids = tokens(2, 12)
    full = tiny_model(ids).logits
    cache = DynamicCache()
    first = tiny_model(ids[:, :7], cache=cache, use_cache=True)
    steps = [first.logits]
    for t in range(7, 12):
        steps.append(tiny_model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_greedy_generation_same_with_and_without_cache(tiny_model):
    prompt = tokens(1, 5)
    with_cache = tiny_model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    without = tiny_model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)


def test_static_cache_generation_equals_dynamic(tiny_model):
    prompt = tokens(1, 5)
    dynamic = tiny_model.generate(prompt, max_new_tokens=8, do_sample=False)
    static = tiny_model.generate(prompt, max_new_tokens=8, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_left_padded_batch_generation_equals_unbatched(tiny_model, implementation):
    tiny_model.config._attn_implementation = implementation
    long_prompt, short_prompt = tokens(1, 8, seed=3), tokens(1, 5, seed=4)
    pad = tiny_model.config.pad_token_id
    batch = torch.cat((long_prompt, F.pad(short_prompt, (3, 0), value=pad)))
    mask = torch.cat((torch.ones(1, 8), F.pad(torch.ones(1, 5), (3, 0)))).long()
    batched = tiny_model.generate(batch, attention_mask=mask, max_new_tokens=10, do_sample=False)
    alone = tiny_model.generate(short_prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(batched[1, 3:], alone[0])
    assert torch.equal(batched[0], tiny_model.generate(long_prompt, max_new_tokens=10, do_sample=False)[0])


def test_sampling_and_beam_search_run(tiny_model):
    prompt = tokens(2, 4)
    torch.manual_seed(0)
    sampled = tiny_model.generate(prompt, max_new_tokens=5, do_sample=True, top_k=20)
    beams = tiny_model.generate(prompt, max_new_tokens=5, num_beams=3, do_sample=False)
    assert sampled.shape == beams.shape == (2, 9)


def test_2d_positions_advance_glm_style_during_generation(tiny_model):
    """Infilling: the position stays at the mask, the block position counts 1, 2, 3, ..."""
    tiny_model.config._attn_implementation = "sdpa"
    ids = tokens(1, 6)
    ids[0, 5] = tiny_model.config.sop_token_id
    positions = torch.tensor([[[0, 1, 2, 3, 4, 2], [0, 0, 0, 0, 0, 1]]])  # <sop> sits at mask position 2
    prefix = torch.tensor([5])
    generated = tiny_model.generate(
        ids, position_ids=positions, prefix_lengths=prefix, max_new_tokens=4, do_sample=False
    )
    # reference: greedy decoding by hand with the positions GLM prescribes, no cache
    seq, pos = ids, positions
    for _ in range(4):
        next_token = tiny_model(seq, position_ids=pos, prefix_lengths=prefix).logits[:, -1].argmax(-1)
        seq = torch.cat((seq, next_token[:, None]), dim=1)
        pos = torch.cat((pos, torch.tensor([[[2], [pos[0, 1, -1].item() + 1]]])), dim=-1)
    assert torch.equal(generated, seq)


# ---------------------------------------------------------------------------- gradient checkpoint
def test_gradient_checkpointing_gives_the_same_gradients():
    ids = tokens(2, 8)

    def gradients(checkpointing: bool) -> dict:
        model = perturbed_model().train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(ids, labels=ids).loss.backward()
        return {name: p.grad for name, p in model.named_parameters()}

    plain, checkpointed = gradients(False), gradients(True)
    for name, grad in plain.items():
        assert torch.allclose(grad, checkpointed[name], atol=1e-6), name


def test_bf16_forward_close_to_fp32():
    ids = tokens(2, 8)
    fp32 = perturbed_model()(ids).logits
    bf16 = perturbed_model(dtype=torch.bfloat16)(ids).logits
    assert bf16.dtype == torch.bfloat16
    assert (bf16.float() - fp32).abs().max() < 0.1


@pytest.mark.parametrize("attn", ["eager", "sdpa", "cpu_bf16_matmul"])
def test_fp16_left_padded_batch_stays_finite_and_close_to_fp32(attn):
    """fp16 is where GLM remote code met NaNs: a mask filled with -inf (or a min that overflows when added)
    turns fully masked padding rows into NaN. Ours keeps every row finite, padding rows included."""
    ids = tokens(2, 10)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: sample 0's first three query rows may attend to no key at all
    with torch.no_grad():
        fp32 = perturbed_model(attn_implementation=attn)(ids, attention_mask=mask).logits
        fp16 = perturbed_model(dtype=torch.float16, attn_implementation=attn)(ids, attention_mask=mask).logits
    assert fp16.dtype == torch.float16 and fp16.isfinite().all()
    assert (fp16.float() - fp32).abs().max() < 0.02
    model = perturbed_model(attn_implementation=attn).train()
    with torch.autocast("cpu", dtype=torch.float16):  # fp16 mixed precision, as Trainer's --fp16 runs it
        loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    assert loss.isfinite() and all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------ classification head
@pytest.mark.parametrize("side", ["left", "right"])
def test_classifier_pools_last_real_token_for_either_padding_side(side):
    torch.manual_seed(0)
    config = BilingualGlmConfig.from_preset("tiny", num_labels=3)
    model = BilingualGlmForSequenceClassification(config).eval()
    short, long = tokens(1, 4), tokens(1, 7, seed=2)
    pad = (3, 0) if side == "left" else (0, 3)
    ids = torch.cat((long, F.pad(short, pad, value=config.pad_token_id)))
    mask = torch.cat((torch.ones(1, 7), F.pad(torch.ones(1, 4), pad))).long()
    batched = model(ids, attention_mask=mask).logits
    assert torch.allclose(batched[1], model(short).logits[0], atol=1e-5)
    assert torch.allclose(batched[0], model(long).logits[0], atol=1e-5)


@pytest.mark.parametrize(
    ("problem_type", "labels"),
    [
        ("single_label_classification", torch.tensor([0, 2])),
        ("multi_label_classification", torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])),
        ("regression", torch.tensor([[0.5, 1.0, -1.0], [0.0, 2.0, 1.0]])),
    ],
)
def test_classifier_problem_types(problem_type, labels):
    config = BilingualGlmConfig.from_preset("tiny", num_labels=3, problem_type=problem_type)
    model = BilingualGlmForSequenceClassification(config)
    out = model(tokens(2, 5), labels=labels)
    logits = out.logits
    expected = {
        "single_label_classification": lambda: F.cross_entropy(logits, labels),
        "multi_label_classification": lambda: F.binary_cross_entropy_with_logits(logits, labels),
        "regression": lambda: F.mse_loss(logits, labels),
    }[problem_type]()
    assert torch.allclose(out.loss, expected, atol=1e-6)


# ---------------------------------------------------------------------------------- save and load
def test_save_load_round_trip_in_process(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors"} <= names
    assert {
        "configuration_bilingual_glm.py",
        "modeling_bilingual_glm.py",
        "kernels_bilingual_glm.py",
    } <= names
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, BilingualGlmForCausalLM)  # the installed class, no trust_remote_code
    ids = tokens(2, 6)
    assert torch.equal(reloaded(ids).logits, tiny_model(ids).logits)
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    assert classifier.model.embed_tokens.weight.data_ptr() != 0
    assert torch.equal(classifier.model.embed_tokens.weight, tiny_model.model.embed_tokens.weight)


def test_tied_embeddings_stay_tied_after_reload(tmp_path):
    model = perturbed_model(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    reloaded = BilingualGlmForCausalLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


# ------------------------------------------------------------------------------------- bad inputs
def test_bad_position_and_prefix_shapes_raise(tiny_model):
    ids = tokens(2, 5)
    with pytest.raises(ValueError, match="position_ids"):
        tiny_model(ids, position_ids=torch.zeros(2, 3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="prefix_lengths"):
        tiny_model(ids, prefix_lengths=torch.tensor([1, 2, 3]))


def test_block_positions_need_room_in_the_head():
    model = perturbed_model(partial_rotary_factor=1.0)
    positions = torch.zeros(1, 2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        model(tokens(1, 4), position_ids=positions)


def test_token_ids_outside_the_vocabulary_are_named(tiny_model):
    ids = tokens(1, 5)
    ids[0, 2] = VOCAB + 7
    with pytest.raises(ValueError, match=f"token id {VOCAB + 7} is outside \\[0, vocab_size={VOCAB}\\)"):
        tiny_model(ids)
    ids[0, 2] = -3
    with pytest.raises(ValueError, match="token id -3"):
        tiny_model(ids)


def test_position_prefix_and_mask_values_are_checked(tiny_model):
    ids = tokens(2, 5)
    with pytest.raises(ValueError, match="position_ids must be >= 0"):
        tiny_model(ids, position_ids=torch.full((2, 5), -1))
    with pytest.raises(ValueError, match="position_ids must be"):
        tiny_model(ids, position_ids=torch.arange(4).expand(2, 4))
    with pytest.raises(ValueError, match="prefix_lengths must be in"):
        tiny_model(ids, prefix_lengths=torch.tensor([2, 9]))
    with pytest.raises(ValueError, match="attention_mask: a 4D mask"):
        tiny_model(ids, attention_mask=torch.zeros(2, 1, 5, 4))


def test_static_cache_decoding_masks_its_spare_slots(tiny_model):
    prompt, next_token = tokens(1, 5), torch.tensor([[57]])
    cache = StaticCache(config=tiny_model.config, max_cache_len=16)
    tiny_model(prompt, cache=cache, use_cache=True)
    step = tiny_model(next_token, cache=cache, use_cache=True).logits[0, -1]
    full = tiny_model(torch.cat((prompt, next_token), dim=1)).logits[0, -1]
    assert torch.allclose(step, full, atol=1e-5)


def test_prefix_attention_with_a_causal_only_kernel_is_refused(tiny_model):
    tiny_model.config._attn_implementation = "flash_attention_2"  # checked before any kernel runs
    with pytest.raises(ValueError, match="prefix_lengths: flash attention kernels are causal-only"):
        tiny_model(tokens(1, 4), prefix_lengths=torch.tensor([2]))


def test_bf16_training_path_matches_fp32_loss_and_gradients():
    """The CPU bf16 fast paths (matmul attention, chunked linear + cross-entropy) track fp32 closely."""
    ids = tokens(4, 40)
    labels = ids.clone()
    labels[:, :10] = -100

    def loss_and_grads(autocast: bool):
        model = perturbed_model().train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(
                ids, labels=labels, return_logits=False, prefix_lengths=torch.tensor([5, 9, 0, 3])
            ).loss
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    loss32, grad32 = loss_and_grads(False)
    loss16, grad16 = loss_and_grads(True)
    assert abs(loss16 - loss32) < 0.02
    assert F.cosine_similarity(grad16, grad32, dim=0) > 0.99


# ------------------------------------------------------------------------- named attention choice
@pytest.mark.parametrize(("native_bf16", "expected"), [("1", "cpu_bf16_matmul"), ("0", "sdpa")])
def test_default_attention_follows_its_rule_and_explicit_names_are_kept(monkeypatch, native_bf16, expected):
    """No name asked for: cpu_bf16_matmul on a CPU with native bf16 (no CUDA), else sdpa; a name is kept."""
    monkeypatch.setenv("BILINGUAL_GLM_BF16", native_bf16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = BilingualGlmConfig.from_preset("tiny")
    assert BilingualGlmForCausalLM(config).config._attn_implementation == expected
    for name in ("sdpa", "eager", "cpu_bf16_matmul"):
        model = BilingualGlmForCausalLM(BilingualGlmConfig.from_preset("tiny", attn_implementation=name))
        assert model.config._attn_implementation == name


def test_cpu_bf16_kernel_equals_sdpa_where_its_rule_does_not_apply(tiny_model):
    """fp32 (the rule says SDPA): bit for bit what 'sdpa' gives, with padding and a prefix."""
    ids = tokens(2, 9)
    padding = torch.ones(2, 9, dtype=torch.long)
    padding[1, :2] = 0
    kwargs = dict(attention_mask=padding, prefix_lengths=torch.tensor([4, 5]))
    results = []
    for name in ("cpu_bf16_matmul", "sdpa"):
        tiny_model.config._attn_implementation = name
        results.append(tiny_model(ids, **kwargs).logits)
    assert torch.equal(*results)


def test_model_masks_equal_build_attention_mask(tiny_model):
    """The masks forward builds through masking_utils (eager: additive) are build_attention_mask's."""
    tiny_model.config._attn_implementation = "eager"
    padding = torch.ones(2, 7, dtype=torch.long)
    padding[0, :3] = 0
    prefix = torch.tensor([2, 5])
    embeds = torch.zeros(2, 7, tiny_model.config.hidden_size)
    additive = attention_mask_for(tiny_model.config, padding, prefix, None, 0, embeds)
    expected = build_attention_mask(padding, prefix, 2, 7, 0, 7, torch.device("cpu"))
    assert torch.equal(additive == 0, expected)


def test_classifier_pools_by_the_mask_when_pad_is_a_real_token():
    """GLM-4's pad id is <|endoftext|>: a real last token equal to it must still be the pooled one."""
    torch.manual_seed(0)
    config = BilingualGlmConfig.from_preset("tiny", num_labels=2)
    model = BilingualGlmForSequenceClassification(config).eval()
    row = tokens(1, 5)
    row[0, -1] = config.pad_token_id  # the real last token happens to be the pad id
    ids = F.pad(row, (0, 2), value=config.pad_token_id)
    mask = F.pad(torch.ones(1, 5, dtype=torch.long), (0, 2))
    alone = model(row, attention_mask=torch.ones(1, 5, dtype=torch.long)).logits
    assert torch.allclose(model(ids, attention_mask=mask).logits, alone, atol=1e-5)
