"""The report's parts on the attention probes: a figure, summary lines and an events table.

Every part is left out for runs without an ``attention`` table, so a report of runs without
probes is the same as before the probes existed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from stabilitylab.detect import RunEvents, SpikeEvent, attention_layer_series, attention_series_name
from stabilitylab.detect.attention import ENTROPY, MAX_LOGIT, SERIES_PREFIXES
from stabilitylab.report.content import FigureImage, Table
from stabilitylab.report.figures import (
    LEGEND_OUTSIDE,
    PANEL_HEIGHT_INCHES,
    WIDTH_INCHES,
    _to_png,
    plain_text,
)
from stabilitylab.report.summary import format_number, format_scalar
from stabilitylab.runs import Run

ATTENTION_FILE = "attention.png"
# Titles of the two columns of the figure, by attention-table column.
PANEL_TITLES = {
    ENTROPY: "lowest attention entropy over heads",
    MAX_LOGIT: "highest max attention logit over heads",
}
ATTENTION_EVENTS_NOTE = (
    "An entropy event is a drop of the block's lowest normalised entropy over its heads: the "
    "value is the lowest entropy, the baseline the trailing median before it, and the ratio "
    "baseline / value. A max-logit event is a rise of the block's highest attention logit "
    "above its trailing median. Both use the gradient-norm spike parameters, counted in "
    "probes instead of steps."
)


def has_attention(runs: Sequence[Run]) -> bool:
    return any(not run.attention.empty for run in runs)


def attention_figures(
    runs: Sequence[Run], events: Sequence[RunEvents], labels: Sequence[str]
) -> list[FigureImage]:
    """Return the attention figure, or nothing when no run has attention probes."""
    if not has_attention(runs):
        return []
    return [plot_attention(runs, events, labels)]


def plot_attention(
    runs: Sequence[Run], events: Sequence[RunEvents], labels: Sequence[str]
) -> FigureImage:
    """Plot per block the entropy and the maximum logit over steps, one row of panels per run.

    The panels of a column share their y axis, so the learned and the frozen arm of a seed
    compare directly. A block has the same colour in every run.
    """
    depth = max(run.attention["layer"].nunique() for run in runs)
    palette = sns.color_palette("viridis", max(depth, 1))
    with sns.axes_style("whitegrid"):
        height = PANEL_HEIGHT_INCHES * len(runs) + 0.6
        figure = Figure(figsize=(WIDTH_INCHES, height), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.subplots(len(runs), 2, sharex=True, sharey="col", squeeze=False)
        for row, run, run_events, label in zip(axes, runs, events, labels, strict=True):
            for ax, column in zip(row, (ENTROPY, MAX_LOGIT), strict=True):
                ax.set_title(f"{plain_text(label)}: {PANEL_TITLES[column]}", fontsize="medium")
                if run.attention.empty:
                    ax.text(
                        0.5,
                        0.5,
                        "No attention probes recorded",
                        ha="center",
                        va="center",
                        transform=ax.transAxes,
                        color="grey",
                    )
                    continue
                _plot_blocks(ax, run, run_events, column, palette)
        axes[0, 0].set_ylim(0.0, 1.02)
        axes[0, 0].set_ylabel("entropy / log(keys)")
        axes[0, 1].set_ylabel("q.k * scale")
        for ax in axes[-1]:
            ax.set_xlabel("step")
        labelled = next((ax for ax in axes[:, 1] if ax.get_legend_handles_labels()[0]), None)
        if labelled is not None:
            labelled.legend(**LEGEND_OUTSIDE)
        png = _to_png(figure)
    caption = (
        "Attention probes on a fixed batch of validation images: per block, the lowest "
        "normalised attention entropy over its heads (left; 1 is uniform attention, 0 all on "
        "one key) and the highest maximum attention logit (right). Hollow circles mark "
        "detected entropy drops and logit spikes. Panels of a column share their axis."
    )
    return FigureImage(file_name=ATTENTION_FILE, caption=caption, png=png)


def _plot_blocks(
    ax: Axes,
    run: Run,
    run_events: RunEvents,
    column: str,
    palette: Sequence[tuple[float, float, float]],
) -> None:
    """Plot one line per block of ``column`` and mark the block's detected events."""
    for index, (layer, series) in enumerate(attention_layer_series(run.attention, column).items()):
        color = palette[index % len(palette)]
        ax.plot(
            series.index,
            series.to_numpy(),
            marker="o",
            markersize=2,
            linewidth=1.0,
            color=color,
            label=plain_text(layer),
        )
        spikes = run_events.attention_spikes.get(attention_series_name(column, layer), [])
        if spikes:
            ax.plot(
                [spike.peak_step for spike in spikes],
                [spike.peak_value for spike in spikes],
                marker="o",
                markersize=8,
                markerfacecolor="none",
                color=color,
                linestyle="none",
            )


