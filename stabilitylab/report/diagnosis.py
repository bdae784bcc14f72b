"""The report's diagnosis tables: verdicts, dip attribution, lag, and the arm comparison.

Accuracies are kNN top-1 in percent, and differences of accuracies are in points. Lags and
delays are in optimiser steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from stabilitylab.detect import GRAD_NORM, LagParams, LagStats, RunEvents, RunVerdict
from stabilitylab.detect.attribution import DipAttribution
from stabilitylab.detect.lag import bootstrap_median_interval
from stabilitylab.detect.verdict import HiddenCost, hidden_costs
from stabilitylab.report.content import Table
from stabilitylab.report.statistics import MeanInterval, mean_interval
from stabilitylab.report.summary import (
    MISSING,
    ArmPair,
    best_top1,
    final_top1,
    format_number,
    group_pairs,
    has_first_layer_signal,
    pairing_key,
)
from stabilitylab.runs import Run

NO_BLOCKS = "no transformer blocks (blocks.NN) in this run's layer groups"

VERDICT_NOTE = (
    "diverged: the loss became non-finite. partial failure: a dip never recovered, the final "
    "kNN top-1 is more than the dip margin below the best, or the features collapsed or the "
    "loss sat at chance level at the final evaluation. recovered dips: every dip recovered "
    "and the run ended within the margin of its best, or a collapse or chance-loss flag "
    "cleared. stable: none of these. undetermined: no evaluation. The hidden cost is the "
    "stable twin's kNN top-1 (same configuration and seed, other arm) minus this run's."
)
ARMS = ("learned", "frozen")


def twin_key(run: Run) -> str | None:
    """Return the key that makes two runs twins, or None for a run without a seed."""
    if run.config.get("seed") is None:
        return None
    return pairing_key(run)


def verdict_table(runs: Sequence[Run], events: Sequence[RunEvents], labels: Sequence[str]) -> Table:
    """Build the one-row-per-run table of verdicts, their evidence and the hidden cost."""
    verdicts = [_verdict_of(run_events) for run_events in events]
    costs = hidden_costs(runs, verdicts, twin_key)
    rows = []
    for run, verdict, cost, label in zip(runs, verdicts, costs, labels, strict=True):
        rows.append(
            (
                label,
                run.arm,
                verdict.verdict,
                evidence_text(verdict),
                labels[cost.twin_index] if cost is not None else "none",
                _cost_text(cost, "best_cost"),
                _cost_text(cost, "final_cost"),
            )
        )
    columns = (
        "run",
        "arm",
        "verdict",
        "evidence",
        "stable twin",
        "hidden cost, best (pts)",
        "hidden cost, final (pts)",
    )
    return Table(columns=columns, rows=tuple(rows), caption="Verdicts", note=VERDICT_NOTE)


def evidence_text(verdict: RunVerdict) -> str:
    """Describe a verdict's evidence in words: reasons first, then the accuracy facts."""
    evidence = verdict.evidence
    parts = list(verdict.reasons)
    if evidence.evaluations:
        parts.append(
            f"best {format_number(evidence.best_top1)}, final {format_number(evidence.final_top1)}"
            f" (lost {format_number(evidence.lost_accuracy)}, margin "
            f"{format_number(evidence.margin)})"
        )
    if evidence.dips:
        parts.append(f"deepest dip {format_number(evidence.deepest_dip)} pts")
    if evidence.collapsed_steps:
        parts.append(f"collapse at steps {_steps_text(evidence.collapsed_steps)}")
    if evidence.at_chance_steps:
        parts.append(f"loss at chance at steps {_steps_text(evidence.at_chance_steps)}")
    if evidence.low_rank_steps:
        parts.append(f"low effective rank at steps {_steps_text(evidence.low_rank_steps)}")
    if evidence.incomplete:
        parts.append(f"run {evidence.state}, judged on the steps recorded")
    return "; ".join(dict.fromkeys(parts))


def attribution_table(events: RunEvents) -> Table:
    """Build the table of the gradient spikes before each dip of one run."""
    rows = tuple(_attribution_row(attribution) for attribution in events.attributions)
    columns = (
        "dip start step",
        "last good step",
        "window (steps)",
        "first series",
        "first spike step",
        "spiked series, earliest first",
        "spikes",
    )
    note = (
        "The window runs from the lookback before the last evaluation within the margin to "
        "the step before the dip was seen."
    )
    return Table(columns=columns, rows=rows, caption="Gradient spikes before each dip", note=note)


