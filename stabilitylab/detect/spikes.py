"""Spike detection on a per-step series such as a gradient norm or the loss.

A value is a spike when its log is far above a trailing baseline of the values before it,
``z = (log x - centre) / scale >= z_threshold``, and the value is at least ``min_ratio``
times ``exp(centre)``. Logs are used because gradient norms vary over orders of magnitude
and spike multiplicatively. Only upward deviations count. Three rules set the baseline
(see :mod:`stabilitylab.detect.baselines`):

- ``robust`` (default): median and MAD over a trailing window, ``z = 0.6745 (log x -
  median) / MAD``, which a minority of outliers in the window barely moves;
- ``mean_std``: mean and standard deviation over a trailing window, the rule of OLMo 2's
  spike score (7 sigma over the last 1000 values) and of OLMo-core's skip-step optimizers
  (6 sigma over the last 128 values);
- ``ema``: exponential moving averages of the mean and variance, as ZClip tracks the
  gradient norm (z above 2.5 with ``alpha`` 0.97 by default there).

Even a robust baseline moves under a long burst of outliers. The detector therefore runs
several passes: each pass masks the values flagged by the previous one and recomputes the
baseline, so a spike does not raise the threshold for another spike soon after it. Masked
values update no rule's baseline, the EMA included.

``persistence`` then keeps only the runs of at least that many consecutive flagged values,
so one-value blips can be ignored. They stay masked out of the baseline either way.

NOTE: a lasting rise of the level by more than ``min_ratio`` is not a spike, but it is
reported as one event that lasts until the baseline catches up. With the robust defaults, a
step up by 3x on 10 % noise gives one event of about 0.75 * window values.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from stabilitylab.detect.baselines import (
    MAD_TO_SIGMA,
    RULES,
    WINDOWED_RULES,
    trailing_baseline,
    update_baseline,
)
from stabilitylab.detect.intervals import run_lengths, runs_of_true
from stabilitylab.errors import ConfigError

__all__ = [
    "MAD_TO_SIGMA",
    "NON_ROBUST_PASSES",
    "RULES",
    "SCORE_COLUMNS",
    "SPIKE_PRESETS",
    "SpikeEvent",
    "SpikeParams",
    "clean_series",
    "find_spikes",
    "group_spike_events",
    "runs_of_true",
    "score_spikes",
    "spike_preset",
]

SCORE_COLUMNS = ("value", "baseline", "ratio", "z", "outlier", "spike")


@dataclass(frozen=True)
class SpikeParams:
    """Parameters of the spike detector.

    ``rule`` is one of :data:`RULES`. ``window`` and ``min_periods`` count recorded finite
    values, which are steps when the series has one value per step. The ``ema`` rule has no
    window: ``alpha`` is the weight of the previous average there, so its memory is about
    ``1 / (1 - alpha)`` values, and ``window`` is ignored. ``min_periods`` is the history a
    value needs before it can be flagged. The robust rule needs that many earlier values for
    its median and as many earlier deviations for its MAD, so its first ``2 * min_periods``
    values are never flagged, and the other rules' first ``min_periods`` values.
    """

    rule: str = "robust"
    window: int = 100
    min_periods: int = 20
    # Standard deviations above the baseline: robust z, the k of mean + k sigma, or EMA z.
    # 4 comes from benchmarks/planted_faults.py on digits runs (docs/benchmarks.md): the
    # calibration gives 3.25 for at most 0.5 false alarms per 1,000 steps on 8 healthy runs,
    # and at 4 those runs have none while 29 of 30 planted gradient faults of factor 10 or
    # more are found (25 of 30 at the earlier default of 6). Gaussian log noise exceeds z 4
    # with probability 3e-5 per value, about 0.4 false alarms per 1,000 steps over 12 series
    # where min_ratio does not bind; heavier tails need a calibration of their own.
    z_threshold: float = 4.0
    # Minimum of value / exp(baseline centre), so that a tiny scale cannot turn noise into spikes.
    min_ratio: float = 2.0
    # Maximum number of baseline computations. With 1, earlier outliers stay in the baseline.
    # The non-robust rules need more for long bursts, see NON_ROBUST_PASSES.
    passes: int = 3
    # Weight of the previous average in the ema rule, as ZClip's alpha.
    alpha: float = 0.97
    # Minimum number of consecutive flagged values that make an event.
    persistence: int = 1

    @property
    def start_up(self) -> int:
        """Values at the start of a series that this detector never flags."""
        return 2 * self.min_periods if self.rule == "robust" else self.min_periods

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ConfigError(
                f"invalid spike rule {self.rule!r}: expected one of {', '.join(RULES)}"
            )
        if self.window < 2:
            raise ConfigError(f"invalid spike window {self.window}: expected at least 2 values")
        if self.min_periods < 1:
            raise ConfigError(
                f"invalid spike min_periods {self.min_periods}: expected at least 1 value"
            )
        if self.rule in WINDOWED_RULES and self.min_periods > self.window:
            raise ConfigError(
                f"invalid spike min_periods {self.min_periods}: expected at most the window "
                f"size ({self.window})"
            )
        if not self.z_threshold > 0:
            raise ConfigError(f"invalid spike z_threshold {self.z_threshold}: expected > 0")
        if not self.min_ratio >= 1:
            raise ConfigError(f"invalid spike min_ratio {self.min_ratio}: expected >= 1")
        if self.passes < 1:
            raise ConfigError(f"invalid spike passes {self.passes}: expected >= 1")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"invalid spike alpha {self.alpha}: expected between 0 and 1")
        if self.persistence < 1:
            raise ConfigError(
                f"invalid spike persistence {self.persistence}: expected at least 1 value"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# A mean and a standard deviation are not robust, because each outlier left in the baseline
# inflates the deviation. One pass therefore masks only the first few values of a burst, and
# each further pass a few more. On 10 % log-normal noise a burst of 30 values at 20x needed
# 10 passes with olmo-core's 128-value window and 7 with the zclip EMA, and a burst of 60
# values 21 and 12. Passes stop once the flags no longer change, and each pass of these rules
# is one linear pandas computation, so the presets allow many.
NON_ROBUST_PASSES = 25

# Named settings of detectors used in practice, all on log values with the outlier masking
# and min_ratio of this detector. min_periods 25 for zclip is ZClip's warm-up length.
SPIKE_PRESETS: dict[str, SpikeParams] = {
    "robust": SpikeParams(),
    "olmo2": SpikeParams(rule="mean_std", window=1000, z_threshold=7.0, passes=NON_ROBUST_PASSES),
    "olmo-core": SpikeParams(
        rule="mean_std", window=128, z_threshold=6.0, passes=NON_ROBUST_PASSES
    ),
    "zclip": SpikeParams(
        rule="ema", z_threshold=2.5, alpha=0.97, min_periods=25, passes=NON_ROBUST_PASSES
    ),
}


def spike_preset(name: str, **overrides: Any) -> SpikeParams:
    """Return the spike parameters of preset ``name``, with ``overrides`` replacing fields.

    Raises ConfigError for an unknown name, listing the presets, or for an invalid override.
    """
    try:
        params = SPIKE_PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown spike preset {name!r}: expected one of {', '.join(SPIKE_PRESETS)}"
        ) from None
    return dataclasses.replace(params, **overrides) if overrides else params


@dataclass(frozen=True)
class SpikeEvent:
    """One spike: a run of consecutive flagged values of one series.

    ``baseline`` is the exponentiated centre of the rule's baseline at the peak (the trailing
    median, mean or EMA of the log values), in the units of the series, and ``ratio`` is
    ``peak_value / baseline``. ``z`` is infinite when the baseline scale is zero.
    ``duration_steps`` counts both ends, so a single flagged step lasts 1 step.
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
    :data:`SCORE_COLUMNS`: the value, the baseline ``exp(centre)``, ``value / baseline``, the
    z-score, whether the value is an outlier (above both thresholds, and so masked out of
    later baselines) and whether it is a spike (an outlier in a run of at least
    ``persistence`` consecutive outliers). Values without enough history have a NaN
    baseline and are never outliers.
    """
    params = params or SpikeParams()
    values = clean_series(series)
    log_values = np.log(values)
    masked = np.zeros(len(values), dtype=bool)
    centre, scale = trailing_baseline(log_values, masked, params)
    z, ratio, flagged = _flag_outliers(log_values, centre, scale, params)
    for _ in range(params.passes - 1):
        changed = flagged != masked
        if not changed.any():
            break
        masked = flagged
        update_baseline(log_values, masked, changed, centre, scale, params)
        z, ratio, flagged = _flag_outliers(log_values, centre, scale, params)
    scores = pd.DataFrame(
        {
            "value": values.to_numpy(),
            "baseline": np.exp(centre),
            "ratio": ratio,
            "z": z,
            "outlier": flagged,
            "spike": flagged & (run_lengths(flagged) >= params.persistence),
        },
        index=values.index,
    )
    scores.index.name = "step"
    return scores


def _flag_outliers(
    log_values: pd.Series, centre: np.ndarray, scale: np.ndarray, params: SpikeParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the z-score, the ratio to the baseline and the outlier flag of every value."""
    excess = log_values.to_numpy() - centre
    with np.errstate(divide="ignore", invalid="ignore"):
        z = excess / scale
    ratio = np.exp(excess)
    flagged = (z >= params.z_threshold) & (ratio >= params.min_ratio)
    return z, ratio, flagged


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
    """Merge runs of consecutive ``spike`` rows of :func:`score_spikes` output into events."""
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
