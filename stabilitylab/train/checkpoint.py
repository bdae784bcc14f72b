"""Checkpoints: written atomically, loaded with ``weights_only=True``, and what they contain.

``stabilitylab run`` writes ``checkpoint.pt`` every ``--checkpoint-every`` steps, at the end,
and when SIGINT or SIGTERM stops it. With ``--keep-checkpoints-every K`` the checkpoint of
every step that is a multiple of K is also kept as ``checkpoint-NNNNNN.pt``.

A checkpoint of :data:`CHECKPOINT_FORMAT` 1 contains ``step`` (optimiser steps done), the
``model``, ``optimizer`` and gradient ``scaler`` state, and the ``config`` it was trained
with. It also contains ``rng`` (the torch CPU and CUDA, NumPy and Python generator states),
``evals`` (the kNN accuracy of each evaluation so far), ``skipped_steps``, ``wall_seconds``
(training time so far), ``keep_checkpoints_every`` and, with the dense kNN monitor on,
``dense_knn_queue``. Every value is a tensor, a number, a string or a container of those,
so ``torch.load`` reads it with ``weights_only=True`` and no pickled code runs.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stabilitylab.atomic import atomic_target
from stabilitylab.errors import RunDirError
from stabilitylab.runs import CHECKPOINT_FILE, KEPT_CHECKPOINT_PATTERN

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_target(path) as tmp_path:
        torch.save(state, tmp_path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only."""
    return torch.load(path, map_location=map_location, weights_only=True)


def kept_checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}.pt"


def write_checkpoint(run_dir: Path, state: dict[str, Any], keep_every: int = 0) -> None:
    """Write ``checkpoint.pt``, and keep a copy at a step that is a multiple of ``keep_every``.

    The copy is a hard link where the file system allows one, else a byte copy. Either way
    it appears under its final name complete or not at all.
    """
    path = Path(run_dir) / CHECKPOINT_FILE
    save_checkpoint(path, state)
    step = int(state["step"])
    if keep_every > 0 and step % keep_every == 0:
        _link_or_copy(path, path.with_name(kept_checkpoint_name(step)))


def _link_or_copy(source: Path, target: Path) -> None:
    with atomic_target(target) as tmp_path:
        tmp_path.unlink()
        try:
            os.link(source, tmp_path)
        except OSError:
            shutil.copyfile(source, tmp_path)


def kept_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Return the kept ``checkpoint-NNNNNN.pt`` files of a run as (step, path), newest first."""
    found = []
    for entry in Path(run_dir).iterdir():
        match = KEPT_CHECKPOINT_PATTERN.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found, reverse=True)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint for resuming, raising RunDirError for a damaged or foreign file."""
    try:
        state = load_checkpoint(path)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        # A truncated file fails as a zip archive (RuntimeError); a value that
        # weights_only=True rejects raises UnpicklingError.
        raise RunDirError(
            f"{path} cannot be loaded ({_load_failure(error)}); it is damaged or was not "
            "written by stabilitylab run"
        ) from None
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise RunDirError(f"{path} is not a checkpoint of stabilitylab run (no step or model)")
    return state


def _load_failure(error: BaseException) -> str:
    """Return the reason in torch.load's error, without its advice to load unsafely.

    With weights_only=True, torch 2.14 starts the message with "Weights only load failed"
    and advice to re-run with weights_only=False, which can run code from the file. The
    reason follows on a later line, such as "Unsupported operand 103" for a file that is not
    a pickle, or "Trying to load unsupported GLOBAL posix.system ..." for one that refers to
    a function.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if not lines[0].startswith("Weights only load failed"):
        return lines[0]
    # Every line of advice names the weights_only argument; the reason does not.
    reasons = [line for line in lines if "weights_only" not in line]
    if not reasons:
        return "weights-only loading rejected it"
    return f"weights-only loading rejected it: {reasons[0].strip(' .')}"


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """Return the state of every random generator the training process draws from."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, python_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(python_state, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore the generators saved by :func:`capture_rng_state`.

    A run resumed on another kind of device than it was saved on continues with that
    device's generator as it is, so it is not bit-identical to an uninterrupted run.
    """
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate(
        (
            python_state["version"],
            tuple(int(value) for value in python_state["state"].tolist()),
            python_state["gauss_next"],
        )
    )
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "cuda" or "cuda" in state:
        log.warning(
            "the checkpoint was written on %s and the run continues on %s, so the device's "
            "random stream (the augmentation on the device) differs from an uninterrupted run",
            "a CUDA device" if "cuda" in state else "the CPU",
            device,
        )
