"""The sweep sections of a report: accuracy, dips and LR sensitivity against the lr grid.

A report on a sweep folder (one that contains ``sweep.json``) covers every grid point that
has a run folder and adds, before the usual figures:

- kNN top-1 (final and best) against lr per arm, one row of panels per batch size;
- dips against lr per arm: the mean dip count per run and the mean total dip depth per run;
- the LR sensitivity of each arm and batch size;
- a table per grid point and arm.

Accuracy, dip and spike means are over the finished runs of a grid point. A diverged run
(status ``failed`` with reason ``non-finite loss``) enters the diverged count and the LR
sensitivity, and a failed, incomplete or not yet started run enters only the counts.

LR sensitivity follows Wortsman et al. 2023, "Small-scale proxies for large-scale
Transformer training instabilities": the mean over the lr grid of
``min(final loss, initial loss) - best final loss over the grid``. The final loss is the mean
training loss over the last :data:`FINAL_LOSS_FRACTION` of the run's steps (at least one
step), infinite for a diverged run, so a diverged lr counts with its initial loss. The
initial loss is the first recorded loss, the loss of step 0 before any update. The
sensitivity is computed per seed over that seed's whole lr curve, then averaged over seeds.
A seed with a failed or incomplete run at any lr is left out.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from stabilitylab.detect import GRAD_NORM, RunEvents
from stabilitylab.errors import RunDirError
from stabilitylab.report.content import FigureImage, Section, Table
from stabilitylab.report.summary import MISSING, best_top1, final_top1, format_number
from stabilitylab.runs import CONFIG_FILE, Run
from stabilitylab.sweep import (
    DIVERGED_STATUS_REASONS,
    SWEEP_FILE,
    GridPoint,
    SweepGrid,
    SweepManifest,
    is_sweep_dir,
    read_manifest,
)

# Fraction of a run's steps, at its end, whose mean loss is its final loss.
FINAL_LOSS_FRACTION = 0.05
ACCURACY_FILE = "sweep_knn_top1.png"
DIPS_FILE = "sweep_dips.png"
DPI = 110
WIDTH_INCHES = 10.0
ROW_HEIGHT_INCHES = 2.8
# Grid points without a run folder named in the report before the rest are counted.
MAX_NAMED_MISSING = 10

# Outcomes of a grid point's run, as the sweep report counts them.
FINISHED = "finished"
DIVERGED = "diverged"
FAILED = "failed"
INCOMPLETE = "incomplete"
NOT_RUN = "not run"

# Per-run quantities averaged per grid point: key, then its title in tables and figures.
METRICS = {
    "final_top1": "final kNN top-1 (%)",
    "best_top1": "best kNN top-1 (%)",
    "dips": "dips per run",
    "dip_depth": "total dip depth per run (pts)",
    "grad_spikes": "grad-norm spikes per run",
    "first_layer_spikes": "first-layer spikes per run",
    "final_loss": "final loss",
}
# Counts and sums of depths, whose axes start at 0.
NON_NEGATIVE_METRICS = ("dips", "dip_depth", "grad_spikes", "first_layer_spikes")
# Open markers for the frozen arm keep both arms visible where their points coincide.
ARM_MARKERS = {"learned": {"marker": "o"}, "frozen": {"marker": "s", "fillstyle": "none"}}


@dataclass(frozen=True)
class ReportSweep:
    """A sweep folder read for the report: its manifest and the grid points' run folders."""

    path: Path
    manifest: SweepManifest
    run_paths: list[Path]  # grid points with a run folder, in grid order
    missing: list[str]  # names of grid points without one


def load_report_sweep(paths: Sequence[Path]) -> ReportSweep | None:
    """Return the sweep when ``paths`` is one sweep folder, else None.

    Raises RunDirError when the sweep has no run folder yet, or its manifest is damaged.
    """
    if len(paths) != 1 or not is_sweep_dir(paths[0]):
        return None
    folder = Path(paths[0])
    manifest = read_manifest(folder)
    run_paths, missing = [], []
    for point in manifest.points:
        path = folder / point.name
        if (path / CONFIG_FILE).is_file():
            run_paths.append(path)
        else:
            missing.append(point.name)
    if not run_paths:
        raise RunDirError(
            f"sweep {folder} has none of its {len(missing)} runs yet; run stabilitylab sweep "
            "with its options first"
        )
    return ReportSweep(folder, manifest, run_paths, missing)


