"""Builders of synthetic run tables, in-memory runs and spike events for the tests.

The tables have the columns a training run records (see ``stabilitylab.runs.TABLE_COLUMNS``),
so a test can write them with ``RunWriter`` or wrap them in a ``Run`` with :func:`memory_run`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stabilitylab.detect.spikes import SpikeEvent
from stabilitylab.runs import LATER_COLUMNS, TABLE_COLUMNS, Run, empty_table

# Per-step values that stay constant in a synthetic run unless a test overrides them.
STEP_CONSTANTS: dict[str, float] = {
    "lr": 1e-3,
    "momentum": 0.99,
    "weight_decay": 0.1,
    "loss_scale": 1.0,
    "samples_per_s": 100.0,
}

# Per-evaluation values that stay constant unless a test overrides them.
EVAL_CONSTANTS: dict[str, float | int] = {
    "knn_top5": np.nan,
    "feature_std": 0.1,
    "effective_rank": 20.0,
    "n_bank": 5000,
    "n_query": 1000,
    "eval_seconds": 1.0,
}

# The evaluation columns without those added in later versions, which the writer fills with NaN.
EVAL_COLUMNS = tuple(name for name in TABLE_COLUMNS["evals"] if name not in LATER_COLUMNS["evals"])


def log_noise(
    seed: int | np.random.Generator,
    count: int,
    planted: Mapping[int, float] | None = None,
    spread: float = 0.1,
    log_mean: float = 0.0,
) -> np.ndarray:
    """Draw ``count`` log-normal values and multiply the planted positions by their factors.

    The logs are normal with mean ``log_mean`` and standard deviation ``spread``, and
    ``planted`` maps a position to its factor. A generator passed as ``seed`` is drawn from
    in place, so builders that share one keep their draw order.
    """
    rng = np.random.default_rng(seed)
    values = np.exp(rng.normal(log_mean, spread, count))
    for position, factor in (planted or {}).items():
        values[position] *= factor
    return values


def steps_frame(
    step: np.ndarray,
    loss: np.ndarray,
    grad_norm: np.ndarray,
    token_grad_norm: np.ndarray,
    **columns: Any,
) -> pd.DataFrame:
    """Build a steps table in column order, with 100 steps an epoch and 0.1 s a step.

    ``columns`` overrides the epoch, the wall time or any of :data:`STEP_CONSTANTS`.
    """
    _check_columns(columns, TABLE_COLUMNS["steps"])
    values = {
        "epoch": step / 100,
        **STEP_CONSTANTS,
        "wall_time": step * 0.1,
        **columns,
        "step": step,
        "loss": loss,
        "grad_norm": grad_norm,
        "token_grad_norm": token_grad_norm,
    }
    return pd.DataFrame(values)[list(TABLE_COLUMNS["steps"])]


def layers_frame(
    step: np.ndarray,
    grads: Mapping[str, np.ndarray],
    update_ratio: float | Mapping[str, np.ndarray | float] = 1e-3,
    weight_norm: float | Mapping[str, np.ndarray | float] = 1.0,
) -> pd.DataFrame:
    """Build a layers table with one block of rows per layer, in the order of ``grads``.

    ``update_ratio`` and ``weight_norm`` are each one value for every layer or a mapping
    from layer to its values.
    """
    frames = []
    for layer, grad in grads.items():
        ratio = update_ratio[layer] if isinstance(update_ratio, Mapping) else update_ratio
        norm = weight_norm[layer] if isinstance(weight_norm, Mapping) else weight_norm
        frames.append(
            pd.DataFrame(
                {
                    "step": step,
                    "layer": layer,
                    "grad_norm": grad,
                    "weight_norm": norm,
                    "update_ratio": ratio,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def evals_frame(
    step: np.ndarray | list[int], knn_top1: np.ndarray | list[float], **columns: Any
) -> pd.DataFrame:
    """Build an evaluations table without the later columns, at 100 steps an epoch.

    ``columns`` overrides the epoch or any of :data:`EVAL_CONSTANTS`.
    """
    _check_columns(columns, EVAL_COLUMNS)
    values = {
        "epoch": np.asarray(step) / 100,
        **EVAL_CONSTANTS,
        **columns,
        "step": step,
        "knn_top1": knn_top1,
    }
    return pd.DataFrame(values)[list(EVAL_COLUMNS)]


def memory_run(
    steps: pd.DataFrame,
    layers: pd.DataFrame,
    *,
    name: str = "synthetic",
    config: dict[str, Any] | None = None,
    derived: dict[str, Any],
    evals: pd.DataFrame | None = None,
    status: dict[str, Any] | None = None,
) -> Run:
    """Wrap tables in an in-memory ``Run`` whose path is ``name``, with no run directory.

    By default the configuration is a learned-arm vit_micro with seed 0, the evaluations
    table is empty and the status is finished.
    """
    if config is None:
        config = {"freeze_patch_embed": False, "model": "vit_micro", "seed": 0}
    return Run(
        path=Path(name),
        config=config,
        derived=derived,
        environment={},
        status=status if status is not None else {"state": "finished"},
        steps=steps,
        layers=layers,
        evals=empty_table("evals") if evals is None else evals,
    )


def spike_event(
    series: str, start: int, end: int | None = None, ratio: float = 10.0, z: float = 20.0
) -> SpikeEvent:
    """Build a spike on ``series`` that peaks at ``start`` with ``ratio`` over a baseline of 1."""
    end = start if end is None else end
    return SpikeEvent(
        series=series,
        start_step=start,
        peak_step=start,
        end_step=end,
        duration_steps=end - start + 1,
        peak_value=ratio,
        baseline=1.0,
        ratio=ratio,
        z=z,
    )


def _check_columns(columns: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(columns) - set(allowed))
    if unknown:
        raise ValueError(f"unknown table columns {unknown}, expected names from {allowed}")
