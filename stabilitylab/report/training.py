"""The report's table of training events: divergence, skipped steps and loss-scale changes."""

from __future__ import annotations

from stabilitylab.detect import Divergence, LossScaleChange, RunEvents
from stabilitylab.detect.training_events import step_ranges
from stabilitylab.report.content import Table
from stabilitylab.report.summary import MISSING
from stabilitylab.runs import SIGNAL_NAMES

TRAINING_EVENT_COLUMNS = ("event", "step", "details")
# Maximum rows of a run's training-event table. events.json always lists every event.
MAX_TRAINING_EVENT_ROWS = 50

TRAINING_EVENTS_NOTE = (
    "A skipped step left the weights unchanged: the fp16 gradient scaler found inf or NaN "
    "gradients, or --on-nonfinite skip met a non-finite loss or gradient norm. An imported "
    "run counts a logged non-finite loss that finite losses followed as skipped. The spike "
    "detectors leave skipped steps out. The fp16 loss scale falls after a step whose scaled "
    "gradients overflowed and grows after a run of steps without an overflow."
)


def training_events_table(events: RunEvents) -> Table | None:
    """Build the table of one run's recorded training events, or None for a run without any."""
    rows: list[tuple[int, tuple[str, ...]]] = []
    if events.divergence is not None:
        rows.append((events.divergence.step, _divergence_row(events.divergence)))
    for first, last in step_ranges(events.skipped_steps):
        rows.append((first, _skipped_row(first, last)))
    for change in events.loss_scale_changes:
        rows.append((change.step, _loss_scale_row(change)))
    if not rows:
        return None
    rows.sort(key=lambda row: row[0])
    shown_rows = tuple(row for _, row in rows[:MAX_TRAINING_EVENT_ROWS])
    note = TRAINING_EVENTS_NOTE
    if len(rows) > len(shown_rows):
        note += (
            f" The first {len(shown_rows)} of {len(rows)} events are shown, and events.json "
            "lists all of them."
        )
    return Table(
        columns=TRAINING_EVENT_COLUMNS, rows=shown_rows, caption="Training events", note=note
    )


def _divergence_row(divergence: Divergence) -> tuple[str, ...]:
    lr = f"{divergence.lr:.3g}" if divergence.lr is not None else MISSING
    precision = divergence.precision or MISSING
    if divergence.checkpoint_step is not None:
        checkpoint = f"the checkpoint written after {divergence.checkpoint_step} steps was kept"
    else:
        checkpoint = "no checkpoint from before it is recorded"
    details = (
        f"the {SIGNAL_NAMES.get(divergence.signal, divergence.signal)} became non-finite "
        f"(lr {lr}, precision {precision}); the tables end here and {checkpoint}"
    )
    return ("diverged", str(divergence.step), details)


def _skipped_row(first: int, last: int) -> tuple[str, ...]:
    if first == last:
        return ("skipped step", str(first), "optimiser step not applied")
    count = last - first + 1
    return ("skipped steps", f"{first}-{last}", f"{count} optimiser steps not applied")


def _loss_scale_row(change: LossScaleChange) -> tuple[str, ...]:
    return (
        f"loss scale {change.kind}",
        str(change.step),
        f"{change.previous_scale:g} to {change.scale:g}",
    )
