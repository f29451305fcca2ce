"""BilingualGlm: the GLM-4 block with the original GLM's autoregressive blank infilling.

Read top to bottom: norm → rotary → attention → MLP → layer → PreTrainedModel → Model → heads.

- RMSNorm (fp32 statistics), pre-norm residuals, a final norm — GLM-4 / ChatGLM2+.
- Grouped-query attention with bias on q/k/v only, ``o_proj`` without bias.
- SwiGLU MLP with one fused ``gate_up_proj`` (gate first) and ``down_proj``.
- Optional GLM-4-0414 "sandwich" norms (``config.sandwich_norms``), as transformers' ``glm4``.
- Partial, *interleaved* rotary embedding (GLM-4 convention) extended to GLM's 2D positions: the first
  rotary slice of each head follows the token position, the next slice the block position.
- Prefix ("Part A") attention: a per-row prefix length opens the first columns to every query.
- Optional Mixture-of-Experts layers as transformers' ``glm4_moe`` (GLM-4.5/4.6/4.7): ``config.n_routed_experts``
  sigmoid-routed experts with a correction bias, shared experts, dense first layers, per-head q/k norms and the
  half-split ("NeoX") rotary layout (``rotary_interleaved=False``). Off by default.

With 1D positions (or block positions all zero) and no prefix this is exactly transformers' native
``GlmForCausalLM`` (``Glm4ForCausalLM`` with sandwich norms, ``Glm4MoeForCausalLM`` with MoE), weight name for
weight name (transformers 5's fused expert tensors);
``bilingual_glm.conversion`` moves checkpoints both ways.

CPU fast paths are opt-in and named (bodies in ``kernels_bilingual_glm.py``):
``attn_implementation="cpu_bf16_matmul"`` (SDPA, or two bf16 matmuls on a CPU with native bf16 under bf16
compute; the default only there, without CUDA, else ``sdpa``: ``get_correct_attn_implementation``), ``use_onednn_linears`` (a module swap), ``use_fused_qkv`` (q/k/v as one GEMM), a chunked loss.
Masks, input checks and export live in ``utils_bilingual_glm.py``. All three files ship as Hub remote
code, so they import only public transformers API.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    MoeCausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..configuration.configuration_bilingual_glm import BilingualGlmConfig  # flat in exported folders
from .kernels_bilingual_glm import (  # direct: for 4.x export
    fused_linear,
    swiglu,
    use_fused_qkv,
    use_onednn_linears,
)
from .utils_bilingual_glm import (  # masks, input checks, export: the support code
    AUTO_MAP,
    CACHE_FIELD,
    CPU_BF16_ATTENTION,
    HAS_GET_INTERFACE,
    attention_mask_for,
    build_attention_mask,
    causal_lm_loss,
    check_positions,
    check_token_ids,
    cpu_bf16_attention_is_default,
    default_position_ids,
    drop_generation_ids_outside_vocab,
    write_remote_code,
)


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

    RoPE scaling (``config.rope_parameters["rope_type"]``: linear, dynamic, yarn) uses transformers' own
    frequency functions, so both slices turn at the scaled frequencies ``f`` (long answers count block
    positions as far as the prompt counts positions). YaRN's ``attention_factor`` multiplies the position
    slice only, as native scales only its rotary dims: a block position of 0 stays the identity, so 1D
    positions equal native ``glm`` with the same ``rope_parameters``.
    """

    def __init__(self, config: BilingualGlmConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        default = self.compute_default_rope_parameters
        self.rope_init_fn = default if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = self.rope_init_fn(config, device)
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
    @dynamic_rope_update  # "dynamic" RoPE: transformers' own inv_freq update for long inputs
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin in ``x``'s dtype, shape ``[B, 1, T, n_pairs]`` (n_pairs = r, or r/2 if ``2r > head_dim``)."""
        inv_freq = self.inv_freq.to(device=x.device, dtype=torch.float)
        freqs = position_ids[..., None].float() * inv_freq  # [B, T, r/2] or [B, 2, T, r/2]
        if position_ids.dim() == 3:
            freqs = torch.cat((freqs[:, 0], freqs[:, 1]), dim=-1)  # [B, T, r]
        elif 2 * self.config.rotary_dim <= self.config.head_dim:
            freqs = F.pad(freqs, (0, freqs.shape[-1]))  # [B, T, r]: block position 0
        cos, sin = freqs.cos(), freqs.sin()  # one kernel each: decoding calls this every token
        if self.attention_scaling != 1.0:  # YaRN: the position slice only (block 0 stays the identity)
            cos[..., : inv_freq.shape[-1]] *= self.attention_scaling
            sin[..., : inv_freq.shape[-1]] *= self.attention_scaling
        return cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)  # broadcast over heads


