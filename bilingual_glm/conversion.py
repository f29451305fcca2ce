"""Move checkpoints between BilingualGlm and transformers' native ``glm`` and ``glm4``, both directions.

- ``glm`` (``GlmForCausalLM``: GLM-4-9B in HF format) is our block with ``sandwich_norms=False``.
- ``glm4`` (``Glm4ForCausalLM``: GLM-4-0414, GLM-Z1) is our block with ``sandwich_norms=True``: the ``glm``
  block plus ``post_self_attn_layernorm`` / ``post_mlp_layernorm`` on each sublayer's output.

This package kept the native weight names on purpose, so each key map below is the identity — written out
anyway, as the single table both directions read and the tests check for full coverage. A conversion
whose target cannot hold every source weight (sandwich norms into ``glm``, or a ``glm4`` folder read by
``from-glm``) is refused with a ``ValueError`` naming the weights that would be dropped; one whose source
lacks weights the target needs is refused naming those.

CLI (safetensors or ``.bin`` in, sharded safetensors out, streamed tensor by tensor with
``bilingual_glm.chatglm``'s reader and shard writer; the destination appears only when complete)::

    python -m bilingual_glm.conversion to-glm    SRC_DIR DST_DIR   # ours -> native GlmForCausalLM
    python -m bilingual_glm.conversion from-glm  SRC_DIR DST_DIR   # native glm -> ours
    python -m bilingual_glm.conversion to-glm4   SRC_DIR DST_DIR   # ours (sandwich_norms) -> Glm4ForCausalLM
    python -m bilingual_glm.conversion from-glm4 SRC_DIR DST_DIR   # native glm4 (GLM-4-0414) -> ours
    python -m bilingual_glm.conversion from-chatglm SRC_DIR DST_DIR  # THUDM ChatGLM2/3, GLM-4 -> ours
        [--dtype bfloat16] [--max-shard-size 2GB]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    Glm4Config,
    Glm4ForCausalLM,
    GlmConfig,
    GlmForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from . import chatglm, io
from .configuration.configuration_bilingual_glm import GLM_TOKEN_FIELDS, BilingualGlmConfig
from .modeling.modeling_bilingual_glm import AUTO_MAP, BilingualGlmForCausalLM, write_remote_code

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

# ours with sandwich_norms=True                     native (Glm4ForCausalLM): the glm rows plus two norms
GLM4_KEY_MAP: tuple[tuple[str, str], ...] = (
    *KEY_MAP,
    ("model.layers.{i}.post_self_attn_layernorm.weight", "model.layers.{i}.post_self_attn_layernorm.weight"),
    ("model.layers.{i}.post_mlp_layernorm.weight", "model.layers.{i}.post_mlp_layernorm.weight"),
)  # fmt: skip

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
_EMBEDDING, _LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


@dataclass(frozen=True)
class NativeFormat:
    """One transformers-native architecture our model converts to and from exactly."""

    name: str  # model_type, and the CLI suffix: to-<name> / from-<name>
    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    key_map: tuple[tuple[str, str], ...]
    sandwich_norms: bool  # the value of our config field this architecture corresponds to


GLM = NativeFormat("glm", GlmConfig, GlmForCausalLM, KEY_MAP, sandwich_norms=False)
GLM4 = NativeFormat("glm4", Glm4Config, Glm4ForCausalLM, GLM4_KEY_MAP, sandwich_norms=True)
NATIVE_FORMATS = {native.name: native for native in (GLM, GLM4)}


# ------------------------------------------------------------------------------------------ names
def _rename_keys(
    keys: Iterable[str], key_map: tuple[tuple[str, str], ...], to_native: bool
) -> tuple[dict[str, str], list[str]]:
    """``(source key → target key, source keys the map has no row for)`` through one key map."""
    patterns = chatglm.compile_key_map(key_map, reverse=not to_native)
    renamed, unmapped = {}, []
    for key in keys:
        try:
            renamed[key] = chatglm.map_key(key, patterns)
        except KeyError:
            unmapped.append(key)
    return renamed, unmapped


def _shown(names: list[str], limit: int = 6) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _hint(model_type: str | None, sandwich_norms: bool) -> str:
    """The direction that does fit a source, for the error message."""
    if model_type == BilingualGlmConfig.model_type:
        return "to-glm4 / to_transformers_glm4" if sandwich_norms else "to-glm / to_transformers_glm"
    fits = {"glm": "from-glm / from_transformers_glm", "glm4": "from-glm4 / from_transformers_glm4",
            "chatglm": "from-chatglm"}  # fmt: skip
    return fits.get(model_type or "", "")


def _check_representable(
    unmapped: list[str], missing: list[str], target: str, model_type: str | None, sandwich_norms: bool
) -> None:
    """Refuse a conversion that would drop source weights, or that lacks weights the target needs."""
    problems = []
    if unmapped:
        problems.append(f"{target} has no place for {len(unmapped)} source weights, they would be dropped: ")
        problems[-1] += _shown(unmapped)
    if missing:
        problems.append(f"the source lacks {len(missing)} weights {target} needs: {_shown(missing)}")
    if problems:
        hint = _hint(model_type, sandwich_norms)
        if hint:
            problems.append(f"a {model_type!r} model with these weights converts with {hint}")
        raise ValueError("; ".join(problems))


# ----------------------------------------------------------------------------------------- config
def glm_config_from_ours(
    config: BilingualGlmConfig, config_class: type[PretrainedConfig] = GlmConfig
) -> PretrainedConfig:
    """Native ``GlmConfig`` (or ``Glm4Config``) with the same geometry; GLM token ids ride along as extras."""
    fields = {name: getattr(config, name) for name in _SHARED_CONFIG_FIELDS}
    fields["rope_parameters"] = dict(config.rope_parameters)  # type, theta, factor...: native's own keys
    extras = {name: getattr(config, name) for name in GLM_TOKEN_FIELDS}
    native = config_class(**fields, **extras)
    native.eos_token_id = config.eos_token_id  # Glm4Config replaces None by GLM-4-0414's own ids
    return native


def ours_config_from_glm(config: PretrainedConfig, sandwich_norms: bool = False) -> BilingualGlmConfig:
    """Our config from a native ``glm`` (or, with ``sandwich_norms``, ``glm4``) one."""
    fields = {name: getattr(config, name) for name in _SHARED_CONFIG_FIELDS}
    rope = dict(getattr(config, "rope_parameters", None) or {})  # scaling type and factor ride along
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope.setdefault("partial_rotary_factor", getattr(config, "partial_rotary_factor", 0.5))
    fields["rope_parameters"] = rope
    for name in GLM_TOKEN_FIELDS:  # keep ids a round trip carried; native configs have none
        fields[name] = getattr(config, name, None)
    return BilingualGlmConfig(**fields, sandwich_norms=sandwich_norms)


# -------------------------------------------------------------------------------------- in memory
def _persistent_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters only (rotary tables are recomputed), each tied weight once under its own name."""
    return {name: tensor for name, tensor in model.state_dict().items() if "rotary_emb" not in name}


