"""Runs of consecutive True values in a boolean array, shared by the spike and dip detectors."""

from __future__ import annotations

import numpy as np


def runs_of_true(flags: np.ndarray) -> list[tuple[int, int]]:
    """Return the first and last position of each run of consecutive True values."""
    padded = np.concatenate(([False], flags, [False])).astype("int8")
    changes = np.diff(padded)
    starts = np.flatnonzero(changes == 1)
    ends = np.flatnonzero(changes == -1) - 1
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def run_lengths(flags: np.ndarray) -> np.ndarray:
    """Return, at each True position, the length of the run of True values it belongs to.

    False positions get 0.
    """
    flags = np.asarray(flags, dtype=bool)
    lengths = np.zeros(len(flags), dtype="int64")
    runs = np.asarray(runs_of_true(flags), dtype="int64").reshape(-1, 2)
    run_length = runs[:, 1] - runs[:, 0] + 1
    # The True positions, in order, are the runs one after another.
    lengths[flags] = np.repeat(run_length, run_length)
    return lengths