def missing_lag_reason(run: Run, run_events: RunEvents) -> str | None:
    """Return why ``run`` has no first-layer to last-block lag, or None when it can have one."""
    reasons = []
    if run_events.last_layer is None:
        reasons.append(NO_BLOCKS)
    if not has_first_layer_signal(run):
        reasons.append(
            f"its first-layer signal ({run_events.first_layer}) has no finite positive value"
        )
    return "; ".join(reasons) or None


def lag_table(
    events: Sequence[RunEvents], labels: Sequence[str], runs: Sequence[Run] | None = None
) -> Table:
    """Build the table of first-layer-to-later-layer lags, the last block first per run.

    With ``runs``, the note says why a run has no lag to its last block.
    """
    rows = []
    gaps = []
    for index, (run_events, label) in enumerate(zip(events, labels, strict=True)):
        stats = [run_events.lag] if run_events.lag is not None else []
        for lag in [*stats, *run_events.head_lags]:
            rows.append((label, *_lag_cells(lag)))
        reason = missing_lag_reason(runs[index], run_events) if runs is not None else None
        if reason is not None:
            gaps.append(f"{label} has no first-layer to last-block lag: {reason}.")
    columns = (
        "run",
        "from",
        "to",
        "first-layer spikes",
        "matched",
        "median delay",
        "mean delay",
        "95 % CI of median",
        "xcorr peak lag",
        "xcorr peak r",
        "median window lag",
    )
    note = (
        "Delays match each first-layer spike to the next spike of the target that starts 0 to "
        "max_lag steps later. The cross-correlation of the detrended log gradient norms peaks "
        "at a positive lag when the target follows the first layer; the window lag is the "
        "peak within a window around each first-layer spike."
    )
    return Table(
        columns=columns,
        rows=tuple(rows),
        caption="First-layer to last-layer lag, in steps",
        note=" ".join([note, *gaps]),
    )


def arm_difference_table(runs: Sequence[Run], pairs: Sequence[ArmPair]) -> Table:
    """Build the frozen-minus-learned mean, std and 95 % t interval over paired seeds."""
    quantities = (("final kNN top-1", final_top1), ("best kNN top-1", best_top1))
    rows = []
    for setting, group in group_pairs(pairs):
        for name, measure in quantities:
            deltas = [measure(runs[pair.frozen]) - measure(runs[pair.learned]) for pair in group]
            per_seed = ", ".join(
                f"{pair.seed}: {_signed(delta)}" for pair, delta in zip(group, deltas, strict=True)
            )
            quantity = f"{name}, frozen − learned" + (f", {setting}" if setting else "")
            rows.append((quantity, per_seed, *_interval_cells(mean_interval(deltas))))
    columns = ("quantity", "per seed", "mean", "std", "n", "95 % interval of the mean")
    note = (
        "The interval is the Student-t interval of the mean over seeds, shown for n >= 2. "
        "Pairs that differ in other settings (an lr sweep) get rows of their own."
    )
    return Table(
        columns=columns,
        rows=tuple(rows),
        caption="Frozen minus learned over seeds, kNN top-1 in points",
        note=note,
    )


def arm_events_table(events: Sequence[RunEvents], pairs: Sequence[ArmPair]) -> Table:
    """Build the per-seed table of dips, spikes, lag and verdicts of both arms side by side."""
    rows = []
    for pair in pairs:
        learned, frozen = events[pair.learned], events[pair.frozen]
        rows.append(
            (
                pair.label,
                *_side_by_side(learned, frozen, lambda item: str(len(item.dips))),
                *_side_by_side(learned, frozen, _first_layer_spikes_text),
                *_side_by_side(learned, frozen, lambda item: str(len(item.spikes_on(GRAD_NORM)))),
                *_side_by_side(learned, frozen, _median_delay_text),
                *_side_by_side(learned, frozen, lambda item: _verdict_of(item).verdict),
            )
        )
    columns = (
        "seed",
        "dips learned",
        "dips frozen",
        "first-layer spikes learned",
        "first-layer spikes frozen",
        "grad-norm spikes learned",
        "grad-norm spikes frozen",
        "median delay learned",
        "median delay frozen",
        "verdict learned",
        "verdict frozen",
    )
    note = (
        "The first layer is patch_embed in the learned arm and token_grad_norm in the frozen "
        "arm, whose patch projection has no gradient."
    )
    return Table(columns=columns, rows=tuple(rows), caption="Both arms per seed", note=note)


