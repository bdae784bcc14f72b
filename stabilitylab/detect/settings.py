"""Detector parameters from a few named settings, as the ``report`` command's options set them."""

from __future__ import annotations

import dataclasses

from stabilitylab.detect import CoOccurrenceParams, DetectorParams, DipParams, spike_preset
from stabilitylab.detect.baselines import WINDOWED_RULES
from stabilitylab.errors import ConfigError


def build_detector_params(
    *,
    spike_preset_name: str = "robust",
    spike_z: float | None = None,
    spike_window: int | None = None,
    persistence: int = 1,
    co_occurrence: int = 1,
    co_window_steps: int = CoOccurrenceParams().window_steps,
    dip_z: float = DipParams().z,
) -> DetectorParams:
    """Build the parameters of every detector from one spike preset and its overrides.

    The preset, ``spike_z``, ``spike_window`` and ``persistence`` apply to the loss and to
    every gradient-norm series alike, but the loss keeps its own ``min_ratio``, because a
    batch-mean loss moves far less than a gradient norm. For a windowed rule, a
    ``spike_window`` smaller than the preset's ``min_periods`` lowers ``min_periods`` to the
    window. None keeps the preset's value. Raises ConfigError for an unknown preset or an
    invalid value.
    """
    check_detector_options(
        spike_z, spike_window, persistence, co_occurrence, co_window_steps, dip_z
    )
    overrides: dict[str, object] = {"persistence": persistence}
    if spike_z is not None:
        overrides["z_threshold"] = spike_z
    grad_spikes = spike_preset(spike_preset_name)
    if spike_window is not None:
        overrides["window"] = spike_window
        if grad_spikes.rule in WINDOWED_RULES:
            overrides["min_periods"] = min(grad_spikes.min_periods, spike_window)
    grad_spikes = dataclasses.replace(grad_spikes, **overrides)
    defaults = DetectorParams()
    loss_spikes = dataclasses.replace(grad_spikes, min_ratio=defaults.loss_spikes.min_ratio)
    return dataclasses.replace(
        defaults,
        grad_spikes=grad_spikes,
        loss_spikes=loss_spikes,
        dips=dataclasses.replace(defaults.dips, z=dip_z),
        co_occurrence=CoOccurrenceParams(min_series=co_occurrence, window_steps=co_window_steps),
    )


def check_detector_options(
    spike_z: float | None,
    spike_window: int | None,
    persistence: int,
    co_occurrence: int,
    co_window_steps: int,
    dip_z: float,
) -> None:
    """Raise ConfigError naming the ``report`` option whose value is out of range."""
    checks = (
        ("--spike-z", spike_z, spike_z is None or spike_z > 0, "a z threshold above 0"),
        (
            "--spike-window",
            spike_window,
            spike_window is None or spike_window >= 2,
            "a window of at least 2 values",
        ),
        ("--persistence", persistence, persistence >= 1, "at least 1 value"),
        ("--co-occurrence", co_occurrence, co_occurrence >= 1, "at least 1 series"),
        ("--co-window", co_window_steps, co_window_steps >= 0, "0 steps or more"),
        ("--dip-z", dip_z, dip_z >= 0, "0 or more standard errors"),
    )
    for option, value, valid, expected in checks:
        if not valid:
            raise ConfigError(f"{option} {value} is invalid: pass {expected}")