@dataclass(frozen=True)
class PointRun:
    """The numbers of one grid point's run; NaN where the run has no such value."""

    point: GridPoint
    outcome: str
    values: dict[str, float]  # keyed as METRICS, plus initial_loss

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.point.name,
            "lr": self.point.lr,
            "batch_size": self.point.batch_size,
            "arm": self.point.arm,
            "seed": self.point.seed,
            "outcome": self.outcome,
            **{key: _finite_or_none(value) for key, value in self.values.items()},
        }


def run_outcome(run: Run | None) -> str:
    """Return finished, diverged, failed, incomplete (running, interrupted) or not run."""
    if run is None:
        return NOT_RUN
    state = run.status.get("state")
    if state == "finished":
        return FINISHED
    if state == "failed":
        return DIVERGED if run.status.get("reason") in DIVERGED_STATUS_REASONS else FAILED
    return INCOMPLETE


def initial_loss(run: Run) -> float:
    """Return the first recorded training loss, NaN when no step was recorded."""
    if run.steps.empty:
        return math.nan
    return float(pd.to_numeric(run.steps["loss"], errors="coerce").iloc[0])


def final_loss(run: Run, fraction: float = FINAL_LOSS_FRACTION) -> float:
    """Return the mean loss over the last ``fraction`` of the run's steps (at least one).

    Returns infinity for a diverged run and NaN for a run that did not finish. The step
    count is the planned ``total_steps`` when the run directory records it.
    """
    outcome = run_outcome(run)
    if outcome == DIVERGED:
        return math.inf
    if outcome != FINISHED or run.steps.empty:
        return math.nan
    losses = pd.to_numeric(run.steps["loss"], errors="coerce").to_numpy(dtype="float64")
    total = run.derived.get("total_steps")
    if not isinstance(total, int) or isinstance(total, bool) or total < 1:
        total = len(losses)
    tail = losses[-max(1, math.ceil(fraction * total)) :]
    tail = tail[np.isfinite(tail)]
    return float(tail.mean()) if tail.size else math.nan


def lr_sensitivity(initial_losses: Sequence[float], final_losses: Sequence[float]) -> float:
    """Return the LR sensitivity of one lr curve, given per lr the initial and final loss.

    This is the mean over the lr values of ``min(final, initial) - min(final)``, with an
    infinite final loss for a diverged run. Returns NaN when no final loss is finite.
    """
    initial = np.asarray(initial_losses, dtype="float64")
    final = np.asarray(final_losses, dtype="float64")
    finite = final[np.isfinite(final)]
    if finite.size == 0:
        return math.nan
    capped = np.minimum(final, initial)
    return float(np.mean(capped - finite.min()))


def collect_point_runs(
    sweep: ReportSweep, runs: Sequence[Run], events: Sequence[RunEvents]
) -> list[PointRun]:
    """Return one PointRun per grid point, in grid order, matching runs by folder name."""
    by_name = {run.name: (run, run_events) for run, run_events in zip(runs, events, strict=True)}
    point_runs = []
    for point in sweep.manifest.points:
        run, run_events = by_name.get(point.name, (None, None))
        values = dict.fromkeys([*METRICS, "initial_loss"], math.nan)
        if run is not None and run_events is not None:
            values.update(
                final_top1=final_top1(run),
                best_top1=best_top1(run),
                dips=float(len(run_events.dips)),
                dip_depth=float(sum(dip.depth for dip in run_events.dips)),
                grad_spikes=float(len(run_events.spikes_on(GRAD_NORM))),
                first_layer_spikes=float(len(run_events.spikes_on(run_events.first_layer))),
                final_loss=final_loss(run),
                initial_loss=initial_loss(run),
            )
        point_runs.append(PointRun(point, run_outcome(run), values))
    return point_runs


@dataclass(frozen=True)
class PointSummary:
    """One grid point and arm over its seeds: outcome counts and (mean, std) per metric."""

    batch_size: int
    lr: float
    arm: str
    outcomes: Counter[str]
    stats: dict[str, tuple[float, float]]  # over finished runs; std NaN below 2 runs

    @property
    def runs(self) -> int:
        return sum(self.outcomes.values())

    def to_dict(self) -> dict[str, Any]:
        stats = {}
        for key, (mean, std) in self.stats.items():
            stats[f"{key}_mean"] = _finite_or_none(mean)
            stats[f"{key}_std"] = _finite_or_none(std)
        return {
            "batch_size": self.batch_size,
            "lr": self.lr,
            "arm": self.arm,
            "runs": self.runs,
            "outcomes": dict(self.outcomes),
            **stats,
        }


