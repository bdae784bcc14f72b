"""A stratified train/validation split with a fixed seed, for data without its own split."""

from __future__ import annotations

import math

import numpy as np

SPLIT_SEED = 0  # fixed on purpose: runs with different --seed values share one split


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Return sorted (train indices, validation indices) of ``labels``.

    Each class puts ``round(fraction x its size)`` images in the validation split, but at
    most all but one, so every class keeps a training image. A class of one image stays in
    training, and the validation split may therefore be empty, which the caller checks.
    """
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        size = min(math.floor(fraction * len(members) + 0.5), len(members) - 1)
        val.append(members[:size])
        train.append(members[size:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