def apply_rotary_pos_emb(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half_split: int | None = None
) -> torch.Tensor:
    """Rotate the first ``2 * n_pairs`` dims of ``x``; the rest pass.

    ``half_split=None``: adjacent pairs ``(x[2i], x[2i+1])`` (GLM-4, ``glm``). A pair is the complex number
    ``x[2i] + i·x[2i+1]`` and the rotation a multiplication by ``cos + i·sin``: the same products and sums as
    the real form, bit for bit, in one kernel instead of six (in at least fp32; the result has the dtype
    ``x * cos`` would have).

    ``half_split=r``: within each ``r``-dim slice (position slice, then block slice), dim ``i`` pairs with
    ``i + r/2`` ("NeoX", ``glm4_moe``): ``(x1·cos − x2·sin, x2·cos + x1·sin)``, the products native forms.
    """
    rotary = 2 * cos.shape[-1]
    dtype = torch.promote_types(x.dtype, cos.dtype)
    compute = torch.promote_types(dtype, torch.float32)  # complex32 has too few kernels
    # Nothing passes when the rotary dims fill the head (1D positions get the block slice at angle 0: the usual
    # case). Then no slice and no cat: in backward each costs a pass over q or k (a zero-filled slice_backward
    # per slice, summed), 1.8 of 5.2 ms per layer capped at AVX2 (small preset).
    whole = rotary == x.shape[-1]
    rotating = (x if whole else x[..., :rotary]).to(compute)
    if half_split is None:
        pairs = torch.view_as_complex(rotating.unflatten(-1, (-1, 2)))  # [B, H, T, pairs]
        rotated = torch.view_as_real(pairs * torch.complex(cos.to(compute), sin.to(compute))).flatten(-2)
    else:
        half = half_split // 2
        x1, x2 = rotating.unflatten(-1, (-1, 2, half)).unbind(-2)  # [B, H, T, slices, r/2]
        cos, sin = (t.to(compute).unflatten(-1, (-1, half)) for t in (cos, sin))  # [B, 1, T, slices, r/2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-2).flatten(-3)
    if whole:
        return rotated.to(dtype)
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
        if config.use_qk_norm:  # glm4_moe (GLM-4.5): an RMSNorm over head_dim shared by all heads, pre-RoPE
            self.q_norm = BilingualGlmRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = BilingualGlmRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.half_split = None if config.rotary_interleaved else config.rotary_dim
        self.fuse_qkv = False  # ``use_fused_qkv(model)``: q/k/v as one GEMM where it pays (opt-in)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        projections = (self.q_proj, self.k_proj, self.v_proj)
        qkv = fused_linear(hidden_states, projections) if self.fuse_qkv else None  # None: not applicable
        qkv = qkv or [projection(hidden_states) for projection in projections]
        query, key, value = (x.view(hidden_shape) for x in qkv)  # [B, T, H or KV, D]
        if self.config.use_qk_norm:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key, value = (x.transpose(1, 2) for x in (query, key, value))  # [B, H or KV, T, D]
        query = apply_rotary_pos_emb(query, *position_embeddings, self.half_split)
        key = apply_rotary_pos_emb(key, *position_embeddings, self.half_split)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        if HAS_GET_INTERFACE:  # transformers 5: the lookup ``set_attn_implementation`` switches at run time
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
        elif self.config._attn_implementation in (None, "eager"):  # transformers 4.57 (no get_interface)
            attention = eager_attention_forward
        else:
            attention = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        dropout = self.attention_dropout if self.training else 0.0
        output, weights = attention(
            self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs
        )
        output = output.reshape(*hidden_states.shape[:-1], -1).contiguous()  # [B, T, H*D]
        return self.o_proj(output), weights