def summarize_points(point_runs: Sequence[PointRun], grid: SweepGrid) -> list[PointSummary]:
    """Aggregate the runs of each (batch size, lr, arm) over seeds, in that order."""
    summaries = []
    for batch_size in grid.batch_sizes:
        for lr in grid.lrs:
            for arm in grid.arms:
                group = [
                    entry
                    for entry in point_runs
                    if entry.point.batch_size == batch_size
                    and entry.point.lr == lr
                    and entry.point.arm == arm
                ]
                finished = [entry for entry in group if entry.outcome == FINISHED]
                stats = {
                    key: mean_and_std([entry.values[key] for entry in finished]) for key in METRICS
                }
                outcomes = Counter(entry.outcome for entry in group)
                summaries.append(PointSummary(batch_size, lr, arm, outcomes, stats))
    return summaries


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Return the mean and sample standard deviation of the finite values.

    The mean is NaN without finite values, and the deviation is NaN with fewer than two.
    """
    finite = np.asarray([value for value in values if math.isfinite(value)], dtype="float64")
    if finite.size == 0:
        return math.nan, math.nan
    std = float(finite.std(ddof=1)) if finite.size >= 2 else math.nan
    return float(finite.mean()), std


@dataclass(frozen=True)
class SensitivityRow:
    """The LR sensitivity of one arm at one batch size, over the seeds with a whole lr curve."""

    batch_size: int
    arm: str
    seeds_used: int
    seeds_left_out: int
    sensitivity: float  # mean over seeds
    sensitivity_std: float  # sample std over seeds, NaN below 2 seeds
    initial_loss: float  # mean over seeds and lr values
    best_final_loss: float  # mean over seeds of each seed's best final loss
    best_lr: float | None  # lr with the lowest mean final loss, None if every lr diverged
    diverged: int  # diverged runs among the seeds used

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "arm": self.arm,
            "seeds_used": self.seeds_used,
            "seeds_left_out": self.seeds_left_out,
            "lr_sensitivity": _finite_or_none(self.sensitivity),
            "lr_sensitivity_std": _finite_or_none(self.sensitivity_std),
            "initial_loss": _finite_or_none(self.initial_loss),
            "best_final_loss": _finite_or_none(self.best_final_loss),
            "best_lr": self.best_lr,
            "diverged": self.diverged,
        }


def sensitivity_rows(point_runs: Sequence[PointRun], grid: SweepGrid) -> list[SensitivityRow]:
    """Compute the LR sensitivity per batch size and arm, as defined in the module docstring."""
    rows = []
    for batch_size in grid.batch_sizes:
        for arm in grid.arms:
            curves = []
            for seed in grid.seeds:
                curve = [
                    entry
                    for entry in point_runs
                    if entry.point.batch_size == batch_size
                    and entry.point.arm == arm
                    and entry.point.seed == seed
                ]
                if _is_complete_curve(curve):
                    curves.append(sorted(curve, key=lambda entry: entry.point.lr))
            rows.append(_sensitivity_row(batch_size, arm, curves, len(grid.seeds)))
    return rows


def _is_complete_curve(curve: Sequence[PointRun]) -> bool:
    return bool(curve) and all(
        entry.outcome in (FINISHED, DIVERGED) and math.isfinite(entry.values["initial_loss"])
        for entry in curve
    )


def _sensitivity_row(
    batch_size: int, arm: str, curves: Sequence[Sequence[PointRun]], seeds: int
) -> SensitivityRow:
    sensitivities, best_losses, initial = [], [], []
    for curve in curves:
        initial_losses = [entry.values["initial_loss"] for entry in curve]
        final_losses = [entry.values["final_loss"] for entry in curve]
        sensitivities.append(lr_sensitivity(initial_losses, final_losses))
        finite = [loss for loss in final_losses if math.isfinite(loss)]
        best_losses.append(min(finite) if finite else math.nan)
        initial.extend(initial_losses)
    sensitivity, sensitivity_std = mean_and_std(sensitivities)
    return SensitivityRow(
        batch_size=batch_size,
        arm=arm,
        seeds_used=len(curves),
        seeds_left_out=seeds - len(curves),
        sensitivity=sensitivity,
        sensitivity_std=sensitivity_std,
        initial_loss=mean_and_std(initial)[0],
        best_final_loss=mean_and_std(best_losses)[0],
        best_lr=_best_lr(curves),
        diverged=sum(entry.outcome == DIVERGED for curve in curves for entry in curve),
    )


def _best_lr(curves: Sequence[Sequence[PointRun]]) -> float | None:
    """Return the lr whose final loss, averaged over the curves, is lowest."""
    if not curves:
        return None
    means = {}
    for index, entry in enumerate(curves[0]):
        losses = [curve[index].values["final_loss"] for curve in curves]
        means[entry.point.lr] = float(np.mean(losses))  # infinite when any seed diverged
    finite = {lr: loss for lr, loss in means.items() if math.isfinite(loss)}
    return min(finite, key=finite.__getitem__) if finite else None


@dataclass(frozen=True)
class SweepReport:
    """The sweep additions to a report: a title, sections and the ``sweep`` key of events.json."""

    title: str
    sections: list[Section]
    payload: dict[str, Any]


def build_sweep_report(
    sweep: ReportSweep, runs: Sequence[Run], events: Sequence[RunEvents]
) -> SweepReport:
    """Compute the sweep's tables and figures from its runs and their detected events."""
    grid = sweep.manifest.grid
    point_runs = collect_point_runs(sweep, runs, events)
    summaries = summarize_points(point_runs, grid)
    sensitivity = sensitivity_rows(point_runs, grid)
    sections = [
        Section("Sweep", [overview_text(sweep, point_runs)]),
        Section(
            "Sweep: accuracy against lr",
            [plot_accuracy_against_lr(summaries, grid), ACCURACY_NOTE],
        ),
        Section("Sweep: dips against lr", [plot_dips_against_lr(summaries, grid)]),
        Section("Sweep: LR sensitivity", [sensitivity_table(sensitivity), SENSITIVITY_NOTE]),
        Section("Sweep: grid points", [grid_points_table(summaries)]),
    ]
    payload = {
        "folder": str(sweep.path),
        "manifest": sweep.manifest.to_dict(),
        "final_loss_fraction": FINAL_LOSS_FRACTION,
        "runs": [entry.to_dict() for entry in point_runs],
        "points": [summary.to_dict() for summary in summaries],
        "lr_sensitivity": [row.to_dict() for row in sensitivity],
    }
    title = f"Sweep report: {sweep.path.name}, {len(point_runs)} grid points"
    return SweepReport(title, sections, payload)


