"""Dip detection on the kNN accuracy curve: drawdowns from the running maximum.

A dip starts at the first evaluation whose accuracy falls more than ``margin`` points below
the best accuracy so far (the peak), and it ends at the first later evaluation back within
``margin`` of that peak. The margin is the larger of a fixed minimum and ``z`` binomial
standard errors of the peak accuracy over the ``n_query`` evaluated images:

    margin = max(min_margin, z * 100 * sqrt(p * (1 - p) / n_query)),  p = peak / 100

so a small query set, whose accuracy is noisier, needs a deeper drop to count as a dip.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from stabilitylab.detect.spikes import runs_of_true
from stabilitylab.errors import ConfigError


@dataclass(frozen=True)
class DipParams:
    """Parameters of the dip detector, with accuracies and margins in percentage points.

    The default ``z`` of 3 standard errors of the peak is about 2 standard errors of the
    difference between two independent evaluations (3 / sqrt(2) = 2.1). The minimum margin
    of 1 point keeps a large query set from reporting sub-point wiggles.
    """

    min_margin: float = 1.0
    z: float = 3.0

    def __post_init__(self) -> None:
        if not self.min_margin >= 0:
            raise ConfigError(f"invalid dip min_margin {self.min_margin}: expected >= 0 points")
        if not self.z >= 0:
            raise ConfigError(f"invalid dip z {self.z}: expected >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Dip:
    """One drawdown of an accuracy series from its running maximum.

    ``recovery_step`` is None when no later evaluation came back within the margin, and then
    ``duration_steps`` runs from ``start_step`` to the last evaluation instead of to the
    recovery.
    """

    series: str
    peak_step: int
    peak_top1: float
    start_step: int
    bottom_step: int
    bottom_top1: float
    depth: float
    margin: float
    recovery_step: int | None
    duration_steps: int

    @property
    def recovered(self) -> bool:
        return self.recovery_step is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dip_margin(
    peak: np.ndarray | float, n_query: np.ndarray | float, params: DipParams | None = None
) -> np.ndarray:
    """Return the dip margin in points for a peak accuracy in percent and a query-set size.

    A missing or non-positive ``n_query`` gives the minimum margin alone.
    """
    params = params or DipParams()
    fraction = np.clip(np.asarray(peak, dtype="float64") / 100.0, 0.0, 1.0)
    count = np.asarray(n_query, dtype="float64")
    with np.errstate(divide="ignore", invalid="ignore"):
        standard_error = 100.0 * np.sqrt(fraction * (1.0 - fraction) / count)
    standard_error = np.where(np.isfinite(standard_error) & (count > 0), standard_error, 0.0)
    return np.maximum(params.min_margin, params.z * standard_error)


def find_dips(
    evals: pd.DataFrame, params: DipParams | None = None, column: str = "knn_top1"
) -> list[Dip]:
    """Detect dips in ``evals[column]`` (percent), ordered by ``evals["step"]``.

    ``evals`` needs a ``step`` column and may have ``n_query``. Without ``n_query`` every
    margin is the minimum margin. Evaluations with a non-finite accuracy are skipped, and a step
    recorded twice keeps its later row.
    """
    params = params or DipParams()
    curve = _accuracy_curve(evals, column)
    if curve.empty:
        return []
    steps = curve["step"].to_numpy(dtype="int64")
    accuracy = curve[column].to_numpy(dtype="float64")
    positions = np.arange(len(accuracy))
    running_max = np.maximum.accumulate(accuracy)
    # The peak of a drawdown is the latest evaluation at the running maximum before it.
    peak_position = np.maximum.accumulate(np.where(accuracy >= running_max, positions, 0))
    margin = dip_margin(running_max, curve["n_query"].to_numpy()[peak_position], params)
    below = accuracy < running_max - margin
    dips = []
    for start, end in runs_of_true(below):
        bottom = start + int(np.argmin(accuracy[start : end + 1]))
        recovery = end + 1 if end + 1 < len(accuracy) else None
        finish_step = steps[recovery] if recovery is not None else steps[-1]
        peak = peak_position[start]
        dips.append(
            Dip(
                series=column,
                peak_step=int(steps[peak]),
                peak_top1=float(accuracy[peak]),
                start_step=int(steps[start]),
                bottom_step=int(steps[bottom]),
                bottom_top1=float(accuracy[bottom]),
                depth=float(accuracy[peak] - accuracy[bottom]),
                margin=float(margin[start]),
                recovery_step=int(steps[recovery]) if recovery is not None else None,
                duration_steps=int(finish_step - steps[start]),
            )
        )
    return dips


def _accuracy_curve(evals: pd.DataFrame, column: str) -> pd.DataFrame:
    """Return ``step``, ``column`` and ``n_query`` for the evaluations with a finite accuracy."""
    curve = pd.DataFrame(
        {
            "step": pd.to_numeric(evals["step"], errors="coerce"),
            column: pd.to_numeric(evals[column], errors="coerce"),
            "n_query": (
                pd.to_numeric(evals["n_query"], errors="coerce")
                if "n_query" in evals.columns
                else np.nan
            ),
        }
    )
    usable = np.isfinite(curve[column].to_numpy(dtype="float64")) & curve["step"].notna()
    curve = curve[usable]
    curve = curve.drop_duplicates("step", keep="last").sort_values("step", kind="stable")
    return curve.reset_index(drop=True)
