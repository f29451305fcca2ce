"""GLM-4-0414 (transformers' ``glm4``): sandwich norms, parity with Glm4ForCausalLM both ways, folder
round trips, conversion guards, and GLM's infilling features on a sandwich-norm model."""

import functools
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, Glm4Config, Glm4ForCausalLM, GlmForCausalLM

from bilingual_glm import BilingualGlmConfig, BilingualGlmForCausalLM
from bilingual_glm.chatglm import find_weight_files
from bilingual_glm.conversion import (
    GLM4_KEY_MAP,
    from_transformers_glm,
    from_transformers_glm4,
    main,
    to_transformers_glm,
    to_transformers_glm4,
)
from bilingual_glm.infill import infill

from . import test_modeling as plain
from .conftest import RANDOM_CONFIGS, hand_built_native_config, perturbed_model
from .test_export import check_without_package, write_expectations

TOLERANCE = 1e-5
POST_NORMS = ("post_self_attn_layernorm", "post_mlp_layernorm")


def sandwich_model(seed: int = 0, **overrides) -> BilingualGlmForCausalLM:
    """Tiny perturbed model with sandwich norms: every norm weight moved off 1 (so none is a no-op)."""
    return perturbed_model(seed=seed, sandwich_norms=True, **overrides)


def _inputs(config, batch=3, length=17, seed=5):
    return torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def _max_delta(a: torch.nn.Module, b: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (a(ids).logits - b(ids).logits).abs().max().item()


def _tensors(folder):
    out = {}
    for path in find_weight_files(folder):
        with safe_open(str(path), framework="pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})
    return out


# ------------------------------------------------------------------------------------------ model
def test_sandwich_norms_are_off_by_default_and_add_two_norms_per_layer():
    plain_keys = set(perturbed_model().state_dict())
    sandwich_keys = set(sandwich_model().state_dict())
    assert not any(name in key for key in plain_keys for name in POST_NORMS)
    assert sandwich_keys - plain_keys == {
        f"model.layers.{i}.{name}.weight" for i in range(2) for name in POST_NORMS
    }


def test_sandwich_norms_change_the_output():
    """Same weights with the post-sublayer norms skipped give other logits: the norms are really applied."""
    model = sandwich_model(seed=1)
    ids = _inputs(model.config)
    skipped = perturbed_model(seed=1)
    skipped.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not any(n in k for n in POST_NORMS)}, strict=True
    )
    assert _max_delta(model, skipped, ids) > 0.1


def test_a_folder_saved_without_the_field_loads_as_before(tmp_path):
    model = perturbed_model(seed=2)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("sandwich_norms")  # a folder written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    reloaded = BilingualGlmForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.sandwich_norms is False
    assert _max_delta(model, reloaded, _inputs(model.config)) == 0.0


def test_sandwich_norms_must_be_a_bool():
    with pytest.raises(ValueError, match="sandwich_norms"):
        BilingualGlmConfig.from_preset("tiny", sandwich_norms="yes")


# ----------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("overrides", RANDOM_CONFIGS)
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_ours_to_native_glm4_logits(overrides, implementation):
    ours = sandwich_model(seed=11, **overrides)
    native = to_transformers_glm4(ours)
    assert isinstance(native, Glm4ForCausalLM)
    ours.config._attn_implementation = native.config._attn_implementation = implementation
    assert _max_delta(ours, native, _inputs(ours.config)) <= TOLERANCE


@pytest.mark.parametrize("overrides", RANDOM_CONFIGS)
def test_native_glm4_to_ours_logits_and_greedy(overrides):
    native = to_transformers_glm4(sandwich_model(seed=12, **overrides))
    torch.manual_seed(3)
    with torch.no_grad():  # perturb the native model itself so nothing leaks from our side
        for parameter in native.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    ours = from_transformers_glm4(native)
    assert ours.config.sandwich_norms is True
    ids = _inputs(native.config)
    assert _max_delta(ours, native, ids) <= TOLERANCE
    with torch.no_grad():
        greedy = [model.generate(ids[:1, :5], max_new_tokens=8, do_sample=False) for model in (ours, native)]
    assert torch.equal(*greedy)


def test_native_glm4_from_its_own_config_converts():
    """A Glm4Config built by hand (theta in rope_parameters, GQA 6/2, head_dim 8 != 48/6) converts exactly."""
    config = hand_built_native_config(Glm4Config, rope_theta=1e4)
    torch.manual_seed(0)
    native = Glm4ForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in native.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    ours = from_transformers_glm4(native)
    assert ours.config.rope_theta == 1e4 and ours.config.eos_token_id == [1, 2]
    assert _max_delta(ours, native, torch.randint(0, 300, (2, 9))) <= TOLERANCE