# ---------------------------------------------------------------------------------------------- MLP
class BilingualGlmMLP(nn.Module):
    """SwiGLU with one fused input projection: ``[gate | up]``, gate first (ChatGLM/GLM-4 layout)."""

    def __init__(self, config: BilingualGlmConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_up_proj(hidden_states)))


# ------------------------------------------------------------------------------ mixture of experts
class BilingualGlmTopkRouter(nn.Module):
    """``glm4_moe``'s router (DeepSeek-V3 style), in fp32 whatever the weights' dtype.

    Sigmoid scores; ``e_score_correction_bias`` is added only to *choose* experts (GLM-4.5's loss-free
    balancing), first the ``topk_group`` best groups (a group scores its two best experts), then the top ``k``
    inside them; the chosen experts' unbiased scores, renormalised if ``norm_topk_prob``, times
    ``routed_scaling_factor``, weight their outputs.

    Training-time balancing, both off by default:
    - ``router_bias_update_rate`` (the rule GLM-4.5 trains with, arXiv 2408.15664): after each optimizer step
      ``update_router_biases`` moves each expert's bias by the rate towards the mean load (down if it got more
      than average tokens, up if fewer). It needs ``tokens_per_expert``, counted here in training.
    - ``router_aux_loss_coef``: the sequence-wise balance loss ``Σ_i f_i·P_i`` (DeepSeek-V3), stored in
      ``aux_loss`` for the causal-LM head to add.
    """

    def __init__(self, config: BilingualGlmConfig) -> None:
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.weight = nn.Parameter(torch.zeros(self.num_experts, config.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))
        # A plain tensor, not a buffer: DDP would overwrite every rank's count with rank 0's at each forward.
        self.tokens_per_expert = torch.zeros(self.num_experts)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, T, H]`` → (sigmoid scores ``[N, E]``, weights ``[N, k]``, expert indices ``[N, k]``), N = B·T."""
        config, groups = self.config, self.config.n_group
        flat = hidden_states.reshape(-1, hidden_states.shape[-1]).float()
        scores = F.linear(flat, self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        group_scores = choice.view(-1, groups, self.num_experts // groups).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=config.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        expert_mask = group_mask.repeat_interleave(self.num_experts // groups, dim=-1)
        choice = choice.masked_fill(~expert_mask.bool(), float("-inf"))
        top_k_index = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        top_k_weights = scores.gather(1, top_k_index)
        if config.norm_topk_prob:
            top_k_weights /= top_k_weights.sum(dim=-1, keepdim=True) + 1e-20
        top_k_weights = top_k_weights * config.routed_scaling_factor
        self.aux_loss = None
        if self.training:
            with torch.no_grad():
                counts = torch.bincount(top_k_index.flatten(), minlength=self.num_experts).float()
                self.tokens_per_expert = counts + self.tokens_per_expert.to(counts.device)
            if config.router_aux_loss_coef > 0:
                self.aux_loss = self._sequence_balance_loss(scores, top_k_index, hidden_states.shape[:-1])
        return scores, top_k_weights, top_k_index

    def _sequence_balance_loss(
        self, scores: torch.Tensor, top_k_index: torch.Tensor, batch_shape: torch.Size
    ) -> torch.Tensor:
        """DeepSeek-V3's ``Σ_i f_i·P_i`` per sequence, averaged: f_i = E/(k·T)·(tokens sent to i), P_i = mean
        normalised score of i. 1.0 when balanced; every position counts (padding too)."""
        batch, length = (batch_shape[0], batch_shape[1]) if len(batch_shape) == 2 else (1, batch_shape[0])
        chosen = torch.zeros_like(scores).scatter_(1, top_k_index, 1.0).view(batch, length, -1)
        load = chosen.mean(1) * self.num_experts / self.top_k  # [B, E]
        probability = (scores / scores.sum(-1, keepdim=True)).view(batch, length, -1).mean(1)  # [B, E]
        return (load * probability).sum(-1).mean()

    @torch.no_grad()
    def update_correction_bias(self, rate: float) -> None:
        """One loss-free balancing step from the load counted since the last one (summed over processes)."""
        load = self.tokens_per_expert.to(self.e_score_correction_bias.device, torch.float32)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        if load.sum() > 0:
            step = rate * torch.sign(load.mean() - load)
            self.e_score_correction_bias += step.to(self.e_score_correction_bias)
        self.tokens_per_expert = torch.zeros_like(load)


class BilingualGlmExperts(nn.Module):
    """The routed experts as two 3D weights, transformers 5's fused layout (released checkpoints store them per
    expert; ``bilingual_glm.conversion`` reads and writes both).

    Computed grouped, never per token: the (token, slot) pairs are sorted by expert, each expert runs one
    GEMM pair over its contiguous rows (a loop over experts: on CPU native's ``grouped_mm`` also runs one
    ``mm`` per expert), the activation runs once over all rows, and the rows return to their tokens, summed
    over the k slots. The per-expert row counts are read once (a host sync), so a compiled
    MoE model breaks its graph here.
    """

    def __init__(self, config: BilingualGlmConfig) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        size, hidden = config.moe_intermediate_size, config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * size, hidden))  # [gate | up] rows
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, hidden, size))

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """``[N, H]`` tokens, ``[N, k]`` experts and weights → ``[N, H]``."""
        tokens, k = top_k_index.shape
        flat = top_k_index.flatten()
        order = flat.argsort(stable=True)  # pair p = token p // k, slot p % k
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        used = [(expert, count) for expert, count in enumerate(counts) if count]
        sizes = [count for _, count in used]
        # unbind once: indexing the 3D weight per expert would give each index its own weight-sized zero
        # gradient in backward (2·E fills and adds of the whole tensor: 4 s per layer at 128 experts)
        gate_up_proj, down_proj = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        rows = hidden_states[order // k].split(sizes)
        gate_up = torch.cat([F.linear(x, gate_up_proj[e]) for (e, _), x in zip(used, rows, strict=True)])
        activated = swiglu(gate_up).split(sizes)  # one kernel over all experts' rows
        routed = torch.cat([F.linear(x, down_proj[e]) for (e, _), x in zip(used, activated, strict=True)])
        weighted = routed * top_k_weights.flatten()[order, None]
        return weighted[order.argsort()].view(tokens, k, -1).sum(1).to(hidden_states.dtype)


class BilingualGlmMoE(nn.Module):
    """Routed experts plus ``n_shared_experts`` always-on experts (one SwiGLU of their summed width)."""

    def __init__(self, config: BilingualGlmConfig) -> None:
        super().__init__()
        self.gate = BilingualGlmTopkRouter(config)
        self.experts = BilingualGlmExperts(config)
        shared = config.moe_intermediate_size * config.n_shared_experts
        self.shared_experts = BilingualGlmMLP(config, shared) if shared else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        _, top_k_weights, top_k_index = self.gate(hidden_states)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        routed = self.experts(flat, top_k_index, top_k_weights).view_as(hidden_states)
        return routed if self.shared_experts is None else routed + self.shared_experts(hidden_states)


# -------------------------------------------------------------------------------------------- layer
class BilingualGlmDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block; with ``sandwich_norms`` each sublayer's output is normed again before its add::

        x = x + post_self_attn_layernorm(attn(input_layernorm(x)))      # GLM-4-0414 (glm4)
        x = x + post_mlp_layernorm(mlp(post_attention_layernorm(x)))

    Without them those two are ``nn.Identity`` (no weights), so the block and its state dict are GLM-4's.
    ``mlp`` is a ``BilingualGlmMoE`` in MoE layers (``config.is_moe_layer``), as ``glm4_moe``'s blocks.
    """

    def __init__(self, config: BilingualGlmConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = BilingualGlmAttention(config, layer_idx)
        self.mlp = BilingualGlmMoE(config) if config.is_moe_layer(layer_idx) else BilingualGlmMLP(config)
        self.input_layernorm = BilingualGlmRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = BilingualGlmRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.sandwich_norms:
            self.post_self_attn_layernorm = BilingualGlmRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.post_mlp_layernorm = BilingualGlmRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        else:
            self.post_self_attn_layernorm, self.post_mlp_layernorm = nn.Identity(), nn.Identity()

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


# ---------------------------------------------------------------------------------------- positions
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
    _can_compile_fullgraph = True  # value checks step aside inside torch.compile (utils: check_*)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialise one module; transformers calls this only for weights a checkpoint did not provide.

        | weight                                                 | init                        |
        |--------------------------------------------------------|-----------------------------|
        | every ``nn.Linear`` weight (q/k/v/o, gate_up, down,    | normal(0, initializer_range)|
        |   lm_head, score) and ``embed_tokens``                 |                             |
        | q/k/v biases                                           | zeros                       |
        | RMSNorm weights (input, post_attention, final norm,    | ones                        |
        |   sandwich norms when ``sandwich_norms``)              |                             |
        | rotary ``inv_freq`` (non-persistent buffer)            | from ``rope_parameters``    |
        | q_norm / k_norm weights (``use_qk_norm``)              | ones                        |
        | router ``gate.weight`` / routed experts' 3D weights    | normal(0, initializer_range)|
        | router ``e_score_correction_bias``                     | zeros                       |
        """
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, BilingualGlmRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, BilingualGlmTopkRouter):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.zeros_(module.e_score_correction_bias)  # via nn.init: transformers skips a loaded one
        elif isinstance(module, BilingualGlmExperts):
            nn.init.normal_(module.gate_up_proj, mean=0.0, std=std)
            nn.init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, BilingualGlmRotaryEmbedding):
            inv_freq, _ = module.rope_init_fn(module.config, module.inv_freq.device)
            module.inv_freq.copy_(inv_freq)
            module.original_inv_freq.copy_(inv_freq)

    def get_correct_attn_implementation(
        self, requested_attention: str | None, is_init_check: bool = False
    ) -> str:
        """Any name asked for is the one used and reported. With none asked for, transformers' default
        (``sdpa``) becomes ``cpu_bf16_matmul`` where ``cpu_bf16_attention_is_default`` (no CUDA, a CPU with
        native bf16): there it is SDPA, or two bf16 matmuls under bf16 compute."""
        resolved = super().get_correct_attn_implementation(requested_attention, is_init_check)
        if requested_attention is None and resolved == "sdpa" and cpu_bf16_attention_is_default():
            return CPU_BF16_ATTENTION
        return resolved

    def update_router_biases(self, rate: float | None = None) -> None:
        """GLM-4.5's loss-free balancing step for every MoE layer (``BilingualGlmTopkRouter``); call it after each
        optimizer step. ``rate`` defaults to ``config.router_bias_update_rate``; 0 only resets the counts."""
        rate = self.config.router_bias_update_rate if rate is None else rate
        for module in self.modules():
            if isinstance(module, BilingualGlmTopkRouter):
                module.update_correction_bias(rate)

    def expert_load(self) -> dict[int, list[float]]:
        """Tokens routed to each expert since the last bias update (training forwards), per MoE layer."""
        return {
            layer_idx: layer.mlp.gate.tokens_per_expert.tolist()
            for layer_idx, layer in enumerate(self.base_model.layers)
            if isinstance(layer.mlp, BilingualGlmMoE)
        }

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> nn.Embedding:
        """transformers' resize; special ids the new vocabulary lacks then leave the config and the generation
        config with a warning naming them (an id without an embedding row cannot be fed or generated)."""
        embeddings = super().resize_token_embeddings(*args, **kwargs)
        self.config.validate_bilingual_glm()
        drop_generation_ids_outside_vocab(self.generation_config, self.config.vocab_size)
        return embeddings

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Also write the code as flat files and an ``auto_map`` (``push_to_hub`` too): it loads anywhere."""
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
            (GLM Part A; diagram in ``build_attention_mask``). Columns count from the start, cache included.
        cache / past_key_values: a transformers ``Cache`` (``DynamicCache``, ``StaticCache``).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        past_len = cache.get_seq_length() if cache is not None else 0  # a tensor for static caches
        check_values = not torch.compiler.is_compiling() and bool(past_len == 0)  # syncs: eager prefill only
        if input_ids is not None and check_values:
            check_token_ids(self.config, input_ids)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache()
        batch, q_len, _ = inputs_embeds.shape
        mask = attention_mask_for(self.config, attention_mask, prefix_lengths, cache, past_len, inputs_embeds)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, past_len, q_len, inputs_embeds.device)
        check_positions(self.config, position_ids, batch, q_len, check_values=check_values)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states, all_hidden, all_attentions = self._run_layers(
            inputs_embeds, position_embeddings, mask, cache, output_hidden_states, output_attentions, kwargs
        )
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden or None,
            attentions=all_attentions or None,
            **{CACHE_FIELD: cache if use_cache else None},
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


