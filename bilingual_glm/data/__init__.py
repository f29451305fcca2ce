"""Collators for the three pretraining objectives (``objectives.py``: clm, glm, mlm): packed causal LM, GLM blank
infilling (whose own draw is a *span kind*: token, sentence, document), masked LM."""

from bilingual_glm.data.blank_infilling import (
    GLM_10B_MIXTURE,
    GLM_BASE_MIXTURE,
    GLM_LARGE_CHINESE_MIXTURE,
    SENTENCE_END_CHARS,
    SPAN_KINDS,
    BlankInfillingCollator,
    sentence_end_ids_from_tokenizer,
)
from bilingual_glm.data.causal import CausalCollator, pack_causal
from bilingual_glm.data.mlm import MlmCollator

__all__ = [
    "GLM_10B_MIXTURE",
    "GLM_BASE_MIXTURE",
    "GLM_LARGE_CHINESE_MIXTURE",
    "SPAN_KINDS",
    "SENTENCE_END_CHARS",
    "BlankInfillingCollator",
    "CausalCollator",
    "MlmCollator",
    "pack_causal",
    "sentence_end_ids_from_tokenizer",
]
