"""Propagation lag of gradient spikes from the first layer to a later layer.

Two measures of how many steps a spike takes to travel from the first layer (the patch
projection, or ``token_grad_norm`` when it is frozen) to the last transformer block:

- Event matching: each first-layer spike is matched to the earliest last-layer spike that
  starts at or after its start step and at most ``max_lag`` steps later. A last-layer spike
  is matched at most once, first-layer spikes taking their turn in step order, so one
  last-layer burst cannot stand for several first-layer spikes. The delay is the difference
  of the two start steps. The median delay gets a percentile-bootstrap confidence interval
  over the matched events.
- Cross-correlation of the two log series, each detrended by the median of the
  ``baseline_window`` values before it and standardised, over lags ``-max_lag..max_lag``.
  A positive lag means the target follows the source. It is computed on the whole run and
  on a window of ``window_steps`` steps either side of each first-layer spike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from stabilitylab.detect.spikes import SpikeEvent, clean_series
from stabilitylab.errors import ConfigError

# Minimum number of value pairs for one lag's correlation, so that a lag near the end of a
# short series cannot win on a handful of points.
MIN_PAIRS = 10


@dataclass(frozen=True)
class LagParams:
    """Parameters of the lag analysis, in optimiser steps.

    The default ``max_lag`` of 50 steps covers, with room to spare, the few to tens of
    iterations that Chen, Xie and He (2021, MoCo v3) report between a patch-projection spike
    and the last layers.
    """

    max_lag: int = 50
    # Trailing window of the median that detrends each log series for the cross-correlation.
    baseline_window: int = 100
    # Half width of the window around each first-layer spike for the windowed correlation.
    window_steps: int = 100
    bootstrap_samples: int = 2000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_lag < 0:
            raise ConfigError(f"invalid lag max_lag {self.max_lag}: expected >= 0 steps")
        if self.baseline_window < 2:
            raise ConfigError(
                f"invalid lag baseline_window {self.baseline_window}: expected at least 2 values"
            )
        if self.window_steps < self.max_lag:
            raise ConfigError(
                f"invalid lag window_steps {self.window_steps}: expected at least max_lag "
                f"({self.max_lag}) steps"
            )
        if self.bootstrap_samples < 1:
            raise ConfigError(
                f"invalid lag bootstrap_samples {self.bootstrap_samples}: expected >= 1"
            )
        if not 0 < self.confidence < 1:
            raise ConfigError(
                f"invalid lag confidence {self.confidence}: expected a fraction between 0 and 1"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SpikeMatch:
    """One first-layer spike and the later-layer spike matched to it, if any."""

    source_start_step: int
    target_start_step: int | None

    @property
    def delay_steps(self) -> int | None:
        if self.target_start_step is None:
            return None
        return self.target_start_step - self.source_start_step

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "delay_steps": self.delay_steps}


@dataclass(frozen=True)
class CrossCorrelationPeak:
    """The lag in steps of the highest correlation, and that correlation.

    ``lag`` is None and ``correlation`` NaN when no lag had :data:`MIN_PAIRS` finite pairs
    or a series was constant.
    """

    lag: int | None
    correlation: float

    def to_dict(self) -> dict[str, Any]:
        return {"lag": self.lag, "correlation": _finite_or_none(self.correlation)}


@dataclass(frozen=True)
class LagStats:
    """Lag from the ``source`` series to the ``target`` series of one run.

    Delays are in steps. ``median_delay_ci`` is the percentile-bootstrap interval of the
    median delay at ``LagParams.confidence``, NaN at both ends with fewer than 2 matches.
    ``window_peaks`` has one entry per first-layer spike, in step order.
    """

    source: str
    target: str
    source_spikes: int
    matched: int
    median_delay: float
    mean_delay: float
    median_delay_ci: tuple[float, float]
    xcorr: CrossCorrelationPeak
    window_peaks: list[CrossCorrelationPeak] = field(default_factory=list)
    matches: list[SpikeMatch] = field(default_factory=list)

    @property
    def unmatched(self) -> int:
        return self.source_spikes - self.matched

    @property
    def delays(self) -> list[int]:
        return [match.delay_steps for match in self.matches if match.delay_steps is not None]

    @property
    def median_window_lag(self) -> float:
        """Median over first-layer spikes of the windowed correlation's peak lag, NaN if none."""
        lags = [peak.lag for peak in self.window_peaks if peak.lag is not None]
        return float(np.median(lags)) if lags else math.nan

    def to_dict(self) -> dict[str, Any]:
        low, high = self.median_delay_ci
        return {
            "source": self.source,
            "target": self.target,
            "source_spikes": self.source_spikes,
            "matched": self.matched,
            "unmatched": self.unmatched,
            "delays": self.delays,
            "median_delay": _finite_or_none(self.median_delay),
            "mean_delay": _finite_or_none(self.mean_delay),
            "median_delay_ci": [_finite_or_none(low), _finite_or_none(high)],
            "xcorr": self.xcorr.to_dict(),
            "median_window_lag": _finite_or_none(self.median_window_lag),
            "window_peaks": [peak.to_dict() for peak in self.window_peaks],
            "matches": [match.to_dict() for match in self.matches],
        }


