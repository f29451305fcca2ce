"""Logit parity with transformers' native GlmForCausalLM, both directions, on varied random configs."""

import pytest
import torch
from transformers import GlmConfig, GlmForCausalLM

from bilingual_glm.conversion import KEY_MAP, from_transformers_glm, main, to_transformers_glm
from bilingual_glm.modeling import kernels_bilingual_glm as kernels

from .conftest import RANDOM_CONFIGS, hand_built_native_config, perturbed_model

TOLERANCE = 1e-5


def _inputs(config, batch=3, length=17, seed=5):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=generator)


@pytest.mark.parametrize("overrides", RANDOM_CONFIGS)
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_ours_to_native_logits(overrides, implementation):
    ours = perturbed_model(seed=11, **overrides)
    native = to_transformers_glm(ours)
    ours.config._attn_implementation = native.config._attn_implementation = implementation
    ids = _inputs(ours.config)
    with torch.no_grad():
        delta = (ours(ids).logits - native(ids).logits).abs().max().item()
    assert delta <= TOLERANCE


@pytest.mark.parametrize("overrides", RANDOM_CONFIGS)
def test_native_to_ours_logits(overrides):
    torch.manual_seed(3)
    reference = perturbed_model(seed=12, **overrides)
    native = to_transformers_glm(reference)
    with torch.no_grad():  # perturb the native model itself so nothing leaks from our side
        for parameter in native.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    ours = from_transformers_glm(native)
    ids = _inputs(native.config)
    with torch.no_grad():
        assert (ours(ids).logits - native(ids).logits).abs().max().item() <= TOLERANCE
        cached_ours = ours.generate(ids[:1, :5], max_new_tokens=8, do_sample=False)
        cached_native = native.generate(ids[:1, :5], max_new_tokens=8, do_sample=False)
    assert torch.equal(cached_ours, cached_native)


def test_native_model_from_its_own_config_converts():
    """A GlmConfig built by hand (rope theta in rope_parameters, GQA) round-trips exactly."""
    config = hand_built_native_config(GlmConfig, rope_theta=5e6)
    torch.manual_seed(0)
    native = GlmForCausalLM(config).eval()
    ours = from_transformers_glm(native)
    assert ours.config.rope_theta == 5e6 and ours.config.eos_token_id == [1, 2]
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert (ours(ids).logits - native(ids).logits).abs().max().item() <= TOLERANCE


def test_key_map_covers_every_weight_both_ways():
    model = perturbed_model(num_hidden_layers=3)
    ours_keys = {k for k in model.state_dict() if "rotary_emb" not in k}
    native_keys = set(to_transformers_glm(model).state_dict())
    templates = {pair[0] for pair in KEY_MAP}
    assert {
        key.replace(".0.", ".{i}.").replace(".1.", ".{i}.").replace(".2.", ".{i}.") for key in ours_keys
    } == templates
    assert {k for k in native_keys if "rotary_emb" not in k} == ours_keys


def test_cli_round_trip_through_native_folders(tmp_path):
    ours = perturbed_model(seed=4)
    ours.save_pretrained(tmp_path / "ours")
    assert main(["to-glm", str(tmp_path / "ours"), str(tmp_path / "native")]) == 0
    assert main(["from-glm", str(tmp_path / "native"), str(tmp_path / "back")]) == 0
    assert (tmp_path / "native" / "model.safetensors").exists()
    native = GlmForCausalLM.from_pretrained(tmp_path / "native").eval()
    from bilingual_glm import BilingualGlmForCausalLM

    back = BilingualGlmForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = _inputs(ours.config)
    with torch.no_grad():
        reference = ours(ids).logits
        assert (native(ids).logits - reference).abs().max().item() <= TOLERANCE
        assert (back(ids).logits - reference).abs().max().item() <= TOLERANCE
    assert back.config.gmask_token_id == ours.config.gmask_token_id


@pytest.mark.parametrize("overrides", RANDOM_CONFIGS)
def test_fused_qkv_keeps_parity(overrides):
    """q/k/v as one GEMM (``use_fused_qkv``, on in train.py) against native's three projections."""
    ours = perturbed_model(seed=17, **overrides)
    native = to_transformers_glm(ours)
    assert kernels.use_fused_qkv(ours) == ours.config.num_hidden_layers
    attention = ours.model.layers[0].self_attn
    ids = _inputs(ours.config, batch=4, length=24)  # 96 rows: the fused path
    rows = torch.zeros(96, ours.config.hidden_size)
    assert kernels.fused_linear(rows, (attention.q_proj, attention.k_proj, attention.v_proj)) is not None
    ours_loss = ours(ids, labels=ids, return_logits=False).loss
    assert abs(ours_loss.item() - native(ids, labels=ids).loss.item()) <= TOLERANCE
    with torch.no_grad():
        assert (ours(ids).logits - native(ids).logits).abs().max().item() <= TOLERANCE


@pytest.mark.skipif(kernels._ONEDNN_LINEAR is None, reason="this torch has no oneDNN linear")
@pytest.mark.parametrize("overrides", RANDOM_CONFIGS[:3])
def test_onednn_fp32_path_keeps_parity(overrides, monkeypatch):
    """The CPU fp32 oneDNN linears (on for every matmul here, whatever its size) match native's MKL."""
    monkeypatch.setattr(kernels, "_ONEDNN_MIN_MACS", 0)
    monkeypatch.setattr(kernels, "onednn_fp32_wins", lambda: True)  # whatever this CPU's vendor
    ours = perturbed_model(seed=13, **overrides)
    native = to_transformers_glm(ours)
    names = list(ours.state_dict())
    assert kernels.use_onednn_linears(ours) > 0  # the opt-in module swap
    assert list(ours.state_dict()) == names
    ids = _inputs(ours.config)
    ours_loss = ours(ids, labels=ids, return_logits=False).loss
    native_loss = native(ids, labels=ids).loss
    assert abs(ours_loss.item() - native_loss.item()) <= TOLERANCE
    with torch.no_grad():
        assert (ours(ids).logits - native(ids).logits).abs().max().item() <= TOLERANCE
        greedy = [model.generate(ids[:1, :5], max_new_tokens=8, do_sample=False) for model in (ours, native)]
    assert torch.equal(*greedy)
