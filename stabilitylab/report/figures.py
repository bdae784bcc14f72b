"""The report's figures, rendered to PNG bytes with matplotlib's Agg canvas.

Figures are built on :class:`matplotlib.figure.Figure` objects with their own Agg canvas
instead of pyplot, so rendering changes no global backend and leaks no open figures. Seaborn
only provides the style and the colour palette, inside a context that restores the previous
matplotlib settings.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from stabilitylab.detect import (
    LOSS,
    PATCH_EMBED,
    TOKEN_GRAD_NORM,
    RunEvents,
    SpikeEvent,
    clean_series,
    layer_grad_norms,
    select_first_layer,
    select_last_block,
    step_series,
)
from stabilitylab.report.content import FigureImage
from stabilitylab.report.summary import knn_curve
from stabilitylab.runs import Run

DPI = 110
WIDTH_INCHES = 10.0
PANEL_HEIGHT_INCHES = 2.8
SINGLE_HEIGHT_INCHES = 4.0
# Maximum columns of the gradient heatmap. Each column is the maximum over its steps, so a
# one-step spike stays visible after downsampling.
MAX_HEATMAP_COLUMNS = 800
MISSING_COLOR = "#d0d0d0"
# Legends sit right of the axes, because there they hide no spike, and matplotlib's
# loc="best" search is slow on series with 100 000 points.
LEGEND_OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": "small"}

KNN_FILE = "knn_top1.png"
LOSS_FILE = "loss.png"
FIRST_LAST_FILE = "grad_first_last.png"
HEATMAP_FILE = "grad_heatmap.png"


def render_figures(
    runs: Sequence[Run], events: Sequence[RunEvents], labels: Sequence[str]
) -> list[FigureImage]:
    """Render the four report figures for ``runs``, in report order."""
    colors = run_colors(len(runs))
    return [
        plot_knn_top1(runs, events, labels, colors),
        plot_loss(runs, events, labels, colors),
        plot_first_last_grad(runs, events, labels),
        plot_grad_heatmap(runs, labels),
    ]


def run_colors(count: int) -> list[tuple[float, float, float]]:
    """Return one colour per run, from the colour-blind palette up to 10 runs, else husl."""
    palette = "colorblind" if count <= 10 else "husl"
    return list(sns.color_palette(palette, max(count, 1)))


def plot_knn_top1(
    runs: Sequence[Run],
    events: Sequence[RunEvents],
    labels: Sequence[str],
    colors: Sequence[tuple[float, float, float]],
) -> FigureImage:
    """Plot kNN top-1 against step for every run, with each dip shaded and its bottom marked.

    Runs with a dense kNN monitor get a second, dashed line in the same colour, and the
    bottoms of its dips are hollow triangles.
    """
    any_dense = any(not _dense_curve(run).empty for run in runs)
    with sns.axes_style("whitegrid"):
        figure, axes = _new_figure(1, row_height=SINGLE_HEIGHT_INCHES)
        ax = axes[0]
        plotted = False
        for run, run_events, label, color in zip(runs, events, labels, colors, strict=True):
            curve = knn_curve(run)
            if not curve.empty:
                plotted = True
                ax.plot(
                    curve["step"],
                    curve["knn_top1"],
                    marker="o",
                    markersize=3,
                    color=color,
                    label=plain_text(f"{label}, validation split" if any_dense else label),
                )
                _mark_dips(ax, run_events, color)
            plotted |= _plot_dense_knn(ax, run, run_events, label, color)
        if plotted:
            ax.set_xlabel("step")
            ax.set_ylabel("kNN top-1 (%)")
            handles = ax.get_legend_handles_labels()[0]
            if any(run_events.dips for run_events in events):
                handles += [
                    Patch(color="grey", alpha=0.2, label="dip"),
                    Line2D([], [], marker="v", linestyle="none", color="grey", label="dip bottom"),
                ]
            if any(run_events.dense_dips for run_events in events):
                handles.append(
                    Line2D(
                        [],
                        [],
                        marker="v",
                        markerfacecolor="none",
                        linestyle="none",
                        color="grey",
                        label="dense-queue dip bottom",
                    )
                )
            ax.legend(handles=handles, **LEGEND_OUTSIDE)
        else:
            _mark_empty(ax, "No kNN evaluations recorded")
        ax.set_title("kNN top-1 accuracy")
        png = _to_png(figure)
    caption = "kNN top-1 accuracy; shaded spans are dips, from their start to their recovery."
    if any_dense:
        caption += (
            " Dashed lines are the dense kNN monitor (validation images against a queue of "
            "recent training features); hollow triangles mark the bottoms of its dips."
        )
    return FigureImage(file_name=KNN_FILE, caption=caption, png=png)


def _dense_curve(run: Run) -> pd.DataFrame:
    """Return the dense kNN evaluations with a finite top-1, sorted by step."""
    table = run.dense_knn
    accuracy = pd.to_numeric(table["knn_top1"], errors="coerce").to_numpy(dtype="float64")
    return table[np.isfinite(accuracy)].sort_values("step", kind="stable")


def _plot_dense_knn(
    ax: Axes, run: Run, run_events: RunEvents, label: str, color: tuple[float, float, float]
) -> bool:
    """Plot one run's dense kNN curve dashed and mark its dips; return whether it had any."""
    curve = _dense_curve(run)
    if curve.empty:
        return False
    ax.plot(
        curve["step"],
        curve["knn_top1"],
        linestyle="--",
        linewidth=1.0,
        color=color,
        label=plain_text(f"{label}, dense queue"),
    )
    for dip in run_events.dense_dips:
        ax.plot(
            dip.bottom_step,
            dip.bottom_top1,
            marker="v",
            markersize=9,
            markerfacecolor="none",
            color=color,
            linestyle="none",
        )
    return True


