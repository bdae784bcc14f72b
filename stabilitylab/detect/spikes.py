"""Spike detection on a per-step series such as a gradient norm or the loss.

A value is a spike when its log is far above a trailing baseline of the values before it:

    z = 0.6745 * (log x - median) / MAD

where ``median`` and ``MAD`` come from the ``window`` recorded values strictly before ``x``.
The factor 0.6745 makes z comparable to a Gaussian z-score, because the MAD of a normal
distribution is 0.6745 standard deviations. Logs are used because gradient norms vary
over orders of magnitude and spike multiplicatively. Only upward deviations count.

The baseline is robust, but a long burst of outliers still moves it. The detector therefore
runs several passes: each pass masks the values flagged by the previous one and recomputes
the baseline, so a spike does not raise the threshold for another spike soon after it.

NOTE: a lasting rise of the level by more than ``min_ratio`` is not a spike, but it is
reported as one event that lasts until the baseline catches up. With the defaults, a step
up by 3x on 10 % noise gives one event of about 0.75 * window values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from stabilitylab.errors import ConfigError

# MAD of a standard normal distribution, so that z is in units of standard deviations.
MAD_TO_SIGMA = 0.6745

SCORE_COLUMNS = ("value", "baseline", "ratio", "z", "spike")


@dataclass(frozen=True)
class SpikeParams:
    """Parameters of the spike detector.

    ``window`` and ``min_periods`` count recorded finite values, which are steps when the
    series has one value per step. A value needs ``min_periods`` earlier values for its
    median and as many earlier deviations for its MAD, so the first ``2 * min_periods``
    values of a series are never flagged.
    """

    window: int = 100
    min_periods: int = 20
    z_threshold: float = 6.0
    # Minimum of value / baseline median, so that a tiny MAD cannot turn noise into spikes.
    min_ratio: float = 2.0
    # Number of baseline computations. With 1, earlier outliers stay in the baseline.
    passes: int = 3

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ConfigError(f"invalid spike window {self.window}: expected at least 2 values")
        if not 1 <= self.min_periods <= self.window:
            raise ConfigError(
                f"invalid spike min_periods {self.min_periods}: expected 1 to the window "
                f"size ({self.window})"
            )
        if not self.z_threshold > 0:
            raise ConfigError(f"invalid spike z_threshold {self.z_threshold}: expected > 0")
        if not self.min_ratio >= 1:
            raise ConfigError(f"invalid spike min_ratio {self.min_ratio}: expected >= 1")
        if self.passes < 1:
            raise ConfigError(f"invalid spike passes {self.passes}: expected >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SpikeEvent:
    """One spike: a run of consecutive flagged values of one series.

    ``baseline`` is the trailing median at the peak, in the units of the series, and
    ``ratio`` is ``peak_value / baseline``. ``z`` is infinite when the baseline MAD is
    zero. ``duration_steps`` counts both ends, so a single flagged step lasts 1 step.
    """

    series: str
    start_step: int
    peak_step: int
    end_step: int
    duration_steps: int
    peak_value: float
    baseline: float
    ratio: float
    z: float

    def to_dict(self) -> dict[str, Any]:
        """Return the event as JSON-ready values, with None for an infinite z."""
        payload = asdict(self)
        payload["z"] = self.z if math.isfinite(self.z) else None
        return payload


def clean_series(series: pd.Series) -> pd.Series:
    """Return the finite, positive values of ``series`` as float, one per step, sorted by step.

    Non-positive values have no log and are dropped with the non-finite ones. A run resumed
    from a checkpoint records some steps twice, and the later record is kept.
    """
    values = pd.to_numeric(series, errors="coerce").astype("float64")
    values = values[~values.index.duplicated(keep="last")].sort_index(kind="stable")
    array = values.to_numpy()
    with np.errstate(invalid="ignore"):
        keep = np.isfinite(array) & (array > 0)
    return values[keep]


def score_spikes(series: pd.Series, params: SpikeParams | None = None) -> pd.DataFrame:
    """Score every usable value of ``series`` (indexed by step) against its trailing baseline.

    Returns one row per finite positive value, indexed by step, with the columns
    :data:`SCORE_COLUMNS`: the value, the baseline median, ``value / baseline``, the robust
    z-score and whether the value is a spike. Values without enough history have a NaN
    baseline and are never spikes.
    """
    params = params or SpikeParams()
    values = clean_series(series)
    log_values = np.log(values)
    masked = np.zeros(len(values), dtype=bool)
    median, mad = _trailing_baseline(log_values, masked, params)
    z, ratio, flagged = _flag_spikes(log_values, median, mad, params)
    for _ in range(params.passes - 1):
        changed = flagged != masked
        if not changed.any():
            break
        masked = flagged
        _update_baseline(log_values, masked, changed, median, mad, params)
        z, ratio, flagged = _flag_spikes(log_values, median, mad, params)
    scores = pd.DataFrame(
        {
            "value": values.to_numpy(),
            "baseline": np.exp(median),
            "ratio": ratio,
            "z": z,
            "spike": flagged,
        },
        index=values.index,
    )
    scores.index.name = "step"
    return scores


def _trailing_baseline(
    log_values: pd.Series, masked: np.ndarray, params: SpikeParams
) -> tuple[np.ndarray, np.ndarray]:
    """Return the median and MAD of the ``window`` log values strictly before each value.

    Masked values are left out of both. The MAD of a value is the median, over the window,
    of each earlier value's absolute deviation from its own trailing median. This differs
    from the MAD around the current median but needs only vectorised rolling medians, and
    it follows a slow trend the same way the median does.
    """
    history = log_values.where(~masked)
    median = history.rolling(params.window, min_periods=params.min_periods).median().shift(1)
    deviation = (history - median).abs()
    mad = deviation.rolling(params.window, min_periods=params.min_periods).median().shift(1)
    return median.to_numpy(copy=True), mad.to_numpy(copy=True)


def _update_baseline(
    log_values: pd.Series,
    masked: np.ndarray,
    changed: np.ndarray,
    median: np.ndarray,
    mad: np.ndarray,
    params: SpikeParams,
) -> None:
    """Recompute ``median`` and ``mad`` in place where a change of the mask reaches them.

    The median at position t reads positions t - window to t - 1. The MAD reads deviations
    that each read a window before them, so a mask change at p affects positions p + 1 to
    p + 2 * window only. Recomputing those stretches alone, each from a slice that starts
    2 * window earlier, gives the same values as a full pass and costs far less when
    outliers are sparse.
    """
    reach = 2 * params.window
    count = len(log_values)
    marks = np.zeros(count + 1, dtype="int64")
    changed_positions = np.flatnonzero(changed)
    np.add.at(marks, np.minimum(changed_positions + 1, count), 1)
    np.add.at(marks, np.minimum(changed_positions + reach + 1, count), -1)
    affected = np.cumsum(marks[:count]) > 0
    for start, end in runs_of_true(affected):
        first = max(0, start - reach)
        segment_median, segment_mad = _trailing_baseline(
            log_values.iloc[first : end + 1], masked[first : end + 1], params
        )
        median[start : end + 1] = segment_median[start - first :]
        mad[start : end + 1] = segment_mad[start - first :]


def _flag_spikes(
    log_values: pd.Series, median: np.ndarray, mad: np.ndarray, params: SpikeParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the z-score, the ratio to the baseline and the spike flag of every value."""
    z, ratio = _robust_scores(log_values, median, mad)
    flagged = (z >= params.z_threshold) & (ratio >= params.min_ratio)
    return z, ratio, flagged


