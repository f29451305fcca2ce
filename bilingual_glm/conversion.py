"""Move checkpoints between BilingualGlm and transformers' native ``glm``, ``glm4`` and ``glm4_moe``, both ways.

- ``glm`` (``GlmForCausalLM``: GLM-4-9B in HF format) is our block with ``sandwich_norms=False``.
- ``glm4`` (``Glm4ForCausalLM``: GLM-4-0414, GLM-Z1) is our block with ``sandwich_norms=True``: the ``glm``
  block plus ``post_self_attn_layernorm`` / ``post_mlp_layernorm`` on each sublayer's output.
- ``glm4_moe`` (``Glm4MoeForCausalLM``: GLM-4.5, GLM-4.5-Air, 4.6, 4.7) is our Mixture-of-Experts model
  (``n_routed_experts > 0``) with ``rotary_interleaved=False``. Its table, ``GLM4_MOE_KEY_MAP``, is not the
  identity: see the section below.

This package kept the native weight names on purpose, so the ``glm``/``glm4`` key maps are the identity —
written out anyway, as the single table both directions read and the tests check for full coverage.
``GLM4_MOE_KEY_MAP`` differs in two row kinds, marked by placeholders in its native column: our fused
``gate_up_proj`` is native's ``gate_proj`` + ``up_proj`` (dense layers, shared experts), and our ``[E, ...]``
routed-expert tensors are the released files' one tensor per expert. The multi-token-prediction layer of
GLM-4.5 checkpoints (``model.layers.{num_hidden_layers}``) is skipped with a warning counting its tensors.

A conversion whose target cannot hold every source weight (sandwich norms into ``glm``, or a ``glm4`` folder read by
``from-glm``) is refused with a ``ValueError`` naming the weights that would be dropped; one whose source
lacks weights the target needs is refused naming those.

CLI (safetensors or ``.bin`` in, sharded safetensors out, streamed tensor by tensor with
``bilingual_glm.chatglm``'s reader and shard writer; the destination appears only when complete)::

    python -m bilingual_glm.conversion to-glm    SRC_DIR DST_DIR   # ours -> native GlmForCausalLM
    python -m bilingual_glm.conversion from-glm  SRC_DIR DST_DIR   # native glm -> ours
    python -m bilingual_glm.conversion to-glm4   SRC_DIR DST_DIR   # ours (sandwich_norms) -> Glm4ForCausalLM
    python -m bilingual_glm.conversion from-glm4 SRC_DIR DST_DIR   # native glm4 (GLM-4-0414) -> ours
    python -m bilingual_glm.conversion to-glm4-moe   SRC_DIR DST_DIR  # ours (MoE) -> released GLM-4.5 layout
    python -m bilingual_glm.conversion from-glm4-moe SRC_DIR DST_DIR  # GLM-4.5 / -Air (either layout) -> ours
    python -m bilingual_glm.conversion from-chatglm SRC_DIR DST_DIR  # THUDM ChatGLM2/3, GLM-4 -> ours
        [--dtype bfloat16] [--max-shard-size 2GB]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    Glm4Config,
    Glm4ForCausalLM,
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    GlmConfig,
    GlmForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from . import chatglm, io
from .configuration.configuration_bilingual_glm import GLM_TOKEN_FIELDS, MOE_FIELDS, BilingualGlmConfig
from .modeling.modeling_bilingual_glm import AUTO_MAP, BilingualGlmForCausalLM, write_remote_code

logger = logging.getLogger(__name__)

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
# Our training-only router options (glm4_moe has no such fields): carried as extras through a round trip.
_ROUTER_TRAINING_FIELDS = ("router_bias_update_rate", "router_aux_loss_coef")


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


def _hint(model_type: str | None, sandwich_norms: bool, moe: bool = False) -> str:
    """The direction that does fit a source, for the error message (``moe``: ours with routed experts)."""
    if model_type == BilingualGlmConfig.model_type:
        if moe:
            return "to-glm4-moe / to_transformers_glm4_moe"
        return "to-glm4 / to_transformers_glm4" if sandwich_norms else "to-glm / to_transformers_glm"
    fits = {"glm": "from-glm / from_transformers_glm", "glm4": "from-glm4 / from_transformers_glm4",
            "glm4_moe": "from-glm4-moe / from_transformers_glm4_moe", "chatglm": "from-chatglm"}  # fmt: skip
    return fits.get(model_type or "", "")


def _check_representable(
    unmapped: list[str],
    missing: list[str],
    target: str,
    model_type: str | None,
    sandwich_norms: bool,
    moe: bool = False,
) -> None:
    """Refuse a conversion that would drop source weights, or that lacks weights the target needs."""
    problems = []
    if unmapped:
        problems.append(f"{target} has no place for {len(unmapped)} source weights, they would be dropped: ")
        problems[-1] += _shown(unmapped)
    if missing:
        problems.append(f"the source lacks {len(missing)} weights {target} needs: {_shown(missing)}")
    if problems:
        hint = _hint(model_type, sandwich_norms, moe)
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
    moe = bool(getattr(model.config, "n_routed_experts", 0))
    _check_representable(unmapped, [], target_name, model.config.model_type, sandwich, moe)
    if to_native:
        target = native.model_class(glm_config_from_ours(model.config, native.config_class))
    else:
        target = BilingualGlmForCausalLM(ours_config_from_glm(model.config, native.sandwich_norms))
    missing = sorted(set(_persistent_state(target)) - set(renamed.values()))
    _check_representable([], missing, target_name, model.config.model_type, sandwich, moe)
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
    """Convert a saved folder ``to-``/``from-`` ``glm``, ``glm4`` or ``glm4-moe``, streaming.

    Every key, shape and dtype is checked against the target architecture (built on the meta device)
    before anything is written; weights are then read one at a time and written into shards of at most
    ``max_shard_size``, cast to ``dtype`` if given. Tied models carry no ``lm_head.weight``. Returns the
    written config. ``glm4-moe`` goes to ``convert_glm4_moe_folder`` (experts change layout on the way).
    """
    to_native, _, name = direction.partition("-")
    if to_native in ("to", "from") and name == "glm4-moe":
        return convert_glm4_moe_folder(src_dir, dst_dir, to_native == "to", dtype, max_shard_size)
    if to_native not in ("to", "from") or name not in NATIVE_FORMATS:
        raise ValueError(
            f"direction must be to-/from- one of {sorted([*NATIVE_FORMATS, 'glm4-moe'])}, got {direction!r}"
        )
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
        _finish_folder(src, tmp, config, target_class, to_native, out_dtype or source_dtype)
    return config


def _plan_folder(
    src: Path, files: list[Path], native: NativeFormat, to_native: bool, direction: str
) -> tuple[PretrainedConfig, type[PreTrainedModel], dict[str, str], torch.dtype]:
    """Target config and class, source key → target key, source dtype; refuse anything not exact."""
    source = chatglm._read_json(src / "config.json")
    if not source:
        raise ValueError(f"{src} has no config.json")
    model_type, sandwich = source.get("model_type"), bool(source.get("sandwich_norms", False))
    moe = bool(source.get("n_routed_experts"))
    want_type = BilingualGlmConfig.model_type if to_native else native.name
    target_class = native.model_class if to_native else BilingualGlmForCausalLM
    infos = _weight_infos(files)
    renamed, unmapped = _rename_keys(infos, native.key_map, to_native)
    unmapped = [key for key in unmapped if not key.endswith("rotary_emb.inv_freq")]  # recomputed buffer
    if model_type != want_type:
        _check_representable(unmapped, [], target_class.__name__, model_type, sandwich, moe)
        hint = _hint(model_type, sandwich, moe)
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
    _check_representable(unmapped, missing, target_class.__name__, model_type, sandwich, moe)
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


# ------------------------------------------------------------------------------------------ glm4_moe
# GLM4_MOE_KEY_MAP is the one table both glm4_moe directions read. Its native column names tensors as the
# released GLM-4.5 files store them; two placeholders there say how several native tensors make one of ours:
#   EXPERT   ("{j}")       one native tensor per routed expert j: ours stacks them on a new first dim [E, ...]
#                          (transformers 5's fused layout, which it builds at load and which
#                          ``save_pretrained(save_original_format=False)`` writes: those files carry ours' name)
#   GATE_UP  ("{gate|up}") two native tensors, gate then up: ours concatenates them by rows, gate first
#                          (after the expert dim when both appear: ours[j] = cat(gate_j, up_j))
# Every other row is a rename (here always to the same name). Reading a row right to left splits instead.
EXPERT, GATE_UP = "{j}", "{gate|up}"
_GATE_UP_PARTS = ("gate", "up")
_LAYER, _MLP = "model.layers.{i}.", "model.layers.{i}.mlp."

# ours (BilingualGlm, n_routed_experts > 0)              native glm4_moe, released layout
GLM4_MOE_KEY_MAP: tuple[tuple[str, str], ...] = (
    *((ours, native) for ours, native in KEY_MAP if ".mlp." not in ours),  # embedding, attention, norms, head
    (_LAYER + "self_attn.q_norm.weight", _LAYER + "self_attn.q_norm.weight"),  # use_qk_norm
    (_LAYER + "self_attn.k_norm.weight", _LAYER + "self_attn.k_norm.weight"),
    # dense layers (< first_k_dense_replace)
    (_MLP + "gate_up_proj.weight", _MLP + GATE_UP + "_proj.weight"),
    (_MLP + "down_proj.weight", _MLP + "down_proj.weight"),
    # MoE layers: router (+ its fp32 correction bias), shared experts, routed experts
    (_MLP + "gate.weight", _MLP + "gate.weight"),
    (_MLP + "gate.e_score_correction_bias", _MLP + "gate.e_score_correction_bias"),
    (_MLP + "shared_experts.gate_up_proj.weight", _MLP + "shared_experts." + GATE_UP + "_proj.weight"),
    (_MLP + "shared_experts.down_proj.weight", _MLP + "shared_experts.down_proj.weight"),
    (_MLP + "experts.gate_up_proj", _MLP + "experts." + EXPERT + "." + GATE_UP + "_proj.weight"),
    (_MLP + "experts.down_proj", _MLP + "experts." + EXPERT + ".down_proj.weight"),
)  # fmt: skip
_TO_GLM4_MOE = chatglm.compile_key_map(GLM4_MOE_KEY_MAP)
_CORRECTION_BIAS = "e_score_correction_bias"  # fp32 on both sides, never cast: it decides which experts run


def _native_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for placeholder, alternatives in (("{i}", r"\d+"), (EXPERT, r"\d+"), (GATE_UP, "gate|up")):
        pattern = pattern.replace(re.escape(placeholder), f"(?:{alternatives})")
    return re.compile(f"^{pattern}$")


_GLM4_MOE_NATIVE_NAMES = [_native_regex(native) for _, native in GLM4_MOE_KEY_MAP]
Index = tuple[int | slice, ...]


@dataclass(frozen=True)
class TensorGroup:
    """One of our tensors and the native tensors it is made of: one ``GLM4_MOE_KEY_MAP`` row at one layer.

    ``pieces`` are ``(native key, index)``, the piece being ``ours[index]`` (index ``()``: the whole tensor).
    The converters, in memory and streaming, and ``plan_folder_memory`` all walk these groups.
    """

    ours: str
    shape: tuple[int, ...]
    pieces: tuple[tuple[str, Index], ...]


def glm4_moe_groups(ours_shapes: dict[str, tuple[int, ...]], fused: Callable[[str], bool]) -> list[TensorGroup]:
    """Groups for each of our tensors (``KeyError`` naming a key the table has no row for).

    ``fused(key)``: whether the native side holds that EXPERT row fused, under our name (transformers 5's
    layout in memory, or a folder saved so); otherwise it is per expert, as released."""
    groups = []
    for key, shape in ours_shapes.items():
        native = chatglm.map_key(key, _TO_GLM4_MOE)
        if EXPERT in native and fused(key):
            groups.append(TensorGroup(key, shape, ((key, ()),)))
            continue
        leads: list[Index] = [(j,) for j in range(shape[0])] if EXPERT in native else [()]
        pieces: list[tuple[str, Index]] = []
        for lead in leads:
            name = native.replace(EXPERT, str(lead[0])) if lead else native
            if GATE_UP not in name:
                pieces.append((name, lead))
                continue
            rows = shape[len(lead)] // 2
            for part, start in zip(_GATE_UP_PARTS, (0, rows), strict=True):
                pieces.append((name.replace(GATE_UP, part), (*lead, slice(start, start + rows))))
        groups.append(TensorGroup(key, shape, tuple(pieces)))
    return groups


def _ours_shapes(config: BilingualGlmConfig) -> dict[str, tuple[int, ...]]:
    """Every persistent tensor of our model for ``config`` (built on the meta device), a tied head left out."""
    with torch.device("meta"):
        state = _persistent_state(BilingualGlmForCausalLM(config))
    if config.tie_word_embeddings:
        state.pop(_LM_HEAD, None)
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


def _piece_shape(group: TensorGroup, index: Index) -> tuple[int, ...]:
    return tuple(torch.empty(group.shape, device="meta")[index].shape)


def glm4_moe_config_from_ours(config: BilingualGlmConfig) -> Glm4MoeConfig:
    """``Glm4MoeConfig`` with our geometry; ``ValueError`` naming the field for anything glm4_moe cannot run.

    GLM token ids and our training-only router options ride along as extra fields, so a round trip keeps them.
    ``num_mtp_layers`` is 0: we have no multi-token-prediction layer to write."""
    problems = {
        "n_routed_experts": (not config.is_moe, "n_routed_experts=0 is a dense model: convert it with to-glm / "
                             "to_transformers_glm (to-glm4 / to_transformers_glm4 with sandwich_norms)"),
        "rotary_interleaved": (config.rotary_interleaved, "rotary_interleaved=True rotates adjacent pairs; "
                               "glm4_moe rotates half-split (NeoX) pairs, so q/k would be wrong"),
        "sandwich_norms": (config.sandwich_norms, "sandwich_norms=True: glm4_moe has no post-sublayer norms"),
    }  # fmt: skip
    for name, (refused, why) in problems.items():
        if refused:
            raise ValueError(f"{name}: glm4_moe cannot represent this model: {why}")
    fields = {name: getattr(config, name) for name in (*_SHARED_CONFIG_FIELDS, *MOE_FIELDS)}
    fields["rope_parameters"] = dict(config.rope_parameters)
    extras = {name: getattr(config, name) for name in (*GLM_TOKEN_FIELDS, *_ROUTER_TRAINING_FIELDS)}
    return Glm4MoeConfig(**fields, **extras, num_mtp_layers=0)


def ours_config_from_glm4_moe(config: PretrainedConfig) -> BilingualGlmConfig:
    """Our MoE config (``rotary_interleaved=False``) from a native ``Glm4MoeConfig``; MTP layers are not kept."""
    fields = {name: getattr(config, name) for name in (*_SHARED_CONFIG_FIELDS, *MOE_FIELDS)}
    fields["rope_parameters"] = dict(config.rope_parameters)
    for name in GLM_TOKEN_FIELDS:  # ids a round trip carried; a native config has none (not our tokenizer's)
        fields[name] = getattr(config, name, None)
    for name in _ROUTER_TRAINING_FIELDS:  # likewise, else our defaults (off)
        if getattr(config, name, None) is not None:
            fields[name] = getattr(config, name)
    return BilingualGlmConfig(**fields, rotary_interleaved=False, sandwich_norms=False)


def to_transformers_glm4_moe(model: BilingualGlmForCausalLM) -> Glm4MoeForCausalLM:
    """Native ``Glm4MoeForCausalLM`` with identical weights, logits and expert choices (1D positions, no prefix)."""
    config = glm4_moe_config_from_ours(model.config)  # refusals name the field
    state = _persistent_state(model)
    unmapped = [key for key in state if not any(pattern.match(key) for pattern, _ in _TO_GLM4_MOE)]
    target = Glm4MoeForCausalLM.__name__
    _check_representable(unmapped, [], target, model.config.model_type, False, True)
    groups = glm4_moe_groups({key: tuple(t.shape) for key, t in state.items()}, fused=lambda key: True)
    native_state = {key: state[g.ours][index].clone() for g in groups for key, index in g.pieces}
    native = Glm4MoeForCausalLM(config).to(model.dtype)
    for key, tensor in _persistent_state(native).items():  # n_shared_experts=0: native keeps 0-row weights
        if key not in native_state and tensor.numel() == 0:
            native_state[key] = tensor
    missing = sorted(set(_persistent_state(native)) - set(native_state))
    _check_representable([], missing, target, model.config.model_type, False, True)
    native.load_state_dict(native_state, strict=True)
    return native.eval()


def from_transformers_glm4_moe(model: Glm4MoeForCausalLM) -> BilingualGlmForCausalLM:
    """BilingualGlm (MoE, ``rotary_interleaved=False``) with a GLM-4.5-style model's weights."""
    config = ours_config_from_glm4_moe(model.config)
    state = _persistent_state(model)
    groups = glm4_moe_groups(_ours_shapes(config), fused=lambda key: key in state)
    used = {key for group in groups for key, _ in group.pieces}
    unmapped = [key for key, tensor in state.items() if key not in used and tensor.numel()]
    if config.tie_word_embeddings:
        unmapped = [key for key in unmapped if key != _LM_HEAD]
    missing = sorted(used - set(state))
    _check_representable(unmapped, missing, BilingualGlmForCausalLM.__name__, model.config.model_type, False)
    ours_state = {group.ours: _assemble(group, lambda key, index: state[key][index], None) for group in groups}
    if config.tie_word_embeddings:
        ours_state[_LM_HEAD] = ours_state[_EMBEDDING]
    ours = BilingualGlmForCausalLM(config).to(model.dtype)
    ours.load_state_dict(ours_state, strict=True)
    return ours.eval()