ACCURACY_NOTE = (
    "Each point is the mean over the finished runs (seeds) of a grid point, and the band is "
    "one sample standard deviation either side, drawn where two or more seeds finished. "
    "Crosses on the lower edge mark lr values where a run of that arm diverged."
)
SENSITIVITY_NOTE = (
    "LR sensitivity (Wortsman et al. 2023) is the mean over the lr grid of min(final loss, "
    "initial loss) minus the best final loss over the grid, computed per seed and then "
    f"averaged. The final loss is the mean training loss over the last "
    f"{FINAL_LOSS_FRACTION:.0%} of a run's steps (at least one step); a diverged run counts "
    "with its initial loss, the loss of step 0. Lower is less sensitive to the lr. Seeds "
    "with a failed or incomplete run at any lr are left out."
)


def overview_text(sweep: ReportSweep, point_runs: Sequence[PointRun]) -> str:
    """Describe the grid, the shared options and how many runs ended in each outcome."""
    manifest = sweep.manifest
    grid = manifest.grid
    options = ", ".join(f"{key}={value}" for key, value in sorted(manifest.options.items()))
    counts = Counter(entry.outcome for entry in point_runs)
    order = (FINISHED, DIVERGED, FAILED, INCOMPLETE, NOT_RUN)
    outcome_text = ", ".join(f"{counts[name]} {name}" for name in order if counts[name])
    text = (
        f"{len(point_runs)} grid points in {sweep.path} ({SWEEP_FILE}): base lr "
        f"{_join(grid.lrs)}, batch size {_join(grid.batch_sizes)}, arms {_join(grid.arms)}, "
        f"seeds {_join(grid.seeds)}; preset {manifest.preset}; shared options: "
        f"{options or 'none'}. Runs: {outcome_text}."
    )
    if sweep.missing:
        named = ", ".join(sweep.missing[:MAX_NAMED_MISSING])
        more = len(sweep.missing) - MAX_NAMED_MISSING
        text += f" Not run yet: {named}" + (f" and {more} more." if more > 0 else ".")
    return text


