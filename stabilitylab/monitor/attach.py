"""``Monitor``: the signals of ``stabilitylab run``, recorded from a training loop of your own.

    monitor = stabilitylab.Monitor(model, optimizer, out="runs/mine")
    with monitor:
        for images, labels in loader:
            loss = criterion(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            monitor.after_backward(loss)
            optimizer.step()

The monitor registers a pre-hook and a post-hook on ``optimizer.step``. The pre-hook
measures the gradients and copies the weights, and the post-hook measures the update. Both
use the batched device-side path of :class:`~stabilitylab.monitor.signals.TrainingMonitor`,
so a step costs no host sync. The buffers reach the run directory every ``flush_every``
steps through :class:`~stabilitylab.monitor.recorder.MetricsRecorder`. Gradient
accumulation needs no setting, because the hooks run once per optimiser step.

With ``scaler=``, a ``torch.amp.GradScaler``, the norms are of the unscaled gradients
(``scaler.step`` unscales before it calls ``optimizer.step``) and the loss scale is
recorded. To see the steps the scaler skips, which never reach ``optimizer.step``, the
monitor wraps that scaler's ``step`` method until :meth:`Monitor.close`.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn

from probes.knn import KnnResult
from stabilitylab.config import MODELS
from stabilitylab.errors import ConfigError, TrainingError
from stabilitylab.monitor.config_json import json_config
from stabilitylab.monitor.grouping import GroupSpec, LayerGrouping, group_model, unwrap_model
from stabilitylab.monitor.knn_eval import FeatureFn, KnnEvaluation, KnnRow, evaluate_knn_row
from stabilitylab.monitor.recorder import HostStep, MetricsRecorder
from stabilitylab.monitor.signals import TrainingMonitor
from stabilitylab.monitor.snapshot import FrozenSnapshot, patch_embed_frozen
from stabilitylab.runs import (
    DIVERGED_REASONS,
    FROZEN_CHECK_FILE,
    SIGNAL_NAMES,
    RunWriter,
    prepare_run_dir,
)
from stabilitylab.train.environment import describe_environment
from stabilitylab.train.precision import scale_tensor

__all__ = ["KnnEvaluation", "Monitor"]

log = logging.getLogger(__name__)

SOURCE = "monitor"
DEFAULT_FLUSH_EVERY = 100  # optimiser steps, as ``stabilitylab run --flush-every``


class Monitor:
    """Record per-step and per-layer training signals of ``model`` into the run folder ``out``.

    Call :meth:`after_backward` with the loss after every ``loss.backward()``, and
    :meth:`close` at the end, or use the monitor as a context manager, which also records a
    failure. See ``docs/instrument.md`` for every option.

    ``config`` is a mapping of JSON values that describes the run. numpy scalars and
    one-element tensors in it are converted (see :mod:`stabilitylab.monitor.config_json`).
    It is stored in ``config.json`` with ``source: "monitor"`` and, for a model with a
    ``patch_embed`` group, ``freeze_patch_embed``. ``groups`` and ``first_block`` override
    the automatic grouping of :func:`~stabilitylab.monitor.grouping.group_model`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        out: str | os.PathLike[str],
        *,
        config: Mapping[str, Any] | None = None,
        groups: GroupSpec = None,
        first_block: nn.Module | str | None = "auto",
        scaler: torch.amp.GradScaler | None = None,
        accumulation_steps: int | None = None,
        knn: KnnEvaluation | Mapping[str, Any] | None = None,
        flush_every: int = DEFAULT_FLUSH_EVERY,
        samples_per_step: int | None = None,
        steps_per_epoch: int | None = None,
        total_steps: int | None = None,
        overwrite: bool = False,
    ) -> None:
        _check_optional_count("accumulation_steps", accumulation_steps)
        _check_optional_count("flush_every", flush_every, optional=False)
        _check_optional_count("samples_per_step", samples_per_step)
        _check_optional_count("steps_per_epoch", steps_per_epoch)
        _check_optional_count("total_steps", total_steps)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"optimizer is a {type(optimizer).__name__}, not a torch.optim.Optimizer; pass "
                "the optimizer whose step() trains the model"
            )
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise ConfigError(
                f"scaler is a {type(scaler).__name__}, not a torch.amp.GradScaler; pass the "
                "scaler of the loop or None"
            )
        self.model = unwrap_model(model)
        self.optimizer = optimizer
        self.scaler = scaler
        self.accumulation_steps = accumulation_steps
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.knn = _knn_evaluation(knn)
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.grouping = group_model(self.model, groups, first_block, owned)
        self.device = self.grouping.groups[0][1][0][1].device
        _check_optimizer_covers_model(optimizer, self.grouping)
        freeze = patch_embed_frozen(self.grouping)
        run_config = _run_config(config, freeze)
        self._config_model = run_config.get("model")
        self.frozen = FrozenSnapshot(self.grouping.parameters_of("patch_embed") if freeze else [])

        # The step-0 evaluation runs before the folder exists, so a broken feature_fn or
        # loader leaves nothing behind.
        self.step = 0
        self._epoch: float | None = None
        self._momentum: float | None = None
        self.evals: list[KnnResult] = []
        self._last_eval_step: int | None = None
        first_eval = self._knn_row(self.knn) if self.knn is not None else None

        existed = Path(out).exists()
        self.path = prepare_run_dir(
            Path(out), overwrite=overwrite, out_option="out", overwrite_option="overwrite=True"
        )
        self.signals = TrainingMonitor(
            self.grouping.groups, self.grouping.first_block, self.device, flush_every
        )
        try:
            self.writer = RunWriter(self.path)
            self.recorder = MetricsRecorder(self.signals, self.writer, samples_per_step)
            self.writer.write_config(
                run_config,
                self._derived(flush_every, samples_per_step),
                describe_environment(self.device, run_config.get("seed")),
            )
        except BaseException:
            self.signals.close()  # leave no hook on the model of a monitor that never started
            _remove_partial_run_dir(self.path, existed)
            raise
        self._start = time.perf_counter()
        self._loss: torch.Tensor | None = None
        self._backwards = 0
        self._backward_counts: Counter[int] = Counter()
        # Backward passes of each step since the last flush, to uncount the steps that a
        # non-finite loss drops from the tables.
        self._unflushed_backwards: dict[int, int] = {}
        self._accumulation_mismatches = 0
        self._pending: HostStep | None = None
        self._stepped = False
        self.skipped_steps: list[int] = []
        self.failed = False
        self.closed = False
        if first_eval is not None:
            self._keep_eval(first_eval)
        self._write_running()
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]
        self._original_scaler_step: Callable[..., Any] | None = None
        if scaler is not None:
            self._wrap_scaler(scaler)
        log.info(
            "%s: monitoring %d layer groups (%s grouping), first block %s",
            self.path,
            len(self.grouping.groups),
            self.grouping.kind,
            self.grouping.first_block_name,
        )
        self._log_wrapped_vit()
        self._warn_missing_layer_signals()

    def _log_wrapped_vit(self) -> None:
        vit = self.grouping.vit
        if vit is None or vit.path == "":
            return
        log.info(
            "%s: grouped the ViT at %s as patch_embed, cls_token, blocks.NN and norm (%s)%s",
            self.path,
            vit.path,
            vit.reason,
            f"; left out, as nothing trains them: {', '.join(self.grouping.left_out)}"
            if self.grouping.left_out
            else "",
        )

    def _warn_missing_layer_signals(self) -> None:
        """Log when the report will lack the first-layer signal or the last block."""
        grouping = self.grouping
        if grouping.first_block is None and "patch_embed" not in grouping.names:
            log.warning(
                "%s: the model has no patch_embed group and no first block, so token_grad_norm "
                "is NaN and the report has no first-layer signal; pass first_block= the module "
                "whose input gradient to record",
                self.path,
            )
        if grouping.last_block is None:
            log.info(
                "%s: no layer group is a transformer block (blocks.NN), so the report measures "
                "no lag from the first layer to the last block; pass groups= to name the "
                "blocks",
                self.path,
            )

    # -- the user's calls --------------------------------------------------------------------

    def after_backward(
        self,
        loss: torch.Tensor | float,
        *,
        epoch: float | None = None,
        momentum: float | None = None,
    ) -> None:
        """Keep the loss of the backward pass that just ran, for the coming optimiser step.

        With gradient accumulation, call it after every backward: the step records the sum
        of the losses given since the previous step, which is the loss of the whole batch
        when each micro-batch loss was divided by the number of micro-batches. Pass the loss
        before AMP scaling. ``epoch`` (fractional) and ``momentum`` replace the values taken
        from ``steps_per_epoch`` and the optimiser's ``param_groups``, from this step until
        another value is given.
        """
        if self.closed:
            raise TrainingError(
                f"the monitor of {self.path} is closed; create a new Monitor to record more steps"
            )
        if self.failed:
            return
        loss = _loss_tensor(loss)
        if loss.numel() != 1:
            raise ConfigError(
                f"after_backward got a loss of shape {tuple(loss.shape)}; pass the scalar loss "
                "that backward() was called on"
            )
        value = loss.detach().reshape(()).to(self.device, torch.float32)
        self._loss = value if self._loss is None else self._loss + value
        self._backwards += 1
        if epoch is not None:
            self._epoch = float(epoch)
        if momentum is not None:
            self._momentum = float(momentum)

    def evaluate_knn(
        self,
        feature_fn: FeatureFn,
        bank: Iterable[Any],
        query: Iterable[Any],
        *,
        k: int = 20,
        temperature: float = 0.07,
        num_classes: int | None = None,
    ) -> KnnResult | None:
        """Run one weighted kNN evaluation now and append it to the ``evals`` table.

        ``bank`` and ``query`` are iterables of ``(images, labels)`` batches. Returns None,
        evaluating nothing, once the monitor has stopped at a non-finite loss.
        """
        settings = KnnEvaluation(feature_fn, bank, query, 1, k, temperature, num_classes)
        return self._evaluate(settings)

    def flush(self) -> None:
        """Write the steps recorded since the last flush, the one host sync of the steps."""
        if self.failed or self.closed:
            return
        result = self.recorder.flush()
        if result is None:
            return
        if result.first_nonfinite is not None:
            self._stop_at_nonfinite(result.first_nonfinite, result.nonfinite_signal or "loss")
            return
        self._unflushed_backwards.clear()
        self._write_running()

    def close(self) -> None:
        """Finish the run: final kNN evaluation, last flush, frozen check and status.

        Calling it again does nothing.
        """
        if self.closed:
            return
        try:
            if not self.failed:
                if self.knn is not None and self._last_eval_step != self.step:
                    self._evaluate(self.knn)
                self.flush()
            if not self.failed:
                self._finish()
        except BaseException as error:
            if not self.failed:
                self.writer.write_status(
                    "failed",
                    step=self.step,
                    reason=f"close() failed: {type(error).__name__}: {error}",
                    **self._status_fields(),
                )
            raise
        finally:
            self._detach()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
            return
        if self.closed:
            return
        state = "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed"
        try:
            self.flush()  # keep what the run recorded before it broke
        except Exception:  # the loop's own exception is the one to propagate
            log.exception("%s: the last flush failed", self.path)
        finally:
            if not self.failed:
                self.writer.write_status(
                    state,
                    step=self.step,
                    reason=f"{exc_type.__name__}: {exc}",
                    **self._status_fields(),
                )
            self._detach()

    # -- optimiser hooks ---------------------------------------------------------------------

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.failed or self.closed:
            return
        if self._loss is None and _has_closure(args, kwargs):
            # The pre-hook runs before step() calls the closure that computes the loss.
            raise TrainingError(
                f"{type(optimizer).__name__}.step(closure) computes the loss inside step(), "
                "after the monitor measures the gradients; the monitor does not support "
                "closure optimizers such as LBFGS, so drop the Monitor for this loop"
            )
        if getattr(optimizer, "grad_scale", None) is not None:
            # A fused optimizer gets the scale from scaler.step and unscales inside its step.
            raise ConfigError(
                f"{type(optimizer).__name__} unscales gradients inside its fused step, after "
                "the monitor reads them; call scaler.unscale_(optimizer) before "
                "scaler.step(optimizer), or build the optimizer with fused=False"
            )
        self._begin_step()

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._pending is None:
            return
        self.signals.record_updates()
        self._commit()

    def _begin_step(self, overflow: bool = False) -> None:
        """Record the gradients and copy the weights of the step about to be taken.

        ``overflow`` is True for a step that the gradient scaler skipped.
        """
        if self._loss is None:
            raise TrainingError(
                "optimizer.step() ran without monitor.after_backward(loss) since the previous "
                "step; call monitor.after_backward(loss) after every loss.backward()"
            )
        self._check_accumulation()
        # A step that the scaler skipped changed no weight, so a non-finite loss on it is a
        # skipped step like a non-finite gradient, not a divergence.
        self.signals.record_gradients(
            self._loss, self._loss_scale(), overflow=overflow, skip_nonfinite=overflow
        )
        self.signals.snapshot_weights()
        self._pending = self._host_step()
        self._loss = None
        self._backwards = 0

    def _commit(self) -> None:
        """Add the step's host values after its update was recorded, then flush or evaluate."""
        self.recorder.add(self._pending)
        self._pending = None
        self._stepped = True
        self.step += 1
        if self.knn is not None and self.step % self.knn.every == 0:
            self._evaluate(self.knn)
        if self.recorder.due:
            self.flush()

    def _wrap_scaler(self, scaler: torch.amp.GradScaler) -> None:
        self._original_scaler_step = scaler.step
        scaler.step = self._scaler_step  # an instance attribute, removed by _detach

    def _scaler_step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """Call the scaler's own ``step``, and record the step if it skipped ``optimizer``."""
        original = self._original_scaler_step
        if optimizer is not self.optimizer or self.failed or self.closed:
            return original(optimizer, *args, **kwargs)
        self._stepped = False
        result = original(optimizer, *args, **kwargs)
        if not self._stepped:
            # The scaler found inf or NaN gradients and did not call optimizer.step(). The
            # gradients are unscaled, so the row shows their non-finite norms, which the spike
            # detectors ignore, and an update ratio of 0.
            skipped = self.step
            self._begin_step(overflow=True)
            self.signals.record_updates()
            self._commit()
            self.skipped_steps.append(skipped)
        return result

    # -- helpers -----------------------------------------------------------------------------

    def _host_step(self) -> HostStep:
        group = self.optimizer.param_groups[0]
        # NOTE: float() of a tensor lr (capturable optimizers) reads it back, one sync a step.
        return HostStep(
            step=self.step,
            epoch=self._epoch_now(),
            lr=float(group.get("lr", math.nan)),
            momentum=self._momentum if self._momentum is not None else _optimizer_momentum(group),
            weight_decay=float(group.get("weight_decay", math.nan)),
            wall_time=time.perf_counter() - self._start,
        )

    def _epoch_now(self) -> float:
        if self._epoch is not None:
            return self._epoch
        if self.steps_per_epoch is not None:
            return self.step / self.steps_per_epoch
        return math.nan

    def _loss_scale(self) -> torch.Tensor | None:
        if self.scaler is None:
            return None
        return scale_tensor(self.scaler, self.device)

    def _check_accumulation(self) -> None:
        self._backward_counts[self._backwards] += 1
        self._unflushed_backwards[self.step] = self._backwards
        expected = self.accumulation_steps
        if expected is None or self._backwards == expected:
            return
        self._accumulation_mismatches += 1
        if self._accumulation_mismatches == 1:
            log.warning(
                "%s: step %d followed %d backward passes, not accumulation_steps=%d; the step "
                "is recorded as it is (further mismatches are counted in status.json)",
                self.path,
                self.step,
                self._backwards,
                expected,
            )

    def _knn_row(self, settings: KnnEvaluation) -> KnnRow:
        return evaluate_knn_row(
            self.model,
            settings.feature_fn,
            settings.bank,
            settings.query,
            self.device,
            step=self.step,
            epoch=self._epoch_now(),
            k=settings.k,
            temperature=settings.temperature,
            num_classes=settings.num_classes,
        )

    def _evaluate(self, settings: KnnEvaluation) -> KnnResult | None:
        # A model broken by a non-finite loss would score near 0 % and read as a dip, so the
        # pending rows are flushed first, which stops the monitor at that loss.
        if not self.failed and bool(self.signals.nonfinite):
            self.flush()
        if self.failed:
            return None
        row = self._knn_row(settings)
        self._keep_eval(row)
        return row.result

    def _keep_eval(self, row: KnnRow) -> None:
        if not self.evals:
            _check_model_width(self._config_model, row.feature_dim)
        self.writer.append("evals", row.frame)
        self.evals.append(row.result)
        self._last_eval_step = int(row.frame["step"].iloc[0])

    def _stop_at_nonfinite(self, bad: HostStep, signal: str) -> None:
        self.failed = True
        self._forget_steps_after(bad.step)
        self.writer.write_status(
            "failed",
            step=bad.step,
            reason=DIVERGED_REASONS[signal],
            diverged={"step": bad.step, "signal": signal, "lr": bad.lr},
            **self._status_fields(),
        )
        log.error(
            "%s: the %s became non-finite at step %d (lr %.3g); the tables end there and "
            "the monitor records no further steps",
            self.path,
            SIGNAL_NAMES[signal],
            bad.step,
            bad.lr,
        )

    def _forget_steps_after(self, last: int) -> None:
        """Uncount the steps after ``last``, which the tables leave out, in status.json."""
        for step, backwards in self._unflushed_backwards.items():
            if step <= last:
                continue
            self._backward_counts[backwards] -= 1
            if self.accumulation_steps is not None and backwards != self.accumulation_steps:
                self._accumulation_mismatches -= 1
        self._backward_counts = +self._backward_counts  # drops the counts that reached 0
        self._unflushed_backwards.clear()
        self.skipped_steps = [step for step in self.skipped_steps if step <= last]

    def _finish(self) -> None:
        passed = None
        if self.frozen.applies:
            check = self.frozen.check(self.step, self.optimizer)
            self.writer.write_json(FROZEN_CHECK_FILE, check)
            passed = check["passed"]
            if passed is False:
                log.error(
                    "%s: the frozen patch projection changed during training; see %s",
                    self.path,
                    self.path / FROZEN_CHECK_FILE,
                )
        fields: dict[str, Any] = {
            "wall_seconds": time.perf_counter() - self._start,
            "frozen_check_passed": passed,
        }
        if self.evals:
            fields["final_knn_top1"] = self.evals[-1].top1
            fields["best_knn_top1"] = max(result.top1 for result in self.evals)
        self.writer.write_status("finished", step=self.step, **fields, **self._status_fields())
        log.info("%s: finished after %d optimiser steps", self.path, self.step)

    def _write_running(self) -> None:
        self.writer.write_status("running", step=self.step, **self._status_fields())

    def _status_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "skipped_steps": list(self.skipped_steps),
            "backward_passes_per_step": {
                str(count): steps for count, steps in sorted(self._backward_counts.items())
            },
        }
        if self.total_steps is not None:
            fields["total_steps"] = self.total_steps
        if self.accumulation_steps is not None:
            fields["accumulation_mismatches"] = self._accumulation_mismatches
        return fields

    def _derived(self, flush_every: int, samples_per_step: int | None) -> dict[str, Any]:
        grouping = self.grouping
        derived: dict[str, Any] = {
            "layers": grouping.names,
            "first_layer": grouping.first_layer,
            "last_block": grouping.last_block,
            "first_block": grouping.first_block_name,
            "grouping": grouping.kind,
            "vit": grouping.vit.to_dict() if grouping.vit is not None else None,
            "left_out": grouping.left_out,
            "group_parameters": {
                name: [parameter_name for parameter_name, _ in members]
                for name, members in grouping.groups
            },
            "optimizer": type(self.optimizer).__name__,
            "amp_scaler": self.scaler is not None and self.scaler.is_enabled(),
            "accumulation_steps": self.accumulation_steps,
            "flush_every": flush_every,
            "samples_per_step": samples_per_step,
            "steps_per_epoch": self.steps_per_epoch,
        }
        if self.total_steps is not None:
            derived["total_steps"] = self.total_steps
        if self.knn is not None:
            derived["knn"] = {
                "every": self.knn.every,
                "k": self.knn.k,
                "temperature": self.knn.temperature,
            }
        return derived

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.scaler is not None and self.scaler.__dict__.get("step") == self._scaler_step:
            del self.scaler.step
        self.signals.close()
        self.writer.close()
        self.closed = True