def attention_summary(
    runs: Sequence[Run], events: Sequence[RunEvents], labels: Sequence[str]
) -> list[str]:
    """Return one summary line per run when any run has attention probes, else none."""
    if not has_attention(runs):
        return []
    return [
        attention_summary_line(run, run_events, label)
        for run, run_events, label in zip(runs, events, labels, strict=True)
    ]


def attention_summary_line(run: Run, run_events: RunEvents, label: str) -> str:
    """Describe the lowest entropy and the highest logit of one run's probes in one line."""
    if run.attention.empty:
        return f"Attention probes, {label}: none recorded (--attention-every 0)."
    table = run.attention
    first_step = int(table["step"].min())
    first = table[table["step"] == first_step]
    entropy_start = pd.to_numeric(first["entropy"], errors="coerce").min()
    logit_start = pd.to_numeric(first["max_logit"], errors="coerce").max()
    lowest = _extreme_text(table, ENTROPY, lowest=True)
    highest = _extreme_text(table, MAX_LOGIT, lowest=False)
    drops = _event_count(run_events, ENTROPY)
    rises = _event_count(run_events, MAX_LOGIT)
    return (
        f"Attention probes, {label}: lowest entropy {lowest}, against "
        f"{format_number(entropy_start)} at step {first_step}; highest max logit {highest}, "
        f"against {format_scalar(logit_start)} at step {first_step}; {drops} entropy drop(s) "
        f"and {rises} max-logit spike(s) detected."
    )


def _extreme_text(table: pd.DataFrame, column: str, lowest: bool) -> str:
    """Describe the lowest or highest value of ``column`` with its block, head and step."""
    values = pd.to_numeric(table[column], errors="coerce")
    if not values.notna().any():
        return "n/a (no finite value)"
    row = table.loc[values.idxmin() if lowest else values.idxmax()]
    value = format_number(row[column]) if column == ENTROPY else format_scalar(row[column])
    return f"{value} ({row['layer']} head {int(row['head'])}, step {int(row['step'])})"


def _event_count(run_events: RunEvents, column: str) -> int:
    prefix = SERIES_PREFIXES[column] + "["
    return sum(
        len(spikes)
        for series, spikes in run_events.attention_spikes.items()
        if series.startswith(prefix)
    )


def attention_events_section(run_events: RunEvents, max_rows: int) -> list[Table | str]:
    """Return the blocks on one run's attention events: a table, a line, or nothing.

    Nothing for a run without probes. At most ``max_rows`` events are listed, the largest
    by ratio, in step order.
    """
    if not run_events.attention_spikes:
        return []
    spikes = [spike for found in run_events.attention_spikes.values() for spike in found]
    if not spikes:
        return ["No attention entropy drops or max-logit spikes detected."]
    listed = sorted(spikes, key=lambda spike: spike.ratio, reverse=True)[:max_rows]
    listed.sort(key=lambda spike: (spike.peak_step, spike.series))
    note = ATTENTION_EVENTS_NOTE
    if len(listed) < len(spikes):
        note += (
            f" {len(spikes) - len(listed)} of {len(spikes)} events with smaller ratios are left "
            "out; events.json lists all of them."
        )
    columns = ("series", "start step", "peak step", "duration (steps)", "value", "baseline")
    columns += ("ratio", "z")
    rows = tuple(_event_row(spike) for spike in listed)
    return [Table(columns=columns, rows=rows, caption="Attention events", note=note)]


def _event_row(spike: SpikeEvent) -> tuple[str, ...]:
    return (
        spike.series,
        str(spike.start_step),
        str(spike.peak_step),
        str(spike.duration_steps),
        format_scalar(spike.peak_value),
        format_scalar(spike.baseline),
        f"{spike.ratio:.1f}×",
        format_number(spike.z, 1) if math.isfinite(spike.z) else "inf (MAD 0)",
    )
