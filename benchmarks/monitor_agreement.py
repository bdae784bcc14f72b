"""Compare the dense kNN monitor with the validation-split monitor on recorded runs.

Run: python benchmarks/monitor_agreement.py RUN_OR_SWEEP_DIR... [--tolerance 10]

Reads runs that recorded both monitors (``evals`` and ``dense_knn`` tables) and, per run
and over all of them, reports:

- how closely the two top-1 curves follow each other at the steps where both ran: the
  Pearson correlation of the levels and of the step-to-step changes, and the mean gap;
- the spread of the changes between consecutive evaluations of each monitor (robust
  standard deviation, 1.4826 times the median absolute deviation);
- the dips the default detector finds in each curve, and how many dips of one monitor have
  a dip of the other whose start lies within ``--tolerance`` steps, beside the count that
  chance alone gives: the mean over 200 random circular shifts of the other monitor's dip
  starts along the run.

It trains nothing; it measures agreement, not time. A sweep folder stands for its runs.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stabilitylab.detect import detect_run
from stabilitylab.detect.dips import Dip
from stabilitylab.errors import RunDirError
from stabilitylab.runs import Run, read_run
from stabilitylab.sweep import is_sweep_dir, read_manifest


@dataclass(frozen=True)
class Agreement:
    """The comparison of the two monitors in one run."""

    run: str
    arm: str
    shared_evaluations: int
    level_correlation: float
    change_correlation: float
    mean_gap: float  # validation-split minus dense top-1, points
    validation_spread: float  # robust std of successive changes, points
    dense_spread: float
    validation_dips: int
    dense_dips: int
    validation_dips_seen_dense: int  # validation dips with a dense dip starting nearby
    validation_dips_seen_dense_by_chance: float
    dense_dips_seen_validation: int
    dense_dips_seen_validation_by_chance: float


def run_dirs(paths: list[Path]) -> list[Path]:
    """Expand sweep folders into their run folders, in grid order."""
    folders: list[Path] = []
    for path in paths:
        if is_sweep_dir(path):
            manifest = read_manifest(path)
            folders.extend(path / point.name for point in manifest.points)
        else:
            folders.append(path)
    return folders


def robust_spread(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return float("nan")
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def correlation(first: np.ndarray, second: np.ndarray) -> float:
    if len(first) < 3 or np.std(first) == 0 or np.std(second) == 0:
        return float("nan")
    return float(np.corrcoef(first, second)[0, 1])


def matched(dips: list[Dip], others: list[Dip], tolerance: int) -> int:
    """Count the dips in ``dips`` with a dip in ``others`` that starts within ``tolerance``."""
    starts = np.array([dip.start_step for dip in others])
    if len(starts) == 0:
        return 0
    return sum(int(np.min(np.abs(starts - dip.start_step)) <= tolerance) for dip in dips)


def matched_by_chance(
    dips: list[Dip], others: list[Dip], tolerance: int, length: int, shifts: int = 200
) -> float:
    """Mean of :func:`matched` when the starts of ``others`` move by a random circular shift.

    A shift keeps the spacing of the other monitor's dips but breaks any link in time, so the
    mean is the count that dips this frequent would match without a shared cause.
    """
    if not dips or not others or length < 1:
        return 0.0
    rng = np.random.default_rng(0)
    starts = np.array([dip.start_step for dip in dips])
    other_starts = np.array([dip.start_step for dip in others])
    counts = []
    for offset in rng.integers(0, length, size=shifts):
        moved = (other_starts + offset) % length
        distance = np.abs(starts[:, None] - moved[None, :])
        distance = np.minimum(distance, length - distance)  # circular distance
        counts.append(int(np.sum(distance.min(axis=1) <= tolerance)))
    return float(np.mean(counts))


def compare(run: Run, tolerance: int) -> Agreement | None:
    """Compare the monitors of ``run``; None when it lacks either table."""
    if run.evals.empty or run.dense_knn.empty:
        return None
    shared = pd.merge(
        run.evals[["step", "knn_top1"]],
        run.dense_knn[["step", "knn_top1"]],
        on="step",
        suffixes=("_validation", "_dense"),
    ).dropna()
    validation = shared["knn_top1_validation"].to_numpy()
    dense = shared["knn_top1_dense"].to_numpy()
    events = detect_run(run)
    length = int(run.evals["step"].max()) + 1
    return Agreement(
        run=run.name,
        arm=run.arm,
        shared_evaluations=len(shared),
        level_correlation=correlation(validation, dense),
        change_correlation=correlation(np.diff(validation), np.diff(dense)),
        mean_gap=float(np.mean(validation - dense)) if len(shared) else float("nan"),
        validation_spread=robust_spread(np.diff(run.evals["knn_top1"].to_numpy())),
        dense_spread=robust_spread(np.diff(run.dense_knn["knn_top1"].to_numpy())),
        validation_dips=len(events.dips),
        dense_dips=len(events.dense_dips),
        validation_dips_seen_dense=matched(events.dips, events.dense_dips, tolerance),
        validation_dips_seen_dense_by_chance=matched_by_chance(
            events.dips, events.dense_dips, tolerance, length
        ),
        dense_dips_seen_validation=matched(events.dense_dips, events.dips, tolerance),
        dense_dips_seen_validation_by_chance=matched_by_chance(
            events.dense_dips, events.dips, tolerance, length
        ),
    )


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Per arm and over all runs: means of the curve statistics and sums of the dip counts."""
    means = ["level_correlation", "change_correlation", "mean_gap"]
    means += ["validation_spread", "dense_spread"]
    sums = ["validation_dips", "dense_dips", "validation_dips_seen_dense"]
    sums += ["validation_dips_seen_dense_by_chance", "dense_dips_seen_validation"]
    sums += ["dense_dips_seen_validation_by_chance"]
    groups = [("all", rows), *((arm, frame) for arm, frame in rows.groupby("arm"))]
    summary = []
    for name, frame in groups:
        entry = {"runs": name, "count": len(frame)}
        entry.update({column: frame[column].mean() for column in means})
        entry.update({column: frame[column].sum() for column in sums})
        summary.append(entry)
    return pd.DataFrame(summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders or sweep folders")
    parser.add_argument(
        "--tolerance",
        type=int,
        default=10,
        help="steps between the starts of two dips that count as the same event (default: 10)",
    )
    args = parser.parse_args()
    rows = []
    try:
        runs = [read_run(folder) for folder in run_dirs(args.paths)]
    except RunDirError as error:
        raise SystemExit(f"error: {error}") from None
    for run in runs:
        agreement = compare(run, args.tolerance)
        if agreement is None:
            print(f"{run.path}: no dense_knn or evals rows, left out")
            continue
        rows.append(vars(agreement))
    if not rows:
        raise SystemExit("no run recorded both monitors; train with --dense-knn-every above 0")
    frame = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(frame.round(3).to_string(index=False))
        print()
        print(summarise(frame).round(3).to_string(index=False))


if __name__ == "__main__":
    main()
