"""Assembly of the report's sections from runs, their events and the rendered figures."""

from __future__ import annotations

from collections.abc import Sequence

from stabilitylab.detect import DetectorParams, RunEvents
from stabilitylab.report.attention import attention_events_section, attention_summary
from stabilitylab.report.content import Block, FigureImage, ReportContent, Section
from stabilitylab.report.diagnosis import (
    arm_difference_table,
    arm_events_table,
    arm_lag_table,
    attribution_table,
    lag_table,
    verdict_table,
)
from stabilitylab.report.faults import planted_faults_table
from stabilitylab.report.summary import (
    configuration_table,
    dips_table,
    pair_arms,
    parameters_table,
    run_folders_table,
    seed_comparison_table,
    spikes_table,
    summary_table,
)
from stabilitylab.report.training import training_events_table
from stabilitylab.runs import Run

# Maximum rows of a run's spike table. events.json always lists every event.
MAX_SPIKE_ROWS = 50
# Run names shown in the report title before it switches to a count.
MAX_TITLE_RUNS = 3

SUMMARY_NOTE = (
    "A run whose status is still 'running' either continues or was killed before it could "
    "write a final status. A dip is a fall of kNN top-1 below the best value so far by more "
    "than the margin: z standard errors (see the detector parameters) of the difference "
    "between the two evaluations, from their per-query hits where recorded, and at least "
    "1 point. A spike is a value whose log is far above the median of the values before "
    "it. The first layer is the patch projection (patch_embed) when it has a gradient and "
    "token_grad_norm otherwise."
)


def build_report_content(
    runs: Sequence[Run],
    events: Sequence[RunEvents],
    labels: Sequence[str],
    figures: Sequence[FigureImage],
    params: DetectorParams,
    extra_sections: Sequence[Section] = (),
) -> ReportContent:
    """Build the report model: runs, summary, seed comparison, figures, events, detectors.

    ``extra_sections``, such as a sweep's, go after the comparisons and before the figures.
    """
    sections = [
        _runs_section(runs, labels),
        Section(
            "Summary",
            [
                summary_table(runs, events, labels),
                SUMMARY_NOTE,
                *attention_summary(runs, events, labels),
            ],
        ),
        Section(
            "Diagnosis",
            [verdict_table(runs, events, labels), lag_table(events, labels, runs)],
        ),
    ]
    comparison = seed_comparison_table(runs, labels)
    if comparison is not None:
        blocks: list[Block] = [comparison] if comparison.rows else [comparison.note]
        blocks.extend(_arm_comparison_tables(runs, events, params))
        sections.append(Section("Frozen versus learned patch projection", blocks))
    sections.extend(extra_sections)
    sections.append(Section("Figures", list(figures)))
    sections.extend(
        _events_section(run_events, label, dense_monitor=not run.dense_knn.empty)
        for run, run_events, label in zip(runs, events, labels, strict=True)
    )
    sections.append(Section("Detector parameters", [parameters_table(params)]))
    return ReportContent(title=report_title(runs), sections=sections)


def report_title(runs: Sequence[Run]) -> str:
    if len(runs) <= MAX_TITLE_RUNS:
        return "Stability report: " + ", ".join(run.name for run in runs)
    return f"Stability report: {len(runs)} runs"


def _arm_comparison_tables(
    runs: Sequence[Run], events: Sequence[RunEvents], params: DetectorParams
) -> list[Block]:
    """Return the seed-paired comparison of both arms, or nothing without a pair."""
    pairs, _ = pair_arms(runs)
    if not pairs:
        return []
    return [
        arm_difference_table(runs, pairs),
        arm_events_table(events, pairs),
        arm_lag_table(events, pairs, params.lag),
    ]


def _runs_section(runs: Sequence[Run], labels: Sequence[str]) -> Section:
    section = Section("Runs", [configuration_table(runs, labels), run_folders_table(runs, labels)])
    for run, label in zip(runs, labels, strict=True):
        if run.steps.empty:
            section.blocks.append(f"{label}: no training steps were recorded.")
        section.blocks.extend(f"{label}: {warning}" for warning in run.warnings)
    return section


def _events_section(run_events: RunEvents, label: str, dense_monitor: bool = False) -> Section:
    section = Section(f"Events: {label}")
    training = training_events_table(run_events)
    if training is not None:
        section.blocks.append(training)
    if run_events.dips:
        section.blocks.append(dips_table(run_events))
        section.blocks.append(attribution_table(run_events))
    else:
        section.blocks.append("No kNN top-1 dips detected.")
    if run_events.dense_dips:
        section.blocks.append(dips_table(run_events, dense=True))
    elif dense_monitor:
        section.blocks.append("No kNN top-1 dips detected by the dense queue monitor.")
    spikes = spikes_table(run_events, MAX_SPIKE_ROWS)
    if spikes.rows:
        section.blocks.append(spikes)
    else:
        section.blocks.append("No spikes detected on any series.")
    faults = planted_faults_table(run_events)
    if faults is not None:
        section.blocks.append(faults)
    section.blocks.extend(attention_events_section(run_events, MAX_SPIKE_ROWS))
    return section
