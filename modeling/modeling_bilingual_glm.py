"""BilingualGlm: the GLM-4 block with the original GLM's autoregressive blank infilling, in one file.

Architecture choices (read top to bottom: norm → rotary → attention → MLP → layer → PreTrainedModel →
Model → heads):

- RMSNorm (fp32 statistics), pre-norm residuals, a final norm — GLM-4 / ChatGLM2+.
- Grouped-query attention with bias on q/k/v only, ``o_proj`` without bias.
- SwiGLU MLP with one fused ``gate_up_proj`` (gate first) and ``down_proj``.
- Optional GLM-4-0414 "sandwich" norms (``config.sandwich_norms``): an RMSNorm on each sublayer's output
  before its residual add, as transformers' ``glm4``.
- Partial, *interleaved* rotary embedding (GLM-4 convention) extended to GLM's 2D positions: the first
  rotary slice of each head follows the token position, the next slice the block position.
- Prefix ("Part A") attention: a per-row prefix length opens the first columns to every query, giving
  GLM's bidirectional context, or a full bidirectional encoder when the prefix is the whole row.

With 1D positions (or block positions all zero) and no prefix this is exactly transformers' native
``GlmForCausalLM`` (``Glm4ForCausalLM`` with sandwich norms), weight name for weight name;
``bilingual_glm.conversion`` moves checkpoints both ways.

CPU fast paths are opt-in and named, at transformers' extension points (bodies in ``kernels_bilingual_glm.py``):

- ``attn_implementation="cpu_bf16_matmul"``, registered with ``AttentionInterface``: SDPA, except on a CPU
  with native bf16 under bf16 compute, where it is two bf16 matmuls (``use_matmul_attention`` is the rule).
  It is the default when no ``attn_implementation`` is asked for; ``"sdpa"``, ``"eager"``, flash and flex
  run exactly those kernels.
- ``use_onednn_linears(model)``: a module swap to oneDNN fp32 linears (they win on AMD CPUs), for the user
  or ``train.py`` to turn on.
- the loss: ``lm_head`` + cross-entropy a chunk of rows at a time, on supervised positions only.

This file ships as Hub remote code, so it imports only public transformers API.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, create_causal_mask, sdpa_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..configuration.configuration_bilingual_glm import BilingualGlmConfig  # flat in exported folders
from .kernels_bilingual_glm import (
    is_plain_linear,
    linear_cross_entropy,
    matmul_attention_forward,
    use_matmul_attention,
)

# transformers 5.x renamed the outputs' `past_key_values` field to `cache`.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# ... and create_causal_mask's (input_embeds, cache_position, past_key_values) to (inputs_embeds, cache).
_MASK_TAKES_CACHE_POSITION = "cache_position" in inspect.signature(create_causal_mask).parameters


# --------------------------------------------------------------------------------------------- norm
class BilingualGlmRMSNorm(nn.Module):
    """RMSNorm with fp32 statistics: bf16 variance underflows on long rows."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


