"""The support code of ``modeling_bilingual_glm.py`` that is not architecture: masks, input checks, export.

- Attention: ``attn_implementation="cpu_bf16_matmul"``, registered with ``AttentionInterface``.
- Masks: GLM's open prefix and padding as ``masking_utils`` mask functions, ``attention_mask_for`` (the
  mask in the form the chosen kernel wants) and ``build_attention_mask`` (the same mask as a bool tensor,
  the reference the tests compare against); default positions from the padding mask.
- Loss: ``causal_lm_loss``, the causal LM's loss on supervised positions (transformers keeps its losses
  in ``loss_utils`` too).
- Input checks: ``ValueError`` naming the argument, before a bad input fails deep inside a kernel.
- Export: ``AUTO_MAP`` and ``write_remote_code``, which make a saved folder load with ``trust_remote_code``.
- Version shims for transformers 4.57 → 5.x (field and argument renames).

This file ships as Hub remote code next to ``modeling_bilingual_glm.py``, so it imports only public
transformers API.
"""

from __future__ import annotations

import importlib
import inspect
import os
import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.masking_utils import AttentionMaskInterface, create_causal_mask, sdpa_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..configuration.configuration_bilingual_glm import BilingualGlmConfig  # flat in exported folders
from .kernels_bilingual_glm import (
    fast_bf16,
    is_plain_linear,
    linear_cross_entropy,
    matmul_attention_forward,
    use_matmul_attention,
)

# transformers 5.x renamed the outputs' `past_key_values` field to `cache`.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# ... and create_causal_mask's (input_embeds, cache_position, past_key_values) to (inputs_embeds, cache).
_MASK_TAKES_CACHE_POSITION = "cache_position" in inspect.signature(create_causal_mask).parameters


# ---------------------------------------------------------------------------------------- attention
CPU_BF16_ATTENTION = "cpu_bf16_matmul"
# transformers 5 looks kernels up with ``get_interface`` (and lets ``set_attn_implementation`` switch a model
# only if its attention does); 4.57 has only ``ALL_ATTENTION_FUNCTIONS[name]``.
HAS_GET_INTERFACE = hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface")


def cpu_bf16_attention_is_default() -> bool:
    """The rule for a model loaded without ``attn_implementation``: ``cpu_bf16_matmul`` where its matmul path
    can pay, i.e. no CUDA and a CPU with native bf16 (``fast_bf16("cpu")``); elsewhere transformers' default
    (``sdpa``), which is then also what runs. A name asked for is always the one used."""
    return not torch.cuda.is_available() and fast_bf16("cpu")


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


# -------------------------------------------------------------------------------------------- masks
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