def match_spikes(
    source: Sequence[SpikeEvent], target: Sequence[SpikeEvent], max_lag: int
) -> list[SpikeMatch]:
    """Match each source spike to the earliest unused target spike 0 to ``max_lag`` steps later.

    Both lists may be in any order. The result follows the source spikes in step order.
    """
    target_starts = sorted(spike.start_step for spike in target)
    used = [False] * len(target_starts)
    matches = []
    for start in sorted(spike.start_step for spike in source):
        matched_step = None
        for position, candidate in enumerate(target_starts):
            if used[position] or candidate < start:
                continue
            if candidate - start <= max_lag:
                used[position] = True
                matched_step = candidate
            break
        matches.append(SpikeMatch(source_start_step=start, target_start_step=matched_step))
    return matches


def bootstrap_median_interval(
    values: Sequence[float], samples: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Return the percentile-bootstrap interval of the median of ``values``.

    NaN at both ends with fewer than 2 values, since one value has no spread to resample.
    The interval is reproducible for a given ``seed``.
    """
    data = np.asarray(values, dtype="float64")
    if len(data) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    resampled = rng.choice(data, size=(samples, len(data)), replace=True)
    medians = np.median(resampled, axis=1)
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(medians, [tail, 100.0 - tail])
    return float(low), float(high)


def detrended_log(series: pd.Series, baseline_window: int) -> pd.Series:
    """Return log values minus the median of the ``baseline_window`` values before each.

    Only finite positive values are used, and the first values, which lack
    ``baseline_window // 2`` earlier values, are NaN.
    """
    log_values = np.log(clean_series(series))
    min_periods = max(1, baseline_window // 2)
    baseline = log_values.rolling(baseline_window, min_periods=min_periods).median().shift(1)
    return log_values - baseline


def cross_correlation(
    source: pd.Series, target: pd.Series, max_lag: int, baseline_window: int
) -> pd.Series:
    """Return the Pearson correlation of the detrended logs at each lag ``-max_lag..max_lag``.

    Both series are indexed by step. At lag k the source at step t is paired with the
    target at step t + k. Lags with fewer than :data:`MIN_PAIRS` finite pairs are NaN.
    """
    first = detrended_log(source, baseline_window)
    second = detrended_log(target, baseline_window)
    return _correlation_by_lag(first, second, max_lag)


def _correlation_by_lag(first: pd.Series, second: pd.Series, max_lag: int) -> pd.Series:
    """Return the lagged correlations of two detrended series on a common step grid."""
    lags = np.arange(-max_lag, max_lag + 1)
    first = first.dropna()
    second = second.dropna()
    if first.empty or second.empty:
        return pd.Series(np.nan, index=lags, name="correlation")
    low = int(min(first.index.min(), second.index.min()))
    high = int(max(first.index.max(), second.index.max()))
    grid = np.arange(low, high + 1)
    a = first.reindex(grid).to_numpy(dtype="float64")
    b = second.reindex(grid).to_numpy(dtype="float64")
    return pd.Series(_lagged_correlations(a, b, max_lag), index=lags, name="correlation")


def _lagged_correlations(a: np.ndarray, b: np.ndarray, max_lag: int) -> np.ndarray:
    """Return :func:`_lagged_correlation` for every lag from -max_lag to max_lag at once.

    Each lag's sums over its finite pairs (count, sums, squares and products) come from
    sliding dot products, which cost O(len(a) * max_lag) in NumPy's C loop in place of a
    Python loop over the lags. The correlation then follows from the sums, in float64.
    """
    finite_a, finite_b = np.isfinite(a), np.isfinite(b)
    a0 = np.where(finite_a, a, 0.0)
    b0 = np.where(finite_b, b, 0.0)
    mask_a, mask_b = finite_a.astype("float64"), finite_b.astype("float64")

    def by_lag(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        # sum over t of x[t] * y[t + lag], for lag = -max_lag ... max_lag
        padded = np.concatenate([np.zeros(max_lag), y, np.zeros(max_lag)])
        return np.correlate(padded, x, mode="valid")

    count = np.rint(by_lag(mask_a, mask_b))
    sum_x, sum_y = by_lag(a0, mask_b), by_lag(mask_a, b0)
    sum_xx, sum_yy = by_lag(a0 * a0, mask_b), by_lag(mask_a, b0 * b0)
    sum_xy = by_lag(a0, b0)
    with np.errstate(invalid="ignore", divide="ignore"):
        covariance = sum_xy - sum_x * sum_y / count
        variance_x = sum_xx - sum_x**2 / count
        variance_y = sum_yy - sum_y**2 / count
        correlation = covariance / np.sqrt(variance_x * variance_y)
    # A constant side has a variance of zero up to the rounding of the sums.
    flat = (variance_x <= 1e-12 * sum_xx) | (variance_y <= 1e-12 * sum_yy)
    correlation[(count < MIN_PAIRS) | flat] = np.nan
    return np.clip(correlation, -1.0, 1.0)


def correlation_peak(correlations: pd.Series) -> CrossCorrelationPeak:
    """Return the lag of the highest finite correlation; ties go to the smallest |lag|."""
    finite = correlations[np.isfinite(correlations.to_numpy(dtype="float64"))]
    if finite.empty:
        return CrossCorrelationPeak(lag=None, correlation=math.nan)
    best = finite.max()
    candidates = finite.index[finite.to_numpy() == best]
    lag = int(min(candidates, key=lambda value: (abs(value), value)))
    return CrossCorrelationPeak(lag=lag, correlation=float(best))


def lag_statistics(
    source_name: str,
    source_values: pd.Series,
    source_spikes: Sequence[SpikeEvent],
    target_name: str,
    target_values: pd.Series,
    target_spikes: Sequence[SpikeEvent],
    params: LagParams | None = None,
) -> LagStats:
    """Measure the lag from one source series to one target series, both indexed by step."""
    params = params or LagParams()
    matches = match_spikes(source_spikes, target_spikes, params.max_lag)
    delays = [match.delay_steps for match in matches if match.delay_steps is not None]
    first = detrended_log(source_values, params.baseline_window)
    second = detrended_log(target_values, params.baseline_window)
    window_peaks = [
        _window_peak(first, second, match.source_start_step, params) for match in matches
    ]
    return LagStats(
        source=source_name,
        target=target_name,
        source_spikes=len(matches),
        matched=len(delays),
        median_delay=float(np.median(delays)) if delays else math.nan,
        mean_delay=float(np.mean(delays)) if delays else math.nan,
        median_delay_ci=bootstrap_median_interval(
            delays, params.bootstrap_samples, params.confidence, params.seed
        ),
        xcorr=correlation_peak(_correlation_by_lag(first, second, params.max_lag)),
        window_peaks=window_peaks,
        matches=matches,
    )


def _window_peak(
    first: pd.Series, second: pd.Series, center: int, params: LagParams
) -> CrossCorrelationPeak:
    """Return the correlation peak within ``window_steps`` steps of one first-layer spike.

    ``first`` and ``second`` are detrended over the whole run, so the window's start still
    has a baseline. The target reaches ``max_lag`` steps further either side, so that every
    lag pairs the whole source window.
    """
    low = center - params.window_steps
    high = center + params.window_steps
    source = first[(first.index >= low) & (first.index <= high)]
    target_low = low - params.max_lag
    target_high = high + params.max_lag
    target = second[(second.index >= target_low) & (second.index <= target_high)]
    return correlation_peak(_correlation_by_lag(source, target, params.max_lag))


def _lagged_correlation(a: np.ndarray, b: np.ndarray, lag: int) -> float:
    """Return the Pearson correlation of ``a[t]`` with ``b[t + lag]`` over finite pairs."""
    if abs(lag) >= len(a):
        return math.nan
    if lag >= 0:
        x, y = a[: len(a) - lag], b[lag:]
    else:
        x, y = a[-lag:], b[: len(b) + lag]
    usable = np.isfinite(x) & np.isfinite(y)
    if usable.sum() < MIN_PAIRS:
        return math.nan
    x = x[usable] - x[usable].mean()
    y = y[usable] - y[usable].mean()
    scale = math.sqrt(float(np.dot(x, x)) * float(np.dot(y, y)))
    if scale == 0:
        return math.nan
    return float(np.dot(x, y)) / scale


def _finite_or_none(value: float) -> float | None:
    """Return ``value``, or None when it is NaN or infinite, for strict JSON."""
    return value if math.isfinite(value) else None
