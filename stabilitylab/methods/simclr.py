"""SimCLR (Chen, Kornblith, Norouzi and Hinton, 2020), following google-research/simclr.

The encoder is the backbone plus a projector MLP, and there is no target network. The loss
is NT-Xent over the 2B L2-normalised projections of a global batch of B images. Each
projection's positive is the other view of its image, the other 2B - 2 projections are its
negatives, and its similarity with itself is masked out. The cosine similarities are divided
by the temperature, and the cross-entropy is averaged over the 2B anchors. Features that
carry no information about the positive give ln(2B - 1).

The projector follows the public code's head, in v1 (``head_proj_mode=nonlinear``) and v2
(``proj_head_mode=nonlinear``) alike: every linear layer is followed by BatchNorm,
including the output layer, whose BN has no offset. ``last_bn=True`` gives that output BN.

Deviations from the public code, with their reasons:

- The output BN has no learnable scale either (the public one keeps its scale), because
  :func:`stabilitylab.models.heads.build_mlp` builds the affine-free output BN of MoCo v3.
- Each view goes through the encoder separately, so BN statistics are per view, as in MoCo
  v3 here. The public code encodes both views as one batch of 2B. Per-view statistics make
  the heads of the methods in this package normalise alike, so the methods differ in their
  loss, not in how BN batches the views.
- The loss is the mean over the 2B anchors. The public code sums the two views' losses and
  averages over the B images, which is twice this value. The gradients differ by that
  constant factor only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from stabilitylab.methods.base import TwoViewMethod, pooled
from stabilitylab.models.heads import build_mlp
from stabilitylab.train import distributed

if TYPE_CHECKING:
    from stabilitylab.config import RunConfig
    from stabilitylab.methods.base import StepSchedule


def nt_xent_loss(
    projection1: torch.Tensor, projection2: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Return NT-Xent of two views' projections (B, D) each, the mean over the 2B anchors.

    Row i of ``projection1`` and row i of ``projection2`` are the two views of image i.
    Under torchrun the anchors are this process's 2B projections and the candidates those of
    the global batch, gathered with gradient as SimCLR's ``cross_replica_concat`` does, so
    each process's negatives are trained by every process's loss.
    """
    batch = projection1.shape[0]
    anchors = F.normalize(torch.cat([projection1, projection2]).float(), dim=1)  # (2B, D)
    view1 = distributed.gather_with_grad(anchors[:batch])
    view2 = distributed.gather_with_grad(anchors[batch:])
    candidates = torch.cat([view1, view2])  # (2 world B, D): all first views, then all second
    logits = anchors @ candidates.T / temperature  # (2B, 2 world B)
    total = view1.shape[0]
    index = torch.arange(batch, device=logits.device) + distributed.rank() * batch
    # Anchor i of view 1 is candidate index[i]; its positive is candidate total + index[i].
    own = torch.cat([index, index + total])
    logits = logits.scatter(1, own[:, None], float("-inf"))
    labels = torch.cat([index + total, index])
    return F.cross_entropy(logits, labels)


class SimCLR(TwoViewMethod):
    """Backbone and projector trained with NT-Xent. ``forward`` returns the loss.

    ``batch_norm=False`` is the study's heads-without-BN ablation.
    """

    def __init__(
        self,
        backbone: nn.Module,
        proj_hidden_dim: int,
        proj_dim: int,
        temperature: float,
        *,
        proj_layers: int = 2,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.backbone = backbone
        self.projector = build_mlp(
            proj_layers,
            backbone.embed_dim,
            proj_hidden_dim,
            proj_dim,
            last_bn=True,
            batch_norm=batch_norm,
        )

    @classmethod
    def from_config(cls, config: RunConfig, backbone: nn.Module, schedule: StepSchedule) -> SimCLR:
        return cls(
            backbone,
            config.proj_hidden_dim,
            config.proj_dim,
            config.temperature,
            proj_layers=config.proj_layers,
            batch_norm=config.head_bn,
        )

    def online_modules(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, "projector": self.projector}

    def loss_and_features(
        self, view1: torch.Tensor, view2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the loss and the detached pooled features of ``view1`` (B, embed_dim)."""
        pooled1 = pooled(self.backbone, view1)
        projection1 = self.projector(pooled1)
        projection2 = self.projector(pooled(self.backbone, view2))
        loss = nt_xent_loss(projection1, projection2, self.temperature)
        return loss, pooled1.detach()