def test_glm4_key_map_covers_every_weight_both_ways():
    model = sandwich_model(num_hidden_layers=3)
    ours_keys = {k for k in model.state_dict() if "rotary_emb" not in k}
    native_keys = {k for k in to_transformers_glm4(model).state_dict() if "rotary_emb" not in k}
    templates = {
        key.replace(".0.", ".{i}.").replace(".1.", ".{i}.").replace(".2.", ".{i}.") for key in ours_keys
    }
    assert templates == {pair[0] for pair in GLM4_KEY_MAP}
    assert native_keys == ours_keys


# ---------------------------------------------------------------------------------------- folders
@pytest.mark.parametrize(
    "dtype, tied", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)]
)
def test_cli_round_trip_from_glm4_to_glm4_is_bit_for_bit(tmp_path, dtype, tied):
    """native glm4 (sharded) → from-glm4 (sharded) → to-glm4: the same tensors, names, dtypes, bits."""
    native = to_transformers_glm4(sandwich_model(seed=4, tie_word_embeddings=tied)).to(dtype)
    native.save_pretrained(tmp_path / "native", max_shard_size="40KB")
    assert len(find_weight_files(tmp_path / "native")) > 1
    assert (
        main(["from-glm4", str(tmp_path / "native"), str(tmp_path / "ours"), "--max-shard-size", "30KB"]) == 0
    )
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    assert main(["to-glm4", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0

    source, back = _tensors(tmp_path / "native"), _tensors(tmp_path / "back")
    assert source.keys() == back.keys()
    for key, tensor in source.items():
        assert back[key].dtype == tensor.dtype == dtype and torch.equal(back[key], tensor), key
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(ours) is BilingualGlmForCausalLM and ours.config.sandwich_norms and ours.dtype == dtype
    # logits in fp32 from the stored bits (loading upcasts weights; rotary tables are built in fp32)
    fp32 = dict(dtype=torch.float32)
    reference = Glm4ForCausalLM.from_pretrained(tmp_path / "native", **fp32).eval()
    ours = BilingualGlmForCausalLM.from_pretrained(tmp_path / "ours", **fp32).eval()
    back_model = Glm4ForCausalLM.from_pretrained(tmp_path / "back", **fp32).eval()
    ids = _inputs(ours.config)
    assert _max_delta(ours, reference, ids) <= TOLERANCE
    assert _max_delta(back_model, reference, ids) == 0.0


def test_converted_glm4_folder_loads_without_the_package(tmp_path):
    native = to_transformers_glm4(sandwich_model(seed=6))
    native.save_pretrained(tmp_path / "native")
    main(["from-glm4", str(tmp_path / "native"), str(tmp_path / "ours")])
    write_expectations(native, tmp_path / "expected.pt")  # the native model's own logits and greedy output
    result = check_without_package(tmp_path / "ours", tmp_path / "expected.pt", tmp_path)
    assert "greedy_equal=True" in result.stdout


# ----------------------------------------------------------------------------------------- guards
def test_sandwich_weights_into_glm_are_refused_naming_them():
    with pytest.raises(
        ValueError, match=r"GlmForCausalLM has no place for 4 source weights.*post_mlp_layernorm"
    ):
        to_transformers_glm(sandwich_model())
    native4 = to_transformers_glm4(sandwich_model())
    with pytest.raises(ValueError, match=r"dropped: model\.layers\.0\.post_mlp_layernorm\.weight.*from-glm4"):
        from_transformers_glm(native4)


def test_a_model_without_sandwich_norms_into_glm4_is_refused():
    with pytest.raises(ValueError, match=r"lacks 4 weights Glm4ForCausalLM needs.*to-glm /"):
        to_transformers_glm4(perturbed_model())
    with pytest.raises(ValueError, match=r"lacks 4 weights BilingualGlmForCausalLM needs.*from-glm /"):
        from_transformers_glm4(to_transformers_glm(perturbed_model()))


@pytest.mark.parametrize(
    "direction, source, message",
    [
        ("to-glm", "ours_sandwich", r"would be dropped: model\.layers\.0\.post_mlp_layernorm\.weight"),
        ("from-glm", "native_glm4", r"would be dropped: model\.layers\.0\.post_mlp_layernorm.*from-glm4"),
        ("to-glm4", "ours_plain", r"lacks 4 weights Glm4ForCausalLM needs: model\.layers\.0\.post_mlp"),
        ("from-glm4", "native_glm", r"holds a 'glm' checkpoint, from-glm4 reads 'glm4': use from-glm "),
    ],
)
def test_cli_refuses_what_the_target_cannot_represent_and_writes_nothing(
    tmp_path, direction, source, message
):
    models = {
        "ours_sandwich": lambda: sandwich_model(),
        "ours_plain": lambda: perturbed_model(),
        "native_glm4": lambda: to_transformers_glm4(sandwich_model()),
        "native_glm": lambda: to_transformers_glm(perturbed_model()),
    }
    models[source]().save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match=message):
        main([direction, str(tmp_path / "src"), str(tmp_path / "out" / "dst")])
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_plain_glm_folders_still_round_trip_through_the_streaming_path(tmp_path):
    ours = perturbed_model(seed=8, tie_word_embeddings=True)
    ours.save_pretrained(tmp_path / "ours")
    main(["to-glm", str(tmp_path / "ours"), str(tmp_path / "native")])
    main(["from-glm", str(tmp_path / "native"), str(tmp_path / "back")])
    native = GlmForCausalLM.from_pretrained(tmp_path / "native").eval()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = _inputs(ours.config)
    assert _max_delta(native, ours, ids) <= TOLERANCE and _max_delta(back, ours, ids) == 0.0
    assert back.config.sandwich_norms is False and back.config.tie_word_embeddings
    assert _tensors(tmp_path / "ours").keys() == _tensors(tmp_path / "back").keys()


# ---------------------------------------------------------------- GLM features, sandwich-norm model
def _with(check, **kwargs):
    return pytest.param(functools.partial(check, **kwargs), id="-".join([check.__name__, *kwargs.values()]))


@pytest.mark.parametrize(
    "check",
    [
        _with(plain.test_zero_block_positions_equal_1d_positions),
        _with(plain.test_block_positions_change_outputs),
        _with(plain.test_prefix_is_bidirectional_and_blind_to_what_follows, implementation="eager"),
        _with(plain.test_prefix_is_bidirectional_and_blind_to_what_follows, implementation="sdpa"),
        _with(plain.test_full_length_prefix_is_a_bidirectional_encoder),
        _with(plain.test_zero_prefix_is_plain_causal),
        _with(plain.test_incremental_decoding_matches_full_forward, implementation="eager"),
        _with(plain.test_incremental_decoding_matches_full_forward, implementation="sdpa"),
        _with(plain.test_2d_positions_advance_glm_style_during_generation),
        _with(plain.test_eager_and_sdpa_agree_with_padding_prefix_and_2d_positions),
    ],
)
def test_glm_features_hold_on_a_sandwich_model(check):
    """The tiny-model tester's prefix-attention, 2D-position and decoding checks, on a sandwich model."""
    check(sandwich_model())


def test_prefix_forward_differs_from_causal_only_where_it_should():
    """One layer, prefix 6: rows 0-4 see keys to their right (differ); row 5 on see the same keys as
    causal attention (equal). The causal forward itself is exactly native glm4's."""
    model = sandwich_model(seed=3, num_hidden_layers=1)
    ids = plain.tokens(1, 10)
    with torch.no_grad():
        causal, prefix = model(ids).logits, model(ids, prefix_lengths=torch.tensor([6])).logits
    assert (causal[0, :5] - prefix[0, :5]).abs().amax(-1).min() > 1e-3
    assert torch.allclose(causal[0, 5:], prefix[0, 5:], atol=1e-6)
    assert _max_delta(model, to_transformers_glm4(model), ids) <= TOLERANCE


def test_infill_on_a_sandwich_model_matches_hand_decoding(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = sandwich_model(seed=5)
    config = model.config
    text = "北京是[MASK]的首都。"
    filled, spans = infill(model, tokenizer, text, max_new_tokens=4, return_spans=True)
    part_a = tokenizer(text, add_special_tokens=False)["input_ids"]
    blank = part_a.index(config.mask_token_id)
    seq, pos, blocks, span = (
        part_a + [config.sop_token_id],
        list(range(len(part_a))) + [blank],
        [0] * len(part_a) + [1],
        [],
    )
    with torch.no_grad():  # greedy by hand, no cache: GLM positions, Part A bidirectional
        for _ in range(4):
            logits = model(
                torch.tensor([seq]),
                position_ids=torch.tensor([[pos, blocks]]),
                prefix_lengths=torch.tensor([len(part_a)]),
            ).logits
            token = int(logits[0, -1].argmax())
            if token == config.eop_token_id:
                break
            seq, pos, blocks, span = seq + [token], pos + [blank], blocks + [blocks[-1] + 1], span + [token]
    assert spans == [tokenizer.decode(span, clean_up_tokenization_spaces=False)]
    assert "[MASK]" not in filled and filled.startswith("北京是")


def test_folder_conversion_casts_with_dtype_and_refuses_a_wrong_shape(tmp_path):
    native = to_transformers_glm4(sandwich_model(seed=7))
    native.save_pretrained(tmp_path / "native")
    main(["from-glm4", str(tmp_path / "native"), str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in _tensors(tmp_path / "bf16").values()} == {torch.bfloat16}
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    (tmp_path / "native" / "config.json").write_text(json.dumps({**config, "intermediate_size": 100}))
    with pytest.raises(
        ValueError, match=r"down_proj\.weight' has shape \(64, 172\), the config implies \(64, 100\)"
    ):
        main(["from-glm4", str(tmp_path / "native"), str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
