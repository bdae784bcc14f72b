"""Planted faults for validating the detectors: gradient and learning-rate spikes.

``--inject-spike STEP:LAYER:FACTOR`` multiplies the gradient of one layer group by FACTOR at
optimiser step STEP, after AMP unscaling and before the monitor measures it, so the step's
update and its recorded gradient norm both carry the fault. ``--lr-spike STEP:FACTOR``
multiplies the learning rate of step STEP. Both options repeat, and the parsed plan is
stored in ``config.json`` under ``derived.faults``.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from stabilitylab.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GradientSpike:
    """Multiply the gradient of ``layer`` by ``factor`` at optimiser step ``step``."""

    step: int
    layer: str
    factor: float


@dataclass(frozen=True)
class LrSpike:
    """Multiply the learning rate of optimiser step ``step`` by ``factor``."""

    step: int
    factor: float


def _parse_step(text: str, option: str, spec: str) -> int:
    try:
        step = int(text)
    except ValueError:
        raise ConfigError(f"{option} {spec!r}: step {text!r} is not a whole number") from None
    if step < 0:
        raise ConfigError(f"{option} {spec!r}: step {step} is invalid, steps count from 0")
    return step


def _parse_factor(text: str, option: str, spec: str) -> float:
    try:
        factor = float(text)
    except ValueError:
        raise ConfigError(f"{option} {spec!r}: factor {text!r} is not a number") from None
    if not (math.isfinite(factor) and factor > 0):
        raise ConfigError(f"{option} {spec!r}: factor {factor} must be positive and finite")
    return factor


def parse_gradient_spike(spec: str) -> GradientSpike:
    """Parse ``STEP:LAYER:FACTOR``, such as ``300:patch_embed:20``."""
    parts = spec.split(":")
    if len(parts) != 3 or not parts[1]:
        raise ConfigError(
            f"--inject-spike {spec!r} is invalid; write STEP:LAYER:FACTOR, such as "
            "300:patch_embed:20"
        )
    option = "--inject-spike"
    return GradientSpike(
        step=_parse_step(parts[0], option, spec),
        layer=parts[1],
        factor=_parse_factor(parts[2], option, spec),
    )


def parse_lr_spike(spec: str) -> LrSpike:
    """Parse ``STEP:FACTOR``, such as ``300:10``."""
    parts = spec.split(":")
    if len(parts) != 2:
        raise ConfigError(f"--lr-spike {spec!r} is invalid; write STEP:FACTOR, such as 300:10")
    return LrSpike(
        step=_parse_step(parts[0], "--lr-spike", spec),
        factor=_parse_factor(parts[1], "--lr-spike", spec),
    )


def check_fault_specs(
    gradient_specs: tuple[str, ...], lr_specs: tuple[str, ...], layers: list[str], frozen: set[str]
) -> None:
    """Raise ConfigError for a malformed spec, an unknown layer or a frozen one."""
    for spec in lr_specs:
        parse_lr_spike(spec)
    for spec in gradient_specs:
        layer = parse_gradient_spike(spec).layer
        if layer not in layers:
            raise ConfigError(
                f"--inject-spike {spec!r}: layer {layer!r} is not a layer group of this model; "
                f"choose one of: {', '.join(layers)}"
            )
        if layer in frozen:
            raise ConfigError(
                f"--inject-spike {spec!r}: layer {layer!r} is frozen in this run, so it has no "
                "gradient to multiply; choose another layer"
            )


def check_fault_steps(
    gradient_specs: tuple[str, ...], lr_specs: tuple[str, ...], total_steps: int
) -> None:
    """Raise ConfigError for a fault planned after the last step of the run."""
    spikes = [*map(parse_gradient_spike, gradient_specs), *map(parse_lr_spike, lr_specs)]
    for spike in spikes:
        if spike.step >= total_steps:
            raise ConfigError(
                f"a fault at step {spike.step} would never happen: the run has {total_steps} "
                f"steps, numbered 0 to {total_steps - 1}"
            )


def warn_undetectable_steps(spikes: list[GradientSpike | LrSpike]) -> None:
    """Warn about faults planted before the default spike detector can flag anything."""
    from stabilitylab.detect.spikes import SpikeParams

    start_up = SpikeParams().start_up
    early = sorted({spike.step for spike in spikes if spike.step < start_up})
    if early:
        log.warning(
            "faults planted at step %s fall in the first %d steps, which the default spike "
            "detector never flags (its baseline needs that much history), so the report will "
            "count them as missed; plant them at step %d or later to test detection",
            ", ".join(map(str, early)),
            start_up,
            start_up,
        )


class FaultPlan:
    """The planted faults of one run, checked against its layer groups and length."""

    def __init__(
        self,
        gradient_specs: tuple[str, ...],
        lr_specs: tuple[str, ...],
        groups: list[tuple[str, list[tuple[str, nn.Parameter]]]],
        total_steps: int,
    ) -> None:
        self.gradient_spikes = [parse_gradient_spike(spec) for spec in gradient_specs]
        self.lr_spikes = [parse_lr_spike(spec) for spec in lr_specs]
        trainable = {name: [p for _, p in members if p.requires_grad] for name, members in groups}
        frozen = {name for name, parameters in trainable.items() if not parameters}
        check_fault_specs(gradient_specs, lr_specs, list(trainable), frozen)
        check_fault_steps(gradient_specs, lr_specs, total_steps)
        warn_undetectable_steps([*self.gradient_spikes, *self.lr_spikes])
        self._by_step: dict[int, list[tuple[list[nn.Parameter], float]]] = defaultdict(list)
        for spike in self.gradient_spikes:
            self._by_step[spike.step].append((trainable[spike.layer], spike.factor))
        self._lr_factor: dict[int, float] = {}
        for spike in self.lr_spikes:
            self._lr_factor[spike.step] = self._lr_factor.get(spike.step, 1.0) * spike.factor

    def lr_factor(self, step: int) -> float:
        return self._lr_factor.get(step, 1.0)

    @torch.no_grad()
    def apply_gradient_spikes(self, step: int) -> None:
        """Multiply the gradients planned for ``step``, skipping parameters without one."""
        for parameters, factor in self._by_step.get(step, ()):
            grads = [p.grad for p in parameters if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, factor)

    def to_dict(self) -> dict[str, Any]:
        return {
            "gradient_spikes": [asdict(spike) for spike in self.gradient_spikes],
            "lr_spikes": [asdict(spike) for spike in self.lr_spikes],
        }
