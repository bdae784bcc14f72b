"""Turn drained device buffers and host-side step values into run-directory chunks."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from stabilitylab.monitor.signals import LAYER_SIGNALS, STEP_SIGNALS, TrainingMonitor
from stabilitylab.runs import TABLE_COLUMNS, RunWriter

# Per-step device flags that the tables do not store, see stabilitylab.monitor.signals.
FLAG_SIGNALS = ("skipped", "diverged")


@dataclass
class HostStep:
    """Values of one step that are known on the host without reading the device."""

    step: int
    epoch: float
    lr: float
    momentum: float
    weight_decay: float
    wall_time: float


@dataclass
class FlushResult:
    """Outcome of one flush.

    ``first_nonfinite`` is the first step that diverged, if any: a non-finite loss, or a
    non-finite gradient norm on a step that was applied. ``nonfinite_signal`` names which,
    ``loss`` or ``grad_norm``. ``skipped_steps`` lists the steps of the chunk whose
    optimiser step was skipped, up to ``first_nonfinite``.
    """

    first_nonfinite: HostStep | None
    nonfinite_signal: str | None = None
    skipped_steps: list[int] = field(default_factory=list)


@dataclass
class MetricsRecorder:
    """Collect host-side step values and flush them with the monitor's device buffers.

    ``samples_per_step`` is None when the batch size is unknown, and ``samples_per_s`` is
    then NaN.
    """

    monitor: TrainingMonitor
    writer: RunWriter
    samples_per_step: int | None
    pending: list[HostStep] = field(default_factory=list)
    _chunk_start: float = field(default_factory=time.perf_counter)

    def add(self, host: HostStep) -> None:
        self.pending.append(host)

    @property
    def due(self) -> bool:
        return self.monitor.full

    def flush(self) -> FlushResult | None:
        """Write the pending steps as one chunk of ``steps`` and one of ``layers``."""
        if not self.pending:
            return None
        drained = self.monitor.drain()  # the one device-to-host transfer of this chunk
        elapsed = time.perf_counter() - self._chunk_start
        self._chunk_start = time.perf_counter()
        hosts, self.pending = self.pending, []
        if len(hosts) != drained.steps.shape[0]:
            raise RuntimeError(f"{len(hosts)} host rows but {drained.steps.shape[0]} device rows")
        # Throughput is averaged over the chunk: per-step host timings would only measure
        # kernel launches on an asynchronous device.
        throughput = math.nan
        if self.samples_per_step is not None and elapsed > 0:
            throughput = self.samples_per_step * len(hosts) / elapsed
        device_steps = drained.steps.numpy()
        steps = self._steps_frame(hosts, device_steps, throughput)
        layers = self._layers_frame(hosts, drained.layers.numpy())
        flags = {name: device_steps[:, STEP_SIGNALS.index(name)] > 0 for name in FLAG_SIGNALS}
        bad_rows = np.flatnonzero(flags["diverged"])
        bad = hosts[bad_rows[0]] if len(bad_rows) else None
        kept_rows = len(hosts) if bad is None else int(bad_rows[0]) + 1
        if bad is not None:
            # Steps after the first diverged step trained on broken weights: keep them out.
            steps = steps[steps["step"] <= bad.step]
            layers = layers[layers["step"] <= bad.step]
        self.writer.append("steps", steps)
        self.writer.append("layers", layers)
        skipped = [hosts[row].step for row in np.flatnonzero(flags["skipped"][:kept_rows])]
        return FlushResult(
            first_nonfinite=bad,
            nonfinite_signal=_nonfinite_signal(steps) if bad is not None else None,
            skipped_steps=skipped,
        )

    def _steps_frame(
        self, hosts: list[HostStep], device_rows: np.ndarray, throughput: float
    ) -> pd.DataFrame:
        data: dict[str, object] = {
            "step": np.array([h.step for h in hosts], dtype=np.int64),
            "epoch": [h.epoch for h in hosts],
        }
        signal = {name: device_rows[:, i].astype(np.float64) for i, name in enumerate(STEP_SIGNALS)}
        data["loss"] = signal["loss"]
        data["lr"] = [h.lr for h in hosts]
        data["momentum"] = [h.momentum for h in hosts]
        data["weight_decay"] = [h.weight_decay for h in hosts]
        data["grad_norm"] = signal["grad_norm"]
        data["token_grad_norm"] = signal["token_grad_norm"]
        data["loss_scale"] = signal["loss_scale"]
        data["samples_per_s"] = np.full(len(hosts), throughput)
        data["wall_time"] = [h.wall_time for h in hosts]
        return pd.DataFrame(data, columns=list(TABLE_COLUMNS["steps"]))

    def _layers_frame(self, hosts: list[HostStep], device_rows: np.ndarray) -> pd.DataFrame:
        # device_rows: (R, G, 3) -> long format with R * G rows, layer-major within a step.
        num_rows, num_groups, _ = device_rows.shape
        names = self.monitor.group_names
        data: dict[str, object] = {
            "step": np.repeat(np.array([h.step for h in hosts], dtype=np.int64), num_groups),
            "layer": pd.Categorical(
                np.tile(np.array(names, dtype=object), num_rows), categories=names
            ),
        }
        flat = device_rows.reshape(num_rows * num_groups, len(LAYER_SIGNALS)).astype(np.float64)
        for i, name in enumerate(LAYER_SIGNALS):
            data[name] = flat[:, i]
        return pd.DataFrame(data, columns=list(TABLE_COLUMNS["layers"]))


def _nonfinite_signal(steps: pd.DataFrame) -> str:
    """Return ``loss`` or ``grad_norm``: what is non-finite in the last row of ``steps``."""
    return "loss" if not np.isfinite(steps["loss"].iloc[-1]) else "grad_norm"