def _convert_model(model: PreTrainedModel, native: NativeFormat, to_native: bool) -> PreTrainedModel:
    state = _persistent_state(model)
    renamed, unmapped = _rename_keys(state, native.key_map, to_native)
    target_name = native.model_class.__name__ if to_native else BilingualGlmForCausalLM.__name__
    sandwich = getattr(model.config, "sandwich_norms", native.sandwich_norms)
    _check_representable(unmapped, [], target_name, model.config.model_type, sandwich)
    if to_native:
        target = native.model_class(glm_config_from_ours(model.config, native.config_class))
    else:
        target = BilingualGlmForCausalLM(ours_config_from_glm(model.config, native.sandwich_norms))
    missing = sorted(set(_persistent_state(target)) - set(renamed.values()))
    _check_representable([], missing, target_name, model.config.model_type, sandwich)
    target = target.to(model.dtype)
    target.load_state_dict({renamed[key]: tensor for key, tensor in state.items()}, strict=True)
    return target.eval()


def to_transformers_glm(model: BilingualGlmForCausalLM) -> GlmForCausalLM:
    """Native ``GlmForCausalLM`` with identical weights and logits (for block positions 0, no prefix)."""
    return _convert_model(model, GLM, to_native=True)


def from_transformers_glm(model: GlmForCausalLM) -> BilingualGlmForCausalLM:
    """BilingualGlm with the native model's weights: gains blank infilling, prefix attention, 2D RoPE."""
    return _convert_model(model, GLM, to_native=False)


def to_transformers_glm4(model: BilingualGlmForCausalLM) -> Glm4ForCausalLM:
    """Native ``Glm4ForCausalLM`` (GLM-4-0414) from a ``sandwich_norms`` model; identical logits."""
    return _convert_model(model, GLM4, to_native=True)


def from_transformers_glm4(model: Glm4ForCausalLM) -> BilingualGlmForCausalLM:
    """BilingualGlm (``sandwich_norms=True``) with a GLM-4-0414 model's weights."""
    return _convert_model(model, GLM4, to_native=False)