def _join(values: Sequence[Any]) -> str:
    return ", ".join(str(value) for value in values)


def sensitivity_table(rows: Sequence[SensitivityRow]) -> Table:
    """Build the LR sensitivity table, one row per batch size and arm."""
    columns = (
        "batch size",
        "arm",
        "seeds",
        "LR sensitivity",
        "std over seeds",
        "initial loss",
        "best final loss",
        "best lr",
        "diverged runs",
    )
    body = tuple(
        (
            str(row.batch_size),
            row.arm,
            _seeds_text(row),
            format_number(row.sensitivity, 4),
            format_number(row.sensitivity_std, 4),
            format_number(row.initial_loss, 4),
            format_number(row.best_final_loss, 4),
            MISSING if row.best_lr is None else f"{row.best_lr:g}",
            str(row.diverged),
        )
        for row in rows
    )
    return Table(columns=columns, rows=body, caption="LR sensitivity per arm and batch size")


def _seeds_text(row: SensitivityRow) -> str:
    if not row.seeds_left_out:
        return str(row.seeds_used)
    return f"{row.seeds_used} ({row.seeds_left_out} left out)"


def grid_points_table(summaries: Sequence[PointSummary]) -> Table:
    """Build the table of every grid point and arm over its seeds."""
    columns = (
        "batch size",
        "lr",
        "arm",
        "runs",
        "finished",
        "diverged",
        "other",
        "final top-1",
        "final top-1 std",
        "best top-1",
        "best top-1 std",
        "dips per run",
        "dip depth per run (pts)",
        "grad-norm spikes per run",
        "first-layer spikes per run",
        "final loss",
    )
    rows = []
    for summary in summaries:
        stats = summary.stats
        rows.append(
            (
                str(summary.batch_size),
                f"{summary.lr:g}",
                summary.arm,
                str(summary.runs),
                str(summary.outcomes[FINISHED]),
                str(summary.outcomes[DIVERGED]),
                _other_outcomes_text(summary.outcomes),
                format_number(stats["final_top1"][0]),
                format_number(stats["final_top1"][1]),
                format_number(stats["best_top1"][0]),
                format_number(stats["best_top1"][1]),
                format_number(stats["dips"][0]),
                format_number(stats["dip_depth"][0]),
                format_number(stats["grad_spikes"][0]),
                format_number(stats["first_layer_spikes"][0]),
                format_number(stats["final_loss"][0], 4),
            )
        )
    note = (
        "Means and sample standard deviations over the finished runs of each grid point. "
        "Other counts runs that failed for another reason than a non-finite loss, that are "
        "incomplete (running, killed or interrupted) or that have not started."
    )
    return Table(columns=columns, rows=tuple(rows), caption="Grid points", note=note)


def _other_outcomes_text(outcomes: Counter[str]) -> str:
    parts = [f"{outcomes[name]} {name}" for name in (FAILED, INCOMPLETE, NOT_RUN) if outcomes[name]]
    return ", ".join(parts) if parts else "0"


def plot_accuracy_against_lr(summaries: Sequence[PointSummary], grid: SweepGrid) -> FigureImage:
    """Plot final and best kNN top-1 against lr per arm, one row of panels per batch size."""
    png = _plot_metric_grid(summaries, grid, ("final_top1", "best_top1"))
    caption = (
        "kNN top-1 against base lr (log scale) per arm: mean over seeds with a band of one "
        "standard deviation; crosses mark lr values with a diverged run."
    )
    return FigureImage(file_name=ACCURACY_FILE, caption=caption, png=png)


