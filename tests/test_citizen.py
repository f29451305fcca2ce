"""What transformers' common model tests check, written as its tester writes them: ours against itself and
against native ``GlmForCausalLM`` with the same weights (``to_transformers_glm``), on the tiny preset.

Covered: attention switched at run time (the requested kernel is the reported one), ``resize_token_embeddings``
both ways, generation continued from ``inputs_embeds``, ``rope_parameters`` (linear / dynamic / yarn) and
the conversions that carry them, the tensor-parallel plan, ``_init_weights`` for every weight and buffer,
custom 4D masks, and ``torch.compile(fullgraph=True)`` / compiled static-cache generation.
"""

import copy
import inspect
import os
import random
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import GlmForCausalLM

from bilingual_glm import BilingualGlmConfig, BilingualGlmForCausalLM
from bilingual_glm.conversion import from_transformers_glm, glm_config_from_ours, to_transformers_glm

from .conftest import ROOT, perturbed_model

TOLERANCE = 1e-5


def tokens(batch: int, length: int, seed: int = 0, vocab: int = 1024) -> torch.Tensor:
    """Ids clear of the GLM specials (0..10), so no id means anything special."""
    return torch.randint(11, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_delta(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------- attention interface
def test_set_attn_implementation_switches_the_kernel_and_reports_the_requested_one():
    """As transformers' tester: each name set at run time is the one reported and the one that runs (eager
    gives attention weights, sdpa none), with the same logits as native switched the same way."""
    ours = perturbed_model(seed=1)
    native = to_transformers_glm(ours)
    assert type(ours)._can_set_attn_implementation()
    ids = tokens(2, 9)
    for name in ("eager", "sdpa", "cpu_bf16_matmul", "eager"):
        ours.set_attn_implementation(name)
        assert ours.config._attn_implementation == name and ours.model.config._attn_implementation == name
        with torch.no_grad():
            out = ours(ids, output_attentions=True)
        assert all(weights is not None for weights in out.attentions) == (name == "eager")
        if name != "cpu_bf16_matmul":
            native.set_attn_implementation(name)
            with torch.no_grad():
                assert max_delta(out.logits, native(ids).logits) <= TOLERANCE


def test_set_attn_implementation_refuses_an_unknown_name():
    ours = perturbed_model()
    with pytest.raises(ValueError, match="not_a_kernel"):
        ours.set_attn_implementation("not_a_kernel")


def test_from_pretrained_reports_the_requested_kernel(tmp_path):
    perturbed_model().save_pretrained(tmp_path)
    for name in ("sdpa", "eager", "cpu_bf16_matmul"):
        model = BilingualGlmForCausalLM.from_pretrained(tmp_path, attn_implementation=name)
        assert model.config._attn_implementation == name


# ---------------------------------------------------------------------------------------- resize
@pytest.mark.parametrize("tie", [False, True])
def test_resize_token_embeddings_up_and_down(tie):
    """transformers' test_resize_tokens_embeddings on the tiny preset, then down below GLM's special ids:
    the ids the vocabulary lost leave the config with a warning naming them, and the config rebuilds."""
    model = perturbed_model(seed=2, tie_word_embeddings=tie)
    vocab = model.config.vocab_size
    cloned = model.get_input_embeddings().weight.clone()
    ids = tokens(2, 7)
    embeddings = model.resize_token_embeddings(vocab + 10)
    assert model.config.vocab_size == vocab + 10 and embeddings.weight.shape[0] == vocab + 10
    assert model(ids).logits.shape[-1] == vocab + 10
    embeddings = model.resize_token_embeddings(vocab - 15)
    assert (
        model.config.vocab_size == vocab - 15
        and model(ids.clamp(max=vocab - 16)).logits.shape[-1] == vocab - 15
    )
    assert torch.equal(embeddings.weight, cloned[: vocab - 15])
    with pytest.warns(UserWarning, match=r"pad_token_id=10.*sop_token_id=4, eop_token_id=5"):
        model.resize_token_embeddings(4)
    assert (model.config.pad_token_id, model.config.sop_token_id, model.config.gmask_token_id) == (
        None,
        None,
        3,
    )
    assert model.generation_config.pad_token_id is None
    assert model.lm_head.weight.shape[0] == 4 and model(torch.tensor([[0, 1, 2, 3]])).logits.shape == (
        1,
        4,
        4,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left to drop: the config rebuilds silently
        rebuilt = BilingualGlmConfig.from_dict(model.config.to_dict())
        BilingualGlmForCausalLM(rebuilt)


def test_resized_model_keeps_native_parity():
    ours = perturbed_model(seed=3)
    native = to_transformers_glm(ours)
    smaller = ours.config.vocab_size - 100
    for model in (ours, native):
        model.resize_token_embeddings(smaller)
    ids = tokens(2, 8, vocab=smaller)
    with torch.no_grad():
        assert max_delta(ours(ids).logits, native(ids).logits) <= TOLERANCE


# ----------------------------------------------------------------------------- inputs_embeds continuation
def test_generate_continues_from_inputs_embeds_with_a_cache():
    """transformers' test_generate_continue_from_inputs_embeds: generating 3 tokens, then 3 more from the
    extended embeddings and the returned cache, equals generating 6 at once; native gives the same tokens."""
    ours = perturbed_model(seed=4)
    native = to_transformers_glm(ours)
    assert "inputs_embeds" in inspect.signature(ours.prepare_inputs_for_generation).parameters
    ids = tokens(2, 6)
    greedy = dict(do_sample=False, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    results = []
    for model in (ours, native):
        embeds = model.get_input_embeddings()(ids)
        full = model.generate(inputs_embeds=embeds, max_new_tokens=6, min_new_tokens=6, **greedy)
        first = model.generate(inputs_embeds=embeds, max_new_tokens=3, min_new_tokens=3, **greedy)
        more = torch.cat((embeds, model.get_input_embeddings()(first.sequences)), dim=1)
        cache = copy.deepcopy(getattr(first, "cache", None) or first.past_key_values)
        second = model.generate(
            inputs_embeds=more, past_key_values=cache, max_new_tokens=3, min_new_tokens=3, **greedy
        )
        assert torch.equal(torch.cat((first.sequences, second.sequences), dim=1), full.sequences)
        results.append(full.sequences)
    assert torch.equal(*results)


# ------------------------------------------------------------------------------------------ rope scaling
ROPE_CASES = [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 2.0, "attention_factor": 1.3, "beta_fast": 16.0, "beta_slow": 2.0},
]


@pytest.mark.parametrize("rope", ROPE_CASES, ids=lambda r: r["rope_type"] + str(len(r)))
def test_rope_scaling_matches_native_glm(rope):
    """1D positions past max_position_embeddings (dynamic grows there): native glm with the same
    rope_parameters and weights gives the same logits and greedy tokens."""
    ours = perturbed_model(seed=5, max_position_embeddings=16, rope_parameters={**rope, "rope_theta": 500.0})
    native = to_transformers_glm(ours)
    assert native.config.rope_parameters == ours.config.rope_parameters
    ids = tokens(2, 24)
    with torch.no_grad():
        assert max_delta(ours(ids).logits, native(ids).logits) <= TOLERANCE
        greedy = [model.generate(ids[:, :20], max_new_tokens=6, do_sample=False) for model in (ours, native)]
    assert torch.equal(*greedy)
    back = from_transformers_glm(native)
    assert back.config.rope_parameters == ours.config.rope_parameters


def test_rope_scaling_turns_both_2d_slices_and_scales_the_position_slice_only():
    """Documented rule: linear factor 2 at (2p, 2b) is default RoPE at (p, b) in both slices; yarn's
    attention_factor multiplies the position slice, and block position 0 stays the identity."""
    default = BilingualGlmConfig.from_preset("tiny")
    linear = BilingualGlmConfig.from_preset("tiny", rope_parameters={"rope_type": "linear", "factor": 2.0})
    yarn = BilingualGlmConfig.from_preset("tiny", rope_parameters={"rope_type": "yarn", "factor": 4.0})
    positions = torch.stack((torch.arange(6), torch.tensor([0, 0, 1, 2, 3, 4])))[None]  # [1, 2, 6]
    x = torch.zeros(1, 6, 64)
    tables = {}
    for name, config in (("default", default), ("linear", linear), ("yarn", yarn)):
        tables[name] = BilingualGlmForCausalLM(config).model.rotary_emb
    cos_d, sin_d = tables["default"](x, positions)
    cos_l, sin_l = tables["linear"](x, positions * 2)
    assert max_delta(cos_d, cos_l) < 1e-6 and max_delta(sin_d, sin_l) < 1e-6
    cos_y, _ = tables["yarn"](x, positions)
    scale, pairs = tables["yarn"].attention_scaling, default.rotary_dim // 2
    assert scale > 1.0
    assert torch.allclose(cos_y[0, 0, 0, :pairs], torch.full((pairs,), scale))  # position 0: scaled
    assert torch.equal(cos_y[0, 0, :2, pairs:], torch.ones(2, pairs))  # block position 0: identity


def test_2d_positions_with_zero_blocks_equal_native_under_yarn():
    ours = perturbed_model(seed=6, rope_parameters={"rope_type": "yarn", "factor": 4.0})
    native = to_transformers_glm(ours)
    ids = tokens(2, 10)
    positions = torch.stack((torch.arange(10), torch.zeros(10, dtype=torch.long)))[None].expand(2, -1, -1)
    with torch.no_grad():
        assert max_delta(ours(ids, position_ids=positions).logits, native(ids).logits) <= TOLERANCE


def test_chatglm_import_keeps_a_rope_scaling():
    from bilingual_glm.chatglm import config_from_chatglm

    thudm = dict(
        padded_vocab_size=300, hidden_size=48, ffn_hidden_size=80, num_layers=2, num_attention_heads=6,
        multi_query_attention=True, multi_query_group_num=2, kv_channels=8, seq_length=64, rope_ratio=50,
        rope_scaling={"type": "dynamic", "factor": 4.0},
    )  # fmt: skip
    config = config_from_chatglm(thudm, tie_word_embeddings=False)
    assert config.rope_parameters == {
        "rope_type": "dynamic", "factor": 4.0, "rope_theta": 500000.0, "partial_rotary_factor": 0.5
    }  # fmt: skip


# -------------------------------------------------------------------------------------- tensor parallel
def test_tp_plan_is_native_glms():
    """Same plan as native glm on the same geometry, and every entry names weights the model has."""
    ours = BilingualGlmForCausalLM(BilingualGlmConfig.from_preset("tiny"))
    native_config = glm_config_from_ours(ours.config)
    assert ours.config.base_model_tp_plan == native_config.base_model_tp_plan
    assert ours.config.base_model_pp_plan == native_config.base_model_pp_plan
    assert BilingualGlmForCausalLM._tp_plan == GlmForCausalLM._tp_plan
    assert ours.supports_tp_plan
    names = [name for name, _ in ours.model.named_parameters()]
    for pattern in ours.config.base_model_tp_plan:
        regex = re.compile(pattern.replace(".", r"\.").replace("*", r"\d+") + r"\.")
        assert any(regex.match(name) for name in names), pattern


@pytest.mark.slow  # CI time (Makefile): gloo, 2 processes
def test_tp_plan_auto_shards_ours_and_native_alike(tmp_path):
    """``from_pretrained(tp_plan="auto")`` on 2 CPU processes (torchrun, gloo): each rank holds half of
    q_proj, and ours gives the unsharded logits and greedy tokens, as native glm does from the same weights."""
    model = perturbed_model(seed=9)
    model.save_pretrained(tmp_path / "ours")
    to_transformers_glm(model).save_pretrained(tmp_path / "native")
    worker = Path(__file__).with_name("tp_worker.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(worker), str(tmp_path / "ours"), str(tmp_path / "native"), str(tmp_path / "out.pt")]
    result = subprocess.run([*torchrun, *args], capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = torch.load(tmp_path / "out.pt", weights_only=True)
    ids = torch.randint(11, 1024, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        greedy = model.generate(ids[:, :5], max_new_tokens=5, do_sample=False)
    for name in ("ours", "native"):
        assert sharded[name]["q_rows"] == model.config.num_attention_heads * model.config.head_dim // 2
        assert max_delta(sharded[name]["logits"], reference) <= TOLERANCE
        assert torch.equal(sharded[name]["greedy"], greedy)


# ------------------------------------------------------------------------------------------- init
@pytest.mark.parametrize("overrides", [dict(), dict(sandwich_norms=True, tie_word_embeddings=True)])
def test_can_init_all_missing_weights(overrides):
    """transformers' test: from_pretrained with an empty state dict initialises every weight through
    _init_weights as __init__ does, nothing left on meta. ``initializer_range=0`` makes the random inits
    exact (zeros), so a weight _init_weights missed shows as torch's default init or uninitialised memory."""
    config = BilingualGlmConfig.from_preset("tiny", initializer_range=0.0, **overrides)
    from_init = BilingualGlmForCausalLM(copy.deepcopy(config))
    from_pretrained = BilingualGlmForCausalLM.from_pretrained(
        None, config=copy.deepcopy(config), state_dict={}
    )
    expected, got = from_init.state_dict(), from_pretrained.state_dict()
    assert sorted(expected) == sorted(got)
    assert not [name for name, tensor in got.items() if tensor.device.type == "meta"]
    assert [name for name in expected if not torch.equal(expected[name], got[name])] == []
    norms = [name for name in got if "norm" in name]
    assert norms and all(torch.equal(got[name], torch.ones_like(got[name])) for name in norms)


def test_init_weights_draws_from_initializer_range():
    model = BilingualGlmForCausalLM.from_pretrained(
        None, config=BilingualGlmConfig.from_preset("tiny", initializer_range=0.1), state_dict={}
    )
    assert abs(model.model.embed_tokens.weight.std().item() - 0.1) < 0.005
    assert abs(model.model.layers[0].mlp.down_proj.weight.std().item() - 0.1) < 0.005
    assert torch.equal(model.model.layers[0].self_attn.q_proj.bias, torch.zeros(64))


def test_init_weights_recomputes_buffers_from_meta():
    """transformers' test_init_weights_can_init_buffers, with a scaled rope: the rotary tables come back."""
    config = BilingualGlmConfig.from_preset("tiny", rope_parameters={"rope_type": "yarn", "factor": 4.0})
    reference = BilingualGlmForCausalLM(copy.deepcopy(config))
    with torch.device("meta"):
        model = BilingualGlmForCausalLM(copy.deepcopy(config))
    model.to_empty(device="cpu")
    model.init_weights()
    expected = dict(reference.named_buffers())
    assert sorted(expected) == sorted(dict(model.named_buffers()))
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, expected[name]), name


# ---------------------------------------------------------------------------------------- 4D masks
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_custom_4d_attention_mask(implementation):
    """transformers' test_custom_4d_attention_mask: three sequences sharing a prefix, packed in one row with
    a 4D additive mask and their own positions, give each sequence's logits; native takes the same mask."""
    ours = perturbed_model(seed=7)
    native = to_transformers_glm(ours)
    shared, tails = tokens(1, 4, seed=1)[0], tokens(3, 2, seed=2)
    packed = torch.cat((shared, tails.flatten()))[None]  # [1, 10]
    positions = torch.cat((torch.arange(4), torch.arange(4, 6).repeat(3)))[None]
    visible = torch.zeros(10, 10, dtype=torch.bool)
    for index in range(3):
        rows = slice(4 + 2 * index, 6 + 2 * index)
        visible[rows, :4] = True
        visible[rows, rows] = torch.ones(2, 2, dtype=torch.bool).tril()
    visible[:4, :4] = torch.ones(4, 4, dtype=torch.bool).tril()
    mask = torch.zeros(1, 1, 10, 10).masked_fill(~visible, torch.finfo(torch.float32).min)
    for model in (ours, native):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            packed_logits = model(packed, attention_mask=mask, position_ids=positions).logits
            for index in range(3):
                alone = model(torch.cat((shared, tails[index]))[None]).logits
                assert max_delta(packed_logits[0, 4 + 2 * index : 6 + 2 * index], alone[0, 4:]) <= TOLERANCE


# ---------------------------------------------------------------------------------------------- compile
def glm_inputs(batch: int = 2, length: int = 8) -> dict:
    """GLM's own inputs: left padding, 2D positions (a span at the end) and prefix lengths."""
    padding = torch.ones(batch, length, dtype=torch.long)
    padding[0, :2] = 0
    blocks = torch.tensor([0] * (length - 3) + [1, 2, 3])
    positions = torch.stack((torch.arange(length).clamp(max=length - 4), blocks))[None].expand(batch, -1, -1)
    return dict(
        input_ids=tokens(batch, length),
        attention_mask=padding,
        position_ids=positions.contiguous(),
        prefix_lengths=torch.full((batch,), length - 3),
    )


def test_compiled_forward_fullgraph_with_2d_positions_and_prefix():
    """torch.compile(fullgraph=True) traces GLM's inputs in one graph (value checks step aside) and gives
    the eager logits; with 1D positions the compiled model gives native's logits."""
    assert BilingualGlmForCausalLM._can_compile_fullgraph
    ours = perturbed_model(seed=8)
    ours.set_attn_implementation("sdpa")
    compiled = torch.compile(ours, fullgraph=True, dynamic=False)
    inputs = glm_inputs()
    with torch.no_grad():
        assert (
            max_delta(compiled(**inputs, use_cache=False).logits, ours(**inputs, use_cache=False).logits)
            <= TOLERANCE
        )


def test_compiled_static_cache_generation_with_2d_positions_and_prefix():
    """generate(cache_implementation="static") with transformers' own compiled forward (fullgraph) gives the
    tokens of eager generation with a dynamic cache, for GLM's 2D positions and prefix."""
    from transformers import CompileConfig

    ours = perturbed_model(seed=8)
    ours.set_attn_implementation("sdpa")
    compile_config = CompileConfig(fullgraph=True, dynamic=False)
    compile_config._compile_all_devices = True  # transformers auto-compiles on accelerators only, else
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    inputs = glm_inputs()
    eager = ours.generate(**inputs, **greedy)
    static = ours.generate(**inputs, cache_implementation="static", compile_config=compile_config, **greedy)
    assert hasattr(ours, "_compiled_call")  # generate did run the compiled forward
    assert torch.equal(static, eager)


# One process's compiled elementwise kernel (inductor's vectorized C++ loops) against eager: 1 if close. The
# salt (argv[1]), a constant of the graph, makes the first process a cache miss in a warm shared cache.
_COMPILED_KERNEL = """
import sys
import torch
import tests.conftest  # noqa: F401  (tags the compile caches with this process's CPU capability)
def f(x):
    return torch.where(x > 0, x.sin() + float(sys.argv[1]), float("-inf"))
x = torch.linspace(-3, 3, 1000)
print(int(torch.allclose(torch.compile(f, fullgraph=True, dynamic=False)(x), f(x), rtol=1e-5, atol=1e-6)))
"""


@pytest.mark.slow  # 25 s; CI's capped pass re-runs the compile tests on the plain pass's warm cache
def test_compiled_code_from_a_native_isa_run_is_not_served_to_an_avx2_run():
    """CI compiles on this CPU, then runs the model tests again capped at AVX2 (an AMD Zen 3) with the same
    inductor cache. torch's FX graph cache key omits the vector ISA, so the capped run was served AVX-512
    code built with ``-mavx2``; half of each output stayed unwritten and the compiled model's logits came
    out NaN. tests/conftest.py tags the caches with the ISA: one new kernel, compiled on the native ISA,
    then under AVX2 (the compile tests above check the model itself in CI's capped pass)."""
    env = {key: value for key, value in os.environ.items() if key != "ATEN_CPU_CAPABILITY"}
    command = [sys.executable, "-c", _COMPILED_KERNEL, str(random.random())]
    for caps in ({}, {"ATEN_CPU_CAPABILITY": "avx2"}):
        result = subprocess.run(
            command, cwd=ROOT, env={**env, **caps}, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.split()[-1] == "1", f"{caps or 'native ISA'}: the compiled kernel is wrong"


@pytest.mark.slow
def test_compiled_static_cache_generation_matches_native():
    from transformers import CompileConfig

    ours = perturbed_model(seed=8)
    native = to_transformers_glm(ours)
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    inputs = {key: glm_inputs()[key] for key in ("input_ids", "attention_mask")}
    results = []
    for model in (ours, native):
        model.set_attn_implementation("sdpa")
        compile_config = CompileConfig(fullgraph=True, dynamic=False)
        compile_config._compile_all_devices = True
        results.append(
            model.generate(**inputs, cache_implementation="static", compile_config=compile_config, **greedy)
        )
    assert torch.equal(*results)
