"""Mean, spread and Student-t confidence interval of a few values, such as seeds."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Two-sided 95 % quantiles of Student's t distribution, t(0.975, df), to 3 decimals.
T_975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    11: 2.201,
    12: 2.179,
    13: 2.160,
    14: 2.145,
    15: 2.131,
    16: 2.120,
    17: 2.110,
    18: 2.101,
    19: 2.093,
    20: 2.086,
    21: 2.080,
    22: 2.074,
    23: 2.069,
    24: 2.064,
    25: 2.060,
    26: 2.056,
    27: 2.052,
    28: 2.048,
    29: 2.045,
    30: 2.042,
    40: 2.021,
    60: 2.000,
    120: 1.980,
}
NORMAL_975 = 1.960


def t_quantile_975(df: int) -> float:
    """Return t(0.975, df) for ``df`` >= 1.

    Between rows of :data:`T_975` the next smaller df is used, which widens the interval
    slightly. Beyond 1000 degrees of freedom the normal quantile is used.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom {df} < 1 have no t quantile")
    if df > 1000:
        return NORMAL_975
    return T_975[max(row for row in T_975 if row <= df)]


@dataclass(frozen=True)
class MeanInterval:
    """Mean, sample std (ddof 1) and the 95 % t interval of the mean of ``n`` finite values.

    ``std``, ``low`` and ``high`` are NaN with fewer than 2 values, and every field but ``n``
    is NaN without values.
    """

    n: int
    mean: float
    std: float
    low: float
    high: float


def mean_interval(values: Sequence[float]) -> MeanInterval:
    """Return the mean and 95 % t interval of the finite ``values``; non-finite ones are skipped."""
    data = np.asarray([value for value in values if math.isfinite(value)], dtype="float64")
    count = len(data)
    if count == 0:
        return MeanInterval(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(data.mean())
    if count < 2:
        return MeanInterval(count, mean, math.nan, math.nan, math.nan)
    std = float(data.std(ddof=1))
    half_width = t_quantile_975(count - 1) * std / math.sqrt(count)
    return MeanInterval(count, mean, std, mean - half_width, mean + half_width)
