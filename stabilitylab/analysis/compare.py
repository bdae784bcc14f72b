"""Runs side by side: one row per run, and frozen-minus-learned differences paired by seed.

Runs are paired as the report pairs them (:func:`stabilitylab.report.summary.pair_arms`):
a learned and a frozen run whose configurations are equal, seed and method included, apart
from the arm and bookkeeping settings. Accuracies are kNN top-1 in percent, their differences in
points, delays in optimiser steps.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pandas as pd

from stabilitylab.analysis.collection import RunSource, load_runs
from stabilitylab.analysis.rundata import RunData
from stabilitylab.detect import GRAD_NORM, LOSS
from stabilitylab.detect.verdict import HiddenCost, hidden_costs
from stabilitylab.report.diagnosis import twin_key
from stabilitylab.report.statistics import mean_interval
from stabilitylab.report.summary import ArmPair, pair_arms, run_labels, run_method
from stabilitylab.runs import Run

log = logging.getLogger(__name__)

Runs = Sequence[Run] | RunSource | Iterable[RunSource]

COMPARE_COLUMNS = (
    "run",
    "name",
    "arm",
    "method",
    "seed",
    "lr",
    "peak_lr",
    "batch_size",
    "state",
    "steps",
    "total_steps",
    "final_top1",
    "best_top1",
    "dips",
    "deepest_dip",
    "dip_depth",
    "grad_spikes",
    "first_layer_spikes",
    "loss_spikes",
    "median_delay",
    "verdict",
    "hidden_cost_best",
    "hidden_cost_final",
    "path",
)


def _dip_count(run: RunData) -> float:
    return float(len(run.detection.dips))


def _dip_depth(run: RunData) -> float:
    return float(sum(dip.depth for dip in run.detection.dips))


def _grad_spikes(run: RunData) -> float:
    return float(len(run.detection.spikes_on(GRAD_NORM)))


def _first_layer_spikes(run: RunData) -> float:
    """Count the first-layer spikes, NaN for a run without a first-layer signal."""
    if run.first_layer is None:
        return math.nan
    return float(len(run.detection.spikes_on(run.detection.first_layer)))


# Quantities compared between the arms of a seed: column prefix, then how a run gives it.
PAIRED_QUANTITIES: dict[str, Callable[[RunData], float]] = {
    "final_top1": lambda run: run.final_top1,
    "best_top1": lambda run: run.best_top1,
    "dips": _dip_count,
    "dip_depth": _dip_depth,
    "grad_spikes": _grad_spikes,
    "first_layer_spikes": _first_layer_spikes,
}


def as_run_data(runs: Runs) -> list[RunData]:
    """Return ``runs`` as RunData: loaded runs as they are, paths and patterns read first."""
    if isinstance(runs, str | os.PathLike):
        return list(load_runs(runs))
    items = list(runs)
    if items and all(isinstance(item, Run) for item in items):
        return [item if isinstance(item, RunData) else RunData.from_run(item) for item in items]
    return list(load_runs(items))


def compare_runs(runs: Runs) -> pd.DataFrame:
    """Return one row per run with its settings, accuracy, events and verdict.

    ``runs`` is a RunSet, a list of RunData, or anything :func:`load_runs` reads. Columns
    (:data:`COMPARE_COLUMNS`): ``run`` (distinct label), ``name`` (folder name), ``arm``,
    ``method`` (None for an import that records none), ``seed``, ``lr`` (base lr per 256
    images), ``peak_lr`` (after batch scaling), ``batch_size``, ``state``, ``steps``
    (recorded), ``total_steps`` (planned), ``final_top1`` and ``best_top1`` (%), ``dips``,
    ``deepest_dip`` and ``dip_depth`` (the deepest and the summed dip depth, points),
    ``grad_spikes`` (total gradient norm), ``first_layer_spikes``, ``loss_spikes``,
    ``median_delay`` (first layer to last block, steps), ``verdict``, ``hidden_cost_best``
    and ``hidden_cost_final`` (the stable twin's kNN top-1 minus this run's, NaN without a
    stable twin) and ``path``.
    """
    items = as_run_data(runs)
    verdicts = [run.detection.verdict for run in items]
    costs = hidden_costs(items, verdicts, twin_key) if items else []
    rows = [
        _compare_row(run, label, cost)
        for run, label, cost in zip(items, run_labels(items), costs, strict=True)
    ]
    return pd.DataFrame(rows, columns=list(COMPARE_COLUMNS))


def _compare_row(run: RunData, label: str, cost: HiddenCost | None) -> dict[str, Any]:
    events = run.detection
    depths = [dip.depth for dip in events.dips]
    return {
        "run": label,
        "name": run.name,
        "arm": run.arm,
        "method": run_method(run),
        "seed": run.seed,
        "lr": run.config.get("lr"),
        "peak_lr": run.derived.get("lr"),
        "batch_size": run.config.get("batch_size"),
        "state": run.state,
        "steps": int(run.steps["step"].nunique()),
        "total_steps": run.derived.get("total_steps"),
        "final_top1": run.final_top1,
        "best_top1": run.best_top1,
        "dips": len(events.dips),
        "deepest_dip": max(depths) if depths else math.nan,
        "dip_depth": float(sum(depths)),
        "grad_spikes": len(events.spikes_on(GRAD_NORM)),
        "first_layer_spikes": _first_layer_spikes(run),
        "loss_spikes": len(events.spikes_on(LOSS)),
        "median_delay": events.lag.median_delay if events.lag is not None else math.nan,
        "verdict": run.verdict,
        "hidden_cost_best": cost.best_cost if cost is not None else math.nan,
        "hidden_cost_final": cost.final_cost if cost is not None else math.nan,
        "path": str(run.path),
    }


def paired_differences(runs: Runs) -> pd.DataFrame:
    """Return one row per seed that has both arms, with frozen-minus-learned differences.

    Columns: ``seed``, ``learned`` and ``frozen`` (run labels), then for each of
    final_top1, best_top1, dips, dip_depth, grad_spikes and first_layer_spikes the columns
    ``NAME_learned``, ``NAME_frozen`` and ``NAME_diff`` (frozen minus learned). Runs left
    unpaired are described in ``frame.attrs["unpaired"]``: seeds with both arms that do not
    pair, and each run whose seed has no run of the other arm (or that has no seed).
    """
    items = as_run_data(runs)
    pairs, unpaired = pair_arms(items)
    labels = run_labels(items)
    unpaired = [*unpaired, *_runs_without_twin(items, labels, pairs)]
    rows = []
    for pair in pairs:
        learned, frozen = items[pair.learned], items[pair.frozen]
        row: dict[str, Any] = {
            "seed": learned.seed,
            "learned": labels[pair.learned],
            "frozen": labels[pair.frozen],
        }
        for name, measure in PAIRED_QUANTITIES.items():
            row[f"{name}_learned"] = measure(learned)
            row[f"{name}_frozen"] = measure(frozen)
            row[f"{name}_diff"] = measure(frozen) - measure(learned)
        rows.append(row)
    columns = ["seed", "learned", "frozen"]
    for name in PAIRED_QUANTITIES:
        columns += [f"{name}_learned", f"{name}_frozen", f"{name}_diff"]
    frame = pd.DataFrame(rows, columns=columns)
    frame.attrs["unpaired"] = list(unpaired)
    if unpaired:
        log.info("not paired: %s", "; ".join(unpaired))
    return frame


def _runs_without_twin(
    items: Sequence[RunData], labels: Sequence[str], pairs: Sequence[ArmPair]
) -> list[str]:
    """Describe the runs outside every pair whose seed has no run of the other arm.

    Seeds that have both arms but do not pair are described by ``pair_arms`` already.
    """
    paired = {index for pair in pairs for index in (pair.learned, pair.frozen)}
    arms_of_seed: dict[Any, set[str]] = {}
    for run in items:
        arms_of_seed.setdefault(_seed_key(run), set()).add(run.arm)
    notes = []
    for index, (run, label) in enumerate(zip(items, labels, strict=True)):
        if index in paired:
            continue
        if run.seed is None:
            notes.append(f"{label}: no seed in its configuration, so it has no twin")
            continue
        other = "frozen" if run.arm == "learned" else "learned"
        if other not in arms_of_seed[_seed_key(run)]:
            notes.append(f"{label}: no {other} run with seed {run.seed}")
    return notes


def _seed_key(run: RunData) -> str:
    return repr(run.seed)


def paired_summary(runs: Runs) -> pd.DataFrame:
    """Return the mean frozen-minus-learned difference over seeds, one row per quantity.

    Columns: ``quantity``, ``n`` (paired seeds with a finite difference), ``mean``, ``std``
    (sample, NaN below 2 seeds) and ``low``, ``high`` (the Student-t 95 % interval of the
    mean, NaN below 2 seeds).
    """
    differences = paired_differences(runs)
    rows = []
    for name in PAIRED_QUANTITIES:
        interval = mean_interval(differences[f"{name}_diff"].astype("float64").tolist())
        rows.append(
            {
                "quantity": name,
                "n": interval.n,
                "mean": interval.mean,
                "std": interval.std,
                "low": interval.low,
                "high": interval.high,
            }
        )
    frame = pd.DataFrame(rows, columns=["quantity", "n", "mean", "std", "low", "high"])
    frame.attrs["unpaired"] = differences.attrs["unpaired"]
    return frame
