"""Config: presets, serialisation, and a ValueError naming the field for every invalid value."""

import pytest

from bilingual_glm import PRESETS, BilingualGlmConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_round_trip_through_json(name, tmp_path):
    config = BilingualGlmConfig.from_preset(name)
    config.save_pretrained(tmp_path)
    reloaded = BilingualGlmConfig.from_pretrained(tmp_path)
    for field in PRESETS[name]:
        assert getattr(reloaded, field) == getattr(config, field), field


def test_defaults_follow_glm4():
    config = BilingualGlmConfig()
    assert config.partial_rotary_factor == 0.5 and config.attention_bias is True
    assert config.rotary_dim == config.head_dim // 2


def test_rope_parameters_dict_is_accepted():
    config = BilingualGlmConfig(
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.25}
    )
    assert config.rope_theta == 5e6 and config.partial_rotary_factor == 0.25


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="preset"):
        BilingualGlmConfig.from_preset("huge")


def test_ids_outside_the_vocabulary_are_dropped_with_a_warning_naming_them():
    """Not refused: a config rebuilt after resize_token_embeddings to a smaller vocabulary must construct."""
    with pytest.warns(UserWarning, match=r"pad_token_id=5000.*eos_token_id=\[0, 4096\]"):
        config = BilingualGlmConfig.from_preset("tiny", pad_token_id=5000, eos_token_id=[0, 4096])
    assert config.pad_token_id is None and config.eos_token_id == [0]
    with pytest.warns(UserWarning, match=r"sop_token_id=4, eop_token_id=5"):
        config = BilingualGlmConfig.from_preset("tiny", vocab_size=4)
    assert (config.sop_token_id, config.eop_token_id, config.gmask_token_id) == (None, None, 3)


def test_old_flat_rope_fields_and_4x_rope_scaling_load(tmp_path):
    """Folders saved before rope_parameters (flat rope_theta) or by 4.x (rope_scaling with "type") still load."""
    import json

    BilingualGlmConfig.from_preset("tiny").save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["rope_parameters"]
    saved.update(rope_theta=123.0, partial_rotary_factor=0.25, rope_scaling={"type": "linear", "factor": 2.0})
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = BilingualGlmConfig.from_pretrained(tmp_path)
    assert config.rope_parameters == {
        "rope_type": "linear",
        "factor": 2.0,
        "rope_theta": 123.0,
        "partial_rotary_factor": 0.25,
    }
    assert config.rope_theta == 123.0 and config.rope_scaling["factor"] == 2.0


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(hidden_size=-64), "hidden_size"),
        (dict(intermediate_size=0), "intermediate_size"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(num_attention_heads=0), "num_attention_heads"),
        (dict(num_key_value_heads=0), "num_key_value_heads"),
        (dict(head_dim=0), "head_dim"),
        (dict(max_position_embeddings=0), "max_position_embeddings"),
        (dict(hidden_size=66, head_dim=None), "head_dim"),
        (dict(head_dim=10), "partial_rotary_factor"),  # 10 * 0.5 = 5 rotary dims: not pairs
        (dict(partial_rotary_factor=0.0), "partial_rotary_factor"),
        (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(initializer_range=-0.1), "initializer_range"),
        (dict(attention_dropout=1.0), "attention_dropout"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(sandwich_norms=1), "sandwich_norms"),
        (dict(pad_token_id="5"), "pad_token_id"),
        (dict(eos_token_id=[0, 1.5]), "eos_token_id"),
        (dict(gmask_token_id=-1), "gmask_token_id"),
        (dict(rope_parameters={"rope_type": "longrope", "factor": 2.0}), "rope_type"),
        (dict(rope_parameters={"rope_type": "linear"}), "factor"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 0.5}), "factor"),
        (
            dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 0}),
            "original_max_position_embeddings",
        ),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        BilingualGlmConfig.from_preset("tiny", **overrides)
