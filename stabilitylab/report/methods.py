"""The per-method section of a report on runs of several self-supervised methods.

A report whose runs are of more than one method (MoCo v3, SimCLR ...) adds a section with
two tables and a ``methods`` key in events.json:

- per method and arm: the runs, how many finished, the mean and sample standard deviation
  of the final and best kNN top-1, dips and spikes per run, and the count of each verdict;
- per method: frozen minus learned over the method's seed pairs, pooled over every paired
  setting of the method, with the Student-t 95 % interval of the mean.

Means are over every run (or pair) of the group that has the value, finished or not, as in
the report's per-run summary and seed comparison. Learned and frozen runs are paired only
within one method (:func:`stabilitylab.report.summary.pair_arms`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stabilitylab.detect import GRAD_NORM, RunEvents
from stabilitylab.detect.verdict import VERDICTS
from stabilitylab.report.content import Section, Table
from stabilitylab.report.statistics import MeanInterval, mean_interval
from stabilitylab.report.summary import (
    MISSING,
    ArmPair,
    best_top1,
    differ_by_method,
    final_top1,
    format_number,
    has_first_layer_signal,
    method_order,
    method_text,
    pair_arms,
    run_method,
)
from stabilitylab.runs import Run

ARMS = ("learned", "frozen")

# Per-run quantities of the per-method tables: key, then its title.
QUANTITIES = {
    "final_top1": "final kNN top-1",
    "best_top1": "best kNN top-1",
    "dips": "dips per run",
    "grad_spikes": "grad-norm spikes per run",
    "first_layer_spikes": "first-layer spikes per run",
}
# Frozen-minus-learned differences per method: key, then its title.
DIFFERENCES = {
    "final_top1": "final",
    "best_top1": "best",
    "dips": "dips",
    "first_layer_spikes": "first-layer spikes",
}

SUMMARY_NOTE = (
    "Means and sample standard deviations over every run of the method and arm that has the "
    "value, finished or not; the verdict column counts how the runs ended. kNN top-1 in "
    "percent."
)
DIFFERENCE_NOTE = (
    "Frozen minus learned over the seed pairs of each method, pooled over every setting in "
    "which the method has pairs; the frozen versus learned section has a row per setting. "
    "Learned and frozen runs pair only within one method. The interval is the Student-t "
    "interval of the mean, shown for 2 or more pairs. kNN top-1 in points."
)


def run_quantities(run: Run, run_events: RunEvents) -> dict[str, float]:
    """Return the QUANTITIES of one run, NaN where the run has no such value."""
    first_layer = math.nan
    if has_first_layer_signal(run):
        first_layer = float(len(run_events.spikes_on(run_events.first_layer)))
    return {
        "final_top1": final_top1(run),
        "best_top1": best_top1(run),
        "dips": float(len(run_events.dips)),
        "grad_spikes": float(len(run_events.spikes_on(GRAD_NORM))),
        "first_layer_spikes": first_layer,
    }


@dataclass(frozen=True)
class MethodArmSummary:
    """The runs of one method and arm: counts, the mean of each quantity and the verdicts."""

    method: str | None
    arm: str
    runs: int
    finished: int
    stats: dict[str, MeanInterval]  # keyed as QUANTITIES
    verdicts: Counter[str]

    def to_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for key, interval in self.stats.items():
            values[f"{key}_mean"] = _finite_or_none(interval.mean)
            values[f"{key}_std"] = _finite_or_none(interval.std)
        return {
            "method": self.method,
            "arm": self.arm,
            "runs": self.runs,
            "finished": self.finished,
            **values,
            "verdicts": {name: self.verdicts[name] for name in VERDICTS if self.verdicts[name]},
        }


@dataclass(frozen=True)
class MethodDifference:
    """Frozen minus learned over the seed pairs of one method."""

    method: str | None
    pairs: int
    stats: dict[str, MeanInterval]  # keyed as DIFFERENCES

    def to_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for key, interval in self.stats.items():
            values[key] = {
                "n": interval.n,
                "mean": _finite_or_none(interval.mean),
                "std": _finite_or_none(interval.std),
                "low": _finite_or_none(interval.low),
                "high": _finite_or_none(interval.high),
            }
        return {"method": self.method, "pairs": self.pairs, "frozen_minus_learned": values}


@dataclass(frozen=True)
class MethodReport:
    """The per-method additions to a report: its section and the ``methods`` key of events.json."""

    sections: list[Section]
    payload: dict[str, Any]


def build_method_report(runs: Sequence[Run], events: Sequence[RunEvents]) -> MethodReport | None:
    """Compute the per-method tables, or return None when all runs are of one method."""
    if not differ_by_method(runs):
        return None
    summaries = summarize_methods(runs, events)
    differences = method_differences(runs, events)
    section = Section(
        "Per method",
        [method_summary_table(summaries), method_difference_table(differences)],
    )
    payload = {
        "arms": [summary.to_dict() for summary in summaries],
        "differences": [difference.to_dict() for difference in differences],
    }
    return MethodReport([section], payload)


def report_methods(runs: Sequence[Run]) -> list[str | None]:
    """Return the methods of ``runs`` once each, in :func:`method_order`."""
    return sorted({run_method(run) for run in runs}, key=method_order)


def summarize_methods(runs: Sequence[Run], events: Sequence[RunEvents]) -> list[MethodArmSummary]:
    """Return one summary per method and arm that has runs, methods in their order."""
    summaries = []
    for method in report_methods(runs):
        for arm in ARMS:
            members = [
                index
                for index, run in enumerate(runs)
                if run_method(run) == method and run.arm == arm
            ]
            if members:
                group_runs = [runs[index] for index in members]
                group_events = [events[index] for index in members]
                summaries.append(_summary(method, arm, group_runs, group_events))
    return summaries


def _summary(
    method: str | None, arm: str, runs: Sequence[Run], events: Sequence[RunEvents]
) -> MethodArmSummary:
    values = [run_quantities(run, run_events) for run, run_events in zip(runs, events, strict=True)]
    stats = {key: mean_interval([value[key] for value in values]) for key in QUANTITIES}
    verdicts = Counter(
        run_events.verdict.verdict for run_events in events if run_events.verdict is not None
    )
    return MethodArmSummary(
        method=method,
        arm=arm,
        runs=len(runs),
        finished=sum(run.finished for run in runs),
        stats=stats,
        verdicts=verdicts,
    )


def method_differences(runs: Sequence[Run], events: Sequence[RunEvents]) -> list[MethodDifference]:
    """Return frozen minus learned per method over its seed pairs, for every method."""
    pairs, _ = pair_arms(runs)
    differences = []
    for method in report_methods(runs):
        method_pairs = [pair for pair in pairs if run_method(runs[pair.learned]) == method]
        stats = {
            key: mean_interval([_difference(runs, events, pair, key) for pair in method_pairs])
            for key in DIFFERENCES
        }
        differences.append(MethodDifference(method, len(method_pairs), stats))
    return differences


def _difference(runs: Sequence[Run], events: Sequence[RunEvents], pair: ArmPair, key: str) -> float:
    def value(index: int) -> float:
        return run_quantities(runs[index], events[index])[key]

    return value(pair.frozen) - value(pair.learned)


def method_summary_table(summaries: Sequence[MethodArmSummary]) -> Table:
    """Build the table of each method and arm: counts, means, standard deviations, verdicts."""
    columns = (
        "method",
        "arm",
        "runs",
        "finished",
        "final kNN top-1",
        "final std",
        "best kNN top-1",
        "best std",
        "dips per run",
        "grad-norm spikes per run",
        "first-layer spikes per run",
        "verdicts",
    )
    rows = []
    for summary in summaries:
        stats = summary.stats
        rows.append(
            (
                method_text(summary.method),
                summary.arm,
                str(summary.runs),
                str(summary.finished),
                format_number(stats["final_top1"].mean),
                format_number(stats["final_top1"].std),
                format_number(stats["best_top1"].mean),
                format_number(stats["best_top1"].std),
                format_number(stats["dips"].mean),
                format_number(stats["grad_spikes"].mean),
                format_number(stats["first_layer_spikes"].mean),
                verdicts_text(summary.verdicts),
            )
        )
    return Table(columns=columns, rows=tuple(rows), caption="Per method and arm", note=SUMMARY_NOTE)


def method_difference_table(differences: Sequence[MethodDifference]) -> Table:
    """Build the table of frozen minus learned per method."""
    columns = ["method", "pairs"]
    for title in DIFFERENCES.values():
        columns += [f"{title} frozen − learned", f"{title} 95 % interval"]
    rows = []
    for difference in differences:
        cells = [method_text(difference.method), str(difference.pairs)]
        for key in DIFFERENCES:
            interval = difference.stats[key]
            cells += [_signed(interval.mean), _interval_text(interval)]
        rows.append(tuple(cells))
    return Table(
        columns=tuple(columns),
        rows=tuple(rows),
        caption="Frozen minus learned per method",
        note=DIFFERENCE_NOTE,
    )


def verdicts_text(verdicts: Counter[str]) -> str:
    """Return the verdict counts as ``2 stable, 1 partial failure``, most severe first."""
    parts = [f"{verdicts[name]} {name}" for name in VERDICTS if verdicts[name]]
    return ", ".join(parts) if parts else MISSING


def _signed(value: float) -> str:
    return f"{value:+.2f}" if math.isfinite(value) else MISSING


def _interval_text(interval: MeanInterval) -> str:
    if not (math.isfinite(interval.low) and math.isfinite(interval.high)):
        return MISSING
    return f"{interval.low:+.2f} to {interval.high:+.2f}"


def _finite_or_none(value: float) -> float | None:
    # Strict JSON (allow_nan=False) has no NaN or infinity.
    return float(value) if math.isfinite(value) else None