def attention_mask_for(
    config: BilingualGlmConfig,
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
        check_4d_mask(attention_mask, batch, q_len, _kv_length(cache, past_len, q_len))
        return attention_mask  # a ready custom mask is used as given
    implementation = config._attn_implementation or "eager"
    if prefix_lengths is not None:
        prefix_lengths = check_prefix(config, prefix_lengths, batch, q_len, past_len, inputs_embeds.device)
    if attention_mask is not None and not torch.compiler.is_compiling() and bool(attention_mask.all()):
        attention_mask = None  # no padding: the plain causal mask (None where the kernel allows); a sync
    functions = {}
    if prefix_lengths is not None:
        functions["or_mask_function"] = prefix_mask_function(prefix_lengths)
    if attention_mask is not None and "flash" not in implementation:  # flash takes the 2D mask itself
        functions["and_mask_function"] = padding_mask_function(attention_mask.to(inputs_embeds.device))
        attention_mask = None
    if _MASK_TAKES_CACHE_POSITION:
        positions = torch.arange(past_len, past_len + q_len, device=inputs_embeds.device)
        return create_causal_mask(config, inputs_embeds, attention_mask, positions, cache, **functions)
    # position_ids stay out: GLM's repeated Part-B positions would read as packed sequences.
    return create_causal_mask(config, inputs_embeds, attention_mask, cache, **functions)


def _kv_length(cache: Cache | None, past_len: int, q_len: int) -> int:
    """Key length a 4D mask must cover (a static cache attends over its whole preallocated length)."""
    if cache is None:
        return past_len + q_len
    if _MASK_TAKES_CACHE_POSITION:  # transformers 4.57 / 5.0: (cache_position, layer_idx)
        return int(cache.get_mask_sizes(torch.arange(past_len, past_len + q_len), 0)[0])
    return int(cache.get_mask_sizes(q_len, 0)[0])  # later 5.x: (query_length, layer_idx)


def default_position_ids(
    attention_mask: torch.Tensor | None, past_len: int, q_len: int, device: torch.device
) -> torch.Tensor:
    """Positions from a 2D padding mask, so left-padded rows start at 0 like their unpadded selves."""
    if attention_mask is None or attention_mask.dim() != 2:
        return torch.arange(q_len, device=device)[None] + past_len  # [1, T]; past_len may be a tensor
    positions = attention_mask.long().cumsum(-1) - 1  # [B, past + T]
    return positions.clamp(min=0)[:, -q_len:].to(device)


def drop_generation_ids_outside_vocab(generation_config: Any, vocab_size: int) -> None:
    """After a shrinking resize: the generation config's pad/bos/eos ids the vocabulary lost go, as the model
    config's do (``BilingualGlmConfig._drop_token_ids_outside_vocab``; the config's warning names them)."""
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(generation_config, name, None)
        if isinstance(value, (list, tuple)):
            setattr(generation_config, name, [i for i in value if i < vocab_size] or None)
        elif isinstance(value, int) and value >= vocab_size:
            setattr(generation_config, name, None)


# ------------------------------------------------------------------------------------- input checks
def check_prefix(
    config: BilingualGlmConfig,
    prefix_lengths: Any,
    batch: int,
    q_len: int,
    past_len: int,
    device: torch.device,
) -> torch.Tensor:
    """Shape and range of ``prefix_lengths``; flash kernels are causal-only and cannot honour one."""
    if "flash" in (config._attn_implementation or ""):
        raise ValueError(
            "prefix_lengths: flash attention kernels are causal-only; load the model with "
            "attn_implementation='sdpa', 'eager' or 'flex_attention' for GLM prefix attention"
        )
    prefix_lengths = torch.as_tensor(prefix_lengths, device=device)
    if prefix_lengths.shape != (batch,):
        raise ValueError(
            f"prefix_lengths must have shape [batch]=[{batch}], got {tuple(prefix_lengths.shape)}"
        )
    if (
        not torch.compiler.is_compiling()
        and past_len == 0
        and not 0 <= prefix_lengths.min() <= prefix_lengths.max() <= q_len
    ):
        raise ValueError(
            f"prefix_lengths must be in [0, sequence length={q_len}], got {prefix_lengths.tolist()}"
        )
    return prefix_lengths


def check_token_ids(config: BilingualGlmConfig, input_ids: torch.Tensor) -> None:
    """An id outside the vocabulary would fail deep in the embedding lookup (or silently on GPU). A device
    sync: the model calls it only in eager prefill and training (``check_values`` in its forward), since a
    full ``torch.compile`` graph cannot branch on tensor values."""
    if input_ids.numel() == 0:
        return
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= config.vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"input_ids: token id {bad} is outside [0, vocab_size={config.vocab_size}); "
            "does the tokenizer match this model?"
        )


def check_4d_mask(mask: torch.Tensor, batch: int, q_len: int, kv_len: int) -> None:
    if mask.shape[0] not in (1, batch) or mask.shape[2] != q_len or mask.shape[3] != kv_len:
        raise ValueError(
            f"attention_mask: a 4D mask must be [batch={batch} or 1, 1 or heads, {q_len}, {kv_len}], "
            f"got {tuple(mask.shape)}"
        )


