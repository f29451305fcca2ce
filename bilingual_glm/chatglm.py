"""Convert THUDM-format checkpoints (ChatGLM2-6B, ChatGLM3-6B, GLM-4-9B) into BilingualGlm folders.

THUDM's ``modeling_chatglm.py`` block is the GLM-4 block our model (and transformers' native ``glm``)
implements, so conversion is a rename plus one split: the fused attention input projection.

``self_attention.query_key_value`` rows (``H`` query heads, ``KV`` key/value groups, ``hd`` = kv_channels)
depend on ``multi_query_attention``, because THUDM's ``SelfAttention.forward`` reads its output two ways::

    multi_query_attention: true (every released ChatGLM2/3 and GLM-4-9B) — split, then view per head
    rows  0 ........... H*hd | H*hd ...... (H+KV)*hd | (H+KV)*hd ...... (H+2KV)*hd
          [ Q: all heads     | K: all groups         | V: all groups              ]
            -> q_proj          -> k_proj               -> v_proj       (bias rows likewise)

    multi_query_attention: false — viewed as [..., H, 3*hd], then split in three along the last dim
    rows  0 .. hd .. 2hd .. 3hd | 3hd ........... 6hd | ... | (H-1)*3hd ....... H*3hd
          [ q0  | k0  | v0      | q1  | k1  | v1      | ... | q_H-1 | k_H-1 | v_H-1 ]
            q_proj = [q0; q1; ...], k_proj = [k0; k1; ...], v_proj = [v0; v1; ...]   (KV = H)

``mlp.dense_h_to_4h`` rows are ``[gate | up]``: THUDM's SwiGLU is ``x0, x1 = chunk(2); silu(x0) * x1``, so
the first half is the gate — the layout of our fused ``gate_up_proj``; it is copied unchanged.

Rotary: THUDM rotates the first half of each head (interleaved pairs) with base ``10000 * rope_ratio``;
that is ``partial_rotary_factor=0.5`` and ``rope_theta = 10000 * rope_ratio`` here (GLM-4-9B: 5e6).

Large checkpoints stream: one source file is open at a time, tensors are read one by one
(``safetensors.safe_open`` / ``torch.load(..., weights_only=True, mmap=True)``), and an output shard is written as soon as it
holds ``max_shard_size`` bytes. Everything is written into a temporary folder next to the destination,
renamed into place only when complete. Every refusal is checked before anything is written.

    python -m bilingual_glm.conversion from-chatglm SRC_DIR DST_DIR [--dtype bfloat16] [--max-shard-size 2GB]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import GenerationConfig

from .configuration.configuration_bilingual_glm import (
    GLM_TOKEN_FIELDS,
    SPECIAL_TOKEN_FIELDS,
    BilingualGlmConfig,
)
from .io import ShardWriter, atomic_folder, check_destination
from .modeling.modeling_bilingual_glm import AUTO_MAP, write_remote_code

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ key map
QKV = "{q,k,v}"  # a target holding this is the query_key_value split into q_proj, k_proj, v_proj
DROP = None  # buffers recomputed from the config

# THUDM (ChatGLM2/3, GLM-4)                                          ours (= transformers' native glm)
CHATGLM_KEY_MAP: tuple[tuple[str, str | None], ...] = (
    ("transformer.embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    ("transformer.encoder.layers.{i}.input_layernorm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("transformer.encoder.layers.{i}.self_attention.query_key_value.weight", "model.layers.{i}.self_attn." + QKV + "_proj.weight"),
    ("transformer.encoder.layers.{i}.self_attention.query_key_value.bias", "model.layers.{i}.self_attn." + QKV + "_proj.bias"),
    ("transformer.encoder.layers.{i}.self_attention.dense.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("transformer.encoder.layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("transformer.encoder.layers.{i}.mlp.dense_h_to_4h.weight", "model.layers.{i}.mlp.gate_up_proj.weight"),
    ("transformer.encoder.layers.{i}.mlp.dense_4h_to_h.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("transformer.encoder.final_layernorm.weight", "model.norm.weight"),
    ("transformer.output_layer.weight", "lm_head.weight"),
    ("transformer.rotary_pos_emb.inv_freq", DROP),
)  # fmt: skip
_EMBEDDING, _OUTPUT = CHATGLM_KEY_MAP[0][0], "transformer.output_layer.weight"


def compile_key_map(
    key_map: tuple[tuple[str, str | None], ...], reverse: bool = False
) -> list[tuple[re.Pattern[str], str | None]]:
    """One key-map table as ``(pattern, target)`` rows; ``{i}`` matches a layer index.

    Rows are matched on their left column (``reverse``: the right one, for the opposite direction).
    Every converter of this package (THUDM, native ``glm``/``glm4``) reads its table through this.
    """
    side = 1 if reverse else 0
    return [
        (re.compile("^" + re.escape(row[side]).replace(r"\{i\}", r"(?P<i>\d+)") + "$"), row[1 - side])
        for row in key_map
    ]


def map_key(key: str, patterns: list[tuple[re.Pattern[str], str | None]]) -> str | None:
    """``key``'s target with its layer index filled in; None for a ``DROP`` row; KeyError when no row fits."""
    for pattern, target in patterns:
        match = pattern.match(key)
        if match:
            return None if target is DROP else target.replace("{i}", match.groupdict().get("i") or "")
    raise KeyError(key)


