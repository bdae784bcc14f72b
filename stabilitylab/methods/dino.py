"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers").

Follows the public facebookresearch/dino code (main_dino.py for the loss, the centre and the
schedules, vision_transformer.py for DINOHead). The student is the backbone plus a head. The
head's ``projector`` group is an MLP of ``proj_layers`` linear layers with GELU (BN only with
``head_bn``) down to a ``proj_dim`` bottleneck. Its ``prototypes`` group L2-normalises the
bottleneck and applies a bias-free, weight-normalised linear layer to ``num_prototypes``
outputs, with the weight norm fixed to 1 (``norm_last_layer``; without it the norm trains).
The teacher is an EMA copy of the student without
gradient and encodes only the two global views. The student encodes every view, local crops
included. For each teacher view t and student view s != t the loss is the cross-entropy
between softmax((t - centre) / tau_t) and log_softmax(s / tau_s), averaged over the pairs.
A student whose outputs are uniform therefore scores ln K for K outputs, the chance level.
The centre is an EMA of the teacher outputs, updated after each loss.

Deviations from the public code, and why:

- The teacher temperature rises linearly per optimiser step over the warmup and reaches its
  final value when the warmup ends. DINO's schedule is a per-epoch ``linspace`` that reaches
  it in the last warmup epoch, but a step schedule also serves runs of a few epochs.
- The MLP comes from the project's ``build_mlp`` with its ReLUs replaced by GELUs. With
  ``head_bn`` its hidden linear layers then have no bias, which the BN after each makes
  redundant, where DINOHead keeps the bias.
- The last layer's gradients are removed before the trainer clips, so a clip of the total
  norm leaves them out. DINO removes them after clipping each parameter on its own, which
  gives the same result as the trainer's per-parameter clipping.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from stabilitylab.methods.base import (
    Method,
    StepSchedule,
    cosine_momentum,
    ema_update,
    freeze_copy,
    pooled,
)
from stabilitylab.models.heads import build_mlp
from stabilitylab.train import distributed

if TYPE_CHECKING:
    from stabilitylab.config import RunConfig

GLOBAL_VIEWS = 2


def build_projector(
    num_layers: int, in_dim: int, hidden_dim: int, bottleneck_dim: int, batch_norm: bool
) -> nn.Sequential:
    """Build DINOHead's MLP: GELU between the linear layers, no BN after the last one.

    Linear weights are drawn from a truncated normal with std 0.02 and biases are 0, as in
    DINOHead.
    """
    mlp = build_mlp(
        num_layers, in_dim, hidden_dim, bottleneck_dim, last_bn=False, batch_norm=batch_norm
    )
    for index, layer in enumerate(mlp):
        if isinstance(layer, nn.ReLU):
            mlp[index] = nn.GELU()
        elif isinstance(layer, nn.Linear):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return mlp


def build_last_layer(bottleneck_dim: int, num_outputs: int, fixed_norm: bool = True) -> nn.Linear:
    """Build DINO's last layer: weight-normalised and bias-free, its norms g starting at 1.

    The direction v keeps nn.Linear's default init, as in DINOHead. With ``fixed_norm``
    (DINO's ``norm_last_layer=True``) g is frozen, so every output is a cosine similarity.
    Without it g trains with the rest of the layer.
    """
    layer = weight_norm(nn.Linear(bottleneck_dim, num_outputs, bias=False))
    magnitude = layer.parametrizations.weight.original0
    with torch.no_grad():
        magnitude.fill_(1.0)
    magnitude.requires_grad_(not fixed_norm)
    return layer


def dino_loss(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    center: torch.Tensor,
    student_temperature: float,
    teacher_temperature: float,
) -> torch.Tensor:
    """Return DINO's cross-entropy, averaged over the (teacher view, other student view) pairs.

    ``student`` contains the logits (B, K) of every view, the global views first, and
    ``teacher`` the logits (B, K) of the two global views. ``center`` is (1, K). The loss is
    computed in float32.
    """
    student_log_probs = [
        F.log_softmax(logits.float() / student_temperature, dim=-1) for logits in student
    ]
    # Each teacher view is paired with every student view but its own, so the student term
    # of teacher view i is the sum over all views less view i.
    log_prob_sum = torch.stack(student_log_probs).sum(dim=0)  # (B, K)
    total = torch.zeros((), device=center.device)
    for index, logits in enumerate(teacher):
        targets = F.softmax((logits.float() - center) / teacher_temperature, dim=-1)
        others = log_prob_sum - student_log_probs[index]
        total = total - (targets * others).sum(dim=-1).mean()
    pairs = len(teacher) * (len(student) - 1)
    return total / pairs


