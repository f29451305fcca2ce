"""Move checkpoints between BilingualGlm and transformers' native ``glm`` (GLM-4), both directions.

The two models share one architecture when block positions are zero, and this package kept the native
weight names on purpose, so the key map below is the identity — written out anyway, as the single table
both directions read and the test checks for full coverage.

CLI (safetensors in and out)::

    python -m bilingual_glm.conversion to-glm   SRC_DIR DST_DIR   # ours  -> native GlmForCausalLM
    python -m bilingual_glm.conversion from-glm SRC_DIR DST_DIR   # native -> ours
    python -m bilingual_glm.conversion from-chatglm SRC_DIR DST_DIR  # THUDM ChatGLM2/3, GLM-4 -> ours
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from typing import Any

import torch
from transformers import GlmConfig, GlmForCausalLM

from . import chatglm
from .configuration.configuration_bilingual_glm import BilingualGlmConfig
from .modeling.modeling_bilingual_glm import BilingualGlmForCausalLM

# ours (BilingualGlmForCausalLM)                   native (GlmForCausalLM)
KEY_MAP: tuple[tuple[str, str], ...] = (
    ("model.embed_tokens.weight", "model.embed_tokens.weight"),
    ("model.layers.{i}.input_layernorm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("model.layers.{i}.self_attn.q_proj.bias", "model.layers.{i}.self_attn.q_proj.bias"),
    ("model.layers.{i}.self_attn.k_proj.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("model.layers.{i}.self_attn.k_proj.bias", "model.layers.{i}.self_attn.k_proj.bias"),
    ("model.layers.{i}.self_attn.v_proj.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("model.layers.{i}.self_attn.v_proj.bias", "model.layers.{i}.self_attn.v_proj.bias"),
    ("model.layers.{i}.self_attn.o_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("model.layers.{i}.mlp.gate_up_proj.weight", "model.layers.{i}.mlp.gate_up_proj.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("model.norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
)

# Config fields that mean the same thing on both sides.
_SHARED_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "attention_dropout",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "tie_word_embeddings",
    "pad_token_id",
    "eos_token_id",
    "bos_token_id",
    "attention_bias",
)
_GLM_TOKEN_FIELDS = ("mask_token_id", "smask_token_id", "gmask_token_id", "sop_token_id", "eop_token_id")


def _compile(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def _rename(state_dict: Mapping[str, torch.Tensor], direction: int) -> dict[str, torch.Tensor]:
    """Rename every key through KEY_MAP (direction 0: ours→native, 1: native→ours); unknown keys fail."""
    patterns = [(_compile(pair[direction]), pair[1 - direction]) for pair in KEY_MAP]
    renamed = {}
    for key, tensor in state_dict.items():
        for pattern, target in patterns:
            match = pattern.match(key)
            if match:
                renamed[target.replace("{i}", match.groupdict().get("i") or "")] = tensor
                break
        else:
            raise ValueError(f"state dict key {key!r} has no entry in the conversion key map")
    return renamed


def glm_config_from_ours(config: BilingualGlmConfig) -> GlmConfig:
    """Native GlmConfig with the same geometry; GLM special-token ids ride along as extra fields."""
    fields = {name: getattr(config, name) for name in _SHARED_CONFIG_FIELDS}
    fields["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": config.rope_theta,
        "partial_rotary_factor": config.partial_rotary_factor,
    }
    extras = {name: getattr(config, name) for name in _GLM_TOKEN_FIELDS}
    return GlmConfig(**fields, **extras)


def ours_config_from_glm(config: GlmConfig) -> BilingualGlmConfig:
    """Our config from a native one (rope theta and partial factor from ``rope_parameters``)."""
    fields = {name: getattr(config, name) for name in _SHARED_CONFIG_FIELDS}
    rope = dict(getattr(config, "rope_parameters", None) or {})
    fields["rope_theta"] = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    fields["partial_rotary_factor"] = rope.get(
        "partial_rotary_factor", getattr(config, "partial_rotary_factor", 0.5)
    )
    for name in _GLM_TOKEN_FIELDS:  # keep ids a round trip carried; native configs have none
        fields[name] = getattr(config, name, None)
    return BilingualGlmConfig(**fields)


def _persistent_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters only (rotary tables are recomputed), each tied weight once under its own name."""
    return {name: tensor for name, tensor in model.state_dict().items() if "rotary_emb" not in name}


def to_transformers_glm(model: BilingualGlmForCausalLM) -> GlmForCausalLM:
    """Native ``GlmForCausalLM`` with identical weights and logits (for block positions 0, no prefix)."""
    native = GlmForCausalLM(glm_config_from_ours(model.config)).to(model.dtype)
    native.load_state_dict(_rename(_persistent_state(model), 0), strict=True)
    return native.eval()


def from_transformers_glm(model: GlmForCausalLM) -> BilingualGlmForCausalLM:
    """BilingualGlm with the native model's weights: gains blank infilling, prefix attention, 2D RoPE."""
    ours = BilingualGlmForCausalLM(ours_config_from_glm(model.config)).to(model.dtype)
    ours.load_state_dict(_rename(_persistent_state(model), 1), strict=True)
    return ours.eval()


def _convert_folder(src: str, dst: str, direction: str) -> None:
    load = BilingualGlmForCausalLM if direction == "to-glm" else GlmForCausalLM
    convert: Any = to_transformers_glm if direction == "to-glm" else from_transformers_glm
    model = load.from_pretrained(src, dtype="auto")
    convert(model).save_pretrained(dst)
    print(f"{direction}: {src} -> {dst}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bilingual_glm.conversion", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "direction",
        choices=["to-glm", "from-glm", "from-chatglm"],
        help="to-glm: ours→native; from-glm: back; from-chatglm: THUDM format→ours (see bilingual_glm.chatglm)",
    )
    parser.add_argument("src_dir", help="folder with config.json and *.safetensors")
    parser.add_argument("dst_dir", help="output folder (created)")
    chatglm.add_cli_arguments(parser)
    args = parser.parse_args(argv)
    if args.direction == "from-chatglm":
        chatglm.run_cli(args)
        return 0
    _convert_folder(args.src_dir, args.dst_dir, args.direction)
    return 0


if __name__ == "__main__":
    sys.exit(main())