_PATTERNS = compile_key_map(CHATGLM_KEY_MAP)

# Weight names that identify a checkpoint we refuse, and why (checked before the unknown-key error).
_REFUSED_KEYS: tuple[tuple[str, str], ...] = (
    (
        r"^transformer\.(word_embeddings|layers\.\d+\.attention)\.",
        "ChatGLM-6B v1 weights (transformer.word_embeddings / transformer.layers.N.attention.*) are not "
        "supported: v1 uses DeepNorm residuals, a GeLU MLP and per-head-interleaved QKV, a different block",
    ),
    (
        r"^transformer\.prefix_encoder\.",
        "prefix encoder (P-tuning v2) weights are not supported: BilingualGlm has no prefix encoder; "
        "convert the base checkpoint without the prefix",
    ),
    (r"_scale$", "quantized (int4/int8) weights are not supported: convert the full-precision checkpoint"),
)

# ------------------------------------------------------------------------------------------- config
# THUDM's ChatGLMConfig defaults, used for fields a config.json leaves out.
CHATGLM_DEFAULTS: dict[str, Any] = {
    "seq_length": 2048,
    "layernorm_epsilon": 1e-5,
    "add_qkv_bias": False,
    "add_bias_linear": False,
    "multi_query_attention": False,
    "multi_query_group_num": 1,
    "rope_ratio": 1,
    "rmsnorm": True,
    "apply_residual_connection_post_layernorm": False,
    "post_layer_norm": True,
    "original_rope": True,
    "attention_dropout": 0.0,
    "quantization_bit": 0,
    "pre_seq_len": None,
}
_REQUIRED_FIELDS = (
    "padded_vocab_size",
    "hidden_size",
    "ffn_hidden_size",
    "num_layers",
    "num_attention_heads",
)

# (THUDM field, value we refuse, why) — the modern block is fixed: RMSNorm, pre-norm, no dense/MLP bias.
_REFUSED_CONFIG: tuple[tuple[str, Any, str], ...] = (
    ("quantization_bit", lambda v: v not in (None, 0), "int4/int8 quantized weights are not supported; "
     "convert the full-precision checkpoint"),
    ("pre_seq_len", lambda v: v not in (None, 0), "a prefix encoder (P-tuning v2) is not supported: "
     "BilingualGlm has no prefix encoder"),
    ("add_bias_linear", lambda v: bool(v), "biases on the attention output and MLP are not supported "
     "(BilingualGlm's o_proj, gate_up_proj and down_proj have no bias)"),
    ("rmsnorm", lambda v: not v, "LayerNorm is not supported: BilingualGlm uses RMSNorm"),
    ("apply_residual_connection_post_layernorm", lambda v: bool(v), "post-layernorm residuals are not "
     "supported: BilingualGlm adds the residual before the norm (pre-norm)"),
    ("post_layer_norm", lambda v: not v, "a model without the final layernorm is not supported: "
     "BilingualGlm always applies model.norm"),
    ("original_rope", lambda v: not v, "the non-original rotary implementation is not supported: "
     "BilingualGlm implements THUDM's original_rope=True (interleaved pairs on half of each head)"),
)  # fmt: skip

