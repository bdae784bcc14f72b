"""Instability detectors for one run: gradient and loss spikes, and kNN accuracy dips.

:func:`detect_run` runs every detector on a :class:`~stabilitylab.runs.Run` and returns a
:class:`RunEvents`, whose :meth:`RunEvents.to_dict` is the per-run entry of ``events.json``.

Series names used as keys of :attr:`RunEvents.spikes`:

- ``loss``, ``grad_norm`` (all trainable gradients) and ``token_grad_norm`` (the gradient
  with respect to the tokens entering ``blocks.00``), from the steps table;
- ``grad_norm[LAYER]`` for each layer group of the layers table, see :func:`layer_series_name`.

:attr:`RunEvents.attention_spikes` holds the events of the attention probes apart from
these, keyed ``attention_entropy[blocks.NN]`` (drops of the lowest entropy over the heads)
and ``attention_max_logit[blocks.NN]``, see :mod:`stabilitylab.detect.attention`. They use
the gradient-norm spike parameters and take no part in the co-occurrence filter, the
attribution of dips or the matching of planted faults.

Steps that ``status.json`` lists as skipped (an fp16 overflow, or ``--on-nonfinite skip``)
are left out of every spike series, so their inf or NaN norms never count as spikes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from stabilitylab.detect.attention import (
    attention_layer_series,
    attention_series_name,
    find_attention_spikes,
)
from stabilitylab.detect.attribution import AttributionParams, DipAttribution, attribute_dips
from stabilitylab.detect.cooccur import CoOccurrenceParams, filter_co_occurring
from stabilitylab.detect.dips import Dip, DipParams, dip_margin, find_dips
from stabilitylab.detect.faults import FaultMatch, match_planted_faults, planted_faults_from_plan
from stabilitylab.detect.lag import LagParams, LagStats, lag_statistics
from stabilitylab.detect.sanity import SanityParams, SanityReport, check_sanity
from stabilitylab.detect.spikes import (
    SPIKE_PRESETS,
    SpikeEvent,
    SpikeParams,
    clean_series,
    find_spikes,
    score_spikes,
    spike_preset,
)
from stabilitylab.detect.training_events import (
    Divergence,
    LossScaleChange,
    loss_divergence,
    loss_scale_changes,
    recorded_divergence,
    skipped_steps,
    without_steps,
)
from stabilitylab.detect.verdict import RunVerdict, judge_run
from stabilitylab.runs import Run

__all__ = [
    "AttributionParams",
    "CoOccurrenceParams",
    "DetectorParams",
    "Dip",
    "DipAttribution",
    "DipParams",
    "Divergence",
    "FaultMatch",
    "GRAD_NORM",
    "HEAD_LAYERS",
    "LOSS",
    "LagParams",
    "LagStats",
    "LossScaleChange",
    "PATCH_EMBED",
    "RunEvents",
    "RunVerdict",
    "SPIKE_PRESETS",
    "SanityParams",
    "SanityReport",
    "SpikeEvent",
    "SpikeParams",
    "TOKEN_GRAD_NORM",
    "attention_layer_series",
    "attention_series_name",
    "clean_series",
    "detect_run",
    "dip_margin",
    "filter_co_occurring",
    "find_attention_spikes",
    "find_dips",
    "find_spikes",
    "gradient_series_order",
    "layer_grad_norms",
    "layer_series_name",
    "score_spikes",
    "select_first_layer",
    "select_last_block",
    "spike_preset",
]

LOSS = "loss"
GRAD_NORM = "grad_norm"
TOKEN_GRAD_NORM = "token_grad_norm"
PATCH_EMBED = "patch_embed"
# Layer groups after the last block, measured as extra lag targets besides the last block.
HEAD_LAYERS = ("norm", "projector", "predictor", "prototypes")
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
    co_occurrence: CoOccurrenceParams = field(default_factory=CoOccurrenceParams)
    lag: LagParams = field(default_factory=LagParams)
    attribution: AttributionParams = field(default_factory=AttributionParams)
    sanity: SanityParams = field(default_factory=SanityParams)

    def to_dict(self) -> dict[str, Any]:
        return {
            "grad_spikes": self.grad_spikes.to_dict(),
            "loss_spikes": self.loss_spikes.to_dict(),
            "dips": self.dips.to_dict(),
            "co_occurrence": self.co_occurrence.to_dict(),
            "lag": self.lag.to_dict(),
            "attribution": self.attribution.to_dict(),
            "sanity": self.sanity.to_dict(),
        }


@dataclass
class RunEvents:
    """Events detected in one run.

    ``first_layer`` is the key in ``spikes`` of the first-layer gradient signal:
    ``grad_norm[patch_embed]`` when the patch projection has a gradient, otherwise
    ``token_grad_norm``, which exists in both arms. ``last_layer`` is the key of the last
    transformer block's gradient norm, or None when the run has no ``blocks.NN`` group.

    ``lag`` runs from the first layer to the last block (None without a last block), and
    ``head_lags`` from the first layer to each of :data:`HEAD_LAYERS` that the run has.
    ``attributions`` has one entry per dip, in the order of ``dips``.
    ``planted_faults`` has one entry per fault planted with ``--inject-spike`` or
    ``--lr-spike``, matched to ``spikes`` as :mod:`stabilitylab.detect.faults` describes.
    ``dense_dips`` are the dips of the dense kNN monitor's top-1 (the ``dense_knn`` table),
    empty when it did not run; the verdict uses ``dips``, from the validation split.
    ``divergence``, ``skipped_steps`` and ``loss_scale_changes`` are the events that the
    training loop recorded, see :mod:`stabilitylab.detect.training_events`.
    ``attention_spikes`` are the entropy drops and maximum-logit spikes of the attention
    probes by series, empty without probes (:mod:`stabilitylab.detect.attention`).
    """

    run_name: str
    run_path: str
    arm: str
    first_layer: str
    last_layer: str | None
    spikes: dict[str, list[SpikeEvent]]
    dips: list[Dip]
    lag: LagStats | None = None
    head_lags: list[LagStats] = field(default_factory=list)
    attributions: list[DipAttribution] = field(default_factory=list)
    sanity: SanityReport | None = None
    verdict: RunVerdict | None = None
    planted_faults: list[FaultMatch] = field(default_factory=list)
    dense_dips: list[Dip] = field(default_factory=list)
    divergence: Divergence | None = None
    skipped_steps: list[int] = field(default_factory=list)
    loss_scale_changes: list[LossScaleChange] = field(default_factory=list)
    attention_spikes: dict[str, list[SpikeEvent]] = field(default_factory=dict)

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
            "lag": self.lag.to_dict() if self.lag is not None else None,
            "head_lags": [lag.to_dict() for lag in self.head_lags],
            "attributions": [attribution.to_dict() for attribution in self.attributions],
            "sanity": self.sanity.to_dict() if self.sanity is not None else None,
            "verdict": self.verdict.to_dict() if self.verdict is not None else None,
            "planted_faults": [match.to_dict() for match in self.planted_faults],
            "dense_dips": [dip.to_dict() for dip in self.dense_dips],
            "divergence": self.divergence.to_dict() if self.divergence is not None else None,
            "skipped_steps": list(self.skipped_steps),
            "loss_scale_changes": [change.to_dict() for change in self.loss_scale_changes],
            "attention_spikes": {
                series: [event.to_dict() for event in events]
                for series, events in self.attention_spikes.items()
            },
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


def gradient_series_order(layer_names: list[str]) -> list[str]:
    """Return the gradient series keys in the order data flows through the model.

    ``token_grad_norm`` sits just before the first ``blocks.NN`` group, since it is the
    gradient at that block's input, and the total ``grad_norm`` comes last.
    """
    keys = [layer_series_name(name) for name in layer_names]
    first_block = next(
        (position for position, name in enumerate(layer_names) if _BLOCK_NAME.match(name)),
        len(layer_names),
    )
    keys.insert(first_block, TOKEN_GRAD_NORM)
    keys.append(GRAD_NORM)
    return keys


def detect_run(run: Run, params: DetectorParams | None = None) -> RunEvents:
    """Run every detector on ``run``: spikes on the loss, the total and token gradient norms
    and each layer's gradient norm, dips on kNN top-1 accuracy, and the attention events.

    Runs without steps, layers or evaluations give empty event lists.
    """
    params = params or DetectorParams()
    skipped = skipped_steps(run)

    def usable(column: str) -> pd.Series:
        return without_steps(step_series(run, column), skipped)

    spikes = {
        LOSS: find_spikes(usable(LOSS), params.loss_spikes, name=LOSS),
        GRAD_NORM: find_spikes(usable(GRAD_NORM), params.grad_spikes, name=GRAD_NORM),
        TOKEN_GRAD_NORM: find_spikes(
            usable(TOKEN_GRAD_NORM), params.grad_spikes, name=TOKEN_GRAD_NORM
        ),
    }
    layers = {
        layer: without_steps(values, skipped) for layer, values in layer_grad_norms(run).items()
    }
    for layer, values in layers.items():
        key = layer_series_name(layer)
        spikes[key] = find_spikes(values, params.grad_spikes, name=key)
    # The co-occurrence filter compares gradient series only: the loss is kept as found.
    spikes.update(
        filter_co_occurring(
            {series: events for series, events in spikes.items() if series != LOSS},
            params.co_occurrence,
        )
    )
    first_layer, first_values = select_first_layer(run, layers)
    first_values = without_steps(first_values, skipped)
    last_layer, last_values = select_last_block(run, layers)
    dips = find_dips(run.evals, params.dips, column=ACCURACY)
    gradient_spikes = {series: events for series, events in spikes.items() if series != LOSS}
    sanity = check_sanity(run, params.sanity)
    lag = None
    if last_layer is not None:
        lag = lag_statistics(
            first_layer,
            first_values,
            spikes.get(first_layer, []),
            last_layer,
            last_values,
            spikes[last_layer],
            params.lag,
        )
    head_lags = [
        lag_statistics(
            first_layer,
            first_values,
            spikes.get(first_layer, []),
            layer_series_name(head),
            layers[head],
            spikes[layer_series_name(head)],
            params.lag,
        )
        for head in HEAD_LAYERS
        if head in layers and not clean_series(layers[head]).empty
    ]
    verdict = judge_run(run, dips, sanity, params.dips)
    divergence = recorded_divergence(run)
    if divergence is None and verdict.evidence.nonfinite_loss_step is not None:
        divergence = loss_divergence(run, verdict.evidence.nonfinite_loss_step)
    return RunEvents(
        run_name=run.name,
        run_path=str(run.path),
        arm=run.arm,
        first_layer=first_layer,
        last_layer=last_layer,
        spikes=spikes,
        dips=dips,
        lag=lag,
        head_lags=head_lags,
        attributions=attribute_dips(
            dips,
            run.evals,
            gradient_spikes,
            gradient_series_order(list(layers)),
            params.attribution,
        ),
        sanity=sanity,
        verdict=verdict,
        planted_faults=match_planted_faults(
            planted_faults_from_plan(run.derived.get("faults")), spikes, run.steps["step"]
        ).faults,
        dense_dips=find_dips(run.dense_knn, params.dips, column=ACCURACY, successive_noise=True),
        divergence=divergence,
        skipped_steps=skipped,
        loss_scale_changes=loss_scale_changes(run.steps),
        attention_spikes=find_attention_spikes(run.attention, params.grad_spikes),
    )


def _empty_series(name: str) -> pd.Series:
    return pd.Series(dtype="float64", name=name)
