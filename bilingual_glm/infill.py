"""Fill the blanks of a text with a GLM model: every ``[MASK]``, ``[sMASK]`` and ``[gMASK]``.

This is blank infilling at inference time, exactly as the model is trained (glm-reference §1)::

    text     我 爱 [MASK] 。 I love [MASK] .
    Part A   我 爱 [MASK] 。 I love [MASK] .      bidirectional (prefix_lengths = len(A))
    span 1   <sop> 北 京                          position = 2 (its mask), block 1, 2, 3, ...
    span 2   <sop> Paris                          position = 6, block 1, 2, ...; sees span 1

Spans are generated left to right, each conditioned on Part A and the spans before it, and stop at
``<eop>``. The user's text marks the blanks, so here (and only here) we look for the mask tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from .modeling.modeling_bilingual_glm import span_position_ids
from .tokenizer import check_tokenizer_matches


def _blank_token_ids(config: Any) -> set[int]:
    """The ids that mark a blank; infilling also needs ``<sop>``/``<eop>`` to open and close each span."""
    mask_ids = {config.mask_token_id, config.smask_token_id, config.gmask_token_id} - {None}
    if config.sop_token_id is None or config.eop_token_id is None or not mask_ids:
        raise ValueError("model.config needs sop_token_id, eop_token_id and mask token ids for infilling")
    return mask_ids


def infill(
    model: Any,
    tokenizer: Any,
    text: str,
    max_new_tokens: int = 32,
    return_spans: bool = False,
    **generate_kwargs: Any,
) -> str | tuple[str, list[str]]:
    """Return ``text`` with each blank replaced by a generated span (greedy unless told otherwise)."""
    config = model.config
    check_tokenizer_matches(config, tokenizer)
    mask_ids = _blank_token_ids(config)
    part_a = tokenizer(text, add_special_tokens=False)["input_ids"]
    blanks = [index for index, token in enumerate(part_a) if token in mask_ids]
    device = next(model.parameters()).device
    context = list(part_a)
    positions = torch.stack([torch.arange(len(part_a)), torch.zeros(len(part_a), dtype=torch.long)])[None]
    generate_kwargs.setdefault("do_sample", False)
    spans: list[list[int]] = []
    for blank in blanks:
        # <sop> at the blank's position, block 1; span_position_ids is the model's one span layout
        context.append(config.sop_token_id)
        positions = torch.cat([positions, span_position_ids(blank, 1, 1)], dim=-1)
        input_ids = torch.tensor([context], device=device)
        with torch.no_grad():
            output = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                position_ids=positions.to(device),  # [1, 2, T]
                prefix_lengths=torch.tensor([len(part_a)], device=device),
                max_new_tokens=max_new_tokens,
                eos_token_id=config.eop_token_id,
                pad_token_id=config.pad_token_id if config.pad_token_id is not None else config.eop_token_id,
                **generate_kwargs,
            )
        span = output[0, len(context) :].tolist()
        if config.eop_token_id in span:
            span = span[: span.index(config.eop_token_id)]
        spans.append(span)
        context += span  # the span's tokens: still at the blank's position, blocks 2, 3, ...
        positions = torch.cat([positions, span_position_ids(blank, 2, len(span))], dim=-1)
    filled: list[int] = []
    span_of = dict(zip(blanks, spans, strict=True))
    for index, token in enumerate(part_a):
        filled.extend(span_of.get(index, [token]))
    result = tokenizer.decode(filled, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if return_spans:
        return result, [tokenizer.decode(span, clean_up_tokenization_spaces=False) for span in spans]
    return result