# ----------------------------------------------------------------------------------- special tokens
# Special-token ids by padded_vocab_size when no tokenizer file names them.
FAMILY_TOKEN_DEFAULTS: dict[int, dict[str, int]] = {
    65024: {  # ChatGLM2-6B / ChatGLM3-6B (SentencePiece; specials appended after its 64789 pieces)
        "</s>": 2,
        "[MASK]": 64789,
        "[gMASK]": 64790,
        "[sMASK]": 64791,
        "sop": 64792,
        "eop": 64793,
        "<|system|>": 64794,
        "<|user|>": 64795,
        "<|assistant|>": 64796,
        "<|observation|>": 64797,
    },
    151552: {  # GLM-4-9B (tiktoken)
        "<|endoftext|>": 151329,
        "[MASK]": 151330,
        "[gMASK]": 151331,
        "[sMASK]": 151332,
        "<sop>": 151333,
        "<eop>": 151334,
        "<|system|>": 151335,
        "<|user|>": 151336,
        "<|assistant|>": 151337,
        "<|observation|>": 151338,
    },
}
# ChatGLM2/3's SPTokenizer appends these after the SentencePiece pieces, in this order.
_SENTENCEPIECE_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>",
                           "<|assistant|>", "<|observation|>")  # fmt: skip
# ChatGLM2/3 spell these without brackets; every other GLM token is spelled as in SPECIAL_TOKEN_FIELDS.
_CHATGLM2_SPELLINGS = {"<sop>": "sop", "<eop>": "eop"}
_CHAT_STOP_TOKENS = ("<|user|>", "<|observation|>")  # THUDM's chat() stops on these
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "tokenizer.json", "tokenization_chatglm.py",
                   "special_tokens_map.json", "added_tokens.json", "LICENSE", "MODEL_LICENSE")  # fmt: skip

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


