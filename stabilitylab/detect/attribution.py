"""Attribution of each kNN accuracy dip to the gradient spikes that came before it.

A dip is first seen at its ``start_step``, the first evaluation below the margin. The
evaluation before it was still within the margin, so whatever broke the run happened after
that last good evaluation and before ``start_step``. Damage can take a while to show in the
features, so the window also reaches ``lookback_steps`` before the last good evaluation:

    window = [max(0, last_good_step - lookback_steps), start_step - 1]

An evaluation at step s runs after s optimiser steps, so step ``start_step`` itself comes
after the evaluation that saw the dip and is outside the window. A gradient spike belongs
to the window when any of its steps does. The series that spiked first is the one with the
earliest spike start, and ties go to the series nearest the input, in the order data flows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from stabilitylab.detect.dips import Dip
from stabilitylab.detect.spikes import SpikeEvent
from stabilitylab.errors import ConfigError


@dataclass(frozen=True)
class AttributionParams:
    """Parameters of dip attribution, in optimiser steps.

    The default lookback of 50 steps covers the few to tens of steps a spike takes to reach
    the last layers and to show in the features. A longer one ties a dip to spikes long
    before it: on a digits run at lr 0.1 (a kNN evaluation every 2 steps), 100 steps
    attributed three dips 50 to 90 steps apart to one spike.
    """

    lookback_steps: int = 50

    def __post_init__(self) -> None:
        if self.lookback_steps < 0:
            raise ConfigError(
                f"invalid attribution lookback_steps {self.lookback_steps}: expected >= 0 steps"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DipAttribution:
    """The gradient spikes in the window before one dip, earliest first.

    ``series_order`` lists each series that spiked once, by its first spike in the window,
    so ``series_order[0]`` is ``first_series``. Both are empty (None) without spikes.
    """

    dip_start_step: int
    dip_bottom_step: int
    last_good_step: int
    window_start_step: int
    window_end_step: int
    spikes: list[SpikeEvent] = field(default_factory=list)

    @property
    def series_order(self) -> list[str]:
        return list(dict.fromkeys(spike.series for spike in self.spikes))

    @property
    def first_series(self) -> str | None:
        return self.spikes[0].series if self.spikes else None

    @property
    def first_spike_step(self) -> int | None:
        return self.spikes[0].start_step if self.spikes else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "dip_start_step": self.dip_start_step,
            "dip_bottom_step": self.dip_bottom_step,
            "last_good_step": self.last_good_step,
            "window_start_step": self.window_start_step,
            "window_end_step": self.window_end_step,
            "first_series": self.first_series,
            "first_spike_step": self.first_spike_step,
            "series_order": self.series_order,
            "spikes": [
                {
                    "series": spike.series,
                    "start_step": spike.start_step,
                    "peak_step": spike.peak_step,
                    "ratio": spike.ratio,
                }
                for spike in self.spikes
            ],
        }


def attribute_dips(
    dips: Sequence[Dip],
    evals: pd.DataFrame,
    gradient_spikes: Mapping[str, Sequence[SpikeEvent]],
    series_order: Sequence[str],
    params: AttributionParams | None = None,
) -> list[DipAttribution]:
    """Return one attribution per dip, listing the gradient spikes in its window.

    ``gradient_spikes`` maps gradient series keys to their spikes, and ``series_order``
    ranks them for ties (the first layer first). Series missing from ``series_order`` rank
    after it. ``evals`` gives the evaluation steps that find the last good evaluation.
    """
    params = params or AttributionParams()
    eval_steps = _evaluation_steps(evals)
    rank = {name: position for position, name in enumerate(series_order)}
    attributions = []
    for dip in dips:
        last_good = _last_good_step(eval_steps, dip)
        window_start = max(0, last_good - params.lookback_steps)
        window_end = dip.start_step - 1
        found = [
            spike
            for spikes in gradient_spikes.values()
            for spike in spikes
            if spike.end_step >= window_start and spike.start_step <= window_end
        ]
        found.sort(
            key=lambda spike: (spike.start_step, rank.get(spike.series, len(rank)), spike.series)
        )
        attributions.append(
            DipAttribution(
                dip_start_step=dip.start_step,
                dip_bottom_step=dip.bottom_step,
                last_good_step=last_good,
                window_start_step=window_start,
                window_end_step=window_end,
                spikes=found,
            )
        )
    return attributions


def _evaluation_steps(evals: pd.DataFrame) -> np.ndarray:
    """Return the sorted steps of evaluations with a finite kNN top-1."""
    if evals.empty:
        return np.array([], dtype="int64")
    steps = pd.to_numeric(evals["step"], errors="coerce").to_numpy(dtype="float64")
    accuracy = pd.to_numeric(evals["knn_top1"], errors="coerce").to_numpy(dtype="float64")
    usable = np.isfinite(steps) & np.isfinite(accuracy)
    return np.unique(steps[usable].astype("int64"))


def _last_good_step(eval_steps: np.ndarray, dip: Dip) -> int:
    """Return the last evaluation step before the dip's start, or its peak step if unknown."""
    earlier = eval_steps[eval_steps < dip.start_step]
    return int(earlier[-1]) if len(earlier) else dip.peak_step
