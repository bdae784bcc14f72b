"""A sweep folder as frames: one row per grid point, and the LR sensitivity of each arm.

The numbers are those of the sweep report (:mod:`stabilitylab.report.sweep`): the same
outcomes, final loss and LR sensitivity (Wortsman et al. 2023), computed by the same code.
"""

from __future__ import annotations

import math
import os

import pandas as pd

from stabilitylab.analysis.collection import RunSet, load_runs
from stabilitylab.errors import RunDirError
from stabilitylab.report.sweep import METRICS, collect_point_runs, sensitivity_rows
from stabilitylab.sweep import SWEEP_FILE

SWEEP_COLUMNS = (
    "name",
    "lr",
    "batch_size",
    "arm",
    "seed",
    "outcome",
    "verdict",
    *METRICS,
    "initial_loss",
)
SENSITIVITY_COLUMNS = (
    "batch_size",
    "arm",
    "seeds_used",
    "seeds_left_out",
    "lr_sensitivity",
    "lr_sensitivity_std",
    "initial_loss",
    "best_final_loss",
    "best_lr",
    "diverged",
)

SweepSource = RunSet | str | os.PathLike[str]


def sweep_runs(source: SweepSource) -> RunSet:
    """Return the runs of a sweep: a RunSet read from a sweep folder, or the folder's path.

    Raises RunDirError for a RunSet that was not read from a sweep folder.
    """
    runs = source if isinstance(source, RunSet) else load_runs(source)
    if runs.sweep is None:
        raise RunDirError(
            f"these {len(runs)} runs were not read from a sweep folder, so they have no lr "
            f"grid; pass the folder that contains {SWEEP_FILE}, or load_runs() of it"
        )
    return runs


def sweep_table(source: SweepSource) -> pd.DataFrame:
    """Return one row per grid point of a sweep, in grid order, with its run's numbers.

    Columns (:data:`SWEEP_COLUMNS`): ``name`` (run folder), ``lr`` (base lr per 256 images),
    ``batch_size``, ``arm``, ``seed``, ``outcome`` (finished, diverged, failed, incomplete or
    not run), ``verdict`` (None for a point not run), ``final_top1`` and ``best_top1`` (%),
    ``dips``, ``dip_depth`` (summed depth, points), ``grad_spikes``, ``first_layer_spikes``,
    ``final_loss`` (mean loss over the last 5 % of steps; infinite for a diverged run, NaN
    for one that did not finish) and ``initial_loss`` (the loss of step 0). Numbers are NaN
    for a grid point without a run folder.
    """
    runs = sweep_runs(source)
    point_runs = collect_point_runs(runs.sweep, runs, [run.detection for run in runs])
    verdicts = {run.name: run.verdict for run in runs}
    rows = [
        {
            "name": entry.point.name,
            "lr": entry.point.lr,
            "batch_size": entry.point.batch_size,
            "arm": entry.point.arm,
            "seed": entry.point.seed,
            "outcome": entry.outcome,
            "verdict": verdicts.get(entry.point.name),
            **{key: entry.values.get(key, math.nan) for key in (*METRICS, "initial_loss")},
        }
        for entry in point_runs
    ]
    return pd.DataFrame(rows, columns=list(SWEEP_COLUMNS))


def lr_sensitivity(source: SweepSource) -> pd.DataFrame:
    """Return the LR sensitivity of each batch size and arm of a sweep, one row each.

    LR sensitivity is the mean over the lr grid of ``min(final loss, initial loss)`` minus
    the best final loss over the grid, per seed, then averaged over seeds. Lower is less
    sensitive. Columns (:data:`SENSITIVITY_COLUMNS`): ``batch_size``, ``arm``,
    ``seeds_used``, ``seeds_left_out`` (a seed with a failed or incomplete run at any lr),
    ``lr_sensitivity``, ``lr_sensitivity_std`` (over seeds), ``initial_loss``,
    ``best_final_loss``, ``best_lr`` (lowest mean final loss, None if every lr diverged)
    and ``diverged`` (runs among the seeds used).
    """
    runs = sweep_runs(source)
    point_runs = collect_point_runs(runs.sweep, runs, [run.detection for run in runs])
    rows = sensitivity_rows(point_runs, runs.sweep.manifest.grid)
    records = [
        {
            "batch_size": row.batch_size,
            "arm": row.arm,
            "seeds_used": row.seeds_used,
            "seeds_left_out": row.seeds_left_out,
            "lr_sensitivity": row.sensitivity,
            "lr_sensitivity_std": row.sensitivity_std,
            "initial_loss": row.initial_loss,
            "best_final_loss": row.best_final_loss,
            "best_lr": row.best_lr,
            "diverged": row.diverged,
        }
        for row in rows
    ]
    return pd.DataFrame(records, columns=list(SENSITIVITY_COLUMNS))