def check_supported(thudm_config: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` saying why, for every THUDM config this converter cannot represent exactly."""
    v1_clues = [name for name in ("position_encoding_2d", "inner_hidden_size") if name in thudm_config]
    if "multi_query_attention" not in thudm_config and "ffn_hidden_size" not in thudm_config:
        v1_clues.append("no multi_query_attention/ffn_hidden_size")
    if v1_clues:
        raise ValueError(
            f"ChatGLM-6B v1 checkpoints are not supported (config has {', '.join(v1_clues)}): v1 uses DeepNorm "
            "residuals, a GeLU MLP, per-head-interleaved QKV and 2D RoPE, a different block from "
            "ChatGLM2/3 and GLM-4"
        )
    native = thudm_config.get("model_type")
    if "padded_vocab_size" not in thudm_config and native in ("glm", "glm4"):
        raise ValueError(
            f"this is a transformers-native {native} config, not THUDM's format: use "
            f"`python -m bilingual_glm.conversion from-{native}` instead"
        )
    for name in _REQUIRED_FIELDS:
        if name not in thudm_config:
            raise ValueError(f"THUDM config.json has no {name!r}: not a ChatGLM2/3 or GLM-4 config")
    for name, refused, why in _REFUSED_CONFIG:
        value = thudm_config.get(name, CHATGLM_DEFAULTS[name])
        if refused(value):
            raise ValueError(f"unsupported THUDM checkpoint: {name}={value!r}: {why}")


def config_from_chatglm(
    thudm_config: Mapping[str, Any],
    special_tokens: Mapping[str, int] | None = None,
    tie_word_embeddings: bool = False,
    chat: bool | None = None,
) -> BilingualGlmConfig:
    """Our config from THUDM field names; ``special_tokens`` (token → id) fills the GLM token fields.

    ``rope_theta`` is ``10000 * rope_ratio`` (read from the dict — the published script's ``getattr`` on a
    dict always fell back to 1). The eos list gains ``<|user|>``/``<|observation|>`` when ``chat`` (default:
    whenever those tokens are known), so ``generate`` stops where THUDM's ``chat()`` does.
    """
    check_supported(thudm_config)
    cfg = {**CHATGLM_DEFAULTS, **thudm_config}
    tokens = dict(special_tokens or {})
    heads = cfg["num_attention_heads"]
    eos = _as_list(cfg.get("eos_token_id"))
    if not eos:
        eos = [tokens[name] for name in ("<|endoftext|>", "</s>") if name in tokens][:1]
    if chat is None or chat:
        eos += [tokens[name] for name in _CHAT_STOP_TOKENS if name in tokens and tokens[name] not in eos]
    return BilingualGlmConfig(
        vocab_size=cfg["padded_vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["ffn_hidden_size"],
        num_hidden_layers=cfg["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg["multi_query_group_num"] if cfg["multi_query_attention"] else heads,
        head_dim=cfg.get("kv_channels") or cfg["hidden_size"] // heads,
        max_position_embeddings=cfg["seq_length"],
        rms_norm_eps=cfg["layernorm_epsilon"],
        attention_bias=bool(cfg["add_qkv_bias"]),
        attention_dropout=cfg["attention_dropout"],
        rope_parameters={  # a `rope_scaling` dict (long-context variants) keeps its type and factor
            **(cfg.get("rope_scaling") or {}),
            "rope_theta": 10000.0 * float(cfg["rope_ratio"] or 1),
            "partial_rotary_factor": 0.5,
        },
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=(eos[0] if len(eos) == 1 else eos) if eos else None,
        pad_token_id=cfg.get("pad_token_id"),
        bos_token_id=None,
        **{field: _glm_token_id(tokens, SPECIAL_TOKEN_FIELDS[field]) for field in GLM_TOKEN_FIELDS},
    )


def resolve_special_tokens(src_dir: str | os.PathLike, thudm_config: Mapping[str, Any]) -> dict[str, int]:
    """Token → id for GLM's specials, from the most specific source present; ids ≥ vocab size are dropped.

    Later sources win: family defaults (by ``padded_vocab_size``) < SentencePiece ``tokenizer.model``
    (ChatGLM2/3 append their specials after the pieces) < ``tokenizer.json`` ``added_tokens`` <
    ``tokenizer_config.json`` ``added_tokens_decoder``.
    """
    src, vocab = Path(src_dir), thudm_config.get("padded_vocab_size", 0)
    tokens = dict(FAMILY_TOKEN_DEFAULTS.get(vocab, {}))
    tokens.update(_sentencepiece_specials(src / "tokenizer.model"))
    tokenizer_json = _read_json(src / "tokenizer.json")
    tokens.update({t["content"]: int(t["id"]) for t in tokenizer_json.get("added_tokens", [])})
    decoder = _read_json(src / "tokenizer_config.json").get("added_tokens_decoder", {})
    tokens.update({entry["content"]: int(token_id) for token_id, entry in decoder.items()})
    return {token: token_id for token, token_id in tokens.items() if 0 <= token_id < vocab}


def _sentencepiece_specials(path: Path) -> dict[str, int]:
    """ChatGLM2/3 specials from a SentencePiece model ({} for GLM-4's tiktoken file or no sentencepiece)."""
    if not path.is_file():
        return {}
    try:
        import sentencepiece

        pieces = sentencepiece.SentencePieceProcessor(model_file=str(path)).vocab_size()
    except Exception:  # not a SentencePiece model (GLM-4 ships tiktoken ranks) or library missing
        return {}
    return {token: pieces + offset for offset, token in enumerate(_SENTENCEPIECE_SPECIALS)}


def _glm_token_id(tokens: Mapping[str, int], token: str) -> int | None:
    """The id of ``token`` (our spelling), or of its ChatGLM2/3 spelling, or None."""
    for name in (token, _CHATGLM2_SPELLINGS.get(token)):
        if name in tokens:
            return tokens[name]
    return None


def _as_list(value: Any) -> list[int]:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# ------------------------------------------------------------------------------------------ tensors
def split_qkv(
    fused: torch.Tensor, config: BilingualGlmConfig, per_head: bool = False
) -> tuple[torch.Tensor, ...]:
    """THUDM's fused rows → q ``[H*hd]``, k ``[KV*hd]``, v ``[KV*hd]`` (weight or bias).

    ``per_head=False`` (``multi_query_attention: true``): rows are ``[Q_all | K_all | V_all]``.
    ``per_head=True`` (``multi_query_attention: false``): rows are ``[q0 k0 v0 | q1 k1 v1 | ...]``, one
    ``3*hd`` block per head — THUDM's forward views the output as ``[..., H, 3*hd]`` and splits the last dim.
    """
    q_rows, kv_rows = (
        config.num_attention_heads * config.head_dim,
        config.num_key_value_heads * config.head_dim,
    )
    sizes = [q_rows, kv_rows, kv_rows]
    if fused.shape[0] != sum(sizes):
        raise ValueError(
            f"query_key_value has {fused.shape[0]} rows, expected (heads + 2 * kv groups) * kv_channels = "
            f"{sum(sizes)}: check num_attention_heads, multi_query_group_num and kv_channels"
        )
    if per_head:
        if config.num_key_value_heads != config.num_attention_heads:
            raise ValueError("a per-head query_key_value layout needs one key/value head per query head")
        blocks = fused.unflatten(0, (config.num_attention_heads, 3, config.head_dim))  # [H, 3, hd, ...]
        return tuple(blocks[:, part].flatten(0, 1).clone() for part in range(3))  # each [H*hd, ...]
    return tuple(part.clone() for part in torch.split(fused, sizes, dim=0))  # own storage each


def target_name(key: str) -> str | None:
    """Our name for a THUDM key (``QKV`` inside for the fused projection, None when dropped)."""
    for pattern, refused_why in _REFUSED_KEYS:
        if re.search(pattern, key):
            raise ValueError(f"unsupported THUDM checkpoint: weight {key!r}: {refused_why}")
    try:
        return map_key(key, _PATTERNS)
    except KeyError:
        raise ValueError(f"unknown THUDM weight {key!r}: no entry in CHATGLM_KEY_MAP") from None


def map_chatglm_tensor(
    key: str, tensor: torch.Tensor, config: BilingualGlmConfig, multi_query_attention: bool
) -> list[tuple[str, Any]]:
    """One THUDM tensor → our ``(name, tensor)`` pairs: 0 (dropped), 1 (renamed) or 3 (q, k, v).

    ``multi_query_attention`` is the THUDM config's flag (no default: it decides the fused qkv layout,
    and THUDM's own default, false, is the layout no released checkpoint uses).
    """
    target = target_name(key)
    if target is None:
        return []
    if QKV in target:
        parts = split_qkv(tensor, config, per_head=not multi_query_attention)
        return [(target.replace(QKV, part), t) for part, t in zip("qkv", parts, strict=True)]
    return [(target, tensor)]


def _expected_shapes(config: BilingualGlmConfig) -> dict[str, tuple[int, ...]]:
    """Every THUDM key a complete checkpoint holds, with its shape (inv_freq and output_layer optional)."""
    hidden, hd = config.hidden_size, config.head_dim
    qkv_rows = (config.num_attention_heads + 2 * config.num_key_value_heads) * hd
    shapes = {
        _EMBEDDING: (config.vocab_size, hidden),
        "transformer.encoder.final_layernorm.weight": (hidden,),
    }
    for i in range(config.num_hidden_layers):
        layer = f"transformer.encoder.layers.{i}."
        shapes[layer + "input_layernorm.weight"] = (hidden,)
        shapes[layer + "self_attention.query_key_value.weight"] = (qkv_rows, hidden)
        if config.attention_bias:
            shapes[layer + "self_attention.query_key_value.bias"] = (qkv_rows,)
        shapes[layer + "self_attention.dense.weight"] = (hidden, config.num_attention_heads * hd)
        shapes[layer + "post_attention_layernorm.weight"] = (hidden,)
        shapes[layer + "mlp.dense_h_to_4h.weight"] = (2 * config.intermediate_size, hidden)
        shapes[layer + "mlp.dense_4h_to_h.weight"] = (hidden, config.intermediate_size)
    return shapes


# -------------------------------------------------------------------------------------- reading
def find_weight_files(src_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint's weight files: an index's shards, else a single file (safetensors preferred)."""
    src = Path(src_dir)
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (src / index_name).is_file():
            weight_map = _read_json(src / index_name).get("weight_map") or {}
            files = sorted(set(weight_map.values()))
            if not files:
                raise ValueError(f"{src / index_name} has an empty weight_map")
            missing = [name for name in files if not (src / name).is_file()]
            if missing:
                raise ValueError(f"{index_name} lists weight files missing from {src}: {', '.join(missing)}")
            return [src / name for name in files]
        if (src / single).is_file():
            return [src / single]
    files = sorted(src.glob("*.safetensors")) or sorted(src.glob("pytorch_model*.bin"))
    if not files:
        raise ValueError(
            f"no weight files in {src}: expected model.safetensors, model-*.safetensors with "
            "model.safetensors.index.json, or pytorch_model*.bin"
        )
    return files


@contextlib.contextmanager
def _open_weights(path: Path) -> Iterator[_WeightFile]:
    """One weight file, open for reading tensor by tensor; closed (mmap released) on exit."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            yield _SafetensorsFile(handle)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (pre-zip) pickles cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            yield _TorchFile(state)
        finally:
            state.clear()


class _WeightFile:
    def keys(self) -> list[str]:
        raise NotImplementedError

    def info(self, key: str) -> tuple[tuple[int, ...], torch.dtype | str]:
        """Shape and dtype without reading the data (dtype is a string when not a float type)."""
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError


class _SafetensorsFile(_WeightFile):
    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def keys(self) -> list[str]:
        return list(self.handle.keys())

    def info(self, key: str) -> tuple[tuple[int, ...], torch.dtype | str]:
        tensor_slice = self.handle.get_slice(key)
        dtype = tensor_slice.get_dtype()
        return tuple(tensor_slice.get_shape()), _SAFETENSORS_DTYPES.get(dtype, dtype)

    def get(self, key: str) -> torch.Tensor:
        return self.handle.get_tensor(key)


class _TorchFile(_WeightFile):
    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state

    def keys(self) -> list[str]:
        return list(self.state)

    def info(self, key: str) -> tuple[tuple[int, ...], torch.dtype | str]:
        tensor = self.state[key]
        return tuple(tensor.shape), tensor.dtype if tensor.is_floating_point() else str(tensor.dtype)

    def get(self, key: str) -> torch.Tensor:
        return self.state[key]


def _scan(files: list[Path], config: BilingualGlmConfig) -> dict[str, Path]:
    """Check every key, dtype and shape before writing anything; return key → file of the kept keys."""
    expected, located = _expected_shapes(config), {}
    for path in files:
        with _open_weights(path) as weights:
            for key in weights.keys():
                target_name(key)  # refuses v1/prefix/quantized names and unknown keys
                shape, dtype = weights.info(key)
                if not isinstance(dtype, torch.dtype):
                    raise ValueError(
                        f"unsupported THUDM checkpoint: weight {key!r} has dtype {dtype}: quantized "
                        "(int4/int8) weights are not supported; convert the full-precision checkpoint"
                    )
                want = expected.get(key, (config.vocab_size, config.hidden_size) if key == _OUTPUT else shape)
                if shape != want:
                    raise ValueError(f"weight {key!r} has shape {shape}, the config implies {want}")
                located[key] = path
    missing = sorted(set(expected) - set(located))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"checkpoint is missing {len(missing)} weights the config implies: {shown}")
    return located


def _output_is_tied(thudm_config: Mapping[str, Any], located: Mapping[str, Path]) -> bool:
    """Tied when there is no output_layer, or the config says tied and it equals the embedding.

    THUDM's model never ties by itself (it defines no output embeddings): a present output_layer is used.
    """
    if _OUTPUT not in located:
        return True
    if not thudm_config.get("tie_word_embeddings", False):
        return False
    with _open_weights(located[_OUTPUT]) as weights:
        output = weights.get(_OUTPUT).clone()
    with _open_weights(located[_EMBEDDING]) as weights:
        same = torch.equal(weights.get(_EMBEDDING), output)
    if not same:
        logger.warning("tie_word_embeddings is set but output_layer differs from the embedding: kept untied")
    return same


def parse_size(size: int | str) -> int:
    """Bytes from ``2GB``, ``500MB``, ``1GiB`` or an int (decimal units, as ``save_pretrained``)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size must be an int or like '2GB'/'500MB', got {size!r}")
    unit = match.group(2).rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    return int(float(match.group(1)) * base ** " KMGT".index(unit.rstrip("I") or " "))


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype such as 'bfloat16', got {dtype!r}")
    return resolved


# ------------------------------------------------------------------------------------- conversion
def convert_chatglm_checkpoint(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "2GB",
    chat: bool | None = None,
) -> BilingualGlmConfig:
    """Convert a THUDM-format folder (ChatGLM2/3, GLM-4) into a BilingualGlm folder, streaming.

    Args:
        src_dir: THUDM folder: ``config.json`` and ``*.safetensors`` or ``pytorch_model*.bin`` (single
            file or sharded with an index); tokenizer files next to them are copied along.
        dst_dir: output folder; must not exist (or be empty). Appears only once complete.
        dtype: cast weights to this dtype (``"bfloat16"``, ``torch.float32``...); default keeps the source's.
        max_shard_size: output shard size (``"2GB"``, ``"500MB"`` or bytes); also bounds the write buffer.
        chat: add ``<|user|>``/``<|observation|>`` to the eos ids; default: whenever those tokens are known.

    Returns:
        The written config. Raises ``ValueError`` naming the reason for anything unsupported.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} has no config.json: expected a THUDM-format checkpoint folder")
    check_destination(dst)
    out_dtype, max_bytes = _resolve_dtype(dtype), parse_size(max_shard_size)
    thudm_config = _read_json(src / "config.json")
    tokens = resolve_special_tokens(src, thudm_config)
    config = config_from_chatglm(thudm_config, tokens, chat=chat)
    located = _scan(find_weight_files(src), config)
    config.tie_word_embeddings = _output_is_tied(thudm_config, located)

    with atomic_folder(dst) as tmp:
        multi_query = bool({**CHATGLM_DEFAULTS, **thudm_config}["multi_query_attention"])
        source_dtype = _write_weights(located, config, tmp, out_dtype, max_bytes, multi_query)
        config.dtype = out_dtype or source_dtype
        config.architectures = ["BilingualGlmForCausalLM"]
        config.auto_map = dict(AUTO_MAP)
        config.save_pretrained(tmp)
        _generation_config(src, config).save_pretrained(tmp)
        write_remote_code(tmp)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
    logger.info("converted %s -> %s (%d layers, dtype %s)", src, dst, config.num_hidden_layers, config.dtype)
    return config


def _write_weights(
    located: Mapping[str, Path],
    config: BilingualGlmConfig,
    folder: Path,
    dtype: torch.dtype | None,
    max_bytes: int,
    multi_query_attention: bool,
) -> torch.dtype:
    """Stream source files one at a time, tensor by tensor, into output shards; return the source dtype."""
    writer, files = ShardWriter(folder, max_bytes), sorted(set(located.values()))
    source_dtype = torch.float32
    for path in files:
        logger.info("reading %s", path.name)
        with _open_weights(path) as weights:
            for key in weights.keys():
                if located.get(key) != path or (key == _OUTPUT and config.tie_word_embeddings):
                    continue
                tensor = weights.get(key)
                source_dtype = tensor.dtype if key == _EMBEDDING else source_dtype
                for name, mapped in map_chatglm_tensor(key, tensor, config, multi_query_attention):
                    writer.add(name, mapped if dtype is None else mapped.to(dtype))
                del tensor
    writer.finish()
    return source_dtype


def _generation_config(src: Path, config: BilingualGlmConfig) -> GenerationConfig:
    """The source's generation settings (sampling, lengths) with our eos/pad ids."""
    settings = _read_json(src / "generation_config.json")
    for name in ("eos_token_id", "pad_token_id", "bos_token_id", "transformers_version"):
        settings.pop(name, None)
    return GenerationConfig(
        **settings, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, bos_token_id=None
    )


# --------------------------------------------------------------------------------------------- CLI
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the streaming folder conversions (``--chat`` is for ``from-chatglm`` only)."""
    group = parser.add_argument_group("folder conversion (from-chatglm; --dtype/--max-shard-size for all)")
    group.add_argument(
        "--dtype", default=None, help="cast weights (bfloat16, float16, float32); default: keep"
    )
    group.add_argument("--max-shard-size", default="2GB", help="output shard size, e.g. 2GB, 500MB")
    group.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="stop generation on <|user|>/<|observation|> too (default: when those tokens are known)",
    )


def run_cli(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # one line per source file read
    config = convert_chatglm_checkpoint(
        args.src_dir, args.dst_dir, dtype=args.dtype, max_shard_size=args.max_shard_size, chat=args.chat
    )
    print(
        f"from-chatglm: {args.src_dir} -> {args.dst_dir} ({config.num_hidden_layers} layers, "
        f"rope_theta {config.rope_theta:g}, dtype {config.dtype}, eos {config.eos_token_id})"
    )


__all__ = [
    "CHATGLM_KEY_MAP",
    "FAMILY_TOKEN_DEFAULTS",
    "check_supported",
    "config_from_chatglm",
    "convert_chatglm_checkpoint",
    "find_weight_files",
    "map_chatglm_tensor",
    "resolve_special_tokens",
    "split_qkv",
]