# ------------------------------------------------------------------------------------------- rotary
class BilingualGlmRotaryEmbedding(nn.Module):
    """cos/sin tables for GLM's 2D rotary positions, computed once per forward for all layers.

    One head with ``head_dim=8`` and ``partial_rotary_factor=0.5`` (rotary dim ``r=4``)::

        dims          0 1   2 3   4 5   6 7
                      └─┘   └─┘   └─┘   └─┘      adjacent pairs (GLM-4 interleaved convention)
        angle      pos·f0 pos·f1 blk·f0 blk·f1   f = inv_freq, shared by both slices

    1D ``position_ids [B, T]`` rotate dims ``[0, r)`` only (native GLM-4). 2D ``position_ids [B, 2, T]``
    also rotate dims ``[r, 2r)`` by the block position; a block position of 0 is the identity, which is
    why GLM-4 checkpoints run unchanged. Where the block slice fits, 1D positions get it too, at angle 0:
    the rotation kernel then sees the same shapes as for zero block positions and gives the same bits.
    """

    def __init__(self, config: BilingualGlmConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self.rope_type = "default"
        inv_freq, _ = self.compute_default_rope_parameters(config, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(
        config: BilingualGlmConfig, device: torch.device | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, float]:
        """inv_freq over the rotary dim, computed exactly as native GLM does (bitwise-equal tables)."""
        base, dim = config.rope_theta, config.rotary_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
        return inv_freq.to(device), 1.0

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Return cos, sin of shape ``[B, 1, T, n_pairs]`` (n_pairs = r, or r/2 if ``2r > head_dim``)."""
        inv_freq = self.inv_freq.to(device=position_ids.device, dtype=torch.float)
        freqs = position_ids[..., None].float() * inv_freq  # [B, T, r/2] or [B, 2, T, r/2]
        if position_ids.dim() == 3:
            freqs = torch.cat((freqs[:, 0], freqs[:, 1]), dim=-1)  # [B, T, r]
        elif 2 * self.config.rotary_dim <= self.config.head_dim:
            freqs = F.pad(freqs, (0, freqs.shape[-1]))  # [B, T, r]: block position 0
        freqs = freqs.unsqueeze(1)  # [B, 1, T, n_pairs]: broadcast over heads
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs ``(x[2i], x[2i+1])`` of the first ``2 * n_pairs`` dims; the rest pass.

    A pair is the complex number ``x[2i] + i·x[2i+1]`` and the rotation a multiplication by
    ``cos + i·sin``: the same products and sums as the real form, bit for bit, in one kernel instead of
    six (in at least fp32; the result has the dtype ``x * cos`` would have).
    """
    rotary = 2 * cos.shape[-1]
    dtype = torch.promote_types(x.dtype, cos.dtype)
    compute = torch.promote_types(dtype, torch.float32)  # complex32 has too few kernels
    pairs = torch.view_as_complex(x[..., :rotary].to(compute).unflatten(-1, (-1, 2)))  # [B, H, T, n_pairs]
    rotated = torch.view_as_real(pairs * torch.complex(cos.to(compute), sin.to(compute))).flatten(-2)
    return torch.cat((rotated.to(dtype), x[..., rotary:].to(dtype)), dim=-1)


# ---------------------------------------------------------------------------------------- attention
def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention: GQA by broadcasting query groups over K/V heads, never copying K/V."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    query = query.view(batch, kv_heads, heads // kv_heads, q_len, head_dim)  # [B, KV, G, Tq, D]
    scores = torch.matmul(query, key.unsqueeze(2).transpose(-1, -2)) * scaling  # [B, KV, G, Tq, Tk]
    scores = scores.view(batch, heads, q_len, -1)
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    grouped = weights.view(batch, kv_heads, heads // kv_heads, q_len, -1)
    output = torch.matmul(grouped, value.unsqueeze(2)).view(batch, heads, q_len, head_dim)
    return output.transpose(1, 2).contiguous(), weights  # [B, Tq, H, D]


CPU_BF16_ATTENTION = "cpu_bf16_matmul"


def cpu_bf16_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``attn_implementation="cpu_bf16_matmul"``: transformers' SDPA, except where ``use_matmul_attention``
    holds (a CPU with native bf16, bf16 compute, no dropout, a causal or bool mask, not decoding): there two
    bf16 matmuls (``matmul_attention_forward``), 1.3-3x faster than torch's CPU flash kernel, which computes
    in fp32. Masks are SDPA's (registered with ``AttentionMaskInterface`` under the same name)."""
    if use_matmul_attention(module, query, key, attention_mask):
        return matmul_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CPU_BF16_ATTENTION, cpu_bf16_attention_forward)
AttentionMaskInterface.register(CPU_BF16_ATTENTION, sdpa_mask)


class BilingualGlmAttention(nn.Module):
    """GQA self-attention with q/k/v bias; the kernel comes from transformers' attention registry."""

    def __init__(self, config: BilingualGlmConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        q_size = config.num_attention_heads * self.head_dim
        kv_size = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, H, T, D]
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, KV, T, D]
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        query = apply_rotary_pos_emb(query, *position_embeddings)
        key = apply_rotary_pos_emb(key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        implementation = self.config._attn_implementation or "eager"
        attention = eager_attention_forward
        if implementation != "eager":
            attention = ALL_ATTENTION_FUNCTIONS[implementation]
        output, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        output = output.reshape(*hidden_states.shape[:-1], -1).contiguous()  # [B, T, H*D]
        return self.o_proj(output), weights


# ---------------------------------------------------------------------------------------------- MLP
class BilingualGlmMLP(nn.Module):
    """SwiGLU with one fused input projection: ``[gate | up]``, gate first (ChatGLM/GLM-4 layout)."""

    def __init__(self, config: BilingualGlmConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


# -------------------------------------------------------------------------------------------- layer
def _sandwich_norm(config: BilingualGlmConfig) -> nn.Module:
    """A GLM-4-0414 post-sublayer RMSNorm when ``config.sandwich_norms``, else a weightless identity."""
    if config.sandwich_norms:
        return BilingualGlmRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    return nn.Identity()


class BilingualGlmDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block; with ``sandwich_norms`` each sublayer's output is normed again before its add::

        x = x + post_self_attn_layernorm(attn(input_layernorm(x)))      # GLM-4-0414 (glm4)
        x = x + post_mlp_layernorm(mlp(post_attention_layernorm(x)))

    Without them those two are ``nn.Identity`` (no weights), so the block and its state dict are GLM-4's.
    """

    def __init__(self, config: BilingualGlmConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = BilingualGlmAttention(config, layer_idx)
        self.mlp = BilingualGlmMLP(config)
        self.input_layernorm = BilingualGlmRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = BilingualGlmRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_self_attn_layernorm = _sandwich_norm(config)
        self.post_mlp_layernorm = _sandwich_norm(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, weights = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache, **kwargs
        )
        hidden_states = hidden_states + self.post_self_attn_layernorm(attn_out)
        mlp_out = self.mlp(self.post_attention_layernorm(hidden_states))
        hidden_states = hidden_states + self.post_mlp_layernorm(mlp_out)
        return hidden_states, weights


# ------------------------------------------------------------------------------------ masks, positions
def prefix_mask_function(prefix_lengths: torch.Tensor) -> Any:
    """GLM's open prefix as a ``masking_utils`` mask function (``or_mask_function``): key columns
    ``< prefix_lengths[b]`` are visible to every query of row ``b`` (Part A is bidirectional)."""

    def visible(batch_idx: Any, head_idx: Any, q_idx: Any, kv_idx: Any) -> Any:
        return kv_idx < prefix_lengths[batch_idx]

    return visible


def padding_mask_function(padding_mask: torch.Tensor) -> Any:
    """Padding as a mask function (``and_mask_function``): a key is hidden if it is padding, or beyond the
    mask (a static cache's spare slots), except to its own query, so no softmax row is ever empty.

    transformers' own padding function has no such exception (and needs the mask padded to the key length),
    so forward passes the padding mask through this one instead."""
    keys = padding_mask.bool()
    last = keys.shape[-1] - 1

    def visible(batch_idx: Any, head_idx: Any, q_idx: Any, kv_idx: Any) -> Any:
        real = keys[batch_idx, kv_idx.clamp(max=last)] & (kv_idx <= last)
        return real | (kv_idx == q_idx)

    return visible


def build_attention_mask(
    padding_mask: torch.Tensor | None,
    prefix_lengths: torch.Tensor | None,
    batch: int,
    q_len: int,
    past_len: int,
    kv_len: int,
    device: torch.device,
) -> torch.Tensor:
    """Boolean ``[B, 1, Tq, Tk]`` mask (True = may attend): the model's mask functions on index grids.

    Key ``j`` is visible to the query at absolute position ``i`` iff ``j <= i or j < prefix``, and ``j`` is
    not padding. ``prefix_lengths=3``, 6 tokens::

                 keys 0 1 2 3 4 5
        query 0       1 1 1 . . .     Part A (0..2): bidirectional among itself,
        query 1       1 1 1 . . .     cannot see Part B
        query 2       1 1 1 . . .
        query 3       1 1 1 1 . .     Part B: sees all of Part A, causal within itself
        query 4       1 1 1 1 1 .
        query 5       1 1 1 1 1 1

    A query whose own key is padding still sees itself, so no softmax row is empty (no NaNs).
    """
    batch_idx = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    q_idx = torch.arange(past_len, past_len + q_len, device=device).view(1, 1, -1, 1)
    kv_idx = torch.arange(kv_len, device=device).view(1, 1, 1, -1)
    visible = kv_idx <= q_idx
    if prefix_lengths is not None:
        visible = visible | prefix_mask_function(prefix_lengths.to(device))(batch_idx, 0, q_idx, kv_idx)
    if padding_mask is not None:
        visible = visible & padding_mask_function(padding_mask.to(device))(batch_idx, 0, q_idx, kv_idx)
    return visible.expand(batch, 1, q_len, kv_len)


def span_position_ids(
    mask_position: torch.Tensor | int, first_block: torch.Tensor | int, length: int
) -> torch.Tensor:
    """2D positions of ``length`` Part-B tokens of one blank: GLM's span layout, in one place.

    Every token of a span keeps the position of its ``[MASK]`` (row 0) and counts its block position up
    from ``first_block`` (row 1): ``<sop>`` at block 1, the span's tokens at 2, 3, ... Training collators,
    cloze scoring, infilling and generation all call this, so the layout cannot drift between them.
    Scalars or ``[B]`` tensors in; ``[B, 2, length]`` out.
    """
    mask_position = torch.as_tensor(mask_position).view(-1, 1)  # [B, 1]
    first_block = torch.as_tensor(first_block, device=mask_position.device).view(-1, 1)  # [B or 1, 1]
    steps = torch.arange(length, device=mask_position.device)  # [N]
    rows = torch.broadcast_tensors(mask_position.expand(-1, length), first_block + steps)  # 2 × [B, N]
    return torch.stack(rows, dim=1)  # [B, 2, N]


def _kv_length(cache: Cache | None, past_len: int, q_len: int) -> int:
    """Key length a 4D mask must cover (a static cache attends over its whole preallocated length)."""
    if cache is None:
        return past_len + q_len
    if _MASK_TAKES_CACHE_POSITION:  # transformers 4.57 / 5.0: (cache_position, layer_idx)
        return int(cache.get_mask_sizes(torch.arange(past_len, past_len + q_len), 0)[0])
    return int(cache.get_mask_sizes(q_len, 0)[0])  # later 5.x: (query_length, layer_idx)


def _default_position_ids(
    padding_mask: torch.Tensor | None, past_len: int, q_len: int, device: torch.device
) -> torch.Tensor:
    """Positions from the padding mask, so left-padded rows start at 0 like their unpadded selves."""
    if padding_mask is None:
        return torch.arange(past_len, past_len + q_len, device=device)[None]  # [1, T]
    positions = padding_mask.long().cumsum(-1) - 1  # [B, past + T]
    return positions.clamp(min=0)[:, -q_len:].to(device)


# -------------------------------------------------------------------------------- PreTrainedModel
class BilingualGlmPreTrainedModel(PreTrainedModel):
    config_class = BilingualGlmConfig
    config: BilingualGlmConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BilingualGlmDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialise one module; transformers calls this only for weights a checkpoint did not provide.

        | weight                                                 | init                        |
        |--------------------------------------------------------|-----------------------------|
        | every ``nn.Linear`` weight (q/k/v/o, gate_up, down,    | normal(0, initializer_range)|
        |   lm_head, score)                                      |                             |
        | q/k/v biases                                           | zeros                       |
        | ``embed_tokens``                                       | normal(0, initializer_range)|
        | RMSNorm weights (input, post_attention, final norm)    | ones                        |
        | sandwich norms ``post_self_attn_layernorm``,           | ones                        |
        |   ``post_mlp_layernorm`` (``sandwich_norms`` only)     |                             |
        | rotary ``inv_freq`` (non-persistent buffer)            | recomputed from rope_theta  |
        """
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, BilingualGlmRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, BilingualGlmRotaryEmbedding):
            inv_freq, _ = module.compute_default_rope_parameters(module.config, module.inv_freq.device)
            module.inv_freq.copy_(inv_freq)
            module.original_inv_freq.copy_(inv_freq)

    def get_correct_attn_implementation(
        self, requested_attention: str | None, is_init_check: bool = False
    ) -> str:
        """The documented default: no ``attn_implementation`` asked for gives ``cpu_bf16_matmul`` (SDPA, or
        two bf16 matmuls on a CPU with native bf16 under bf16 compute); any name asked for is used as is."""
        resolved = super().get_correct_attn_implementation(requested_attention, is_init_check)
        return CPU_BF16_ATTENTION if requested_attention is None and resolved == "sdpa" else resolved

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Also write the code as flat files and an ``auto_map``: the folder then loads anywhere.

        ``push_to_hub`` goes through here too, so what is uploaded is exactly this self-contained folder.
        """
        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_remote_code(save_directory)


# ------------------------------------------------------------------------------------------- Model
class BilingualGlmModel(BilingualGlmPreTrainedModel):
    def __init__(self, config: BilingualGlmConfig) -> None:
        super().__init__(config)
        config.validate_bilingual_glm()
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [BilingualGlmDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = BilingualGlmRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = BilingualGlmRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        prefix_lengths: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        r"""
        position_ids (`[B, T]` or `[B, 2, T]`): token positions, optionally with GLM block positions as
            row 1. Default: counted from ``attention_mask`` (left padding safe) and the cache length.
        prefix_lengths (`[B]`): key columns ``< prefix_lengths[b]`` are visible to every query of row ``b``
            (GLM Part A). Columns count from the start of the whole sequence, cache included.
        cache / past_key_values: a transformers ``Cache`` (``DynamicCache``, ``StaticCache``).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        past_len = cache.get_seq_length() if cache is not None else 0
        if input_ids is not None and past_len == 0:
            self._check_token_ids(input_ids)  # prefill and training only: decoding steps stay sync-free
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache()
        batch, q_len, _ = inputs_embeds.shape

        mask = self._attention_mask(attention_mask, prefix_lengths, cache, past_len, inputs_embeds)
        if position_ids is None:
            padding = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
            position_ids = _default_position_ids(padding, past_len, q_len, inputs_embeds.device)
        self._check_positions(position_ids, batch, q_len, check_values=past_len == 0)
        position_embeddings = self.rotary_emb(position_ids, inputs_embeds.dtype)
        hidden_states, all_hidden, all_attentions = self._run_layers(
            inputs_embeds, position_embeddings, mask, cache, output_hidden_states, output_attentions, kwargs
        )
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden or None,
            attentions=all_attentions or None,
            **{_CACHE_FIELD: cache if use_cache else None},
        )
        return output if return_dict is not False else output.to_tuple()

    def _run_layers(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        mask: Any,
        cache: Cache | None,
        output_hidden_states: bool | None,
        output_attentions: bool | None,
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, tuple, tuple]:
        """The decoder stack and the final norm, collecting hidden states / attention weights if asked."""
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        all_hidden, all_attentions = (), ()
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            hidden_states, weights = layer(hidden_states, position_embeddings, mask, cache, **kwargs)
            if output_attentions:
                all_attentions += (weights,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return hidden_states, all_hidden, all_attentions

    def _attention_mask(
        self,
        attention_mask: torch.Tensor | None,
        prefix_lengths: torch.Tensor | None,
        cache: Cache | None,
        past_len: int,
        inputs_embeds: torch.Tensor,
    ) -> Any:
        """``masking_utils.create_causal_mask`` in the form the chosen kernel wants (None for plain causal
        SDPA, bool for SDPA, additive for eager, a BlockMask for flex), with GLM's prefix as its
        ``or_mask_function`` and padding as its ``and_mask_function`` (``padding_mask_function``)."""
        batch, q_len = inputs_embeds.shape[:2]
        if attention_mask is not None and attention_mask.dim() == 4:
            self._check_4d_mask(attention_mask, batch, q_len, _kv_length(cache, past_len, q_len))
            return attention_mask  # a ready custom mask is used as given
        implementation = self.config._attn_implementation or "eager"
        if prefix_lengths is not None:
            prefix_lengths = self._check_prefix(prefix_lengths, batch, q_len, past_len, inputs_embeds.device)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: the plain causal mask (None where the kernel allows)
        functions = {}
        if prefix_lengths is not None:
            functions["or_mask_function"] = prefix_mask_function(prefix_lengths)
        if attention_mask is not None and "flash" not in implementation:  # flash takes the 2D mask itself
            functions["and_mask_function"] = padding_mask_function(attention_mask.to(inputs_embeds.device))
            attention_mask = None
        if _MASK_TAKES_CACHE_POSITION:
            positions = torch.arange(past_len, past_len + q_len, device=inputs_embeds.device)
            return create_causal_mask(
                self.config, inputs_embeds, attention_mask, positions, cache, **functions
            )
        # position_ids stay out: GLM's repeated Part-B positions would read as packed sequences.
        return create_causal_mask(self.config, inputs_embeds, attention_mask, cache, **functions)

    def _check_prefix(
        self, prefix_lengths: Any, batch: int, q_len: int, past_len: int, device: torch.device
    ) -> torch.Tensor:
        """Shape and range of ``prefix_lengths``; flash kernels are causal-only and cannot honour one."""
        if "flash" in (self.config._attn_implementation or ""):
            raise ValueError(
                "prefix_lengths: flash attention kernels are causal-only; load the model with "
                "attn_implementation='sdpa', 'eager' or 'flex_attention' for GLM prefix attention"
            )
        prefix_lengths = torch.as_tensor(prefix_lengths, device=device)
        if prefix_lengths.shape != (batch,):
            raise ValueError(
                f"prefix_lengths must have shape [batch]=[{batch}], got {tuple(prefix_lengths.shape)}"
            )
        if past_len == 0 and (int(prefix_lengths.min()) < 0 or int(prefix_lengths.max()) > q_len):
            raise ValueError(
                f"prefix_lengths must be in [0, sequence length={q_len}], got {prefix_lengths.tolist()}"
            )
        return prefix_lengths

    def _check_token_ids(self, input_ids: torch.Tensor) -> None:
        """An id outside the vocabulary would fail deep in the embedding lookup (or silently on GPU)."""
        if input_ids.numel() == 0:
            return
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"input_ids: token id {bad} is outside [0, vocab_size={self.config.vocab_size}); "
                "does the tokenizer match this model?"
            )

    @staticmethod
    def _check_4d_mask(mask: torch.Tensor, batch: int, q_len: int, kv_len: int) -> None:
        if mask.shape[0] not in (1, batch) or mask.shape[2] != q_len or mask.shape[3] != kv_len:
            raise ValueError(
                f"attention_mask: a 4D mask must be [batch={batch} or 1, 1 or heads, {q_len}, {kv_len}], "
                f"got {tuple(mask.shape)}"
            )

    def _check_positions(
        self, position_ids: torch.Tensor, batch: int, q_len: int, check_values: bool
    ) -> None:
        """Shapes always; values (one sync) only when not decoding. 2D positions need a second slice."""
        if position_ids.shape[-1] != q_len or position_ids.shape[0] not in (1, batch):
            raise ValueError(
                f"position_ids must be [batch={batch}, {q_len}] or [batch, 2, {q_len}], "
                f"got shape {tuple(position_ids.shape)}"
            )
        if check_values and position_ids.numel() and int(position_ids.min()) < 0:
            raise ValueError(f"position_ids must be >= 0, got minimum {int(position_ids.min())}")
        if position_ids.dim() == 3:
            if position_ids.shape[1] != 2:
                raise ValueError(
                    f"position_ids must be [B, T] or [B, 2, T] (position, block position); "
                    f"got shape {tuple(position_ids.shape)}"
                )
            if 2 * self.config.rotary_dim > self.config.head_dim:
                raise ValueError(
                    "position_ids: 2D (block) positions need partial_rotary_factor <= 0.5 so that a second "
                    f"rotary slice fits in head_dim; this config has {self.config.partial_rotary_factor}"
                )
        elif position_ids.dim() != 2:
            raise ValueError(
                f"position_ids must be [B, T] or [B, 2, T], got shape {tuple(position_ids.shape)}"
            )


# ------------------------------------------------------------------------------------------- heads
def _keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """HF ``logits_to_keep``: 0 keeps all positions, k > 0 the last k, a 1D tensor the given indices."""
    if isinstance(logits_to_keep, int):
        return hidden_states if logits_to_keep == 0 else hidden_states[:, -logits_to_keep:]
    return hidden_states[:, logits_to_keep]


class BilingualGlmForCausalLM(BilingualGlmPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BilingualGlmConfig) -> None:
        super().__init__(config)
        self.model = BilingualGlmModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        prefix_lengths: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_logits: bool = True,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        r"""
        labels (`[B, T]`): next-token targets, unshifted as in every HF causal LM, ``-100`` = no loss.
            ``shift_labels`` (already shifted, same shape) may be passed instead.
        return_logits: with ``False`` and labels given, logits are computed only at supervised positions
            (for the loss) and not returned — GLM blank infilling supervises only Part B.
        num_items_in_batch (kwarg from ``Trainer``): the loss is summed and divided by it, so gradient
            accumulation and multi-GPU give the same loss as one big batch.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            prefix_lengths=prefix_lengths,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        loss = None
        if labels is not None or shift_labels is not None:
            if shift_labels is None:
                shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)  # [B, T]: target of each position
            loss = self._supervised_loss(hidden_states, shift_labels, num_items_in_batch)
        logits = None
        if return_logits or loss is None:
            logits = self.lm_head(_keep(hidden_states, logits_to_keep))
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )
        return output if return_dict is not False else output.to_tuple()

    def _supervised_loss(
        self, hidden_states: torch.Tensor, shift_labels: torch.Tensor, num_items_in_batch: Any
    ) -> torch.Tensor:
        """Cross-entropy over supervised positions only: the vocabulary projection runs on those rows.

        A plain ``lm_head`` goes through ``linear_cross_entropy`` (chunks of rows, never the full logits);
        a wrapped one (LoRA, quantized, hooked) through its own forward and full logits.
        """
        shift_labels = shift_labels.to(hidden_states.device)
        supervised = shift_labels != -100  # [B, T]
        hidden, targets = hidden_states[supervised], shift_labels[supervised]  # [N, d], [N]
        head = self.lm_head
        if is_plain_linear(head) and head.bias is None:
            loss = linear_cross_entropy(hidden, head.weight, targets)
        else:
            loss = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
        if num_items_in_batch is None:
            num_items_in_batch = supervised.sum().clamp(min=1)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        return loss / num_items_in_batch

    def create_masks_for_generate(self, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Keep the 2D padding mask for static caches too: forward builds its own (prefix-aware) mask."""
        return attention_mask

    def generate(self, *args: Any, position_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """``GenerationMixin.generate``; 2D positions ``[B, 2, T]`` travel as ``prompt_position_ids`` so that
        generate's own position update (which would advance both rows) leaves them alone, and
        ``prepare_inputs_for_generation`` extends them GLM's way."""
        if position_ids is not None:
            kwargs["prompt_position_ids" if position_ids.dim() == 3 else "position_ids"] = position_ids
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        *args: Any,
        prompt_position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Every generated token continues the prompt's last span (``span_position_ids``): its position
        stays at the mask, its block position counts up, e.g. ``<sop>`` at (2, 1), then (2, 2), (2, 3), ..."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        if prompt_position_ids is None:
            return inputs
        cache = inputs.get("cache", inputs.get("past_key_values"))
        fed_ids = inputs.get("input_ids")
        fed = (fed_ids if fed_ids is not None else inputs["inputs_embeds"]).shape[1]  # tokens this step
        total = fed + (cache.get_seq_length() if cache is not None else 0)
        last = prompt_position_ids[..., -1]  # [B, 2]: the prompt's last token (position, block position)
        new = span_position_ids(last[:, 0], last[:, 1] + 1, total - prompt_position_ids.shape[-1])
        inputs["position_ids"] = torch.cat((prompt_position_ids, new), dim=-1)[..., -fed:]  # [B, 2, fed]
        return inputs


class BilingualGlmForSequenceClassification(BilingualGlmPreTrainedModel):
    """Classifies from the hidden state of each row's last real token (left or right padding).

    Not transformers' ``GenericForSequenceClassification``: that one finds the last token by searching
    ``pad_token_id`` in ``input_ids`` (wrong for GLM-4, whose pad id is ``<|endoftext|>``, a real token, and
    blind with ``inputs_embeds``) and builds its body with ``AutoModel.from_config``, which asks for
    ``trust_remote_code`` again inside exported folders. Here the attention mask decides.
    """

    accepts_loss_kwargs = False  # mean loss: Trainer must scale it for gradient accumulation itself

    def __init__(self, config: BilingualGlmConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = BilingualGlmModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        prefix_lengths: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutputWithPast | tuple:
        kwargs.pop("num_items_in_batch", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            prefix_lengths=prefix_lengths,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)  # [B, T, num_labels]
        last = self._last_token_index(input_ids, attention_mask, logits.shape[:2])
        pooled_logits = logits[torch.arange(logits.shape[0], device=logits.device), last]  # [B, num_labels]
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config
            )
        output = SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )
        return output if return_dict is not False else output.to_tuple()

    def _last_token_index(
        self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, shape: torch.Size
    ) -> torch.Tensor:
        """Last column holding a real token: from the attention mask, else pad ids, else the last column."""
        batch, length = shape
        columns = torch.arange(length, device=self.score.weight.device)
        if attention_mask is not None and attention_mask.dim() == 2:
            real = attention_mask.to(columns.device).bool()
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = input_ids.to(columns.device) != self.config.pad_token_id
        else:
            return torch.full((batch,), length - 1, device=columns.device)
        return (columns * real).argmax(-1)


# ----------------------------------------------------------------------------------- remote code
AUTO_MAP = {
    "AutoConfig": "configuration_bilingual_glm.BilingualGlmConfig",
    "AutoModel": "modeling_bilingual_glm.BilingualGlmModel",
    "AutoModelForCausalLM": "modeling_bilingual_glm.BilingualGlmForCausalLM",
    "AutoModelForSequenceClassification": "modeling_bilingual_glm.BilingualGlmForSequenceClassification",
}
_PACKAGE_IMPORT = "from ..configuration.configuration_bilingual_glm import BilingualGlmConfig"
_FLAT_IMPORT = "from .configuration_bilingual_glm import BilingualGlmConfig"


def write_remote_code(save_directory: str | os.PathLike) -> None:
    """Write this file, its kernels and the config file side by side, the config import made flat.

    transformers' ``custom_object_save`` copies only same-folder relative imports, and the package keeps
    the config in a separate folder, so the export writes all three itself (atomically: temp, rename).
    """
    sources = {
        "modeling_bilingual_glm.py": inspect.getsource(inspect.getmodule(BilingualGlmPreTrainedModel)),
        "configuration_bilingual_glm.py": inspect.getsource(inspect.getmodule(BilingualGlmConfig)),
        "kernels_bilingual_glm.py": inspect.getsource(inspect.getmodule(linear_cross_entropy)),
    }
    sources["modeling_bilingual_glm.py"] = sources["modeling_bilingual_glm.py"].replace(
        _PACKAGE_IMPORT, _FLAT_IMPORT, 1
    )
    os.makedirs(save_directory, exist_ok=True)
    for name, text in sources.items():
        handle, tmp_path = tempfile.mkstemp(dir=save_directory, prefix=f".{name}.", suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as tmp:
            tmp.write(text)
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, os.path.join(save_directory, name))


__all__ = [
    "BilingualGlmPreTrainedModel",
    "BilingualGlmModel",
    "BilingualGlmForCausalLM",
    "BilingualGlmForSequenceClassification",
    "build_attention_mask",
    "write_remote_code",
]