def _mark_dips(ax: Axes, run_events: RunEvents, color: tuple[float, float, float]) -> None:
    for dip in run_events.dips:
        end = dip.start_step + dip.duration_steps
        ax.axvspan(dip.start_step, end, color=color, alpha=0.15, linewidth=0)
        ax.plot(
            dip.bottom_step,
            dip.bottom_top1,
            marker="v",
            markersize=9,
            color=color,
            linestyle="none",
        )


def plot_loss(
    runs: Sequence[Run],
    events: Sequence[RunEvents],
    labels: Sequence[str],
    colors: Sequence[tuple[float, float, float]],
) -> FigureImage:
    """Plot the training loss against step for every run, with loss spikes marked."""
    with sns.axes_style("whitegrid"):
        figure, axes = _new_figure(1, row_height=SINGLE_HEIGHT_INCHES)
        ax = axes[0]
        plotted = False
        for run, run_events, label, color in zip(runs, events, labels, colors, strict=True):
            loss = _finite(step_series(run, LOSS))
            if loss.empty:
                continue
            plotted = True
            ax.plot(
                loss.index, loss.to_numpy(), linewidth=0.8, color=color, label=plain_text(label)
            )
            _mark_spikes(ax, run_events.spikes_on(LOSS), color, marker="x", scale=1.0)
        if plotted:
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
            handles = ax.get_legend_handles_labels()[0]
            if any(run_events.spikes_on(LOSS) for run_events in events):
                handles.append(
                    Line2D([], [], marker="x", linestyle="none", color="grey", label="loss spike")
                )
            ax.legend(handles=handles, **LEGEND_OUTSIDE)
        else:
            _mark_empty(ax, "No training steps recorded")
        ax.set_title("Training loss")
        png = _to_png(figure)
    return FigureImage(
        file_name=LOSS_FILE, caption="Training loss; crosses mark loss spikes.", png=png
    )


