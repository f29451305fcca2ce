"""bilingual_glm: a GLM-style bilingual (Chinese/English) causal LM for the Hugging Face stack.

Importing the package registers ``model_type="bilingual_glm"`` with the Auto classes, so
``AutoConfig``/``AutoModel*.from_pretrained`` work in-process without ``trust_remote_code``.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .configuration.configuration_bilingual_glm import GLM_SPECIAL_TOKENS, PRESETS, BilingualGlmConfig
from .modeling.modeling_bilingual_glm import (
    BilingualGlmForCausalLM,
    BilingualGlmForSequenceClassification,
    BilingualGlmModel,
    BilingualGlmPreTrainedModel,
)

AutoConfig.register(BilingualGlmConfig.model_type, BilingualGlmConfig, exist_ok=True)
AutoModel.register(BilingualGlmConfig, BilingualGlmModel, exist_ok=True)
AutoModelForCausalLM.register(BilingualGlmConfig, BilingualGlmForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(
    BilingualGlmConfig, BilingualGlmForSequenceClassification, exist_ok=True
)

__version__ = "0.1.0"
__all__ = [
    "BilingualGlmConfig",
    "BilingualGlmForCausalLM",
    "BilingualGlmForSequenceClassification",
    "BilingualGlmModel",
    "BilingualGlmPreTrainedModel",
    "GLM_SPECIAL_TOKENS",
    "PRESETS",
]
