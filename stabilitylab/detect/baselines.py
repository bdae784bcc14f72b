"""Trailing baselines of the spike rules: a centre and a scale of the log values before each value.

Every rule takes log values and a mask of earlier outliers. Masked values are left out of the
baseline of every later value, and the baseline at position t uses positions before t only.
A value's z-score is ``(log x - centre) / scale``, so each rule returns its centre and scale
in log units, with NaN where there is not enough history:

- ``robust``: the trailing median and ``MAD / 0.6745`` over the last ``window`` values;
- ``mean_std``: the trailing mean and standard deviation over the last ``window`` values;
- ``ema``: exponential moving averages of the mean and the variance, updated as ZClip does
  (``mean = alpha * mean + (1 - alpha) * x``, then
  ``var = alpha * var + (1 - alpha) * (x - mean) ** 2``), where masked values do not update
  either average.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import bottleneck
import numpy as np
import pandas as pd

from stabilitylab.detect.intervals import runs_of_true

if TYPE_CHECKING:
    from stabilitylab.detect.spikes import SpikeParams

# MAD of a standard normal distribution, so that a robust z is in units of standard deviations.
MAD_TO_SIGMA = 0.6745

RULES = ("robust", "mean_std", "ema")
# Rules whose baseline is a trailing window of values. The ema rule has none.
WINDOWED_RULES = ("robust", "mean_std")


def trailing_baseline(
    log_values: pd.Series, masked: np.ndarray, params: SpikeParams
) -> tuple[np.ndarray, np.ndarray]:
    """Return the centre and scale of the baseline of each value for ``params.rule``."""
    if params.rule == "robust":
        return robust_baseline(log_values, masked, params.window, params.min_periods)
    if params.rule == "mean_std":
        return mean_std_baseline(log_values, masked, params.window, params.min_periods)
    if params.rule == "ema":
        return ema_baseline(log_values, masked, params.alpha, params.min_periods)
    raise ValueError(f"unknown spike rule {params.rule!r}")


def update_baseline(
    log_values: pd.Series,
    masked: np.ndarray,
    changed: np.ndarray,
    centre: np.ndarray,
    scale: np.ndarray,
    params: SpikeParams,
) -> None:
    """Recompute ``centre`` and ``scale`` in place after the mask changed at ``changed``.

    The robust rule recomputes only the stretches that a mask change reaches. The other
    rules are single linear passes in pandas, which cost less than finding those stretches,
    and the EMA reaches every later value anyway, so they are recomputed whole.
    """
    if params.rule == "robust":
        _update_robust(log_values, masked, changed, centre, scale, params)
        return
    new_centre, new_scale = trailing_baseline(log_values, masked, params)
    centre[:] = new_centre
    scale[:] = new_scale


def robust_baseline(
    log_values: pd.Series, masked: np.ndarray, window: int, min_periods: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return the trailing median and ``MAD / 0.6745`` of the ``window`` values before each.

    The MAD of a value is the median, over the window, of each earlier value's absolute
    deviation from its own trailing median. This differs from the MAD around the current
    median but needs only vectorised rolling medians, and it follows a slow trend the same
    way the median does.
    """
    history = np.where(masked, np.nan, log_values.to_numpy(dtype="float64"))
    median = _trailing_median(history, window, min_periods)
    with np.errstate(invalid="ignore"):
        deviation = np.abs(history - median)
    mad = _trailing_median(deviation, window, min_periods)
    return median, mad / MAD_TO_SIGMA


def _trailing_median(values: np.ndarray, window: int, min_periods: int) -> np.ndarray:
    """Return the median of the ``window`` values before each, NaN below ``min_periods``.

    NaN and infinite values are left out of a window but take their place in it, as in
    pandas' ``rolling(window, min_periods).median().shift(1)``, which this equals exactly.
    bottleneck's double-heap median is about four times as fast on long series.
    """
    result = np.full(len(values), np.nan)
    if len(values) < 2 or min_periods > len(values) - 1:
        return result
    values = np.where(np.isinf(values), np.nan, values)
    # A window longer than the series covers every earlier value, as the whole series does.
    span = min(window, len(values) - 1)
    result[1:] = bottleneck.move_median(values[:-1], span, min_count=min_periods)
    return result


def mean_std_baseline(
    log_values: pd.Series, masked: np.ndarray, window: int, min_periods: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return the mean and sample standard deviation of the ``window`` values before each.

    The window spans ``window`` positions, so masked values shrink it, and ``min_periods``
    counts the unmasked values in it.
    """
    history = log_values.where(~masked)
    rolling = history.rolling(window, min_periods=min_periods)
    mean = rolling.mean().shift(1)
    std = rolling.std(ddof=1).shift(1)
    return mean.to_numpy(copy=True), std.to_numpy(copy=True)


def ema_baseline(
    log_values: pd.Series, masked: np.ndarray, alpha: float, min_periods: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return the EMA mean and EMA standard deviation of the unmasked values before each.

    ``alpha`` is the weight of the previous average, as in ZClip (0.97 there). ZClip seeds
    both averages with the plain mean and variance of its first 25 values. Here pandas'
    ``adjust=True`` weighting plays that part: it divides by the sum of the weights seen so
    far, so it starts as a plain average. With ``ignore_na=True`` a masked value neither
    updates the averages nor ages them.
    """
    history = log_values.where(~masked)
    smoothing = 1.0 - alpha
    mean = history.ewm(alpha=smoothing, adjust=True, ignore_na=True).mean()
    squared_deviation = (history - mean) ** 2
    variance = squared_deviation.ewm(
        alpha=smoothing, adjust=True, ignore_na=True, min_periods=min_periods
    ).mean()
    # The averages at a masked position repeat the last unmasked one, so shifting by one
    # gives each value the averages over the unmasked values strictly before it.
    centre = mean.where(variance.notna()).shift(1)
    scale = np.sqrt(variance).shift(1)
    return centre.to_numpy(copy=True), scale.to_numpy(copy=True)


def _update_robust(
    log_values: pd.Series,
    masked: np.ndarray,
    changed: np.ndarray,
    median: np.ndarray,
    scale: np.ndarray,
    params: SpikeParams,
) -> None:
    """Recompute the robust baseline where a change of the mask reaches it.

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
        segment_median, segment_scale = robust_baseline(
            log_values.iloc[first : end + 1],
            masked[first : end + 1],
            params.window,
            params.min_periods,
        )
        median[start : end + 1] = segment_median[start - first :]
        scale[start : end + 1] = segment_scale[start - first :]