def check_positions(
    config: BilingualGlmConfig, position_ids: torch.Tensor, batch: int, q_len: int, check_values: bool
) -> None:
    """Shapes always; values (one sync) only when not decoding. 2D positions need a second slice."""
    if position_ids.shape[-1] != q_len or position_ids.shape[0] not in (1, batch):
        raise ValueError(
            f"position_ids must be [batch={batch}, {q_len}] or [batch, 2, {q_len}], "
            f"got shape {tuple(position_ids.shape)}"
        )
    if check_values and position_ids.numel() and position_ids.min() < 0:  # check_values: never when compiling
        raise ValueError(f"position_ids must be >= 0, got minimum {int(position_ids.min())}")
    if position_ids.dim() == 3:
        if position_ids.shape[1] != 2:
            raise ValueError(
                f"position_ids must be [B, T] or [B, 2, T] (position, block position); "
                f"got shape {tuple(position_ids.shape)}"
            )
        if 2 * config.rotary_dim > config.head_dim:
            raise ValueError(
                "position_ids: 2D (block) positions need partial_rotary_factor <= 0.5 so that a second "
                f"rotary slice fits in head_dim; this config has {config.partial_rotary_factor}"
            )
    elif position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [B, T] or [B, 2, T], got shape {tuple(position_ids.shape)}")


# --------------------------------------------------------------------------------------------- loss
def causal_lm_loss(
    lm_head: nn.Module,
    hidden_states: torch.Tensor,
    labels: torch.Tensor | None,
    shift_labels: torch.Tensor | None,
    num_items_in_batch: Any,
) -> torch.Tensor:
    """Cross-entropy over supervised positions only: the vocabulary projection runs on those rows.

    ``labels`` are unshifted (HF convention), ``shift_labels`` already shifted; ``-100`` = no loss. A plain
    ``lm_head`` goes through ``linear_cross_entropy`` (chunks of rows, never the full logits); a wrapped
    one (LoRA, quantized, hooked) through its own forward and full logits. The sum is divided by
    ``num_items_in_batch`` when given (Trainer), else by the number of supervised positions.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)  # [B, T]: target of each position
    shift_labels = shift_labels.to(hidden_states.device)
    supervised = shift_labels != -100  # [B, T]
    hidden, targets = hidden_states[supervised], shift_labels[supervised]  # [N, d], [N]
    if is_plain_linear(lm_head) and lm_head.bias is None:
        loss = linear_cross_entropy(hidden, lm_head.weight, targets)
    else:
        loss = F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")
    if num_items_in_batch is None:
        num_items_in_batch = supervised.sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


# ------------------------------------------------------------------------------------------- export
AUTO_MAP = {
    "AutoConfig": "configuration_bilingual_glm.BilingualGlmConfig",
    "AutoModel": "modeling_bilingual_glm.BilingualGlmModel",
    "AutoModelForCausalLM": "modeling_bilingual_glm.BilingualGlmForCausalLM",
    "AutoModelForSequenceClassification": "modeling_bilingual_glm.BilingualGlmForSequenceClassification",
}
# The sibling modules an exported folder holds next to the config (the model imports the other two).
REMOTE_CODE_MODULES = ("modeling_bilingual_glm", "utils_bilingual_glm", "kernels_bilingual_glm")
_FLAT_IMPORT = "from .configuration_bilingual_glm import BilingualGlmConfig"
# Built, not written out, so that re-exporting a flat file finds nothing to rewrite in its own text.
_PACKAGE_IMPORT = _FLAT_IMPORT.replace("from .", "from ..configuration.", 1)


def write_remote_code(save_directory: str | os.PathLike) -> None:
    """Write the model's code files and the config file side by side, the config imports made flat.

    transformers' ``custom_object_save`` copies only same-folder relative imports, and the package keeps
    the config in a separate folder, so the export writes them all itself (atomically: temp, rename).
    """
    modules = [importlib.import_module(f".{name}", __package__) for name in REMOTE_CODE_MODULES]
    modules.append(inspect.getmodule(BilingualGlmConfig))
    os.makedirs(save_directory, exist_ok=True)
    for module in modules:
        name = module.__name__.rpartition(".")[2] + ".py"
        text = inspect.getsource(module).replace(_PACKAGE_IMPORT, _FLAT_IMPORT, 1)
        handle, tmp_path = tempfile.mkstemp(dir=save_directory, prefix=f".{name}.", suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as tmp:
            tmp.write(text)
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, os.path.join(save_directory, name))