def arm_lag_table(
    events: Sequence[RunEvents], pairs: Sequence[ArmPair], params: LagParams | None = None
) -> Table:
    """Build the per-arm totals of the paired runs: dips, spikes and the pooled lag.

    Delays of every paired run of one arm are pooled for the median and its bootstrap
    interval, and the cross-correlation peak lag is averaged over those runs.
    """
    params = params or LagParams()
    rows = []
    for arm in ARMS:
        arm_events = [events[getattr(pair, arm)] for pair in pairs]
        lags = [item.lag for item in arm_events if item.lag is not None]
        delays = [delay for lag in lags for delay in lag.delays]
        low, high = bootstrap_median_interval(
            delays, params.bootstrap_samples, params.confidence, params.seed
        )
        xcorr_lags = [lag.xcorr.lag for lag in lags if lag.xcorr.lag is not None]
        rows.append(
            (
                arm,
                str(len(arm_events)),
                str(sum(len(item.dips) for item in arm_events)),
                str(sum(len(item.spikes_on(item.first_layer)) for item in arm_events)),
                str(sum(lag.matched for lag in lags)),
                format_number(float(np.median(delays)) if delays else math.nan, 1),
                _range_text(low, high),
                format_number(float(np.mean(xcorr_lags)) if xcorr_lags else math.nan, 1),
            )
        )
    columns = (
        "arm",
        "runs",
        "dips",
        "first-layer spikes",
        "matched",
        "median delay (steps)",
        "95 % CI of median",
        "mean xcorr peak lag",
    )
    return Table(columns=columns, rows=tuple(rows), caption="Per arm, over the paired runs")


def _verdict_of(run_events: RunEvents) -> RunVerdict:
    if run_events.verdict is None:
        raise ValueError(f"events of {run_events.run_name} have no verdict; use detect_run")
    return run_events.verdict


def _attribution_row(attribution: DipAttribution) -> tuple[str, ...]:
    first_step = attribution.first_spike_step
    return (
        str(attribution.dip_start_step),
        str(attribution.last_good_step),
        f"{attribution.window_start_step} to {attribution.window_end_step}",
        attribution.first_series or "none",
        str(first_step) if first_step is not None else MISSING,
        ", ".join(attribution.series_order) or "none",
        str(len(attribution.spikes)),
    )


def _lag_cells(lag: LagStats) -> tuple[str, ...]:
    return (
        lag.source,
        lag.target,
        str(lag.source_spikes),
        str(lag.matched),
        format_number(lag.median_delay, 1),
        format_number(lag.mean_delay, 1),
        _range_text(*lag.median_delay_ci),
        str(lag.xcorr.lag) if lag.xcorr.lag is not None else MISSING,
        format_number(lag.xcorr.correlation),
        format_number(lag.median_window_lag, 1),
    )


def _interval_cells(interval: MeanInterval) -> tuple[str, ...]:
    return (
        _signed(interval.mean),
        format_number(interval.std),
        str(interval.n),
        _range_text(interval.low, interval.high, signed=True),
    )


def _side_by_side(
    learned: RunEvents, frozen: RunEvents, cell: Callable[[RunEvents], str]
) -> tuple[str, str]:
    return cell(learned), cell(frozen)


def _first_layer_spikes_text(run_events: RunEvents) -> str:
    return str(len(run_events.spikes_on(run_events.first_layer)))


def _median_delay_text(run_events: RunEvents) -> str:
    if run_events.lag is None:
        return MISSING
    return format_number(run_events.lag.median_delay, 1)


def _cost_text(cost: HiddenCost | None, name: str) -> str:
    if cost is None:
        return MISSING
    return _signed(getattr(cost, name))


def _signed(value: float) -> str:
    return f"{value:+.2f}" if math.isfinite(value) else MISSING


def _range_text(low: float, high: float, signed: bool = False) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return MISSING
    if signed:
        return f"{low:+.2f} to {high:+.2f}"
    return f"{low:.1f} to {high:.1f}"


def _steps_text(steps: Sequence[int], limit: int = 5) -> str:
    """Return up to ``limit`` steps, then how many more there are."""
    shown = ", ".join(str(step) for step in steps[:limit])
    if len(steps) > limit:
        shown += f" and {len(steps) - limit} more"
    return shown
