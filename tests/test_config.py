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
        (dict(pad_token_id=5000), "pad_token_id"),
        (dict(eos_token_id=[0, 4096]), "eos_token_id"),
        (dict(gmask_token_id=-1), "gmask_token_id"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}), "rope_type"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        BilingualGlmConfig.from_preset("tiny", **overrides)