def plot_dips_against_lr(summaries: Sequence[PointSummary], grid: SweepGrid) -> FigureImage:
    """Plot dips per run and their total depth against lr per arm, per batch size."""
    png = _plot_metric_grid(summaries, grid, ("dips", "dip_depth"))
    caption = (
        "kNN top-1 dips against base lr (log scale) per arm: the mean number of dips per "
        "finished run and the mean of each run's summed dip depth, with a band of one "
        "standard deviation over seeds."
    )
    return FigureImage(file_name=DIPS_FILE, caption=caption, png=png)


def arm_colors(arms: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """Return a fixed colour per arm, the same in every sweep figure."""
    palette = sns.color_palette("colorblind", 4)
    fixed = {"learned": palette[0], "frozen": palette[1]}
    return {arm: fixed.get(arm, palette[2]) for arm in arms}


def _plot_metric_grid(
    summaries: Sequence[PointSummary], grid: SweepGrid, metrics: Sequence[str]
) -> bytes:
    colors = arm_colors(grid.arms)
    with sns.axes_style("whitegrid"):
        rows, columns = len(grid.batch_sizes), len(metrics)
        figure = Figure(
            figsize=(WIDTH_INCHES, ROW_HEIGHT_INCHES * rows + 0.6), layout="constrained"
        )
        FigureCanvasAgg(figure)
        axes = figure.subplots(rows, columns, squeeze=False, sharex=True)
        for row, batch_size in enumerate(grid.batch_sizes):
            for column, metric in enumerate(metrics):
                ax = axes[row, column]
                subset = [s for s in summaries if s.batch_size == batch_size]
                _plot_metric(ax, subset, grid, metric, colors)
                ax.set_title(f"batch size {batch_size}: {METRICS[metric]}", fontsize="medium")
        for ax in axes[-1]:
            ax.set_xlabel("base lr per 256 images")
        handles = [
            Line2D([], [], color=colors[arm], label=arm, **ARM_MARKERS.get(arm, {}))
            for arm in grid.arms
        ]
        handles.append(
            Line2D([], [], color="grey", marker="x", linestyle="none", label="diverged run")
        )
        figure.legend(handles=handles, loc="outside lower center", ncols=len(handles))
        return _png_bytes(figure)


def _plot_metric(
    ax: Axes,
    summaries: Sequence[PointSummary],
    grid: SweepGrid,
    metric: str,
    colors: dict[str, tuple[float, float, float]],
) -> None:
    plotted = False
    for arm in grid.arms:
        arm_summaries = sorted((s for s in summaries if s.arm == arm), key=lambda s: s.lr)
        lrs = np.array([s.lr for s in arm_summaries], dtype="float64")
        means = np.array([s.stats[metric][0] for s in arm_summaries], dtype="float64")
        stds = np.array([s.stats[metric][1] for s in arm_summaries], dtype="float64")
        shown = np.isfinite(means)
        if shown.any():
            plotted = True
            ax.plot(lrs[shown], means[shown], color=colors[arm], **ARM_MARKERS.get(arm, {}))
            banded = shown & np.isfinite(stds)
            ax.fill_between(
                lrs[banded],
                (means - stds)[banded],
                (means + stds)[banded],
                color=colors[arm],
                alpha=0.2,
                linewidth=0,
            )
        diverged = [s.lr for s in arm_summaries if s.outcomes[DIVERGED]]
        if diverged:
            ax.plot(
                diverged,
                [0.03] * len(diverged),
                marker="x",
                markersize=8,
                linestyle="none",
                color=colors[arm],
                transform=ax.get_xaxis_transform(),
                clip_on=False,
            )
    ax.set_xscale("log")
    ax.set_xlim(*_lr_limits(grid.lrs))
    if metric in NON_NEGATIVE_METRICS:
        ax.set_ylim(0, max(ax.get_ylim()[1], 1.0))
    if not plotted:
        ax.text(
            0.5,
            0.5,
            "no finished runs",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="grey",
        )


def _lr_limits(lrs: Sequence[float]) -> tuple[float, float]:
    # Half a decade of margin each side keeps a single lr, or the grid's ends, off the edges.
    low, high = min(lrs), max(lrs)
    return low / 10**0.5, high * 10**0.5


def _png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    # Without a Software entry the PNG carries no version string, so equal data gives equal bytes.
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _finite_or_none(value: float) -> float | None:
    # Strict JSON (allow_nan=False) has no NaN or infinity.
    return float(value) if math.isfinite(value) else None
