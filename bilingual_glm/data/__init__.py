"""Collators for the three training objectives: GLM blank infilling, masked LM, packed causal LM."""

from bilingual_glm.data.blank_infilling import (
    GLM_10B_MIXTURE,
    GLM_BASE_MIXTURE,
    GLM_LARGE_CHINESE_MIXTURE,
    OBJECTIVES,
    SENTENCE_END_CHARS,
    BlankInfillingCollator,
    sentence_end_ids_from_tokenizer,
)
from bilingual_glm.data.causal import CausalCollator, pack_causal
from bilingual_glm.data.mlm import MlmCollator

__all__ = [
    "GLM_10B_MIXTURE",
    "GLM_BASE_MIXTURE",
    "GLM_LARGE_CHINESE_MIXTURE",
    "OBJECTIVES",
    "SENTENCE_END_CHARS",
    "BlankInfillingCollator",
    "CausalCollator",
    "MlmCollator",
    "pack_causal",
    "sentence_end_ids_from_tokenizer",
]
