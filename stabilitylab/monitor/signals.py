"""Per-step training signals, computed with batched tensor ops and kept on the device.

For each layer group and optimiser step the monitor records the gradient norm (after AMP
unscaling), the weight norm and the update-to-weight ratio ||w_after - w_before|| /
||w_before||; per step it records the loss, the total gradient norm, the gradient norm with
respect to the tokens entering the first block, and the loss scale. A group without any
gradient (a frozen patch projection) gets NaN, never 0.

Two more per-step flags stay out of the tables: ``skipped`` (the optimiser step was not
applied, because the gradient scaler found inf or NaN gradients or the run skips non-finite
steps) and ``diverged`` (a non-finite loss or gradient norm reached a step that was applied,
or a non-finite loss under the stop policy). See :meth:`TrainingMonitor.record_gradients`.

Nothing here reads a value back to the host: norms are taken with ``torch._foreach_norm``
over all parameters at once, summed per group with ``index_add_``, and written into
preallocated device buffers. :meth:`TrainingMonitor.drain` copies the buffers to the host in
one transfer per table when the run flushes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stabilitylab.train import distributed

STEP_SIGNALS = ("loss", "grad_norm", "token_grad_norm", "loss_scale", "skipped", "diverged")
LAYER_SIGNALS = ("grad_norm", "weight_norm", "update_ratio")


@dataclass
class DrainedSignals:
    """Host copies of the recorded rows: ``steps`` (R, 6) and ``layers`` (R, G, 3).

    The columns follow :data:`STEP_SIGNALS` and :data:`LAYER_SIGNALS`.
    """

    steps: torch.Tensor
    layers: torch.Tensor


class TokenGradient:
    """Accumulate ||d loss / d tokens||^2 for the tokens entering a module, on the device.

    A forward pre-hook registers a tensor hook on the module's input while autograd records;
    both views of a step add to the same accumulator. When the input does not require grad
    (frozen patch projection with no other trainable input), it is replaced by a detached leaf
    that does, which changes no other gradient because nothing upstream trains.
    """

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.squared = torch.zeros((), device=device, dtype=torch.float32)
        self._handle = module.register_forward_pre_hook(self._pre_hook)

    def _pre_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        if not (torch.is_grad_enabled() and module.training):
            return None
        tokens = args[0]
        replaced = None
        if not tokens.requires_grad:
            tokens = tokens.detach().requires_grad_(True)
            replaced = (tokens, *args[1:])
        tokens.register_hook(self._accumulate)
        return replaced

    def _accumulate(self, grad: torch.Tensor) -> None:
        self.squared.add_(grad.detach().float().pow(2).sum())

    def reset(self) -> None:
        self.squared.zero_()

    def remove(self) -> None:
        self._handle.remove()


class TrainingMonitor:
    """Record the step and layer signals of every optimiser step into device buffers.

    Call order per step: :meth:`record_gradients` after backward (and after AMP unscaling),
    :meth:`snapshot_weights` before ``optimizer.step()``, :meth:`record_updates` after it.
    ``token_module`` is the first block, whose input gradient becomes ``token_grad_norm``.
    With None, that signal is NaN.
    """

    def __init__(
        self,
        groups: list[tuple[str, list[tuple[str, nn.Parameter]]]],
        token_module: nn.Module | None,
        device: torch.device,
        capacity: int,
    ) -> None:
        self.group_names = [name for name, _ in groups]
        self.device = device
        self.capacity = capacity
        self.params: list[nn.Parameter] = []
        group_ids: list[int] = []
        for index, (_, members) in enumerate(groups):
            for _, parameter in members:
                self.params.append(parameter)
                group_ids.append(index)
        self._group_ids = torch.tensor(group_ids, device=device, dtype=torch.long)
        self._trainable = [i for i, p in enumerate(self.params) if p.requires_grad]
        self._trainable_ids = self._group_ids[self._trainable]
        self._before = [self.params[i].detach().clone() for i in self._trainable]
        self._before_sq: torch.Tensor | None = None
        self._index_cache: dict[tuple[int, ...], torch.Tensor] = {}
        self.tokens = TokenGradient(token_module, device) if token_module is not None else None
        num_groups = len(groups)
        self._steps = torch.full((capacity, len(STEP_SIGNALS)), float("nan"), device=device)
        self._layers = torch.full(
            (capacity, num_groups, len(LAYER_SIGNALS)), float("nan"), device=device
        )
        # Set on the device when a recorded step diverged (see record_gradients). Reading it
        # costs one host sync, so the trainer reads it only before an evaluation or a flush.
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.rows = 0

    @property
    def full(self) -> bool:
        return self.rows >= self.capacity

    def _per_group(
        self, norms: list[torch.Tensor], group_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum squared norms per group; return (sums, mask of groups that received any)."""
        num_groups = len(self.group_names)
        squared = torch.stack(norms).float().pow(2)
        sums = torch.zeros(num_groups, device=self.device).index_add_(0, group_ids, squared)
        present = torch.zeros(num_groups, device=self.device, dtype=torch.bool)
        present[group_ids] = True
        return sums, present

    def _group_ids_of(self, indices: list[int]) -> torch.Tensor:
        # The set of parameters with a gradient rarely changes, so the device index is cached
        # instead of being copied to the device at every step.
        key = tuple(indices)
        if key not in self._index_cache:
            self._index_cache[key] = self._group_ids[indices]
        return self._index_cache[key]

    def record_gradients(
        self,
        loss: torch.Tensor,
        loss_scale: torch.Tensor | None = None,
        *,
        overflow: torch.Tensor | bool = False,
        skip_nonfinite: bool = False,
    ) -> torch.Tensor:
        """Record loss, gradient norms and the token gradient of the step about to be taken.

        ``overflow`` is the gradient scaler's flag (a device tensor or a bool) that it found
        inf or NaN gradients and skips this step. With ``skip_nonfinite`` the caller skips
        any step whose loss or total gradient norm is NaN or infinite. Such a step is
        recorded as skipped, not diverged. Without it, a non-finite loss marks the step
        diverged even where the scaler skips it, and so does a non-finite gradient norm of
        a step the scaler applies. Returns the skip flag as a 0-dim float32 device tensor,
        1.0 for a step that must not change the weights, without reading it back.
        """
        if self.full:
            raise RuntimeError("monitor buffers are full; drain() before recording more steps")
        row = self.rows
        with_grad = [i for i in self._trainable if self.params[i].grad is not None]
        scale = loss_scale if loss_scale is not None else torch.ones((), device=self.device)
        if with_grad:
            norms = torch._foreach_norm([self.params[i].grad for i in with_grad])
            sums, present = self._per_group(norms, self._group_ids_of(with_grad))
            group_norm = torch.where(present, sums.sqrt(), torch.full_like(sums, float("nan")))
            self._layers[row, :, 0] = group_norm
            total = sums.sum().sqrt()
        else:
            self._layers[row, :, 0] = float("nan")
            total = torch.full((), float("nan"), device=self.device)
        # The token gradient comes from a tensor hook, before the scaler unscales parameters.
        if self.tokens is not None:
            # Under torchrun each process has the gradient of its own loss for its own
            # tokens. The global batch's loss is the mean of the processes' losses, so its
            # gradient is that divided by the number of processes.
            squared = distributed.all_reduce_sum(self.tokens.squared)
            token = squared.sqrt() / (scale.float() * distributed.world_size())
        else:
            token = torch.full((), float("nan"), device=self.device)
        loss_value = loss.detach().float()
        # A step without any gradient has a NaN norm that means "not measured", not divergence.
        grad_finite = torch.isfinite(total) if with_grad else torch.ones_like(total, dtype=bool)
        skipped, diverged = self._step_flags(
            torch.isfinite(loss_value), grad_finite, overflow, skip_nonfinite
        )
        torch.logical_or(self.nonfinite, diverged, out=self.nonfinite)
        values = torch.stack(
            [loss_value, total, token, scale.float(), skipped.float(), diverged.float()]
        )
        self._steps[row] = values
        if self.tokens is not None:
            self.tokens.reset()
        return skipped.float()

    def _step_flags(
        self,
        loss_finite: torch.Tensor,
        grad_finite: torch.Tensor,
        overflow: torch.Tensor | bool,
        skip_nonfinite: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the device flags (skipped, diverged) of one step, see record_gradients."""
        if isinstance(overflow, torch.Tensor):
            scaler_skips = overflow.to(self.device, non_blocking=True).bool()
        else:
            # torch.full fills on the device, where torch.tensor would copy from the host.
            scaler_skips = torch.full((), bool(overflow), device=self.device, dtype=torch.bool)
        if skip_nonfinite:
            # Every non-finite step is skipped, so no step can diverge.
            finite = loss_finite & grad_finite
            return scaler_skips | ~finite, torch.zeros_like(finite)
        return scaler_skips, ~loss_finite | (~grad_finite & ~scaler_skips)

    def snapshot_weights(self) -> None:
        """Copy the trainable weights so that the update of the coming step can be measured."""
        if self._before:
            torch._foreach_copy_(self._before, [self.params[i].detach() for i in self._trainable])
            norms = torch._foreach_norm(self._before)
            self._before_sq, _ = self._per_group(norms, self._trainable_ids)

    def record_updates(self) -> None:
        """Record weight norms and update-to-weight ratios after ``optimizer.step()``."""
        row = self.rows
        weight_norms = torch._foreach_norm([p.detach() for p in self.params])
        weight_sq, _ = self._per_group(weight_norms, self._group_ids)
        self._layers[row, :, 1] = weight_sq.sqrt()
        if self._before and self._before_sq is not None:
            torch._foreach_sub_(self._before, [self.params[i].detach() for i in self._trainable])
            update_norms = torch._foreach_norm(self._before)
            update_sq, present = self._per_group(update_norms, self._trainable_ids)
            ratio = update_sq.sqrt() / self._before_sq.sqrt()
            nan = torch.full_like(ratio, float("nan"))
            self._layers[row, :, 2] = torch.where(present, ratio, nan)
        else:
            self._layers[row, :, 2] = float("nan")
        self.rows += 1

    def drain(self) -> DrainedSignals:
        """Copy the recorded rows to the host and empty the buffers."""
        rows = self.rows
        # copy=True: on the CPU, .cpu() would return a view that the fill below overwrites.
        drained = DrainedSignals(
            steps=self._steps[:rows].to("cpu", copy=True),
            layers=self._layers[:rows].to("cpu", copy=True),
        )
        self._steps.fill_(float("nan"))
        self._layers.fill_(float("nan"))
        self.rows = 0
        return drained

    def close(self) -> None:
        if self.tokens is not None:
            self.tokens.remove()
