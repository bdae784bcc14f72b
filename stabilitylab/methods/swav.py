"""SwAV (Caron et al., 2020), following facebookresearch/swav's main_swav.py.

The online network is the backbone, a projector (Linear-BN-ReLU-Linear) whose output is
L2-normalised, and a bias-free linear layer of K prototypes whose rows are L2-normalised
before every step. The scores of a view are the cosines between its projections and the
prototypes. The codes of each global view come from Sinkhorn-Knopp on exp(scores / epsilon)
over the batch, without gradient. The loss is the swapped prediction: each global view's
code against the softmax(scores / tau) of every other view, global or local, averaged over
those views and over the two global views. Local crops are predicted but never coded. A
uniform prediction gives ln K against any code, which is the chance level.

As in main_swav.py, views of one size go through the backbone together, and the projector
runs once over all views, so its BatchNorm statistics span every crop of the step. The
prototypes get no gradient for the first ``freeze_prototypes_steps`` steps. An optional
queue of the global views' earlier projections joins the code computation, as in
main_swav.py, from the step it is full.

Deviations from main_swav.py, and why:

- The queue is filled from step 0 instead of being created empty at the queue's start
  epoch, so it is full when that epoch comes, and ``queue_start_step`` is the step the
  codes start using it (once it is full). main_swav.py starts using it queue_length / B
  steps after that epoch.
- The prototype scores are computed in float32 with autocast off, where main_swav.py with
  --use_fp16 runs them in fp16 under apex. bf16 keeps 8 significant bits, so a cosine near
  1 is off by up to 0.002, which exp(score / 0.05) turns into a 4 % change of the term.
- Sinkhorn-Knopp exponentiates (score - 1) / epsilon instead of score / epsilon. Scores
  are cosines, at most 1, so the terms stay at most 1 and cannot overflow for a small
  epsilon. The shift multiplies every term by one constant, which the first normalisation
  removes, so the codes are unchanged.
- With BatchNorm, the projector's linear layers have no bias (``build_mlp``), where SwAV's
  have one. The hidden layer's bias is redundant before BN, the last layer's is not.

Under torchrun the Sinkhorn-Knopp sums are all-reduced, so the codes equipartition the
global batch, and the sample count is the global one, as in main_swav.py. The queue differs
in layout only: main_swav.py keeps a queue of queue_length / N rows in each of the N
processes. Here every process keeps the whole queue of the global batch's projections,
gathered in rank order, and scores its own 1/N of it in Sinkhorn-Knopp. The rows that take
part are the same, and a checkpoint written by rank 0 contains the queue of every process.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from stabilitylab.methods.base import Method, pooled
from stabilitylab.models.heads import build_mlp
from stabilitylab.train import distributed

if TYPE_CHECKING:
    from stabilitylab.config import RunConfig
    from stabilitylab.methods.base import StepSchedule

# The views whose codes are computed, and whose projections the queue keeps: views[0] and
# views[1]. Any further views are local crops.
GLOBAL_VIEWS = 2


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Return ``tensor`` summed over the training processes (itself in one process)."""
    return distributed.all_reduce_sum(tensor)


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Return the codes (N, K) of ``scores`` (N, K): equipartitioned soft assignments.

    Q = exp(scores / epsilon), as a (K, N) matrix, is scaled to sum 1, then ``iterations``
    times each prototype row to 1/K and each sample column to 1/N. The columns are scaled
    last and multiplied by N, so every sample's code sums to 1 exactly. Each prototype's
    total is N/K within the convergence of ``iterations`` rounds.
    """
    scores = scores.float()
    # Cosine scores are at most 1, so no term exceeds 1 (see the module docstring).
    # NOTE: a very small epsilon still underflows. On random unit vectors (4096 samples,
    # 3000 prototypes, 128 dimensions), 0.01 gave finite codes and 0.005 NaN ones.
    q = torch.exp((scores - 1.0) / epsilon).T  # (K, N)
    num_prototypes = q.shape[0]
    num_samples = q.shape[1] * distributed.world_size()  # every process scores as many
    q /= sum_over_processes(q.sum())
    for _ in range(iterations):
        q /= sum_over_processes(q.sum(dim=1, keepdim=True))
        q /= num_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= num_samples
    q *= num_samples
    return q.T


def swapped_prediction_loss(
    scores: torch.Tensor, codes: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Return SwAV's loss of ``scores`` (V, B, K) for all views and ``codes`` (C, B, K).

    ``codes[i]`` belongs to view i, so the first C views are the coded ones. Each code is
    scored by the cross-entropy -sum_k q_k log softmax(s / tau)_k against the scores s of
    every other view. That is averaged over the batch and the V - 1 other views, and the
    loss is the mean over the C coded views.
    """
    num_views = scores.shape[0]
    log_probs = F.log_softmax(scores.float() / temperature, dim=2)  # (V, B, K)
    total = scores.new_zeros((), dtype=torch.float32)
    for view, code in enumerate(codes):
        # (V,) cross-entropies of this code against every view, its own view included.
        cross = -(code.float()[None] * log_probs).sum(dim=2).mean(dim=1)
        others = torch.cat([cross[:view], cross[view + 1 :]])
        total = total + others.sum() / (num_views - 1)
    return total / codes.shape[0]


