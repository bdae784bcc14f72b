"""Events that the training loop records rather than the detectors find.

- A divergence: the step where the loss or the total gradient norm became NaN or infinite
  on a step that was applied, after which ``stabilitylab run`` stops (its default
  ``--on-nonfinite stop``). It is read from the ``diverged`` object of ``status.json``.
- Skipped steps: optimiser steps that left the weights unchanged, because the fp16 gradient
  scaler found inf or NaN gradients or ``--on-nonfinite skip`` met a non-finite loss or
  gradient norm. They are read from ``skipped_steps`` in ``status.json``, and the spike
  detectors leave them out.
- Loss-scale changes: the steps where the ``loss_scale`` column differs from the step
  recorded before it. ``torch.amp.GradScaler`` halves the scale after a step with inf or
  NaN gradients and doubles it after ``growth_interval`` steps without one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from stabilitylab.runs import DIVERGED_REASONS, Run

log = logging.getLogger(__name__)

DECREASE = "decrease"
INCREASE = "increase"


@dataclass(frozen=True)
class Divergence:
    """The first step whose loss or gradient norm was non-finite on an applied update.

    ``signal`` is ``loss`` or ``grad_norm``. ``checkpoint_step`` is the step count of the
    checkpoint that the run kept, from before the divergence, and None where the run wrote
    none or did not record it.
    """

    step: int
    signal: str
    lr: float | None = None
    precision: str | None = None
    checkpoint_step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LossScaleChange:
    """A change of the loss scale: ``step`` is the first step recorded with ``scale``."""

    step: int
    previous_scale: float
    scale: float

    @property
    def kind(self) -> str:
        """``decrease`` (after an overflow) or ``increase`` (after a run of clean steps)."""
        return DECREASE if self.scale < self.previous_scale else INCREASE

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kind": self.kind}


def skipped_steps(run: Run) -> list[int]:
    """Return the sorted steps that ``status.json`` lists as skipped, empty without any."""
    raw = run.status.get("skipped_steps")
    if raw is None:
        return []
    if not isinstance(raw, list):
        log.warning("%s: status.json skipped_steps is %r, not a list; ignored", run.path, raw)
        return []
    invalid = [value for value in raw if not _is_int(value)]
    if invalid:
        log.warning("%s: status.json skipped_steps has non-steps %r; ignored", run.path, invalid)
    return sorted({value for value in raw if _is_int(value)})


def recorded_divergence(run: Run) -> Divergence | None:
    """Return the divergence that ``status.json`` records, or None without a valid one."""
    raw = run.status.get("diverged")
    if raw is None:
        return None
    step = raw.get("step") if isinstance(raw, dict) else None
    signal = raw.get("signal") if isinstance(raw, dict) else None
    if not _is_int(step) or signal not in DIVERGED_REASONS:
        log.warning("%s: status.json diverged is %r, not a step and signal; ignored", run.path, raw)
        return None
    lr = raw.get("lr")
    precision = raw.get("precision")
    checkpoint_step = raw.get("checkpoint_step")
    return Divergence(
        step=step,
        signal=signal,
        lr=float(lr) if _is_number(lr) and math.isfinite(lr) else None,
        precision=precision if isinstance(precision, str) else None,
        checkpoint_step=checkpoint_step if _is_int(checkpoint_step) else None,
    )


def loss_divergence(run: Run, step: int) -> Divergence:
    """Return the divergence of a non-finite loss at ``step`` that ``status.json`` lacks.

    This covers runs written before ``status.json`` had a ``diverged`` object, imported
    runs, and runs killed before the status was written. The lr comes from the steps table.
    """
    rows = run.steps[pd.to_numeric(run.steps["step"], errors="coerce") == step]
    lr = pd.to_numeric(rows["lr"], errors="coerce").to_numpy(dtype="float64")
    precision = run.config.get("precision")
    return Divergence(
        step=step,
        signal="loss",
        lr=float(lr[0]) if len(lr) and math.isfinite(lr[0]) else None,
        precision=precision if isinstance(precision, str) else None,
    )


def loss_scale_changes(steps: pd.DataFrame) -> list[LossScaleChange]:
    """Return every change of the finite ``loss_scale`` values between recorded steps."""
    if steps.empty:
        return []
    frame = pd.DataFrame(
        {
            "step": pd.to_numeric(steps["step"], errors="coerce"),
            "scale": pd.to_numeric(steps["loss_scale"], errors="coerce"),
        }
    )
    frame = frame[np.isfinite(frame["step"]) & np.isfinite(frame["scale"])]
    # A resumed run records some steps twice, and the later record counts.
    frame = frame.drop_duplicates("step", keep="last").sort_values("step", kind="stable")
    step = frame["step"].to_numpy(dtype=np.int64)
    scale = frame["scale"].to_numpy(dtype="float64")
    changed = np.flatnonzero(scale[1:] != scale[:-1]) + 1
    return [
        LossScaleChange(int(step[i]), previous_scale=float(scale[i - 1]), scale=float(scale[i]))
        for i in changed
    ]


def step_ranges(steps: Sequence[int]) -> list[tuple[int, int]]:
    """Group sorted ``steps`` into ranges of consecutive steps, as (first, last) pairs."""
    ranges: list[tuple[int, int]] = []
    for step in steps:
        if ranges and step == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], step)
        else:
            ranges.append((step, step))
    return ranges


def without_steps(series: pd.Series, steps: Sequence[int]) -> pd.Series:
    """Return ``series`` (indexed by step) without the rows of ``steps``."""
    if not len(steps) or series.empty:
        return series
    return series[~series.index.isin(steps)]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