def plot_first_last_grad(
    runs: Sequence[Run], events: Sequence[RunEvents], labels: Sequence[str]
) -> FigureImage:
    """Plot first- against last-layer gradient norm, each over its own median, per run.

    Dividing each layer by its median puts layers of very different scale on one axis, so
    a spike that starts in the first layer and reaches the last one shows as two peaks.
    """
    palette = sns.color_palette("colorblind", 4)
    first_color, last_color = palette[0], palette[3]
    with sns.axes_style("whitegrid"):
        figure, axes = _new_figure(len(runs))
        for ax, run, run_events, label in zip(axes, runs, events, labels, strict=True):
            layers = layer_grad_norms(run)
            first_key, first = select_first_layer(run, layers)
            last_key, last = select_last_block(run, layers)
            plotted = _plot_relative(
                ax,
                first,
                run_events.spikes_on(first_key),
                first_color,
                _first_layer_legend(first_key),
            )
            if last_key is not None:
                plotted |= _plot_relative(
                    ax,
                    last,
                    run_events.spikes_on(last_key),
                    last_color,
                    f"last layer: {plain_text(str(last.name))}",
                )
            else:
                ax.text(
                    0.01,
                    0.97,
                    "no blocks.NN layer group, so no last layer",
                    ha="left",
                    va="top",
                    transform=ax.transAxes,
                    color="grey",
                    fontsize="small",
                )
            ax.set_title(plain_text(label), fontsize="medium")
            if plotted:
                ax.set_yscale("log")
                ax.set_ylabel("grad norm / median")
                ax.legend(**LEGEND_OUTSIDE)
            else:
                _mark_empty(ax, "No gradient norms recorded")
        axes[-1].set_xlabel("step")
        png = _to_png(figure)
    caption = (
        "First- and last-layer gradient norm, each divided by its own median over the run "
        "(log scale); circles mark detected spikes."
    )
    return FigureImage(file_name=FIRST_LAST_FILE, caption=caption, png=png)


def _first_layer_legend(first_key: str) -> str:
    if first_key == TOKEN_GRAD_NORM:
        return f"first layer: {TOKEN_GRAD_NORM} (no {PATCH_EMBED} gradient)"
    return f"first layer: {PATCH_EMBED}"


def _plot_relative(
    ax: Axes,
    values: pd.Series,
    spikes: list[SpikeEvent],
    color: tuple[float, float, float],
    label: str,
) -> bool:
    """Plot ``values`` over their median, mark ``spikes`` and return whether any value showed."""
    usable = clean_series(values)
    if usable.empty:
        return False
    median = float(usable.median())
    ax.plot(usable.index, usable.to_numpy() / median, linewidth=0.8, color=color, label=label)
    _mark_spikes(ax, spikes, color, marker="o", scale=1.0 / median)
    return True


def _mark_spikes(
    ax: Axes, spikes: list[SpikeEvent], color: tuple[float, float, float], marker: str, scale: float
) -> None:
    if not spikes:
        return
    steps = [spike.peak_step for spike in spikes]
    peaks = [spike.peak_value * scale for spike in spikes]
    ax.plot(
        steps,
        peaks,
        marker=marker,
        markersize=7,
        markerfacecolor="none",
        color=color,
        linestyle="none",
    )


def plot_grad_heatmap(runs: Sequence[Run], labels: Sequence[str]) -> FigureImage:
    """Plot log10 gradient norm per layer over steps, one panel per run, on one colour scale.

    Layers without a gradient (frozen) or without rows are masked and drawn grey, not as 0.
    """
    pooled = [max_pool_steps(run.layers, run.layer_names, MAX_HEATMAP_COLUMNS) for run in runs]
    log_values = [np.log10(values.to_numpy(dtype="float64")) for values, _ in pooled]
    finite = np.concatenate([values[np.isfinite(values)] for values in log_values])
    limits = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    cmap = sns.color_palette("rocket", as_cmap=True)
    with sns.axes_style("white"):
        figure, axes = _new_figure(
            len(runs), row_height=max(PANEL_HEIGHT_INCHES, 0.3 * _rows(runs))
        )
        mesh = None
        for ax, (values, edges), logs, label in zip(axes, pooled, log_values, labels, strict=True):
            ax.set_title(plain_text(label), fontsize="medium")
            if values.empty or edges.size < 2:
                _mark_empty(ax, "No layer statistics recorded")
                continue
            ax.set_facecolor(MISSING_COLOR)
            masked = np.ma.masked_invalid(logs)
            rows = np.arange(len(values.index) + 1)
            mesh = ax.pcolormesh(edges, rows, masked, cmap=cmap, vmin=limits[0], vmax=limits[1])
            ax.set_yticks(rows[:-1] + 0.5, labels=_layer_tick_labels(values, logs))
            ax.tick_params(axis="y", labelsize="small")
            ax.invert_yaxis()
        if mesh is not None:
            figure.colorbar(mesh, ax=list(axes), label="log10 grad norm", shrink=0.9)
        axes[-1].set_xlabel("step")
        png = _to_png(figure)
    caption = (
        "Per-layer log10 gradient norm; each column is the maximum over up to "
        f"{MAX_HEATMAP_COLUMNS} equal groups of recorded steps. Grey cells have no recorded "
        "gradient, as in a frozen layer."
    )
    return FigureImage(file_name=HEATMAP_FILE, caption=caption, png=png)


