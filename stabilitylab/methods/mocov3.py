"""MoCo v3 for ViT (Chen, Xie and He, 2021), following the public moco-v3 code.

The online encoder is the backbone plus a 3-layer projector, followed by a 2-layer
predictor. The momentum encoder is an EMA of backbone and projector, not of the predictor.
Each view goes through the encoders separately, so BatchNorm statistics are per view. The
loss is the InfoNCE of L2-normalised queries against the keys of the whole global batch,
scaled by 2 tau and symmetrised over the two views, so its chance level is about
4 tau ln(B) for global batch B.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from stabilitylab.methods.base import (
    StepSchedule,
    TwoViewMethod,
    cosine_momentum,
    ema_update,
    freeze_copy,
)
from stabilitylab.models.heads import build_mlp
from stabilitylab.train import distributed

if TYPE_CHECKING:
    from stabilitylab.config import RunConfig


def contrastive_loss(query: torch.Tensor, key: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of ``query`` (B, D) against the keys of the global batch, scaled by 2 tau.

    ``key`` (B, D) contains this process's keys. Under torchrun the keys of every process are
    gathered without gradient, as MoCo v3's ``concat_all_gather`` does, and the positive of
    query i is the key at this process's offset plus i.
    """
    query = F.normalize(query.float(), dim=1)
    key = F.normalize(distributed.gather(key.float()), dim=1)
    logits = query @ key.T / temperature  # (B, world B), positives on this process's block
    offset = distributed.rank() * query.shape[0]
    labels = torch.arange(query.shape[0], device=logits.device) + offset
    return F.cross_entropy(logits, labels) * (2 * temperature)


def momentum_at(step: int, total_steps: int, base_momentum: float) -> float:
    """EMA coefficient rising from ``base_momentum`` at step 0 to 1 along a half cosine."""
    return cosine_momentum(step, total_steps, base_momentum)


class MoCoV3(TwoViewMethod):
    """Online encoder, predictor and momentum encoder; ``forward`` returns the loss.

    ``predictor=False`` and ``batch_norm=False`` are the study's ablations: the queries are
    then the projector outputs, and the heads have no BN.
    """

    def __init__(
        self,
        backbone: nn.Module,
        proj_hidden_dim: int,
        proj_dim: int,
        temperature: float,
        *,
        proj_layers: int = 3,
        predictor: bool = True,
        batch_norm: bool = True,
        base_momentum: float = 0.99,
        schedule: StepSchedule | None = None,
    ) -> None:
        super().__init__()
        embed_dim = backbone.embed_dim
        self.temperature = temperature
        self.base_momentum = base_momentum
        self.schedule = schedule
        self.backbone = backbone
        self.projector = build_mlp(
            proj_layers, embed_dim, proj_hidden_dim, proj_dim, batch_norm=batch_norm
        )
        self.predictor = (
            build_mlp(2, proj_dim, proj_hidden_dim, proj_dim, batch_norm=batch_norm)
            if predictor
            else nn.Identity()
        )
        # The momentum encoder starts as an exact copy, frozen patch projection included.
        self.momentum_backbone = copy.deepcopy(backbone)
        self.momentum_projector = copy.deepcopy(self.projector)
        freeze_copy(self.momentum_backbone)
        freeze_copy(self.momentum_projector)

    @classmethod
    def from_config(cls, config: RunConfig, backbone: nn.Module, schedule: StepSchedule) -> MoCoV3:
        return cls(
            backbone,
            config.proj_hidden_dim,
            config.proj_dim,
            config.temperature,
            proj_layers=config.proj_layers,
            predictor=config.predictor,
            batch_norm=config.head_bn,
            base_momentum=config.momentum,
            schedule=schedule,
        )

    def online_modules(self) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {"backbone": self.backbone, "projector": self.projector}
        if not isinstance(self.predictor, nn.Identity):
            modules["predictor"] = self.predictor
        return modules

    def target_backbones(self) -> dict[str, nn.Module]:
        return {"momentum_backbone": self.momentum_backbone}

    def _momentum_parameters(self) -> list[nn.Parameter]:
        return [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]

    def _encode(
        self, backbone: nn.Module, projector: nn.Module, images: torch.Tensor
    ) -> torch.Tensor:
        tokens = backbone.forward_features(images)
        return projector(backbone.forward_head(tokens, pre_logits=True))

    def loss_and_features(
        self, view1: torch.Tensor, view2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the loss and the detached pooled online features of ``view1`` (B, embed_dim).

        The features are the ones the loss already computes, the same as :meth:`features`
        gives for ``view1``, in the autocast dtype, so the dense kNN queue needs no extra
        forward pass.
        """
        pooled1 = self.backbone.forward_head(self.backbone.forward_features(view1), pre_logits=True)
        query1 = self.predictor(self.projector(pooled1))
        query2 = self.predictor(self._encode(self.backbone, self.projector, view2))
        with torch.no_grad():
            key1 = self._encode(self.momentum_backbone, self.momentum_projector, view1)
            key2 = self._encode(self.momentum_backbone, self.momentum_projector, view2)
        loss = contrastive_loss(query1, key2, self.temperature) + contrastive_loss(
            query2, key1, self.temperature
        )
        return loss, pooled1.detach()

    def momentum_at(self, step: int) -> float:
        total = self.schedule.total_steps if self.schedule is not None else 1
        return cosine_momentum(step, total, self.base_momentum)

    def after_optimizer_step(self, step: int) -> None:
        self.update_momentum_encoder(self.momentum_at(step))

    @torch.no_grad()
    def update_momentum_encoder(self, momentum: float) -> None:
        """Move each momentum parameter towards its online twin: m * ema + (1 - m) * online.

        Pairs whose online parameter is frozen are skipped, so a frozen patch projection stays
        bit-identical in the momentum encoder too (an EMA of equal values can drift by an ulp).
        """
        ema_update(
            [
                (self.momentum_backbone, self.backbone),
                (self.momentum_projector, self.projector),
            ],
            momentum,
        )
