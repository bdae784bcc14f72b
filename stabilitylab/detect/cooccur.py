"""Co-occurrence filter: keep a spike only when other series spike near it.

A loss of stability in a ViT shows in several gradient series at once: a spike that starts
in the patch projection reaches the last blocks a few to tens of steps later. Noise in one
series is usually alone. With ``min_series`` above 1, a spike is kept only when
at least ``min_series`` distinct series (its own included) have a spike whose span
``[start_step, end_step]`` comes within ``window_steps`` of its own span. Spans that overlap
are 0 steps apart.

The filter counts series as given. The total gradient norm contains every layer, so a large
spike in one layer usually shows there too and counts as a second series.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from stabilitylab.detect.spikes import SpikeEvent
from stabilitylab.errors import ConfigError


@dataclass(frozen=True)
class CoOccurrenceParams:
    """Parameters of the co-occurrence filter. ``min_series`` 1 keeps every spike.

    The default window of 50 steps covers the lag of a few to tens of iterations between
    the first-layer and the last-layer spike that MoCo v3 training shows.
    """

    min_series: int = 1
    window_steps: int = 50

    def __post_init__(self) -> None:
        if self.min_series < 1:
            raise ConfigError(
                f"invalid co-occurrence min_series {self.min_series}: expected at least 1 series"
            )
        if self.window_steps < 0:
            raise ConfigError(
                f"invalid co-occurrence window_steps {self.window_steps}: expected >= 0 steps"
            )

    @property
    def enabled(self) -> bool:
        return self.min_series > 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def filter_co_occurring(
    spikes: Mapping[str, list[SpikeEvent]], params: CoOccurrenceParams
) -> dict[str, list[SpikeEvent]]:
    """Return ``spikes`` with only the events that co-occur in ``params.min_series`` series.

    Keys and the order of events are kept, and a series left without events maps to an
    empty list. The input is not modified.
    """
    if not params.enabled:
        return {series: list(events) for series, events in spikes.items()}
    names = list(spikes)
    series_ids = np.array(
        [index for index, name in enumerate(names) for _ in spikes[name]], dtype="int64"
    )
    events = [event for name in names for event in spikes[name]]
    if not events:
        return {name: [] for name in names}
    keep = _co_occurring(
        np.array([event.start_step for event in events], dtype="int64"),
        np.array([event.end_step for event in events], dtype="int64"),
        series_ids,
        params,
    )
    filtered: dict[str, list[SpikeEvent]] = {name: [] for name in names}
    for event, series_id, kept in zip(events, series_ids, keep, strict=True):
        if kept:
            filtered[names[series_id]].append(event)
    return filtered


def _co_occurring(
    starts: np.ndarray, ends: np.ndarray, series_ids: np.ndarray, params: CoOccurrenceParams
) -> np.ndarray:
    """Return whether each span has spans of enough distinct series within the window."""
    order = np.argsort(starts, kind="stable")
    sorted_starts = starts[order]
    sorted_ends = ends[order]
    sorted_ids = series_ids[order]
    longest = int((ends - starts).max())
    window = params.window_steps
    keep = np.zeros(len(starts), dtype=bool)
    for event in range(len(starts)):
        # A span within the window starts no later than end + window, and, being at most
        # `longest` steps long, no earlier than start - window - longest.
        low = np.searchsorted(sorted_starts, starts[event] - window - longest, side="left")
        high = np.searchsorted(sorted_starts, ends[event] + window, side="right")
        near = sorted_ends[low:high] >= starts[event] - window
        distinct = np.unique(sorted_ids[low:high][near]).size
        keep[event] = distinct >= params.min_series
    return keep