def _assemble(group: TensorGroup, read: Callable[[str, Index], torch.Tensor], dtype: torch.dtype | None) -> torch.Tensor:
    """Our tensor from its pieces, each read, copied into place (cast on the way) and dropped in turn."""
    (first, whole), *rest = group.pieces
    if not rest and whole == ():
        tensor = read(first, ())
        return tensor if dtype is None else tensor.to(dtype)
    out = None
    for key, index in group.pieces:
        piece = read(key, ())
        if out is None:
            out = torch.empty(group.shape, dtype=dtype or piece.dtype)
        out[index].copy_(piece)
        del piece
    return out


# ---------------------------------------------------------------------------------- glm4_moe folders
@dataclass(frozen=True)
class _MoeFolderPlan:
    """Everything ``convert_glm4_moe_folder`` does, checked before anything is written."""

    config: PretrainedConfig  # the target's
    groups: list[TensorGroup]
    infos: dict[str, tuple[Path, tuple[int, ...], torch.dtype]]  # source key -> (file, shape, dtype)
    skipped_mtp: list[str]  # source keys of the multi-token-prediction layers, reported and not converted
    source_dtype: torch.dtype


def convert_glm4_moe_folder(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    to_native: bool,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "2GB",
) -> PretrainedConfig:
    """``to-glm4-moe`` (ours → released per-expert layout) or ``from-glm4-moe`` (either native layout → ours).

    Streams one of our tensors at a time (``TensorGroup``): ``from`` gathers the E per-expert pieces of one
    layer's expert tensor into one buffer and hands it to the shard writer; ``to`` reads and writes one
    expert's slice at a time. ``plan_folder_memory`` gives the peak this holds. The multi-token-prediction
    layer (``model.layers.{num_hidden_layers}.*``) is skipped with a warning saying how many tensors.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    io.check_destination(dst)
    out_dtype, max_bytes = chatglm._resolve_dtype(dtype), chatglm.parse_size(max_shard_size)
    plan = _plan_glm4_moe_folder(src, to_native)
    if plan.skipped_mtp:
        logger.warning(
            "skipped %d multi-token-prediction (MTP) tensors of %s (neither Glm4MoeForCausalLM nor "
            "BilingualGlm runs them): %s", len(plan.skipped_mtp), src, _shown(plan.skipped_mtp, 3),
        )
    with io.atomic_folder(dst) as tmp, contextlib.ExitStack() as files:
        writer = io.ShardWriter(tmp, max_bytes)
        _write_groups(plan, _reader(files, plan.infos), writer, out_dtype, to_native)
        writer.finish()
        target_class = Glm4MoeForCausalLM if to_native else BilingualGlmForCausalLM
        _finish_folder(src, tmp, plan.config, target_class, to_native, out_dtype or plan.source_dtype)
    return plan.config


def _reader(files: contextlib.ExitStack, infos: dict) -> Callable[[str, Index], torch.Tensor]:
    """``read(key, index)`` → ``source[key][index]``, reading only that part (safetensors slices, ``.bin``
    memory-mapped); each file is opened once, on first use, and closed with ``files``."""
    handles: dict[Path, chatglm._WeightFile] = {}

    def read(key: str, index: Index) -> torch.Tensor:
        path = infos[key][0]
        if path not in handles:
            handles[path] = files.enter_context(chatglm._open_weights(path))
        weights = handles[path]
        if index == ():
            return weights.get(key)
        if isinstance(weights, chatglm._SafetensorsFile):
            return weights.handle.get_slice(key)[index]
        return weights.get(key)[index].clone()

    return read


def _write_groups(
    plan: _MoeFolderPlan, read: Callable, writer: io.ShardWriter, dtype: torch.dtype | None, to_native: bool
) -> None:
    """The streaming loop. ``_simulate_memory`` counts what each step holds: keep the two in step."""
    for group in plan.groups:
        source = plan.infos[group.ours if to_native else group.pieces[0][0]][2]
        cast = None if group.ours.endswith(_CORRECTION_BIAS) or dtype in (None, source) else dtype
        if to_native:
            for key, index in group.pieces:
                _make_room(writer, _nbytes(_piece_shape(group, index), cast or source))
                piece = read(group.ours, index)  # holds: one piece (+ its cast)
                writer.add(key, piece if cast is None else piece.to(cast))
                del piece
        else:
            _make_room(writer, _nbytes(group.shape, cast or source))
            tensor = _assemble(group, read, cast)  # holds: our tensor + one piece (a whole tensor: + its cast)
            writer.add(group.ours, tensor)
            del tensor


def _make_room(writer: io.ShardWriter, nbytes: int) -> None:
    """Flush the shard before building a tensor it cannot take. ``ShardWriter.add`` would flush at that same
    point (the shards come out the same), but only once the tensor is built, holding both at once."""
    if writer.buffer and writer.buffered + nbytes > writer.max_bytes:
        writer.flush()


def _finish_folder(
    src: Path, tmp: Path, config: PretrainedConfig, target_class: type, to_native: bool, dtype: torch.dtype
) -> None:
    """config.json (dtype, architectures; ours: auto_map + remote code) and generation_config.json."""
    config.dtype = dtype
    config.architectures = [target_class.__name__]
    if not to_native:
        config.auto_map = dict(AUTO_MAP)
        write_remote_code(tmp)
    config.save_pretrained(tmp)
    if (src / "generation_config.json").is_file():
        shutil.copy2(src / "generation_config.json", tmp / "generation_config.json")
    else:
        GenerationConfig.from_model_config(config).save_pretrained(tmp)


def _plan_glm4_moe_folder(src: Path, to_native: bool) -> _MoeFolderPlan:
    """Target config, tensor groups and the MTP keys skipped; refuse anything not exact, naming it."""
    direction = "to-glm4-moe" if to_native else "from-glm4-moe"
    source = chatglm._read_json(src / "config.json")
    if not source:
        raise ValueError(f"{src} has no config.json")
    model_type, sandwich = source.get("model_type"), bool(source.get("sandwich_norms", False))
    moe = bool(source.get("n_routed_experts"))
    want_type = BilingualGlmConfig.model_type if to_native else "glm4_moe"
    if model_type != want_type:
        hint = _hint(model_type, sandwich, moe)
        raise ValueError(
            f"{src} holds a {model_type!r} checkpoint, {direction} reads {want_type!r}"
            + (f": use {hint}" if hint else "")
        )
    if to_native:
        ours_config = BilingualGlmConfig.from_pretrained(src)
        target_config: PretrainedConfig = glm4_moe_config_from_ours(ours_config)  # refusals name the field
    else:
        native_config = Glm4MoeConfig.from_pretrained(src)
        ours_config = target_config = ours_config_from_glm4_moe(native_config)
    infos = _weight_infos_located(chatglm.find_weight_files(src))
    ours_shapes = _ours_shapes(ours_config)
    groups = glm4_moe_groups(ours_shapes, fused=lambda key: not to_native and key in infos)
    layers = ours_config.num_hidden_layers
    mtp_layers = range(layers, layers + (0 if to_native else native_config.num_mtp_layers))
    skipped_mtp = [key for key in infos if _layer_index(key) in mtp_layers]

    used = {group.ours for group in groups} if to_native else {k for g in groups for k, _ in g.pieces}
    missing = sorted(used - set(infos))
    ignored = {*skipped_mtp, *([_LM_HEAD] if ours_config.tie_word_embeddings else [])}
    unmapped = [
        key for key, (_, shape, _) in infos.items()
        if key not in used and key not in ignored and not key.endswith("rotary_emb.inv_freq")
        and not (0 in shape and any(p.match(key) for p in _GLM4_MOE_NATIVE_NAMES))  # n_shared_experts=0
    ]  # fmt: skip
    target = Glm4MoeForCausalLM.__name__ if to_native else BilingualGlmForCausalLM.__name__
    _check_representable(unmapped, missing, target, model_type, sandwich, moe)
    for group in groups:
        pieces = [(group.ours, ())] if to_native else group.pieces
        for key, index in pieces:
            _, shape, dtype = infos[key]
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"weight {key!r} has dtype {dtype}: only float weights convert")
            want = _piece_shape(group, index)
            if shape != want:
                raise ValueError(f"weight {key!r} has shape {shape}, the config implies {want}")
    return _MoeFolderPlan(target_config, groups, infos, skipped_mtp, infos[_EMBEDDING][2])


def _layer_index(key: str) -> int | None:
    match = re.match(r"model\.layers\.(\d+)\.", key)
    return int(match.group(1)) if match else None


def _weight_infos_located(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], torch.dtype]]:
    """Key → (file, shape, dtype) of every tensor in the checkpoint, from the headers only."""
    infos = {}
    for path in files:
        with chatglm._open_weights(path) as weights:
            infos.update({key: (path, *weights.info(key)) for key in weights.keys()})
    return infos


# ------------------------------------------------------------------------------------ memory plan
@dataclass(frozen=True)
class MemoryPlan:
    """Tensor bytes a streaming glm4_moe conversion holds at once, counted from shapes alone.

    ``peak_bytes`` = the shard writer's buffer + the tensor being assembled or written + the piece just read
    (+ its cast copy). The buffer is flushed before a tensor it cannot take is built, so this stays within
    ``max(max_shard_bytes, largest_tensor_bytes)`` + one piece (+ casts). Not counted: the source files'
    memory-mapped pages (page cache, dropped under pressure) and Python/torch overhead.
    """

    peak_bytes: int
    peak_tensor: str  # our tensor being converted at the peak
    max_shard_bytes: int
    largest_tensor_bytes: int  # the largest tensor the conversion writes or assembles
    largest_moe_layer_bytes: int  # every tensor of the largest MoE layer, for scale
    total_bytes: int  # everything written
    shard_bytes: tuple[int, ...]  # tensor bytes of each shard, as the writer cuts them


def plan_folder_memory(
    source: BilingualGlmConfig | str | os.PathLike,
    direction: str,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "2GB",
    source_dtype: torch.dtype = torch.bfloat16,
) -> MemoryPlan:
    """Peak resident tensor bytes of ``to-glm4-moe`` / ``from-glm4-moe``, without allocating any tensor.

    ``source``: a checkpoint folder (the converter's own plan: real keys, layout, dtypes) or our config
    (GLM-4.5-Air's with ``BilingualGlmConfig.from_preset("glm-4.5-air")``: shapes from the meta device, every
    source tensor ``source_dtype`` except the fp32 correction biases, native side in the released layout).
    """
    if direction not in ("to-glm4-moe", "from-glm4-moe"):
        raise ValueError(f"direction must be to-glm4-moe or from-glm4-moe, got {direction!r}")
    to_native = direction == "to-glm4-moe"
    out_dtype, max_bytes = chatglm._resolve_dtype(dtype), chatglm.parse_size(max_shard_size)
    if isinstance(source, BilingualGlmConfig):
        glm4_moe_config_from_ours(source)  # refuses what the converter would refuse
        groups = glm4_moe_groups(_ours_shapes(source), fused=lambda key: False)
        keys = [g.ours for g in groups] if to_native else [k for g in groups for k, _ in g.pieces]
        dtypes = {k: torch.float32 if k.endswith(_CORRECTION_BIAS) else source_dtype for k in keys}
    else:
        plan = _plan_glm4_moe_folder(Path(source), to_native)
        groups, dtypes = plan.groups, {key: info[2] for key, info in plan.infos.items()}
    return _simulate_memory(groups, dtypes, out_dtype, max_bytes, to_native)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _simulate_memory(
    groups: list[TensorGroup],
    dtypes: dict[str, torch.dtype],
    dtype: torch.dtype | None,
    max_bytes: int,
    to_native: bool,
) -> MemoryPlan:
    """Walk ``_write_groups``'s loop on shapes: what each step holds, and ``ShardWriter.add``'s flush rule."""
    buffered, shards, peak, peak_tensor, largest = 0, [], 0, "", 0
    layer_bytes: dict[int | None, int] = {}

    def step(held: int, written: int, name: str) -> None:
        """``_make_room``, then ``held`` alive next to the buffer, then ``written`` joins the buffer."""
        nonlocal buffered, peak, peak_tensor, largest
        if buffered and buffered + written > max_bytes:
            shards.append(buffered)
            buffered = 0
        if buffered + held > peak:
            peak, peak_tensor = buffered + held, name
        largest = max(largest, written)
        buffered += written

    for group in groups:
        source = dtypes[group.ours] if to_native else dtypes[group.pieces[0][0]]
        cast = None if group.ours.endswith(_CORRECTION_BIAS) or dtype in (None, source) else dtype
        out = cast or source
        if to_native:  # per piece: read it (+ cast it), hand it to the writer
            for _, index in group.pieces:
                shape = _piece_shape(group, index)
                step(_nbytes(shape, source) + (_nbytes(shape, out) if cast else 0), _nbytes(shape, out), group.ours)
        else:  # _assemble: our tensor + one piece at a time (a whole tensor: it + its cast)
            reads = [_nbytes(_piece_shape(group, index), dtypes[key]) for key, index in group.pieces]
            whole = len(group.pieces) == 1 and group.pieces[0][1] == ()
            held = reads[0] + (_nbytes(group.shape, out) if cast else 0) if whole else _nbytes(group.shape, out) + max(reads)
            step(held, _nbytes(group.shape, out), group.ours)
        layer = _layer_index(group.ours)
        layer_bytes[layer] = layer_bytes.get(layer, 0) + _nbytes(group.shape, out)
    shards.append(buffered)
    moe_layers = {_layer_index(group.ours) for group in groups if ".mlp.experts." in group.ours}
    return MemoryPlan(
        peak_bytes=peak,
        peak_tensor=peak_tensor,
        max_shard_bytes=max_bytes,
        largest_tensor_bytes=largest,
        largest_moe_layer_bytes=max((layer_bytes[i] for i in moe_layers), default=0),
        total_bytes=sum(shards),
        shard_bytes=tuple(shards),
    )


# --------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bilingual_glm.conversion", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "direction",
        choices=["to-glm", "from-glm", "to-glm4", "from-glm4", "to-glm4-moe", "from-glm4-moe", "from-chatglm"],
        help="to-glm/to-glm4/to-glm4-moe: ours→native glm/glm4/glm4_moe; from-…: back; "
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
