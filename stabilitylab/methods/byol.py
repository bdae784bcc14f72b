"""BYOL (Grill et al., 2020), following google-deepmind/deepmind-research ``byol``.

The online network is the backbone, a projector and a predictor. The target network is an
EMA of the online backbone and projector. Its coefficient rises from ``base_momentum``
(0.996 in the recipe) to 1 along a half cosine over training. Each view goes through both
networks separately, so BN statistics are per view, as in the public code. The loss
regresses the online prediction of each view onto the target projection of the other:
2 - 2 cos(p, z) for each of the two orders, summed, then averaged over the batch. It lies
in [0, 8] and has no chance level, because a collapse to a constant drives it to 0.

Projector and predictor are the public code's MLP: a linear layer, BN and ReLU, then a
linear output layer without BN or bias (``last_bn=False``). The public code's hidden linear
layer has a bias, which the BN after it cancels, so it is left out here.

Deviations from the public code, with their reasons:

- The target network starts as an exact copy of the online one, while the public code
  initialises it from its own random key. A copy keeps a frozen patch projection identical
  in both networks, so the frozen arm freezes the same layer everywhere.
- The target has no predictor. The public code's target computes one but never uses it.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from stabilitylab.errors import ConfigError
from stabilitylab.methods.base import (
    StepSchedule,
    TwoViewMethod,
    cosine_momentum,
    ema_update,
    freeze_copy,
    pooled,
)
from stabilitylab.models.heads import build_mlp

if TYPE_CHECKING:
    from stabilitylab.config import RunConfig


def regression_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Return 2 - 2 cos(prediction, target) per row of (B, D) inputs, shape (B,)."""
    prediction = F.normalize(prediction.float(), dim=1)
    target = F.normalize(target.float(), dim=1)
    return 2 - 2 * (prediction * target).sum(dim=1)


def byol_loss(
    prediction1: torch.Tensor,
    prediction2: torch.Tensor,
    target1: torch.Tensor,
    target2: torch.Tensor,
) -> torch.Tensor:
    """Return BYOL's symmetric loss: each view's prediction against the other's target.

    The two orders are summed per image, then averaged over the batch, so the loss lies in
    [0, 8].
    """
    loss = regression_loss(prediction1, target2) + regression_loss(prediction2, target1)
    return loss.mean()


class BYOL(TwoViewMethod):
    """Online network with predictor and an EMA target network. ``forward`` returns the loss.

    ``batch_norm=False`` is the study's heads-without-BN ablation.
    """

    def __init__(
        self,
        backbone: nn.Module,
        proj_hidden_dim: int,
        proj_dim: int,
        *,
        proj_layers: int = 2,
        batch_norm: bool = True,
        base_momentum: float = 0.996,
        schedule: StepSchedule | None = None,
    ) -> None:
        super().__init__()
        self.base_momentum = base_momentum
        self.schedule = schedule
        self.backbone = backbone
        self.projector = build_mlp(
            proj_layers,
            backbone.embed_dim,
            proj_hidden_dim,
            proj_dim,
            last_bn=False,
            batch_norm=batch_norm,
        )
        self.predictor = build_mlp(
            2, proj_dim, proj_hidden_dim, proj_dim, last_bn=False, batch_norm=batch_norm
        )
        # The target starts as an exact copy, frozen patch projection included.
        self.target_backbone = copy.deepcopy(backbone)
        self.target_projector = copy.deepcopy(self.projector)
        freeze_copy(self.target_backbone)
        freeze_copy(self.target_projector)

    @classmethod
    def from_config(cls, config: RunConfig, backbone: nn.Module, schedule: StepSchedule) -> BYOL:
        if not config.predictor:
            raise ConfigError(
                "predictor False is invalid for BYOL, which collapses to a constant without "
                "its predictor. Set predictor to True"
            )
        return cls(
            backbone,
            config.proj_hidden_dim,
            config.proj_dim,
            proj_layers=config.proj_layers,
            batch_norm=config.head_bn,
            base_momentum=config.momentum,
            schedule=schedule,
        )

    def online_modules(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, "projector": self.projector, "predictor": self.predictor}

    def target_backbones(self) -> dict[str, nn.Module]:
        return {"target_backbone": self.target_backbone}

    def loss_and_features(
        self, view1: torch.Tensor, view2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the loss and the detached pooled online features of ``view1`` (B, embed_dim)."""
        pooled1 = pooled(self.backbone, view1)
        prediction1 = self.predictor(self.projector(pooled1))
        prediction2 = self.predictor(self.projector(pooled(self.backbone, view2)))
        with torch.no_grad():
            target1 = self.target_projector(pooled(self.target_backbone, view1))
            target2 = self.target_projector(pooled(self.target_backbone, view2))
        loss = byol_loss(prediction1, prediction2, target1, target2)
        return loss, pooled1.detach()

    def momentum_at(self, step: int) -> float:
        total = self.schedule.total_steps if self.schedule is not None else 1
        return cosine_momentum(step, total, self.base_momentum)

    def after_optimizer_step(self, step: int) -> None:
        self.update_target(self.momentum_at(step))

    def update_target(self, momentum: float) -> None:
        """Move each target parameter towards its online twin: m * target + (1 - m) * online."""
        ema_update(
            [
                (self.target_backbone, self.backbone),
                (self.target_projector, self.projector),
            ],
            momentum,
        )
