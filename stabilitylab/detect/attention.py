"""Attention series for the spike detector, from the ``attention`` table of the probes.

Per block, two series indexed by the probed step:

- ``attention_entropy[blocks.NN]``: the lowest normalised attention entropy over the block's
  heads, so that one head collapsing shows even when the others do not;
- ``attention_max_logit[blocks.NN]``: the highest maximum attention logit over the heads.

The spike detector flags rises of a positive series on a log scale. An entropy collapse is a
fall, so the detector scores the inverse entropy ``1 / H``, whose log is ``-log H``: a spike
of ratio ``r`` is a fall of the entropy to ``1 / r`` of its trailing baseline. The events
are returned in entropy units: ``peak_value`` is the lowest entropy of the event,
``baseline`` the baseline entropy there, and ``ratio`` is baseline / lowest entropy, the
factor by which the entropy fell. A maximum logit at or below 0 has no log and is left out,
as the detector leaves out non-positive values of any series.

The detector's ``window`` and ``min_periods`` count probes here, not optimiser steps, so
with ``--attention-every 5`` the robust default's start-up of 40 values covers 200 steps.

NOTE: :func:`stabilitylab.detect.detect_run` passes the gradient-norm spike parameters,
which were calibrated on gradient norms; no attention series has been calibrated yet.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from stabilitylab.detect.spikes import SpikeEvent, SpikeParams, find_spikes

ENTROPY = "entropy"
MAX_LOGIT = "max_logit"
# The reduction over the heads of a block for each column of the attention table.
HEAD_REDUCTIONS = {ENTROPY: "min", MAX_LOGIT: "max"}
SERIES_PREFIXES = {ENTROPY: "attention_entropy", MAX_LOGIT: "attention_max_logit"}
# An entropy of exactly 0 (every query on one key) is scored as this value, so that its
# inverse stays finite and the collapse counts instead of being dropped as infinite.
ENTROPY_FLOOR = 1e-9


def attention_series_name(column: str, layer: str) -> str:
    """Return the series key of one block, e.g. ``attention_entropy[blocks.00]``."""
    return f"{SERIES_PREFIXES[column]}[{layer}]"


def attention_layer_series(attention: pd.DataFrame, column: str) -> dict[str, pd.Series]:
    """Return per block the head reduction of ``column`` (``entropy`` or ``max_logit``).

    The entropy is the minimum over the heads and the maximum logit the maximum. Each
    Series is indexed by step and sorted, and blocks follow the order of the table's layers.
    A head recorded twice at one step (a resumed run) keeps its later row.
    """
    if column not in HEAD_REDUCTIONS:
        raise ValueError(f"attention column {column!r} is not one of {', '.join(HEAD_REDUCTIONS)}")
    if attention.empty:
        return {}
    rows = attention.drop_duplicates(["step", "layer", "head"], keep="last")
    layers = list(dict.fromkeys(rows["layer"].astype(str)))
    values = pd.to_numeric(rows[column], errors="coerce").astype("float64")
    frame = pd.DataFrame(
        {
            "layer": rows["layer"].astype(str).to_numpy(),
            "step": rows["step"].to_numpy(dtype="int64"),
            column: values.to_numpy(),
        }
    )
    reduced = frame.groupby(["layer", "step"], sort=True)[column].agg(HEAD_REDUCTIONS[column])
    series = {}
    for layer in layers:
        per_step = reduced.loc[layer]
        series[layer] = pd.Series(
            per_step.to_numpy(), index=per_step.index.to_numpy(dtype="int64"), name=layer
        )
    return series


def find_attention_spikes(
    attention: pd.DataFrame, params: SpikeParams | None = None
) -> dict[str, list[SpikeEvent]]:
    """Detect entropy drops and maximum-logit spikes per block, keyed by series name.

    Entropy events are scored on the inverse entropy and returned in entropy units, see
    the module documentation. Returns an empty dict for a run without attention probes.
    """
    spikes: dict[str, list[SpikeEvent]] = {}
    for layer, entropy in attention_layer_series(attention, ENTROPY).items():
        key = attention_series_name(ENTROPY, layer)
        inverse = 1.0 / np.maximum(entropy, ENTROPY_FLOOR)
        spikes[key] = [_as_entropy(event) for event in find_spikes(inverse, params, name=key)]
    for layer, max_logit in attention_layer_series(attention, MAX_LOGIT).items():
        key = attention_series_name(MAX_LOGIT, layer)
        spikes[key] = find_spikes(max_logit, params, name=key)
    return spikes


def _as_entropy(event: SpikeEvent) -> SpikeEvent:
    """Turn an event on the inverse entropy back into entropy units; the ratio is unchanged."""
    return dataclasses.replace(
        event, peak_value=1.0 / event.peak_value, baseline=1.0 / event.baseline
    )
