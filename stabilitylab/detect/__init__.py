"""Instability detectors for one run: gradient and loss spikes, and kNN accuracy dips.

:func:`detect_run` runs every detector on a :class:`~stabilitylab.runs.Run` and returns a
:class:`RunEvents`, whose :meth:`RunEvents.to_dict` is the per-run entry of ``events.json``.

Series names used as keys of :attr:`RunEvents.spikes`:

- ``loss``, ``grad_norm`` (all trainable gradients) and ``token_grad_norm`` (the gradient
  with respect to the tokens entering ``blocks.00``), from the steps table;
- ``grad_norm[LAYER]`` for each layer group of the layers table, see :func:`layer_series_name`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from stabilitylab.detect.dips import Dip, DipParams, dip_margin, find_dips
from stabilitylab.detect.spikes import (
    SpikeEvent,
    SpikeParams,
    clean_series,
    find_spikes,
    score_spikes,
)
from stabilitylab.runs import Run

__all__ = [
    "DetectorParams",
    "Dip",
    "DipParams",
    "GRAD_NORM",
    "LOSS",
    "PATCH_EMBED",
    "RunEvents",
    "SpikeEvent",
    "SpikeParams",
    "TOKEN_GRAD_NORM",
    "clean_series",
    "detect_run",
    "dip_margin",
    "find_dips",
    "find_spikes",
    "layer_grad_norms",
    "layer_series_name",
    "score_spikes",
    "select_first_layer",
    "select_last_block",
]

LOSS = "loss"
GRAD_NORM = "grad_norm"
TOKEN_GRAD_NORM = "token_grad_norm"
PATCH_EMBED = "patch_embed"
ACCURACY = "knn_top1"

_BLOCK_NAME = re.compile(r"^blocks\.(\d+)$")


def _default_loss_params() -> SpikeParams:
    # The loss is a batch mean and moves far less than a gradient norm, so a 25 % rise
    # above its trailing median is already a large excursion.
    return SpikeParams(min_ratio=1.25)


@dataclass(frozen=True)
class DetectorParams:
    """Parameters of every detector that :func:`detect_run` applies."""

    grad_spikes: SpikeParams = field(default_factory=SpikeParams)
    loss_spikes: SpikeParams = field(default_factory=_default_loss_params)
    dips: DipParams = field(default_factory=DipParams)

    def to_dict(self) -> dict[str, Any]:
        return {
            "grad_spikes": self.grad_spikes.to_dict(),
            "loss_spikes": self.loss_spikes.to_dict(),
            "dips": self.dips.to_dict(),
        }


@dataclass
class RunEvents:
    """Events detected in one run.

    ``first_layer`` is the key in ``spikes`` of the first-layer gradient signal:
    ``grad_norm[patch_embed]`` when the patch projection has a gradient, otherwise
    ``token_grad_norm``, which exists in both arms. ``last_layer`` is the key of the last
    transformer block's gradient norm, or None when the run has no ``blocks.NN`` group.
    """

    run_name: str
    run_path: str
    arm: str
    first_layer: str
    last_layer: str | None
    spikes: dict[str, list[SpikeEvent]]
    dips: list[Dip]

    def spikes_on(self, series: str | None) -> list[SpikeEvent]:
        """Return the spikes of one series, or an empty list for an unknown or None key."""
        if series is None:
            return []
        return self.spikes.get(series, [])

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_name": self.run_name,
            "run_path": self.run_path,
            "arm": self.arm,
            "first_layer": self.first_layer,
            "last_layer": self.last_layer,
            "spikes": {
                series: [event.to_dict() for event in events]
                for series, events in self.spikes.items()
            },
            "dips": [dip.to_dict() for dip in self.dips],
        }


def layer_series_name(layer: str) -> str:
    """Return the series key of one layer group's gradient norm, e.g. ``grad_norm[blocks.00]``."""
    return f"{GRAD_NORM}[{layer}]"


def layer_grad_norms(run: Run) -> dict[str, pd.Series]:
    """Return each layer group's gradient norm as a Series indexed by step.

    Layers are ordered as in ``run.derived["layers"]``, and groups that appear only in the
    layers table follow in table order. A listed group without rows gets an empty Series.
    """
    series: dict[str, pd.Series] = {}
    if not run.layers.empty:
        for layer, rows in run.layers.groupby("layer", sort=False):
            series[str(layer)] = pd.Series(
                rows["grad_norm"].to_numpy(), index=rows["step"].to_numpy(), name=str(layer)
            )
    ordered = {name: series.pop(name, _empty_series(name)) for name in run.layer_names}
    ordered.update(series)
    return ordered


def step_series(run: Run, column: str) -> pd.Series:
    """Return one column of the steps table as a Series indexed by step."""
    return pd.Series(run.steps[column].to_numpy(), index=run.steps["step"].to_numpy(), name=column)


def select_first_layer(
    run: Run, layers: dict[str, pd.Series] | None = None
) -> tuple[str, pd.Series]:
    """Return the series key and values of the first-layer gradient signal of ``run``.

    This is the ``patch_embed`` gradient norm when it has any usable value, and otherwise
    ``token_grad_norm``, because a frozen patch projection has no gradient. ``layers`` is
    the output of :func:`layer_grad_norms`, computed here when not given.
    """
    layers = layers if layers is not None else layer_grad_norms(run)
    patch_embed = layers.get(PATCH_EMBED)
    if patch_embed is not None and not clean_series(patch_embed).empty:
        return layer_series_name(PATCH_EMBED), patch_embed
    return TOKEN_GRAD_NORM, step_series(run, TOKEN_GRAD_NORM)


def select_last_block(
    run: Run, layers: dict[str, pd.Series] | None = None
) -> tuple[str | None, pd.Series]:
    """Return the series key and gradient norms of the highest-numbered ``blocks.NN`` group."""
    layers = layers if layers is not None else layer_grad_norms(run)
    blocks = [name for name in layers if _BLOCK_NAME.match(name)]
    if not blocks:
        return None, _empty_series("last block")
    last = max(blocks, key=lambda name: int(_BLOCK_NAME.match(name).group(1)))
    return layer_series_name(last), layers[last]


def detect_run(run: Run, params: DetectorParams | None = None) -> RunEvents:
    """Run every detector on ``run``: spikes on the loss, the total and token gradient norms
    and each layer's gradient norm, and dips on kNN top-1 accuracy.

    Runs without steps, layers or evaluations give empty event lists.
    """
    params = params or DetectorParams()
    spikes = {
        LOSS: find_spikes(step_series(run, LOSS), params.loss_spikes, name=LOSS),
        GRAD_NORM: find_spikes(step_series(run, GRAD_NORM), params.grad_spikes, name=GRAD_NORM),
        TOKEN_GRAD_NORM: find_spikes(
            step_series(run, TOKEN_GRAD_NORM), params.grad_spikes, name=TOKEN_GRAD_NORM
        ),
    }
    layers = layer_grad_norms(run)
    for layer, values in layers.items():
        key = layer_series_name(layer)
        spikes[key] = find_spikes(values, params.grad_spikes, name=key)
    first_layer, _ = select_first_layer(run, layers)
    last_layer, _ = select_last_block(run, layers)
    return RunEvents(
        run_name=run.name,
        run_path=str(run.path),
        arm=run.arm,
        first_layer=first_layer,
        last_layer=last_layer,
        spikes=spikes,
        dips=find_dips(run.evals, params.dips, column=ACCURACY),
    )


def _empty_series(name: str) -> pd.Series:
    return pd.Series(dtype="float64", name=name)
