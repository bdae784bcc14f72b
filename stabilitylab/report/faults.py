"""The report's table of planted faults: what was planted and whether and where it was found."""

from __future__ import annotations

from stabilitylab.detect import RunEvents
from stabilitylab.detect.faults import (
    GRADIENT_FAULT,
    FaultMatch,
    FaultMatchParams,
    false_alarm_events,
)
from stabilitylab.report.content import Table
from stabilitylab.report.summary import MISSING

PLANTED_FAULT_COLUMNS = (
    "fault",
    "step",
    "layer",
    "factor",
    "found",
    "series",
    "detected start",
    "detected peak",
    "lag (steps)",
)


def planted_faults_table(events: RunEvents, params: FaultMatchParams | None = None) -> Table | None:
    """Build the table of one run's planted faults, or return None for a run without any.

    ``params`` must be the tolerances the faults were matched with, the defaults for
    :func:`~stabilitylab.detect.detect_run`.
    """
    if not events.planted_faults:
        return None
    params = params or FaultMatchParams()
    rows = tuple(_fault_row(match) for match in events.planted_faults)
    found = sum(match.found for match in events.planted_faults)
    false_alarms = len(false_alarm_events(events.planted_faults, events.spikes, params))
    note = (
        f"{found} of {len(events.planted_faults)} planted faults found. A gradient fault is "
        f"found by a spike of its layer's gradient norm that covers its step or starts within "
        f"{params.gradient_tolerance} steps of it. An lr fault is found by a spike of the loss "
        f"or a gradient norm that starts 0 to {params.lr_tolerance} steps after it. Spikes "
        f"starting up to {params.follow_on_steps} steps after a fault are attributed to it. "
        f"{false_alarms} spikes elsewhere are false alarms."
    )
    return Table(columns=PLANTED_FAULT_COLUMNS, rows=rows, caption="Planted faults", note=note)


def _fault_row(match: FaultMatch) -> tuple[str, ...]:
    return (
        "gradient" if match.kind == GRADIENT_FAULT else "learning rate",
        str(match.step),
        match.layer if match.layer is not None else "all",
        f"{match.factor:g}",
        "yes" if match.found else "no (missed)",
        match.series if match.series is not None else MISSING,
        _optional_step(match.detected_start_step),
        _optional_step(match.detected_peak_step),
        f"{match.lag_steps:+d}" if match.lag_steps is not None else MISSING,
    )


def _optional_step(step: int | None) -> str:
    return str(step) if step is not None else MISSING
