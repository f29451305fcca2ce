"""The finetuning library under ``finetune.py``: its flags (``arguments``), one object per task owning
everything that differs between tasks (``tasks``: data, collator, model class, LoRA task type, trainer,
metrics, model-card fields; a registry instead of ``if task == ...``), the Trainer subclasses and the
JSONL callback (``trainers``), and LoRA (``lora``). What finetune.py shares with train.py (precision,
run config, JSONL log, row limits, checkpoint lookup, the CLI wrapper) comes from ``bilingual_glm.training``.
"""