class SwAV(Method):
    """Backbone, projector and prototypes, with an optional queue for the codes.

    ``queue_length`` is the number of earlier projections kept per global view (0: no
    queue). ``queue_start_step`` and ``freeze_prototypes_steps`` are optimiser steps.
    """

    def __init__(
        self,
        backbone: nn.Module,
        proj_hidden_dim: int,
        proj_dim: int,
        num_prototypes: int,
        temperature: float,
        *,
        proj_layers: int = 2,
        batch_norm: bool = True,
        sinkhorn_iterations: int = 3,
        sinkhorn_epsilon: float = 0.05,
        queue_length: int = 0,
        queue_start_step: int = 0,
        freeze_prototypes_steps: int = 0,
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.sinkhorn_iterations = sinkhorn_iterations
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.queue_length = queue_length
        self.queue_start_step = queue_start_step
        self.freeze_prototypes_steps = freeze_prototypes_steps
        self.backbone = backbone
        self.projector = build_mlp(
            proj_layers,
            backbone.embed_dim,
            proj_hidden_dim,
            proj_dim,
            last_bn=False,
            batch_norm=batch_norm,
        )
        self.prototypes = nn.Linear(proj_dim, num_prototypes, bias=False)
        self.normalize_prototypes()
        # The newest projections come first in each view's queue. queue_filled counts the
        # filled rows per view, and _queue_rows is its host copy, so deciding whether the
        # queue is full needs no host sync. Loading a state dict sets the copy again.
        self.register_buffer("queue", torch.zeros(GLOBAL_VIEWS, queue_length, proj_dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self._queue_rows = 0
        self.register_load_state_dict_post_hook(self._read_queue_filled)

    @classmethod
    def from_config(cls, config: RunConfig, backbone: nn.Module, schedule: StepSchedule) -> SwAV:
        return cls(
            backbone,
            config.proj_hidden_dim,
            config.proj_dim,
            config.num_prototypes,
            config.temperature,
            proj_layers=config.proj_layers,
            batch_norm=config.head_bn,
            sinkhorn_iterations=config.sinkhorn_iterations,
            sinkhorn_epsilon=config.sinkhorn_epsilon,
            queue_length=config.queue_length,
            queue_start_step=schedule.epochs_to_steps(config.queue_start_epochs),
            freeze_prototypes_steps=schedule.epochs_to_steps(config.freeze_last_layer_epochs),
        )

    def online_modules(self) -> dict[str, nn.Module]:
        return {
            "backbone": self.backbone,
            "projector": self.projector,
            "prototypes": self.prototypes,
        }

    @staticmethod
    def _read_queue_filled(module: SwAV, incompatible_keys: object) -> None:
        # One host sync per load, none per step.
        module._queue_rows = int(module.queue_filled.item())

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Scale every prototype (a row of the prototypes weight) to unit L2 norm, in place."""
        weight = self.prototypes.weight
        weight.copy_(F.normalize(weight.float(), dim=1))

    def queue_in_use(self, step: int) -> bool:
        """Tell whether the codes of ``step`` include the queue: started and full."""
        return (
            self.queue_length > 0
            and step >= self.queue_start_step
            and self._queue_rows >= self.queue_length
        )

    def training_loss(
        self, views: Sequence[torch.Tensor], step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self._check_views(views)
        self.normalize_prototypes()
        features = self._pooled_views(views)  # (V B, embed_dim)
        embeddings = F.normalize(self.projector(features).float(), dim=1)  # (V B, D)
        scores = self._scores(embeddings).view(len(views), batch, -1)  # (V, B, K)
        codes = self.assign_codes(scores[:GLOBAL_VIEWS].detach(), step)
        global_embeddings = embeddings[: GLOBAL_VIEWS * batch].view(GLOBAL_VIEWS, batch, -1)
        self._push_to_queue(global_embeddings.detach())
        loss = swapped_prediction_loss(scores, codes, self.temperature)
        return loss, features[:batch].detach()

    def _check_views(self, views: Sequence[torch.Tensor]) -> int:
        """Return the batch size of ``views``; raise ValueError unless the views fit."""
        if len(views) < GLOBAL_VIEWS:
            raise ValueError(
                f"SwAV needs {GLOBAL_VIEWS} global views, then any local crops, but got "
                f"{len(views)} view(s)"
            )
        sizes = [view.shape[0] for view in views]
        if len(set(sizes)) != 1:
            raise ValueError(
                f"invalid views: their batch sizes {sizes} differ, but every view must be a "
                "crop of the same images"
            )
        batch = sizes[0]
        global_batch = batch * distributed.world_size()
        if global_batch > self.queue_length > 0:
            raise ValueError(
                f"the queue of {self.queue_length} projections per view is shorter than the "
                f"global batch of {global_batch}; pass a queue length that is a multiple of "
                "the batch size"
            )
        return batch

    def _pooled_views(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """Return the pooled features of all views in order, (V B, embed_dim).

        Consecutive views of one size go through the backbone as one batch.
        """
        features = [
            pooled(self.backbone, torch.cat(list(group)))
            for _, group in itertools.groupby(views, key=lambda view: view.shape[-2:])
        ]
        return torch.cat(features)

    def _scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Return the cosines (N, K) of unit ``embeddings`` (N, D) with the prototypes."""
        with torch.autocast(embeddings.device.type, enabled=False):
            return self.prototypes(embeddings.float())

    @torch.no_grad()
    def assign_codes(self, scores: torch.Tensor, step: int) -> torch.Tensor:
        """Return the codes (C, B, K) of the global views' ``scores`` (C, B, K) at ``step``.

        With the queue in use, each view's queue is scored against the current prototypes
        and joins its batch in Sinkhorn-Knopp. Only the batch's codes are returned.
        """
        batch = scores.shape[1]
        use_queue = self.queue_in_use(step)
        # Each process scores its own block of the queue; together they cover all of it.
        share = self.queue_length // distributed.world_size()
        first = distributed.rank() * share
        codes = []
        for view, view_scores in enumerate(scores):
            if use_queue:
                queue = self.queue[view, first : first + share]
                view_scores = torch.cat([self._scores(queue), view_scores])
            view_codes = sinkhorn_knopp(
                view_scores, self.sinkhorn_epsilon, self.sinkhorn_iterations
            )
            codes.append(view_codes[-batch:])
        return torch.stack(codes)

    @torch.no_grad()
    def _push_to_queue(self, embeddings: torch.Tensor) -> None:
        """Put the global views' projections (C, B, D) at the front of their queues."""
        if self.queue_length == 0:
            return
        # The global batch's projections, in rank order: the queue of every process is alike.
        embeddings = distributed.gather(embeddings.transpose(0, 1)).transpose(0, 1)
        batch = embeddings.shape[1]
        self.queue.copy_(torch.cat([embeddings, self.queue[:, :-batch]], dim=1))
        self._queue_rows = min(self._queue_rows + batch, self.queue_length)
        self.queue_filled.fill_(self._queue_rows)

    def adjust_gradients(self, step: int) -> None:
        # The step is known on the host, so no sync.
        if step < self.freeze_prototypes_steps:
            self.prototypes.weight.grad = None
