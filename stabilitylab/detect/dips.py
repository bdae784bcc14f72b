"""Dip detection on an accuracy curve such as kNN top-1: drawdowns from the running maximum.

A dip starts at the first evaluation whose accuracy falls more than ``margin`` points below
the best accuracy so far (the peak), and it ends at the first later evaluation back within
``margin`` of that peak. The margin at evaluation t is ``z`` standard errors of the
difference between the peak evaluation and evaluation t, and at least ``min_margin``:

    margin_t = max(min_margin, z * se_diff_t)

The standard error comes, per evaluation, from the first source that is available:

- ``paired``: the per-query hits of both evaluations (column ``knn_correct``), which share
  their query set. With ``d_i`` = hit at t minus hit at the peak for query i,
  ``se_diff = 100 * std(d) / sqrt(n)``, the standard error of a paired difference. Queries
  that both evaluations classify alike add no noise, so this margin is the tightest;
- ``bootstrap``: the recorded bootstrap standard errors of both evaluations (column
  ``<accuracy column>_se``, in points), as two independent estimates,
  ``se_diff = sqrt(se_peak^2 + se_t^2)``;
- ``binomial``: the binomial standard error over the evaluated images (column ``n_query``)
  when the accuracy did not change, ``se_diff = 100 * sqrt(p (1 - p) (1/n_peak + 1/n_t))``
  with ``p = peak / 100``, so a small query set, whose accuracy is noisier, needs a deeper
  drop to count as a dip;
- ``minimum``: none is available, and the margin is ``min_margin``.

Run directories written before the hits and bootstrap columns existed use the binomial
source.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from stabilitylab.detect.intervals import runs_of_true
from stabilitylab.errors import ConfigError

MARGIN_SOURCES = ("paired", "bootstrap", "binomial", "minimum", "successive")
# Ratio of the standard deviation to the median absolute deviation of a Gaussian.
MAD_TO_STD = 1.4826
# Column of the per-query top-1 hits, packed with numpy.packbits.
HITS_COLUMN = "knn_correct"
COUNT_COLUMN = "n_query"
# Suffix of the bootstrap standard-error column of an accuracy column, e.g. knn_top1_se.
SE_SUFFIX = "_se"


@dataclass(frozen=True)
class DipParams:
    """Parameters of the dip detector, with accuracies and margins in percentage points.

    ``z`` counts standard errors of the difference between an evaluation and its peak. Its
    default of 3 leaves a Gaussian difference a one-sided chance of 0.13 % per evaluation.
    With the paired source that is the tightest margin the query set allows. For runs
    without per-query hits, the unpaired sources treat both evaluations as independent,
    which overstates the noise of two evaluations on the same queries, so their margins are
    wider. The minimum margin of 1 point keeps a large query set from reporting sub-point
    wiggles.

    NOTE: the peak is the largest of many noisy evaluations and so sits above the true
    accuracy, which makes false dips on a flat curve more likely than 0.13 % per evaluation.
    The default is not yet calibrated on healthy runs.
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

    ``margin`` and ``margin_source`` (one of :data:`MARGIN_SOURCES`) are those of the first
    evaluation of the dip. ``recovery_step`` is None when no later evaluation came back
    within the margin, and then ``duration_steps`` runs from ``start_step`` to the last
    evaluation instead of to the recovery.
    """

    series: str
    peak_step: int
    peak_top1: float
    start_step: int
    bottom_step: int
    bottom_top1: float
    depth: float
    margin: float
    margin_source: str
    recovery_step: int | None
    duration_steps: int

    @property
    def recovered(self) -> bool:
        return self.recovery_step is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dip_margin(
    peak: np.ndarray | float,
    n_query: np.ndarray | float,
    params: DipParams | None = None,
    *,
    n_query_current: np.ndarray | float | None = None,
    se_peak: np.ndarray | float | None = None,
    se_current: np.ndarray | float | None = None,
) -> np.ndarray:
    """Return the dip margin in points of an evaluation against the peak accuracy ``peak``.

    ``n_query`` is the query-set size of the peak evaluation and ``n_query_current`` that of
    the current one (the same when not given). ``se_peak`` and ``se_current`` are bootstrap
    standard errors in points, used when both are finite. See :func:`margins_and_sources`.
    """
    margin, _ = margins_and_sources(
        peak,
        n_query,
        n_query if n_query_current is None else n_query_current,
        np.nan if se_peak is None else se_peak,
        np.nan if se_current is None else se_current,
        params or DipParams(),
    )
    return margin


def margins_and_sources(
    peak: np.ndarray | float,
    n_peak: np.ndarray | float,
    n_current: np.ndarray | float,
    se_peak: np.ndarray | float,
    se_current: np.ndarray | float,
    params: DipParams,
) -> tuple[np.ndarray, np.ndarray]:
    """Return the margin in points and its source for each evaluation, elementwise.

    The bootstrap source needs finite, non-negative ``se_peak`` and ``se_current``. The
    binomial source needs positive finite query-set sizes. Otherwise the margin is
    ``params.min_margin`` and the source ``minimum``.
    """
    se_peak, se_current = (np.asarray(value, dtype="float64") for value in (se_peak, se_current))
    with np.errstate(invalid="ignore"):
        bootstrap = np.isfinite(se_peak) & np.isfinite(se_current)
        bootstrap &= (se_peak >= 0) & (se_current >= 0)
    bootstrap_se = np.sqrt(np.where(bootstrap, se_peak**2 + se_current**2, 0.0))
    binomial_se, binomial = _binomial_difference_se(peak, n_peak, n_current)
    standard_error = np.where(bootstrap, bootstrap_se, np.where(binomial, binomial_se, 0.0))
    source = np.where(bootstrap, "bootstrap", np.where(binomial, "binomial", "minimum"))
    return np.maximum(params.min_margin, params.z * standard_error), source


def _binomial_difference_se(
    peak: np.ndarray | float, n_peak: np.ndarray | float, n_current: np.ndarray | float
) -> tuple[np.ndarray, np.ndarray]:
    """Return the binomial standard error in points of the difference, and where it exists."""
    fraction = np.clip(np.asarray(peak, dtype="float64") / 100.0, 0.0, 1.0)
    n_peak, n_current = (np.asarray(value, dtype="float64") for value in (n_peak, n_current))
    with np.errstate(invalid="ignore"):
        usable = np.isfinite(n_peak) & np.isfinite(n_current) & (n_peak > 0) & (n_current > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        variance = fraction * (1.0 - fraction) * (1.0 / n_peak + 1.0 / n_current)
    usable &= np.isfinite(variance)
    return 100.0 * np.sqrt(np.where(usable, variance, 0.0)), usable


def find_dips(
    evals: pd.DataFrame,
    params: DipParams | None = None,
    column: str = "knn_top1",
    *,
    se_column: str | None = None,
    count_column: str = COUNT_COLUMN,
    hits_column: str = HITS_COLUMN,
    successive_noise: bool = False,
) -> list[Dip]:
    """Detect dips in ``evals[column]`` (percent), ordered by ``evals["step"]``.

    ``evals`` needs a ``step`` column. ``se_column`` (default ``column + "_se"``) holds
    bootstrap standard errors in points and ``count_column`` the query-set sizes. Either
    may be missing or NaN in some rows, and then the margin falls back per evaluation as
    the module describes. Evaluations with a non-finite accuracy are skipped, and a step
    recorded twice keeps its later row. Without ``column`` (a run recorded before that
    monitor existed) there are no dips.

    With ``successive_noise``, the margin is at least ``z`` times the spread of the
    differences between successive evaluations (1.4826 times their median absolute
    deviation), and the source reads ``successive`` where that floor sets it. This suits a
    monitor whose evaluations differ in more than their queries, such as the dense kNN
    monitor, whose queue of training features turns over between evaluations.

    NOTE: on a long flat curve of independent noise the drawdown from the running maximum
    grows with the number of evaluations, so this floor still lets through some false dips
    there (about 1 in 8 runs of 12 evaluations at z 3, in a simulation).
    """
    params = params or DipParams()
    drawdowns = score_drawdowns(
        evals,
        params,
        column,
        se_column=se_column,
        count_column=count_column,
        hits_column=hits_column,
        successive_noise=successive_noise,
    )
    if drawdowns.empty:
        return []
    steps = drawdowns["step"].to_numpy(dtype="int64")
    accuracy = drawdowns["accuracy"].to_numpy(dtype="float64")
    peak_position = drawdowns["peak_position"].to_numpy()
    margin = drawdowns["margin"].to_numpy(dtype="float64")
    source = drawdowns["margin_source"].to_numpy()
    below = drawdowns["below"].to_numpy(dtype=bool)
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
                margin_source=str(source[start]),
                recovery_step=int(steps[recovery]) if recovery is not None else None,
                duration_steps=int(finish_step - steps[start]),
            )
        )
    return dips


def score_drawdowns(
    evals: pd.DataFrame,
    params: DipParams | None = None,
    column: str = "knn_top1",
    *,
    se_column: str | None = None,
    count_column: str = COUNT_COLUMN,
    hits_column: str = HITS_COLUMN,
    successive_noise: bool = False,
) -> pd.DataFrame:
    """Return, per evaluation with a finite ``column``, its drawdown from the running maximum.

    Columns: ``step``, ``accuracy``, ``running_max``, ``peak_position`` (row of the peak),
    ``margin``, ``margin_source`` and ``below`` (a drop beyond the margin). The arguments
    are those of :func:`find_dips`. Returns an empty frame without ``column`` or without
    finite values.
    """
    params = params or DipParams()
    if column not in evals.columns:
        return pd.DataFrame()
    se_column = se_column if se_column is not None else column + SE_SUFFIX
    curve = _accuracy_curve(evals, column, se_column, count_column, hits_column)
    if curve.empty:
        return pd.DataFrame()
    accuracy = curve["accuracy"].to_numpy(dtype="float64")
    standard_error = curve["se"].to_numpy(dtype="float64")
    count = curve["count"].to_numpy(dtype="float64")
    positions = np.arange(len(accuracy))
    running_max = np.maximum.accumulate(accuracy)
    # The peak of a drawdown is the latest evaluation at the running maximum before it.
    peak_position = np.maximum.accumulate(np.where(accuracy >= running_max, positions, 0))
    margin, source = margins_and_sources(
        running_max,
        count[peak_position],
        count,
        standard_error[peak_position],
        standard_error,
        params,
    )
    paired_se = paired_difference_se(curve["hits"].tolist(), count, peak_position)
    paired = np.isfinite(paired_se)
    margin = np.where(paired, np.maximum(params.min_margin, params.z * paired_se), margin)
    source = np.where(paired, "paired", source)
    if successive_noise:
        floor = params.z * successive_spread(accuracy)
        source = np.where(floor > margin, "successive", source)
        margin = np.maximum(margin, floor)
    return pd.DataFrame(
        {
            "step": curve["step"].to_numpy(dtype="int64"),
            "accuracy": accuracy,
            "running_max": running_max,
            "peak_position": peak_position,
            "margin": margin,
            "margin_source": source,
            "below": accuracy < running_max - margin,
        }
    )


def _accuracy_curve(
    evals: pd.DataFrame, column: str, se_column: str, count_column: str, hits_column: str
) -> pd.DataFrame:
    """Return ``step``, ``accuracy``, ``se``, ``count`` and ``hits`` of the evaluations.

    Only evaluations with a finite accuracy are kept. A missing ``se_column`` or
    ``count_column`` gives NaN in ``se`` or ``count``, and a missing ``hits_column`` None in
    ``hits``.
    """
    curve = pd.DataFrame(
        {
            "step": pd.to_numeric(evals["step"], errors="coerce"),
            "accuracy": pd.to_numeric(evals[column], errors="coerce"),
            "se": _optional_column(evals, se_column),
            "count": _optional_column(evals, count_column),
            "hits": evals[hits_column] if hits_column in evals.columns else None,
        }
    )
    usable = np.isfinite(curve["accuracy"].to_numpy(dtype="float64")) & curve["step"].notna()
    curve = curve[usable]
    curve = curve.drop_duplicates("step", keep="last").sort_values("step", kind="stable")
    return curve.reset_index(drop=True)


def _optional_column(evals: pd.DataFrame, column: str) -> pd.Series | float:
    if column in evals.columns:
        return pd.to_numeric(evals[column], errors="coerce")
    return np.nan


def unpack_hits(packed: object, count: float) -> np.ndarray | None:
    """Return the per-query hits packed by ``probes.knn.pack_hits`` as an int8 array.

    Returns None when ``packed`` is not bytes (a row written without hits) or has fewer
    than ``count`` queries.
    """
    if not isinstance(packed, bytes | bytearray | memoryview) or not np.isfinite(count):
        return None
    count = int(count)
    buffer = np.frombuffer(packed, dtype=np.uint8)
    if count <= 0 or buffer.size * 8 < count:
        return None
    return np.unpackbits(buffer, count=count).astype(np.int8)


def paired_difference_se(
    hits: list[object], count: np.ndarray, peak_position: np.ndarray
) -> np.ndarray:
    """Return, per evaluation, the paired standard error in points of its difference to its peak.

    ``hits`` contains each evaluation's packed per-query hits and ``count`` its query count.
    The result is NaN where either evaluation lacks hits or the two counts differ, because
    then the queries cannot be matched one to one.
    """
    result = np.full(len(hits), np.nan)
    unpacked: dict[int, np.ndarray | None] = {}

    def hits_at(position: int) -> np.ndarray | None:
        if position not in unpacked:
            unpacked[position] = unpack_hits(hits[position], count[position])
        return unpacked[position]

    for position, peak in enumerate(peak_position.tolist()):
        current, best = hits_at(position), hits_at(peak)
        if current is None or best is None or current.size != best.size:
            continue
        difference = current - best
        result[position] = 100.0 * difference.std() / np.sqrt(difference.size)
    return result


def successive_spread(accuracy: np.ndarray) -> float:
    """Return the robust standard deviation of the differences of successive evaluations.

    Returns 0 for fewer than 3 evaluations, where the spread cannot be estimated.
    """
    differences = np.diff(accuracy)
    if differences.size < 2:
        return 0.0
    # Centred on the median difference, so that the steady rise of a learning curve does
    # not count as noise.
    deviation = np.abs(differences - np.median(differences))
    return float(MAD_TO_STD * np.median(deviation))
