"""Moved to ``bilingual_glm.data`` (``sentiment``, ``labeled``, ``cloze``, ``sft``, ``files``).

Kept as a re-export because docs/finetune.md of 0.1.0 told users to ``from bilingual_glm.finetune_data
import sentiment_splits``; new code imports from the ``bilingual_glm.data`` modules.
"""

from bilingual_glm.data.cloze import (
    DEFAULT_CLOZE_TEMPLATES,
    DEFAULT_VERBALIZERS,
    ClozeCollator,
    ClozeEncoder,
    cloze_scores,
    detect_language,
)
from bilingual_glm.data.labeled import load_labeled_data
from bilingual_glm.data.sentiment import (
    SENTIMENT_DATASET_ID,
    SENTIMENT_LABELS,
    SentimentCorpusStats,
    read_sentiment_corpus,
    sentiment_splits,
)
from bilingual_glm.data.sft import SftCollator, load_chat_data, pack_chats, tokenize_chat

__all__ = [
    "DEFAULT_CLOZE_TEMPLATES",
    "DEFAULT_VERBALIZERS",
    "SENTIMENT_DATASET_ID",
    "SENTIMENT_LABELS",
    "ClozeCollator",
    "ClozeEncoder",
    "SentimentCorpusStats",
    "SftCollator",
    "cloze_scores",
    "detect_language",
    "load_chat_data",
    "load_labeled_data",
    "pack_chats",
    "read_sentiment_corpus",
    "sentiment_splits",
    "tokenize_chat",
]