# ------------------------------------------------------------------------------------------- heads
def _keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """HF ``logits_to_keep``: 0 keeps all positions, k > 0 the last k, a 1D tensor the given indices."""
    if isinstance(logits_to_keep, int):
        return hidden_states if logits_to_keep == 0 else hidden_states[:, -logits_to_keep:]
    return hidden_states[:, logits_to_keep]


def _head_output(cls: type, body: BaseModelOutputWithPast, return_dict: bool | None, **fields: Any) -> Any:
    """A head's output: its own fields plus the body's hidden states, attentions and cache."""
    output = cls(
        hidden_states=body.hidden_states,
        attentions=body.attentions,
        **{CACHE_FIELD: getattr(body, CACHE_FIELD)},
        **fields,
    )
    return output if return_dict is not False else output.to_tuple()


class BilingualGlmForCausalLM(BilingualGlmPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}  # native glm's head plan (the body's is in the config)
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: BilingualGlmConfig) -> None:
        super().__init__(config)
        self.model = BilingualGlmModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.is_moe:
            self._can_compile_fullgraph = False  # the experts read their row counts on the host
        self.post_init()

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

        MoE models return ``MoeCausalLMOutputWithPast``; in training with ``router_aux_loss_coef > 0`` its
        ``aux_loss`` (the balance loss summed over MoE layers) is added to ``loss`` times the coefficient.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        cache = cache if cache is not None else past_key_values
        outputs = self.model(
            input_ids, attention_mask, position_ids, prefix_lengths, cache, inputs_embeds, use_cache, **kwargs
        )
        hidden_states = outputs.last_hidden_state
        loss = None
        if labels is not None or shift_labels is not None:
            loss = causal_lm_loss(self.lm_head, hidden_states, labels, shift_labels, num_items_in_batch)
        logits = self.lm_head(_keep(hidden_states, logits_to_keep)) if return_logits or loss is None else None
        if not self.config.is_moe:
            return _head_output(CausalLMOutputWithPast, outputs, return_dict, loss=loss, logits=logits)
        routers = (m for m in self.modules() if isinstance(m, BilingualGlmTopkRouter))
        aux_losses = [router.aux_loss for router in routers if router.aux_loss is not None]
        aux_loss = torch.stack(aux_losses).sum() if aux_losses else None
        if loss is not None and aux_loss is not None:
            loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
        fields = dict(loss=loss, aux_loss=aux_loss, logits=logits)
        return _head_output(MoeCausalLMOutputWithPast, outputs, return_dict, **fields)

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
        inputs_embeds: torch.Tensor | None = None,
        prompt_position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """transformers' step inputs (``inputs_embeds`` feed the first step, as native; a cache then continues
        from ids). With 2D prompt positions, every generated token continues the prompt's last span
        (``span_position_ids``): position at the mask, block position counting up: (2, 1), (2, 2), ..."""
        inputs = super().prepare_inputs_for_generation(
            input_ids, *args, inputs_embeds=inputs_embeds, **kwargs
        )
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

    Not transformers' ``GenericForSequenceClassification``: it finds the last token by ``pad_token_id``
    (a real token in GLM-4, and blind with ``inputs_embeds``) and builds its body with
    ``AutoModel.from_config`` (``trust_remote_code`` again in exported folders); here the mask decides."""

    accepts_loss_kwargs = False  # mean loss: Trainer must scale it for gradient accumulation itself

    def __init__(self, config: BilingualGlmConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = BilingualGlmModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

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
            input_ids, attention_mask, position_ids, prefix_lengths, cache, inputs_embeds, use_cache, **kwargs
        )
        logits = self.score(outputs.last_hidden_state)  # [B, T, num_labels]
        last = self._last_token_index(input_ids, attention_mask, logits.shape[:2])
        pooled_logits = logits[torch.arange(logits.shape[0], device=logits.device), last]  # [B, num_labels]
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=pooled_logits, config=self.config)
        return _head_output(
            SequenceClassifierOutputWithPast, outputs, return_dict, loss=loss, logits=pooled_logits
        )

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


__all__ = [
    "BilingualGlmPreTrainedModel",
    "BilingualGlmModel",
    "BilingualGlmForCausalLM",
    "BilingualGlmForSequenceClassification",
    "build_attention_mask",
    "use_fused_qkv",
    "use_onednn_linears",
    "write_remote_code",
]