def teacher_temperature_at(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Return the teacher temperature: linear from ``start`` to ``end`` over the warmup."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


class DINO(Method):
    """Student backbone and head, and their EMA teacher; the loss distils teacher into student."""

    def __init__(
        self,
        backbone: nn.Module,
        schedule: StepSchedule,
        *,
        proj_layers: int = 3,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 256,
        num_prototypes: int = 65536,
        batch_norm: bool = False,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.04,
        teacher_temperature_warmup: float = 0.04,
        teacher_temperature_warmup_epochs: float = 0.0,
        center_momentum: float = 0.9,
        freeze_last_layer_epochs: float = 1.0,
        base_momentum: float = 0.996,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        self.schedule = schedule
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.teacher_temperature_warmup = teacher_temperature_warmup
        self.temperature_warmup_steps = schedule.epochs_to_steps(teacher_temperature_warmup_epochs)
        self.center_momentum = center_momentum
        self.freeze_last_layer_steps = schedule.epochs_to_steps(freeze_last_layer_epochs)
        self.base_momentum = base_momentum

        self.backbone = backbone
        self.projector = build_projector(
            proj_layers, backbone.embed_dim, proj_hidden_dim, proj_dim, batch_norm
        )
        self.prototypes = build_last_layer(proj_dim, num_prototypes, fixed_norm=norm_last_layer)
        # The teacher starts as an exact copy, frozen patch projection included.
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_projector = copy.deepcopy(self.projector)
        self.teacher_prototypes = copy.deepcopy(self.prototypes)
        for module in (self.teacher_backbone, self.teacher_projector, self.teacher_prototypes):
            freeze_copy(module)
        self.register_buffer("center", torch.zeros(1, num_prototypes))

    @classmethod
    def from_config(cls, config: RunConfig, backbone: nn.Module, schedule: StepSchedule) -> DINO:
        return cls(
            backbone,
            schedule,
            proj_layers=config.proj_layers,
            proj_hidden_dim=config.proj_hidden_dim,
            proj_dim=config.proj_dim,
            num_prototypes=config.num_prototypes,
            batch_norm=config.head_bn,
            student_temperature=config.temperature,
            teacher_temperature=config.teacher_temperature,
            teacher_temperature_warmup=config.teacher_temperature_warmup,
            teacher_temperature_warmup_epochs=config.teacher_temperature_warmup_epochs,
            center_momentum=config.center_momentum,
            freeze_last_layer_epochs=config.freeze_last_layer_epochs,
            base_momentum=config.momentum,
            norm_last_layer=config.norm_last_layer,
        )

    def online_modules(self) -> dict[str, nn.Module]:
        return {
            "backbone": self.backbone,
            "projector": self.projector,
            "prototypes": self.prototypes,
        }

    def target_backbones(self) -> dict[str, nn.Module]:
        return {"teacher_backbone": self.teacher_backbone}

    def teacher_temperature_at(self, step: int) -> float:
        return teacher_temperature_at(
            step,
            self.temperature_warmup_steps,
            self.teacher_temperature_warmup,
            self.teacher_temperature,
        )

    def last_layer_frozen(self, step: int) -> bool:
        """Tell whether ``step`` falls in the first epochs, when the last layer gets no gradient."""
        return step < self.freeze_last_layer_steps

    def training_loss(
        self, views: Sequence[torch.Tensor], step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if len(views) < GLOBAL_VIEWS:
            raise ValueError(f"DINO needs two global views, got {len(views)} views")
        batch = views[0].shape[0]
        global_views = torch.cat(list(views[:GLOBAL_VIEWS]))  # (2B, C, H, W)

        # The student encodes each resolution in one pass, as DINO's MultiCropWrapper does.
        student_pooled = [pooled(self.backbone, global_views)]
        if len(views) > GLOBAL_VIEWS:
            student_pooled.append(pooled(self.backbone, torch.cat(list(views[GLOBAL_VIEWS:]))))
        student_logits = self.prototypes(
            F.normalize(self.projector(torch.cat(student_pooled)), dim=-1)
        )  # (V B, K)
        with torch.no_grad():
            teacher_logits = self.teacher_prototypes(
                F.normalize(
                    self.teacher_projector(pooled(self.teacher_backbone, global_views)), dim=-1
                )
            )  # (2B, K)

        loss = dino_loss(
            student_logits.split(batch),
            teacher_logits.split(batch),
            self.center,
            self.student_temperature,
            self.teacher_temperature_at(step),
        )
        self.update_center(teacher_logits)
        return loss, student_pooled[0][:batch].detach()

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """Move the centre towards the batch mean of ``teacher_logits`` (N, K) by EMA."""
        # Under torchrun the mean spans the global batch, as DINO's all-reduce does.
        total = distributed.all_reduce_sum(teacher_logits.float().sum(dim=0, keepdim=True))
        batch_center = total / (teacher_logits.shape[0] * distributed.world_size())
        momentum = self.center_momentum
        self.center.copy_(self.center * momentum + batch_center * (1 - momentum))

    def adjust_gradients(self, step: int) -> None:
        if self.last_layer_frozen(step):
            for parameter in self.prototypes.parameters():
                parameter.grad = None

    def momentum_at(self, step: int) -> float:
        return cosine_momentum(step, self.schedule.total_steps, self.base_momentum)

    def after_optimizer_step(self, step: int) -> None:
        ema_update(
            [
                (self.teacher_backbone, self.backbone),
                (self.teacher_projector, self.projector),
                (self.teacher_prototypes, self.prototypes),
            ],
            self.momentum_at(step),
        )
