"""Per-step learning-rate schedule: linear warmup from 0, then a half cosine to 0."""

from __future__ import annotations

import math

import torch
from timm.scheduler import CosineLRScheduler


def build_lr_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> CosineLRScheduler:
    """timm's cosine schedule in steps; the cosine spans the steps after the warmup.

    ``warmup_prefix=True`` starts the cosine at the end of the warmup, as in MoCo v3, instead
    of counting the warmup steps as part of the cosine.
    """
    return CosineLRScheduler(
        optimizer,
        t_initial=max(total_steps - warmup_steps, 1),
        lr_min=0.0,
        warmup_t=warmup_steps,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def lr_at(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def cosine_value(step: int, total_steps: int, start: float, end: float) -> float:
    """Return a half cosine from ``start`` at step 0 to ``end`` at ``total_steps``.

    DINO's schedule for the weight decay, 0.04 to 0.4 over training.
    """
    progress = min(step / max(total_steps, 1), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))