def _robust_scores(
    log_values: pd.Series, median: np.ndarray, mad: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    excess = log_values.to_numpy() - median
    with np.errstate(divide="ignore", invalid="ignore"):
        z = MAD_TO_SIGMA * excess / mad
    return z, np.exp(excess)


def find_spikes(
    series: pd.Series, params: SpikeParams | None = None, name: str | None = None
) -> list[SpikeEvent]:
    """Detect spikes in ``series`` (indexed by step) and merge consecutive flagged values.

    Values are consecutive when no other usable value lies between them, so NaN gaps do not
    split an event. An all-NaN series (a frozen layer) gives no events. ``name`` defaults
    to the series name.
    """
    scores = score_spikes(series, params)
    label = name if name is not None else str(series.name)
    return group_spike_events(scores, label)


def group_spike_events(scores: pd.DataFrame, series_name: str) -> list[SpikeEvent]:
    """Merge runs of consecutive flagged rows of :func:`score_spikes` output into events."""
    flagged = scores["spike"].to_numpy(dtype=bool)
    if not flagged.any():
        return []
    previous = np.concatenate(([False], flagged[:-1]))
    event_ids = np.cumsum(flagged & ~previous)
    rows = scores.reset_index()[flagged].assign(event=event_ids[flagged])
    grouped = rows.groupby("event", sort=True)
    bounds = grouped["step"].agg(["min", "max"])
    peaks = rows.loc[grouped["value"].idxmax()].set_index("event")
    events = []
    for event_id, bound in bounds.iterrows():
        peak = peaks.loc[event_id]
        events.append(
            SpikeEvent(
                series=series_name,
                start_step=int(bound["min"]),
                peak_step=int(peak["step"]),
                end_step=int(bound["max"]),
                duration_steps=int(bound["max"] - bound["min"]) + 1,
                peak_value=float(peak["value"]),
                baseline=float(peak["baseline"]),
                ratio=float(peak["ratio"]),
                z=float(peak["z"]),
            )
        )
    return events


def runs_of_true(flags: np.ndarray) -> list[tuple[int, int]]:
    """Return the first and last position of each run of consecutive True values."""
    padded = np.concatenate(([False], flags, [False])).astype("int8")
    changes = np.diff(padded)
    starts = np.flatnonzero(changes == 1)
    ends = np.flatnonzero(changes == -1) - 1
    return list(zip(starts.tolist(), ends.tolist(), strict=True))
