"""Experiments behind docs/finetune.md and docs/chat.md: baselines, ensembles, weight soups, chat samples."""
