"""The interface between a self-supervised method and the trainer, and what methods share.

A method is an ``nn.Module`` that owns the online backbone, its heads and any target network
(momentum encoder or teacher). Per optimiser step the trainer calls, in order:

1. :meth:`Method.training_loss` on the views of the batch, under autocast;
2. backward, AMP unscaling, then :meth:`Method.adjust_gradients` (a method that keeps a
   layer out of training for a while removes its gradients here, before the monitor reads
   them, so the monitor records what the optimiser applies);
3. the optimiser step, then :meth:`Method.after_optimizer_step` (EMA updates).

Every state a method keeps between steps (a DINO centre, a SwAV queue) is a registered
buffer, so checkpoints and exact resume carry it with the weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class StepSchedule:
    """Training length in steps and epochs, for the schedules that methods keep by epoch."""

    total_steps: int
    steps_per_epoch: int

    def epochs_to_steps(self, epochs: float) -> int:
        return round(epochs * self.steps_per_epoch)


def cosine_momentum(step: int, total_steps: int, base_momentum: float) -> float:
    """EMA coefficient rising from ``base_momentum`` at step 0 to 1 along a half cosine.

    The schedule of MoCo v3, BYOL and DINO: 1 - (1 - m0) (cos(pi k / K) + 1) / 2.
    """
    progress = step / max(total_steps, 1)
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - base_momentum)


@torch.no_grad()
def ema_update(pairs: Sequence[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """Move each (target, online) module pair's parameters: m * target + (1 - m) * online.

    Parameters whose online twin is frozen are skipped, so a frozen patch projection stays
    bit-identical in the target too (an EMA of equal values can drift by an ulp).
    """
    targets: list[torch.Tensor] = []
    sources: list[torch.Tensor] = []
    for target, online in pairs:
        for t, o in zip(target.parameters(), online.parameters(), strict=True):
            if o.requires_grad:
                targets.append(t)
                sources.append(o)
    if targets:
        torch._foreach_lerp_(targets, sources, 1.0 - momentum)


def freeze_copy(module: nn.Module) -> None:
    """Take a target network's parameters out of autograd and the optimiser."""
    for parameter in module.parameters():
        parameter.requires_grad_(False)


def pooled(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Return the backbone's pooled features of ``images``, (B, embed_dim)."""
    return backbone.forward_head(backbone.forward_features(images), pre_logits=True)


class Method(nn.Module):
    """A self-supervised method; subclasses set ``backbone`` and implement the loss."""

    backbone: nn.Module

    def online_modules(self) -> dict[str, nn.Module]:
        """Return the trained modules by layer-group prefix, for the monitor and the optimiser.

        ``backbone`` is split into its layers; every other entry (``projector``,
        ``predictor``, ``prototypes``) is one layer group.
        """
        raise NotImplementedError

    def target_backbones(self) -> dict[str, nn.Module]:
        """Return the copies of the backbone that follow it without gradient, by attribute name.

        A frozen patch projection must stay frozen in them too; the frozen check reads them.
        """
        return {}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled online backbone features, (B, embed_dim), for the kNN monitor."""
        return pooled(self.backbone, images)

    def training_loss(
        self, views: Sequence[torch.Tensor], step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the loss of one step and the detached pooled online features of ``views[0]``.

        ``views`` contains two global views, then any local crops (multi-crop). The features
        are ones the loss already computes, so the dense kNN queue needs no extra forward.
        """
        raise NotImplementedError

    def adjust_gradients(self, step: int) -> None:
        """Change the gradients of ``step`` after backward and unscaling; by default nothing."""

    def after_optimizer_step(self, step: int) -> None:
        """Update what follows the optimiser step of ``step``; by default nothing."""

    def momentum_at(self, step: int) -> float:
        """Return the target network's EMA coefficient at ``step``, NaN without a target."""
        return math.nan


class TwoViewMethod(Method):
    """A method whose loss reads the two global views only (MoCo v3, SimCLR, BYOL).

    Subclasses implement :meth:`loss_and_features`; ``forward`` returns its loss.
    """

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        return self.loss_and_features(view1, view2)[0]

    def training_loss(
        self, views: Sequence[torch.Tensor], step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss_and_features(views[0], views[1])

    def loss_and_features(
        self, view1: torch.Tensor, view2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the loss and the detached pooled online features of ``view1``."""
        raise NotImplementedError