def _rows(runs: Sequence[Run]) -> int:
    return max((len(run.layer_names) for run in runs), default=0)


def _layer_tick_labels(values: pd.DataFrame, logs: np.ndarray) -> list[str]:
    labels = []
    for name, row in zip(values.index, logs, strict=True):
        text = plain_text(str(name))
        labels.append(text if np.isfinite(row).any() else f"{text} (no gradient)")
    return labels


def max_pool_steps(
    layers: pd.DataFrame, layer_order: Sequence[str], max_columns: int
) -> tuple[pd.DataFrame, np.ndarray]:
    """Downsample the layers table to a layer-by-column grid of maximum gradient norms.

    The recorded steps are split, in order, into at most ``max_columns`` groups of equal
    count, and each cell is the maximum finite positive ``grad_norm`` of its layer in that
    group, NaN where there is none. Rows follow ``layer_order``, then any other layer in
    table order. Returns the grid and the column edges in steps: column ``c`` covers
    ``edges[c] <= step < edges[c + 1]``.
    """
    # Integer codes of the layer names: converting millions of names to strings took most
    # of a long run's report time.
    codes, names = pd.factorize(layers["layer"])
    names = [str(name) for name in names]
    order = list(dict.fromkeys([*layer_order, *names]))
    if layers.empty:
        return pd.DataFrame(index=pd.Index(order, name="layer")), np.array([], dtype="int64")
    steps = np.sort(pd.unique(layers["step"].to_numpy(dtype="int64")))
    group_size = math.ceil(len(steps) / max_columns)
    row_steps = layers["step"].to_numpy(dtype="int64")
    grad = pd.to_numeric(layers["grad_norm"], errors="coerce").to_numpy(dtype="float64")
    with np.errstate(invalid="ignore"):
        grad = np.where(np.isfinite(grad) & (grad > 0), grad, np.nan)
    named = codes >= 0
    frame = pd.DataFrame(
        {
            "layer": codes[named],
            "column": np.searchsorted(steps, row_steps[named]) // group_size,
            "grad_norm": grad[named],
        }
    )
    columns = (len(steps) - 1) // group_size + 1
    grid = frame.groupby(["layer", "column"])["grad_norm"].max().unstack("column")
    grid.index = pd.Index([names[code] for code in grid.index], name="layer")
    grid = grid.reindex(index=order, columns=range(columns))
    edges = np.append(steps[::group_size], steps[-1] + 1)
    return grid, edges


def plain_text(text: str) -> str:
    """Return ``text`` safe for a matplotlib label: no mathtext, not hidden from the legend.

    A ``$`` would start mathtext, which fails on some run names, and matplotlib leaves a
    label that starts with an underscore out of the legend.
    """
    text = text.replace("$", r"\$")
    return f" {text}" if text.startswith("_") else text


def _finite(series: pd.Series) -> pd.Series:
    values = pd.to_numeric(series, errors="coerce").astype("float64")
    values = values[~values.index.duplicated(keep="last")].sort_index(kind="stable")
    return values[np.isfinite(values.to_numpy())]


def _new_figure(panels: int, row_height: float = PANEL_HEIGHT_INCHES) -> tuple[Figure, list[Axes]]:
    panels = max(panels, 1)
    height = row_height * panels + 0.6
    figure = Figure(figsize=(WIDTH_INCHES, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    return figure, list(axes)


def _mark_empty(ax: Axes, message: str) -> None:
    # Only the y ticks go, because panels share their x axis and its ticks.
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_yticks([])


def _to_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    # Without a Software entry the PNG carries no version string, so equal data gives equal bytes.
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()
