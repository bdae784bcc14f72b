"""Assembly of the report's sections from runs, their events and the rendered figures."""

from __future__ import annotations

from collections.abc import Sequence

from stabilitylab.detect import DetectorParams, RunEvents
from stabilitylab.report.content import FigureImage, ReportContent, Section
from stabilitylab.report.summary import (
    configuration_table,
    dips_table,
    parameters_table,
    run_folders_table,
    seed_comparison_table,
    spikes_table,
    summary_table,
)
from stabilitylab.runs import Run

# Maximum rows of a run's spike table. events.json always lists every event.
MAX_SPIKE_ROWS = 50
# Run names shown in the report title before it switches to a count.
MAX_TITLE_RUNS = 3

SUMMARY_NOTE = (
    "A run whose status is still 'running' either continues or was killed before it could "
    "write a final status. A dip is a fall of kNN top-1 below the best value so far by more "
    "than the margin, which grows with the binomial standard error of the accuracy over the "
    "evaluated images. A spike is a value whose log is far above the median of the values "
    "before it. The first layer is the patch projection (patch_embed) when it has a "
    "gradient and token_grad_norm otherwise."
)


def build_report_content(
    runs: Sequence[Run],
    events: Sequence[RunEvents],
    labels: Sequence[str],
    figures: Sequence[FigureImage],
    params: DetectorParams,
) -> ReportContent:
    """Build the report model: runs, summary, seed comparison, figures, events, detectors."""
    sections = [
        _runs_section(runs, labels),
        Section("Summary", [summary_table(runs, events, labels), SUMMARY_NOTE]),
    ]
    comparison = seed_comparison_table(runs, labels)
    if comparison is not None:
        blocks = [comparison] if comparison.rows else [comparison.note]
        sections.append(Section("Frozen versus learned patch projection", blocks))
    sections.append(Section("Figures", list(figures)))
    sections.extend(
        _events_section(run_events, label) for run_events, label in zip(events, labels, strict=True)
    )
    sections.append(Section("Detector parameters", [parameters_table(params)]))
    return ReportContent(title=report_title(runs), sections=sections)


def report_title(runs: Sequence[Run]) -> str:
    if len(runs) <= MAX_TITLE_RUNS:
        return "Stability report: " + ", ".join(run.name for run in runs)
    return f"Stability report: {len(runs)} runs"


def _runs_section(runs: Sequence[Run], labels: Sequence[str]) -> Section:
    section = Section("Runs", [configuration_table(runs, labels), run_folders_table(runs, labels)])
    for run, label in zip(runs, labels, strict=True):
        if run.steps.empty:
            section.blocks.append(f"{label}: no training steps were recorded.")
        section.blocks.extend(f"{label}: {warning}" for warning in run.warnings)
    return section


def _events_section(run_events: RunEvents, label: str) -> Section:
    section = Section(f"Events: {label}")
    if run_events.dips:
        section.blocks.append(dips_table(run_events))
    else:
        section.blocks.append("No kNN top-1 dips detected.")
    spikes = spikes_table(run_events, MAX_SPIKE_ROWS)
    if spikes.rows:
        section.blocks.append(spikes)
    else:
        section.blocks.append("No spikes detected on any series.")
    return section