# ---------------------------------------------------------------------------------------- folders
def convert_folder(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    direction: str,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "2GB",
) -> PretrainedConfig:
    """Convert a saved folder ``to-glm``/``from-glm``/``to-glm4``/``from-glm4``, streaming.

    Every key, shape and dtype is checked against the target architecture (built on the meta device)
    before anything is written; weights are then read one at a time and written into shards of at most
    ``max_shard_size``, cast to ``dtype`` if given. Tied models carry no ``lm_head.weight``. Returns the
    written config.
    """
    to_native, _, name = direction.partition("-")
    if to_native not in ("to", "from") or name not in NATIVE_FORMATS:
        raise ValueError(f"direction must be to-/from- one of {sorted(NATIVE_FORMATS)}, got {direction!r}")
    native, to_native = NATIVE_FORMATS[name], to_native == "to"
    src, dst = Path(src_dir), Path(dst_dir)
    io.check_destination(dst)
    out_dtype, max_bytes = chatglm._resolve_dtype(dtype), chatglm.parse_size(max_shard_size)
    files = chatglm.find_weight_files(src)
    config, target_class, renamed, source_dtype = _plan_folder(src, files, native, to_native, direction)

    with io.atomic_folder(dst) as tmp:
        writer = io.ShardWriter(tmp, max_bytes)
        for path in files:
            with chatglm._open_weights(path) as weights:
                for key in weights.keys():
                    if key in renamed:
                        tensor = weights.get(key)
                        writer.add(renamed[key], tensor if out_dtype is None else tensor.to(out_dtype))
        writer.finish()
        config.dtype = out_dtype or source_dtype
        config.architectures = [target_class.__name__]
        if not to_native:
            config.auto_map = dict(AUTO_MAP)
            write_remote_code(tmp)
        config.save_pretrained(tmp)
        if (src / "generation_config.json").is_file():
            shutil.copy2(src / "generation_config.json", tmp / "generation_config.json")
        else:
            GenerationConfig.from_model_config(config).save_pretrained(tmp)
    return config


def _plan_folder(
    src: Path, files: list[Path], native: NativeFormat, to_native: bool, direction: str
) -> tuple[PretrainedConfig, type[PreTrainedModel], dict[str, str], torch.dtype]:
    """Target config and class, source key → target key, source dtype; refuse anything not exact."""
    source = chatglm._read_json(src / "config.json")
    if not source:
        raise ValueError(f"{src} has no config.json")
    model_type, sandwich = source.get("model_type"), bool(source.get("sandwich_norms", False))
    want_type = BilingualGlmConfig.model_type if to_native else native.name
    target_class = native.model_class if to_native else BilingualGlmForCausalLM
    infos = _weight_infos(files)
    renamed, unmapped = _rename_keys(infos, native.key_map, to_native)
    unmapped = [key for key in unmapped if not key.endswith("rotary_emb.inv_freq")]  # recomputed buffer
    if model_type != want_type:
        _check_representable(unmapped, [], target_class.__name__, model_type, sandwich)
        hint = _hint(model_type, sandwich)
        raise ValueError(
            f"{src} holds a {model_type!r} checkpoint, {direction} reads {want_type!r}"
            + (f": use {hint}" if hint else "")
        )
    if to_native:
        config = glm_config_from_ours(BilingualGlmConfig.from_pretrained(src), native.config_class)
    else:
        config = ours_config_from_glm(native.config_class.from_pretrained(src), native.sandwich_norms)
    with torch.device("meta"):
        expected = _persistent_state(target_class(config))
    if config.tie_word_embeddings:
        expected.pop(_LM_HEAD, None)
        renamed.pop(_LM_HEAD, None)  # a tied source saved it anyway: the embedding is what counts
    missing = sorted(set(expected) - set(renamed.values()))
    _check_representable(unmapped, missing, target_class.__name__, model_type, sandwich)
    for key, target in renamed.items():
        shape, dtype = infos[key]
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"weight {key!r} has dtype {dtype}: only float weights convert")
        if shape != tuple(expected[target].shape):
            raise ValueError(
                f"weight {key!r} has shape {shape}, the config implies {tuple(expected[target].shape)}"
            )
    return config, target_class, renamed, infos[_EMBEDDING][1]


def _weight_infos(files: list[Path]) -> dict[str, tuple[tuple[int, ...], torch.dtype | str]]:
    """Key → (shape, dtype) of every tensor in the checkpoint, read from the headers only."""
    infos = {}
    for path in files:
        with chatglm._open_weights(path) as weights:
            infos.update({key: weights.info(key) for key in weights.keys()})
    return infos


# --------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bilingual_glm.conversion", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "direction",
        choices=["to-glm", "from-glm", "to-glm4", "from-glm4", "from-chatglm"],
        help="to-glm/to-glm4: ours→native glm/glm4; from-glm/from-glm4: back; "
        "from-chatglm: THUDM format→ours (see bilingual_glm.chatglm)",
    )
    parser.add_argument("src_dir", help="folder with config.json and *.safetensors")
    parser.add_argument("dst_dir", help="output folder (created)")
    chatglm.add_cli_arguments(parser)
    args = parser.parse_args(argv)
    if args.direction == "from-chatglm":
        chatglm.run_cli(args)
        return 0
    config = convert_folder(
        args.src_dir, args.dst_dir, args.direction, dtype=args.dtype, max_shard_size=args.max_shard_size
    )
    layers = f"{config.num_hidden_layers} layers"
    print(f"{args.direction}: {args.src_dir} -> {args.dst_dir} ({layers}, dtype {config.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
