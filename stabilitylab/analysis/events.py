"""Detector output as tidy DataFrames: one row per event, and one row per lag measurement.

The rows come from :func:`stabilitylab.detect.detect_run`, the same detection that
``stabilitylab report`` writes to ``events.json``; nothing here detects anything itself.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pandas as pd

from stabilitylab.detect import (
    Dip,
    Divergence,
    FaultMatch,
    LagStats,
    LossScaleChange,
    RunEvents,
    SpikeEvent,
)
from stabilitylab.detect.faults import GRADIENT_FAULT

SPIKE = "spike"
DIP = "dip"
DENSE_DIP = "dense_dip"
GRADIENT_FAULT_KIND = "gradient_fault"
LR_FAULT_KIND = "lr_fault"
# Events that the training loop (or the import) recorded, rather than the detectors found.
DIVERGENCE_KIND = "divergence"
SKIPPED_STEP_KIND = "skipped_step"
LOSS_SCALE_KIND = "loss_scale_change"
# Entropy drops and maximum-logit spikes of the attention probes.
ATTENTION_SPIKE = "attention_spike"
EVENT_KINDS = (
    SPIKE,
    DIP,
    DENSE_DIP,
    GRADIENT_FAULT_KIND,
    LR_FAULT_KIND,
    DIVERGENCE_KIND,
    SKIPPED_STEP_KIND,
    LOSS_SCALE_KIND,
    ATTENTION_SPIKE,
)

# Column -> pandas dtype of the events frame. Where an event kind has no such value the cell
# is missing (pandas.isna is true): NaN in text and float columns, pandas.NA in the others.
EVENT_COLUMNS: dict[str, str] = {
    "kind": "object",
    "series": "object",
    "layer": "object",
    "step": "Int64",
    "peak_step": "Int64",
    "end_step": "Int64",
    "duration_steps": "Int64",
    "score": "float64",
    "depth": "float64",
    "value": "float64",
    "baseline": "float64",
    "z": "float64",
    "recovered": "boolean",
    "found": "boolean",
    "factor": "float64",
    "lag_steps": "Int64",
    "dip_step": "Int64",
}

LAG_COLUMNS: dict[str, str] = {
    "source": "object",
    "target": "object",
    "source_spikes": "int64",
    "matched": "int64",
    "median_delay": "float64",
    "mean_delay": "float64",
    "median_delay_low": "float64",
    "median_delay_high": "float64",
    "xcorr_lag": "Int64",
    "xcorr_r": "float64",
    "median_window_lag": "float64",
}

_LAYER_SERIES = re.compile(r"^(?:grad_norm|attention_entropy|attention_max_logit)\[(.+)\]$")


def series_layer(series: str | None) -> str | None:
    """Return the layer group of a ``grad_norm[LAYER]`` or attention series, None for others."""
    if series is None:
        return None
    match = _LAYER_SERIES.match(series)
    return match.group(1) if match else None


def events_frame(run_events: RunEvents) -> pd.DataFrame:
    """Build the tidy frame of one run's events, one row each, sorted by ``step``.

    The rows are the spikes, dips, dense-monitor dips and planted faults, then the recorded
    training events: the divergence, each skipped step and each loss-scale change, then the
    attention events. The columns and their meaning per kind are in docs/api.md.
    """
    dip_of_spike = _attributed_dips(run_events)
    rows: list[dict[str, Any]] = []
    for spikes in run_events.spikes.values():
        rows += [_spike_row(spike, dip_of_spike) for spike in spikes]
    rows += [_dip_row(dip, DIP) for dip in run_events.dips]
    rows += [_dip_row(dip, DENSE_DIP) for dip in run_events.dense_dips]
    rows += [_fault_row(match, run_events) for match in run_events.planted_faults]
    if run_events.divergence is not None:
        rows.append(_divergence_row(run_events.divergence))
    rows += [{"kind": SKIPPED_STEP_KIND, "step": step} for step in run_events.skipped_steps]
    rows += [_loss_scale_row(change) for change in run_events.loss_scale_changes]
    for spikes in run_events.attention_spikes.values():
        rows += [{**_spike_row(spike, {}), "kind": ATTENTION_SPIKE} for spike in spikes]
    frame = pd.DataFrame(rows, columns=list(EVENT_COLUMNS)).astype(EVENT_COLUMNS)
    order = frame["kind"].map({kind: rank for rank, kind in enumerate(EVENT_KINDS)})
    frame = frame.assign(_order=order).sort_values(["step", "_order", "series"], kind="stable")
    return frame.drop(columns="_order").reset_index(drop=True)


def lags_frame(run_events: RunEvents) -> pd.DataFrame:
    """Build one row per lag measurement: first layer to last block, then to each head layer."""
    stats = [run_events.lag] if run_events.lag is not None else []
    rows = [_lag_row(lag) for lag in [*stats, *run_events.head_lags]]
    return pd.DataFrame(rows, columns=list(LAG_COLUMNS)).astype(LAG_COLUMNS)


def _attributed_dips(run_events: RunEvents) -> dict[tuple[str, int], int]:
    """Map each attributed spike, by series and start step, to the start of its first dip."""
    dip_of_spike: dict[tuple[str, int], int] = {}
    for attribution in run_events.attributions:
        for spike in attribution.spikes:
            dip_of_spike.setdefault((spike.series, spike.start_step), attribution.dip_start_step)
    return dip_of_spike


def _spike_row(spike: SpikeEvent, dip_of_spike: dict[tuple[str, int], int]) -> dict[str, Any]:
    return {
        "kind": SPIKE,
        "series": spike.series,
        "layer": series_layer(spike.series),
        "step": spike.start_step,
        "peak_step": spike.peak_step,
        "end_step": spike.end_step,
        "duration_steps": spike.duration_steps,
        "score": spike.ratio,
        "value": spike.peak_value,
        "baseline": spike.baseline,
        "z": spike.z,
        "dip_step": dip_of_spike.get((spike.series, spike.start_step)),
    }


def _dip_row(dip: Dip, kind: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "series": dip.series,
        "step": dip.start_step,
        "peak_step": dip.bottom_step,
        "end_step": dip.recovery_step,
        "duration_steps": dip.duration_steps,
        "score": dip.depth / dip.margin if dip.margin > 0 else math.nan,
        "depth": dip.depth,
        "value": dip.bottom_top1,
        "baseline": dip.peak_top1,
        "recovered": dip.recovered,
    }


def _fault_row(match: FaultMatch, run_events: RunEvents) -> dict[str, Any]:
    matched = _matched_spike(match, run_events)
    return {
        "kind": GRADIENT_FAULT_KIND if match.kind == GRADIENT_FAULT else LR_FAULT_KIND,
        "series": match.series,
        "layer": match.layer,
        "step": match.step,
        "peak_step": match.detected_peak_step,
        "score": matched.ratio if matched is not None else math.nan,
        "found": match.found,
        "factor": match.factor,
        "lag_steps": match.lag_steps,
    }


def _divergence_row(divergence: Divergence) -> dict[str, Any]:
    return {"kind": DIVERGENCE_KIND, "series": divergence.signal, "step": divergence.step}


def _loss_scale_row(change: LossScaleChange) -> dict[str, Any]:
    return {
        "kind": LOSS_SCALE_KIND,
        "series": "loss_scale",
        "step": change.step,
        "value": change.scale,
        "baseline": change.previous_scale,
    }


def _matched_spike(match: FaultMatch, run_events: RunEvents) -> SpikeEvent | None:
    """Return the spike that revealed a planted fault, None for a missed fault."""
    for spike in run_events.spikes_on(match.series):
        if spike.start_step == match.detected_start_step:
            return spike
    return None


def _lag_row(lag: LagStats) -> dict[str, Any]:
    low, high = lag.median_delay_ci
    return {
        "source": lag.source,
        "target": lag.target,
        "source_spikes": lag.source_spikes,
        "matched": lag.matched,
        "median_delay": lag.median_delay,
        "mean_delay": lag.mean_delay,
        "median_delay_low": low,
        "median_delay_high": high,
        "xcorr_lag": lag.xcorr.lag,
        "xcorr_r": lag.xcorr.correlation,
        "median_window_lag": lag.median_window_lag,
    }