def _check_optional_count(name: str, value: int | None, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        allowed = "a positive int or None" if optional else "a positive int"
        raise ConfigError(f"{name}={value!r} is not valid; pass {allowed}")


def _knn_evaluation(knn: KnnEvaluation | Mapping[str, Any] | None) -> KnnEvaluation | None:
    if knn is None or isinstance(knn, KnnEvaluation):
        return knn
    if isinstance(knn, Mapping):
        try:
            return KnnEvaluation(**knn)
        except TypeError as error:
            raise ConfigError(
                f"knn={dict(knn)!r} does not fit KnnEvaluation ({error}); pass feature_fn, "
                "bank, query and every, and optionally k, temperature and num_classes"
            ) from None
    raise ConfigError(
        f"knn is a {type(knn).__name__}; pass a KnnEvaluation, a dict of its fields or None"
    )


def _check_optimizer_covers_model(
    optimizer: torch.optim.Optimizer, grouping: LayerGrouping
) -> None:
    """Raise ConfigError when nothing monitored trains; warn when the two sets differ.

    Raises when the optimizer owns none of the monitored parameters or when every monitored
    parameter is frozen. Warns about parameters that the optimizer owns outside the model,
    and about trainable parameters of the model that the optimizer does not own.
    """
    members = [(name, parameter) for _, group in grouping.groups for name, parameter in group]
    monitored = {id(parameter) for _, parameter in members}
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not monitored & optimized:
        raise ConfigError(
            "the optimizer contains none of the model's parameters; pass the optimizer that "
            "trains this model"
        )
    if not any(parameter.requires_grad for _, parameter in members):
        raise ConfigError(
            f"every parameter of the model ({len(members)}) is frozen (requires_grad=False), "
            "so no step can change it; unfreeze the parameters to train before creating the "
            "Monitor"
        )
    outside = len(optimized - monitored)
    if outside:
        log.warning(
            "the optimizer trains %d parameters outside the monitored model; their gradients "
            "and updates are not recorded",
            outside,
        )
    untrained = [
        name
        for name, parameter in members
        if parameter.requires_grad and id(parameter) not in optimized
    ]
    if untrained:
        log.warning(
            "%d trainable parameters of the model, such as %s, are not in the optimizer, so "
            "their gradients are recorded but no step updates them (update_ratio 0); pass "
            "them to the optimizer or set requires_grad=False",
            len(untrained),
            untrained[0],
        )


def _loss_tensor(loss: Any) -> torch.Tensor:
    """Return ``loss`` as a tensor: a tensor as it is, a real number as a 0-dim tensor."""
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        return torch.tensor(float(loss))
    raise ConfigError(
        f"after_backward got a {type(loss).__name__} ({loss!r}) as the loss; pass the scalar "
        "loss tensor that backward() was called on, or its float value"
    )


def _has_closure(args: Any, kwargs: Any) -> bool:
    """Tell whether an ``optimizer.step`` call passed a closure.

    The step hooks get the call's positional arguments with the optimizer itself first.
    """
    if isinstance(kwargs, Mapping) and callable(kwargs.get("closure")):
        return True
    return any(callable(value) for value in args or ())


def _remove_partial_run_dir(path: Path, existed: bool) -> None:
    """Remove what a monitor that failed to start wrote into ``path``.

    ``path`` was new, empty, or a run directory that ``overwrite=True`` had emptied, so
    everything in it was written by this monitor. A folder that existed stays, empty.
    """
    if not existed:
        shutil.rmtree(path, ignore_errors=True)
        return
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _run_config(config: Mapping[str, Any] | None, freeze: bool | None) -> dict[str, Any]:
    """Return the ``config`` object of ``config.json``: the user's values and the monitor's."""
    if config is not None and not isinstance(config, Mapping):
        raise ConfigError(
            f"config is a {type(config).__name__}; pass a dict of the run's settings or None"
        )
    payload = json_config(config or {})
    if payload.get("source", SOURCE) != SOURCE:
        raise ConfigError(
            f"config key 'source' ({payload['source']!r}) is reserved: config.json records "
            f"source {SOURCE!r} for runs written by the monitor; rename that key"
        )
    declared = payload.get("freeze_patch_embed")
    if freeze is not None and declared is not None and bool(declared) != freeze:
        raise ConfigError(
            f"config sets freeze_patch_embed={declared!r}, but the model's patch_embed "
            f"parameters are {'frozen' if freeze else 'trainable'}; drop the key, since the "
            "monitor reads it from requires_grad"
        )
    payload["source"] = SOURCE
    if freeze is not None:
        payload["freeze_patch_embed"] = freeze
    return payload


def _check_model_width(model_name: Any, feature_dim: int) -> None:
    """Warn when ``config["model"]`` names a stabilitylab model of another feature width.

    The report's collapse and low-rank flags take the feature width from that name.
    """
    spec = MODELS.get(model_name) if isinstance(model_name, str) else None
    if spec is None or spec.embed_dim == feature_dim:
        return
    log.warning(
        "config model %r names a stabilitylab model with %d-wide features, but feature_fn "
        "gives %d; the report sets its collapse threshold from the named model, so rename "
        "the config key or correct it",
        model_name,
        spec.embed_dim,
        feature_dim,
    )


def _optimizer_momentum(group: Mapping[str, Any]) -> float:
    """Return SGD's ``momentum`` or the Adam family's ``betas[0]``, NaN for neither."""
    if "momentum" in group:
        return float(group["momentum"])
    betas = group.get("betas")
    if isinstance(betas, tuple | list) and betas:
        return float(betas[0])
    return math.nan
