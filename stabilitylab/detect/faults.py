"""Matching of a run's planted faults to its detected spikes.

``stabilitylab run --inject-spike`` and ``--lr-spike`` store the planted faults in
``config.json`` under ``derived.faults``. :func:`match_planted_faults` pairs each planted
fault with the spike that reveals it and lists the spikes that no fault explains:

- a gradient fault at step s in layer group L is found by a spike of ``grad_norm[L]`` that
  covers s (start <= s <= end) or starts at most ``gradient_tolerance`` steps from s;
- an lr fault at step s is found by a spike of any gradient-norm series or of the loss that
  starts in [s, s + lr_tolerance]. The gradient of step s is measured before the multiplied
  lr is applied, so the earliest possible effect is at step s + 1.

A fault also disturbs the steps after it: the outsized update moves the weights and AdamW's
moment estimates, so other layers and the loss can spike some steps later. A fault's
follow-on window runs from ``s - gradient_tolerance`` (gradient faults) or s (lr faults) to
``s + follow_on_steps``. A spike is explained when it is matched to a fault or starts inside a
follow-on window, and every other spike is a false alarm. The false-alarm rate counts
false alarms per 1,000 recorded steps outside every follow-on window.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from stabilitylab.detect.spikes import SpikeEvent
from stabilitylab.errors import ConfigError, RunDirError

GRADIENT_FAULT = "gradient"
LR_FAULT = "lr"


@dataclass(frozen=True)
class FaultMatchParams:
    """Tolerances, in optimiser steps, for matching planted faults to spikes.

    In the planted-fault benchmark (56 faults in 8 digits runs, docs/benchmarks.md), found
    faults were detected 0 or 1 step after their step. Every spike on those runs started
    between 2 steps before and 5 steps after the latest fault at the default z, and at z 2
    all but 2 of 84, which started 11 to 25 steps after. The window is therefore generous.
    """

    gradient_tolerance: int = 2
    lr_tolerance: int = 5
    follow_on_steps: int = 25

    def __post_init__(self) -> None:
        for name in ("gradient_tolerance", "lr_tolerance", "follow_on_steps"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 0):
                raise ConfigError(f"invalid fault matching {name} {value!r}: expected >= 0 steps")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PlantedFault:
    """One planted fault: ``kind`` is ``gradient`` (with its layer group) or ``lr``."""

    kind: str
    step: int
    factor: float
    layer: str | None = None


@dataclass(frozen=True)
class FaultMatch:
    """A planted fault and the spike that revealed it, if any.

    ``series`` names the matched spike's series. ``lag_steps`` is the detected start step
    minus the planted step, negative when a spike that began earlier covers the fault.
    The detection fields are None for a missed fault.
    """

    kind: str
    step: int
    layer: str | None
    factor: float
    found: bool
    series: str | None = None
    detected_start_step: int | None = None
    detected_peak_step: int | None = None
    lag_steps: int | None = None

    @property
    def fault(self) -> PlantedFault:
        return PlantedFault(kind=self.kind, step=self.step, factor=self.factor, layer=self.layer)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FaultMatching:
    """The planted faults of one run matched to its spikes.

    ``clear_steps`` counts the recorded steps outside every follow-on window, the steps on
    which a spike is a false alarm.
    """

    faults: list[FaultMatch]
    false_alarms: list[SpikeEvent]
    recorded_steps: int
    clear_steps: int

    @property
    def found_count(self) -> int:
        return sum(match.found for match in self.faults)

    @property
    def false_alarm_rate(self) -> float:
        """Return false alarms per 1,000 clear steps, NaN when no step is clear."""
        if self.clear_steps == 0:
            return math.nan
        return 1000.0 * len(self.false_alarms) / self.clear_steps


def planted_faults_from_plan(plan: Mapping[str, Any] | None) -> list[PlantedFault]:
    """Return the faults of a ``derived.faults`` plan from ``config.json``, ordered by step.

    A missing plan (a run without planted faults, or one written before faults existed)
    gives an empty list. Raises RunDirError for a plan that is not the expected shape.
    """
    if plan is None:
        return []
    if not isinstance(plan, Mapping):
        raise RunDirError(
            f"derived.faults in config.json is {plan!r}, not an object; it is damaged"
        )
    faults = [
        PlantedFault(
            kind=GRADIENT_FAULT,
            step=_plan_step(entry),
            factor=_plan_factor(entry),
            layer=_plan_layer(entry),
        )
        for entry in _plan_entries(plan, "gradient_spikes")
    ]
    faults += [
        PlantedFault(kind=LR_FAULT, step=_plan_step(entry), factor=_plan_factor(entry))
        for entry in _plan_entries(plan, "lr_spikes")
    ]
    return sorted(faults, key=lambda fault: (fault.step, fault.kind, fault.layer or ""))


def _plan_entries(plan: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    entries = plan.get(key, [])
    if not isinstance(entries, list) or not all(isinstance(entry, Mapping) for entry in entries):
        raise RunDirError(
            f"derived.faults.{key} in config.json is {entries!r}, not a list of objects; "
            "it is damaged"
        )
    return entries


def _plan_step(entry: Mapping[str, Any]) -> int:
    step = entry.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise RunDirError(f"planted fault {dict(entry)!r} in config.json has no valid step")
    return step


def _plan_factor(entry: Mapping[str, Any]) -> float:
    factor = entry.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not factor > 0:
        raise RunDirError(f"planted fault {dict(entry)!r} in config.json has no valid factor")
    return float(factor)


def _plan_layer(entry: Mapping[str, Any]) -> str:
    layer = entry.get("layer")
    if not isinstance(layer, str) or not layer:
        raise RunDirError(f"planted fault {dict(entry)!r} in config.json has no layer name")
    return layer


def is_response_series(series: str) -> bool:
    """Tell whether ``series`` is the loss or a gradient norm, the series an lr fault moves."""
    # Imported here because stabilitylab.detect imports this module while it initialises.
    from stabilitylab.detect import GRAD_NORM, LOSS, TOKEN_GRAD_NORM

    return series in (LOSS, GRAD_NORM, TOKEN_GRAD_NORM) or series.startswith(f"{GRAD_NORM}[")


def match_fault(
    fault: PlantedFault,
    spikes: Mapping[str, Sequence[SpikeEvent]],
    params: FaultMatchParams | None = None,
) -> FaultMatch:
    """Match one planted fault to the spike that reveals it, see the module docstring.

    Among several candidates a gradient fault takes the spike starting closest to its step
    and an lr fault the earliest one, and ties go to the larger ratio.
    """
    params = params or FaultMatchParams()
    if fault.kind == GRADIENT_FAULT:
        event = _match_gradient(fault, spikes, params.gradient_tolerance)
    elif fault.kind == LR_FAULT:
        event = _match_lr(fault, spikes, params.lr_tolerance)
    else:
        raise ValueError(f"unknown fault kind {fault.kind!r}")
    if event is None:
        return FaultMatch(fault.kind, fault.step, fault.layer, fault.factor, found=False)
    return FaultMatch(
        kind=fault.kind,
        step=fault.step,
        layer=fault.layer,
        factor=fault.factor,
        found=True,
        series=event.series,
        detected_start_step=event.start_step,
        detected_peak_step=event.peak_step,
        lag_steps=event.start_step - fault.step,
    )


def _match_gradient(
    fault: PlantedFault, spikes: Mapping[str, Sequence[SpikeEvent]], tolerance: int
) -> SpikeEvent | None:
    from stabilitylab.detect import layer_series_name

    step = fault.step
    candidates = [
        event
        for event in spikes.get(layer_series_name(fault.layer or ""), ())
        if event.start_step <= step <= event.end_step or abs(event.start_step - step) <= tolerance
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda event: (abs(event.start_step - step), -event.ratio))


def _match_lr(
    fault: PlantedFault, spikes: Mapping[str, Sequence[SpikeEvent]], tolerance: int
) -> SpikeEvent | None:
    candidates = [
        event
        for series, events in spikes.items()
        if is_response_series(series)
        for event in events
        if fault.step <= event.start_step <= fault.step + tolerance
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda event: (event.start_step, -event.ratio))


def follow_on_window(fault: PlantedFault, params: FaultMatchParams | None = None) -> range:
    """Return the steps on which a starting spike is attributed to ``fault``, as a range."""
    params = params or FaultMatchParams()
    first = fault.step - params.gradient_tolerance if fault.kind == GRADIENT_FAULT else fault.step
    return range(max(first, 0), fault.step + params.follow_on_steps + 1)


def false_alarm_events(
    matches: Sequence[FaultMatch],
    spikes: Mapping[str, Sequence[SpikeEvent]],
    params: FaultMatchParams | None = None,
) -> list[SpikeEvent]:
    """Return the spikes, on every series, that no planted fault explains, ordered by start."""
    params = params or FaultMatchParams()
    windows = [follow_on_window(match.fault, params) for match in matches]
    matched = {(match.series, match.detected_start_step) for match in matches if match.found}
    unexplained = [
        event
        for events in spikes.values()
        for event in events
        if (event.series, event.start_step) not in matched
        and not any(event.start_step in window for window in windows)
    ]
    return sorted(unexplained, key=lambda event: (event.start_step, event.series))


def count_clear_steps(
    recorded_steps: Iterable[int],
    faults: Sequence[PlantedFault],
    params: FaultMatchParams | None = None,
) -> tuple[int, int]:
    """Return the number of distinct recorded steps and how many lie outside every window."""
    steps = np.unique(np.asarray(list(recorded_steps), dtype="int64"))
    inside = np.zeros(len(steps), dtype=bool)
    for fault in faults:
        window = follow_on_window(fault, params)
        inside |= (steps >= window.start) & (steps < window.stop)
    return len(steps), int((~inside).sum())


def match_planted_faults(
    faults: Sequence[PlantedFault],
    spikes: Mapping[str, Sequence[SpikeEvent]],
    recorded_steps: Iterable[int],
    params: FaultMatchParams | None = None,
) -> FaultMatching:
    """Match every planted fault to the spikes of a run and collect the false alarms.

    ``spikes`` maps series keys to their events, as :attr:`RunEvents.spikes` does, and
    ``recorded_steps`` lists the steps of the run's steps table. Without faults every spike
    is a false alarm and every recorded step is clear.
    """
    params = params or FaultMatchParams()
    matches = [match_fault(fault, spikes, params) for fault in faults]
    recorded, clear = count_clear_steps(recorded_steps, faults, params)
    return FaultMatching(
        faults=matches,
        false_alarms=false_alarm_events(matches, spikes, params),
        recorded_steps=recorded,
        clear_steps=clear,
    )
