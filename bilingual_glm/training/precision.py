"""``--mixed_precision auto``: the one rule train.py and finetune.py share."""

from __future__ import annotations

import torch

from bilingual_glm.modeling.kernels_bilingual_glm import fast_bf16

CHOICES = ("auto", "no", "bf16", "fp16")


def resolve_mixed_precision(choice: str, launch_choice: str | None = None, device: str | None = None) -> str:
    """``auto``: what the launch chose (an ``accelerate launch`` config), else bf16 where the device has it
    natively (``fast_bf16``), else fp32: emulated bf16 on a CPU without AVX512-BF16/AMX is many times slower
    than fp32, native bf16 about twice as fast."""
    if choice not in CHOICES:
        raise ValueError(f"--mixed_precision must be auto, no, bf16 or fp16, got {choice!r}")
    if choice != "auto":
        return choice
    if launch_choice:
        return launch_choice
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return "bf16" if fast_bf16(device) else "no"
