"""Calibration of spike thresholds on healthy runs to a target false-alarm rate.

On runs without instabilities every spike is a false alarm. :func:`calibrate` scans a grid
of z thresholds for each spike rule, separately for the gradient-norm series and the loss.
It picks the smallest z whose false-alarm rate is at or below the target and stays there for
every larger z in the grid. The extra condition matters because the rate
is not strictly monotone in z: a higher threshold masks fewer outliers, which can lift the
baseline enough to split one event into two or to let a later value through.

The rate is spike events on any series of the group per 1,000 recorded steps, pooled over
the runs: a spike seen on three layers at once counts three times. The gradient group is
``grad_norm``, ``token_grad_norm`` and every ``grad_norm[LAYER]``, after the co-occurrence
filter of the base parameters, as :func:`~stabilitylab.detect.detect_run` applies it. When
each group meets the target, events on all series together stay at or below twice the
target, so a target of 0.5 per 1,000 steps keeps the whole detector at or below 1.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stabilitylab.detect import (
    GRAD_NORM,
    LOSS,
    TOKEN_GRAD_NORM,
    DetectorParams,
    SpikeParams,
    find_spikes,
    layer_grad_norms,
    layer_series_name,
)
from stabilitylab.detect import step_series as run_step_series
from stabilitylab.detect.cooccur import CoOccurrenceParams, filter_co_occurring
from stabilitylab.detect.faults import planted_faults_from_plan
from stabilitylab.detect.spikes import RULES
from stabilitylab.errors import ConfigError, DataError
from stabilitylab.runs import Run, read_run

log = logging.getLogger(__name__)

# Leaves headroom under a product target of 1 false alarm per 1,000 steps for the whole
# detector, because the gradient group and the loss each get this rate.
DEFAULT_TARGET_RATE = 0.5
# z thresholds scanned: 2 to 10 in steps of 0.25, where the rules' usual thresholds lie, then
# 11 to 20 in whole steps.
DEFAULT_Z_GRID = tuple(
    float(z) for z in (*np.arange(2.0, 10.0 + 1e-9, 0.25), *np.arange(11.0, 20.0 + 1e-9, 1.0))
)

GRADIENT_GROUP = "gradient"
LOSS_GROUP = "loss"
GROUPS = (GRADIENT_GROUP, LOSS_GROUP)


@dataclass(frozen=True)
class RunSeries:
    """The per-step series of one healthy run that the spike detector reads."""

    name: str
    recorded_steps: int
    gradient: dict[str, pd.Series]
    loss: pd.Series


@dataclass(frozen=True)
class ThresholdChoice:
    """The calibrated threshold of one rule on one group of series.

    ``z_threshold`` is None when no z of the grid meets the target, and then
    ``false_alarms`` and ``rate_per_1000`` are those of the largest z scanned. ``scan``
    lists ``(z, false alarms)`` in increasing z, from the largest z that misses the target
    (when one does) to the largest of the grid.
    """

    rule: str
    group: str
    z_threshold: float | None
    false_alarms: int
    rate_per_1000: float
    scan: tuple[tuple[float, int], ...]

    @property
    def met(self) -> bool:
        return self.z_threshold is not None

    @property
    def at_grid_minimum(self) -> bool:
        """Tell whether the smallest z of the grid was chosen, so an even smaller one may pass.

        Then the target is met by ``min_ratio`` alone, and z does not limit false alarms.
        """
        return self.met and self.z_threshold == min(z for z, _ in self.scan)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "group": self.group,
            "z_threshold": self.z_threshold,
            "met": self.met,
            "at_grid_minimum": self.at_grid_minimum,
            "false_alarms": self.false_alarms,
            "rate_per_1000": self.rate_per_1000,
            "scan": [{"z": z, "false_alarms": count} for z, count in self.scan],
        }


@dataclass(frozen=True)
class Calibration:
    """Calibrated detector parameters and the false-alarm rates behind them.

    ``params`` uses ``rule`` with the calibrated z of each group. ``false_alarms`` and
    ``rate_per_1000`` count spike events on every series with ``params``, the loss included.
    ``choices`` contains every rule and group scanned.
    """

    target_rate: float
    rule: str
    runs: tuple[str, ...]
    recorded_steps: int
    params: DetectorParams
    false_alarms: int
    rate_per_1000: float
    choices: tuple[ThresholdChoice, ...]

    def choice(self, rule: str, group: str) -> ThresholdChoice:
        """Return the choice of one rule and group, raising KeyError when it was not scanned."""
        for choice in self.choices:
            if choice.rule == rule and choice.group == group:
                return choice
        raise KeyError(f"no calibration for rule {rule!r} on the {group} series")

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_rate_per_1000": self.target_rate,
            "rule": self.rule,
            "runs": list(self.runs),
            "recorded_steps": self.recorded_steps,
            "false_alarms": self.false_alarms,
            "rate_per_1000": self.rate_per_1000,
            "choices": [choice.to_dict() for choice in self.choices],
        }


def run_series(run: Run) -> RunSeries:
    """Collect the series of ``run`` that :func:`~stabilitylab.detect.detect_run` scans.

    Raises DataError for a run with planted faults, whose spikes are not false alarms.
    """
    if planted_faults_from_plan(run.derived.get("faults")):
        raise DataError(
            f"run {run.path} has planted faults (--inject-spike or --lr-spike), so its spikes "
            "are not false alarms; calibrate on runs without planted faults"
        )
    gradient = {
        GRAD_NORM: run_step_series(run, GRAD_NORM),
        TOKEN_GRAD_NORM: run_step_series(run, TOKEN_GRAD_NORM),
    }
    for layer, values in layer_grad_norms(run).items():
        gradient[layer_series_name(layer)] = values
    recorded = int(pd.Series(run.steps["step"]).nunique())
    return RunSeries(run.name, recorded, gradient, run_step_series(run, LOSS))


def count_gradient_spikes(
    series: RunSeries, params: SpikeParams, co_occurrence: CoOccurrenceParams
) -> int:
    """Count the spike events on the gradient-norm series of one run."""
    spikes = {
        name: find_spikes(values, params, name=name) for name, values in series.gradient.items()
    }
    filtered = filter_co_occurring(spikes, co_occurrence)
    return sum(len(events) for events in filtered.values())


def count_loss_spikes(series: RunSeries, params: SpikeParams) -> int:
    return len(find_spikes(series.loss, params, name=LOSS))


def rate_per_1000(false_alarms: int, recorded_steps: int) -> float:
    """Return false alarms per 1,000 recorded steps, NaN without steps."""
    if recorded_steps <= 0:
        return math.nan
    return 1000.0 * false_alarms / recorded_steps


def smallest_passing_z(
    scan: Sequence[tuple[float, int]], recorded_steps: int, target_rate: float
) -> float | None:
    """Return the smallest z whose rate, and that of every larger z, is at most the target."""
    passing = None
    for z, count in sorted(scan, reverse=True):
        if rate_per_1000(count, recorded_steps) > target_rate:
            break
        passing = z
    return passing


def calibrate_group(
    series: Sequence[RunSeries],
    base: DetectorParams,
    rule: str,
    group: str,
    target_rate: float,
    z_grid: Sequence[float] = DEFAULT_Z_GRID,
) -> ThresholdChoice:
    """Scan ``z_grid`` for one rule on one group of series and pick the threshold.

    The scan runs from the largest z down and stops at the first z that misses the target,
    because no smaller z can be chosen after it.
    """
    recorded = sum(item.recorded_steps for item in series)
    template = base.grad_spikes if group == GRADIENT_GROUP else base.loss_spikes
    scan = []
    for z in sorted(set(z_grid), reverse=True):
        params = dataclasses.replace(template, rule=rule, z_threshold=float(z))
        if group == GRADIENT_GROUP:
            count = sum(count_gradient_spikes(item, params, base.co_occurrence) for item in series)
        else:
            count = sum(count_loss_spikes(item, params) for item in series)
        scan.insert(0, (float(z), count))
        if rate_per_1000(count, recorded) > target_rate:
            break
    chosen = smallest_passing_z(scan, recorded, target_rate)
    alarms = dict(scan)[chosen] if chosen is not None else scan[-1][1]
    return ThresholdChoice(
        rule=rule,
        group=group,
        z_threshold=chosen,
        false_alarms=alarms,
        rate_per_1000=rate_per_1000(alarms, recorded),
        scan=tuple(scan),
    )


def check_calibration_inputs(
    target_rate: float, rule: str, rules: Sequence[str], z_grid: Sequence[float]
) -> None:
    """Raise ConfigError for a target rate, rule or z grid that cannot be used."""
    if not (math.isfinite(target_rate) and target_rate >= 0):
        raise ConfigError(
            f"invalid target false-alarm rate {target_rate}: expected >= 0 per 1,000 steps"
        )
    for name in (rule, *rules):
        if name not in RULES:
            raise ConfigError(f"invalid spike rule {name!r}: expected one of {', '.join(RULES)}")
    if not z_grid or not all(math.isfinite(z) and z > 0 for z in z_grid):
        raise ConfigError(f"invalid z grid {list(z_grid)}: expected positive finite values")


def calibrate(
    runs: Sequence[Run],
    target_rate: float = DEFAULT_TARGET_RATE,
    *,
    rule: str | None = None,
    rules: Sequence[str] = RULES,
    base: DetectorParams | None = None,
    z_grid: Sequence[float] = DEFAULT_Z_GRID,
) -> Calibration:
    """Calibrate the z threshold of each rule in ``rules`` on healthy ``runs``.

    ``base`` gives every other detector parameter (window, min_ratio, co-occurrence...), and
    ``rule`` the rule of the returned parameters, by default the rule of ``base``. Raises
    DataError when the runs have no steps or planted faults, or when no z of the grid meets
    the target for ``rule``, and ConfigError for an invalid target, rule or grid.
    """
    base = base or DetectorParams()
    rule = rule or base.grad_spikes.rule
    scanned = tuple(dict.fromkeys((rule, *rules)))
    check_calibration_inputs(target_rate, rule, scanned, z_grid)
    series = [run_series(run) for run in runs]
    check_healthy_runs(runs, base)
    recorded = sum(item.recorded_steps for item in series)
    if recorded == 0:
        raise DataError("the runs to calibrate on have no recorded steps; pass finished runs")
    choices = tuple(
        calibrate_group(series, base, name, group, target_rate, z_grid)
        for name in scanned
        for group in GROUPS
    )
    gradient, loss = (_choice(choices, rule, group) for group in GROUPS)
    _check_met(gradient, loss, target_rate, recorded)
    params = calibrated_params(base, rule, gradient, loss)
    alarms = gradient.false_alarms + loss.false_alarms
    log.info(
        "calibrated %s: z %s on gradient norms, z %s on the loss, %.2f false alarms per "
        "1,000 steps over %d steps",
        rule,
        gradient.z_threshold,
        loss.z_threshold,
        rate_per_1000(alarms, recorded),
        recorded,
    )
    return Calibration(
        target_rate=target_rate,
        rule=rule,
        runs=tuple(str(run.path) for run in runs),
        recorded_steps=recorded,
        params=params,
        false_alarms=alarms,
        rate_per_1000=rate_per_1000(alarms, recorded),
        choices=choices,
    )


def calibrated_params(
    base: DetectorParams, rule: str, gradient: ThresholdChoice, loss: ThresholdChoice
) -> DetectorParams:
    """Return ``base`` with ``rule`` and the calibrated z of both groups."""
    return dataclasses.replace(
        base,
        grad_spikes=dataclasses.replace(
            base.grad_spikes, rule=rule, z_threshold=gradient.z_threshold
        ),
        loss_spikes=dataclasses.replace(base.loss_spikes, rule=rule, z_threshold=loss.z_threshold),
    )


def _choice(choices: Sequence[ThresholdChoice], rule: str, group: str) -> ThresholdChoice:
    return next(choice for choice in choices if choice.rule == rule and choice.group == group)


def _check_met(
    gradient: ThresholdChoice, loss: ThresholdChoice, target_rate: float, recorded: int
) -> None:
    for choice, series_text in ((gradient, "gradient-norm series"), (loss, "loss")):
        if choice.met:
            continue
        largest = choice.scan[-1][0]
        raise DataError(
            f"no z threshold up to {largest:g} keeps the {choice.rule} rule's false alarms on "
            f"the {series_text} at or below {target_rate:g} per 1,000 steps: at z {largest:g} the "
            f"rate is {choice.rate_per_1000:.2f} ({choice.false_alarms} spikes in {recorded} "
            "steps); "
            "check the runs for real instabilities or pass a higher --target"
        )


DETECTOR_FILE_NAME = "detectors.json"


def default_output(run_paths: Sequence[str | os.PathLike[str]]) -> Path:
    """Return ``detectors.json`` in the folder that contains the first run directory."""
    return Path(run_paths[0]).resolve().parent / DETECTOR_FILE_NAME


def check_healthy_runs(runs: Sequence[Run], base: DetectorParams) -> None:
    """Raise DataError for a run that failed or has no steps, and warn about short runs.

    A failed run, diverged ones included, is not a healthy run, so its spikes would pull the
    thresholds up. A run shorter than the detector's start-up (``2 * min_periods`` values for
    the robust rule) contributes steps that no threshold can flag, which makes the measured
    false-alarm rate look lower than it is.
    """
    for run in runs:
        state = run.status.get("state")
        if state == "failed":
            raise DataError(
                f"run {run.path} failed ({run.status.get('reason', 'no reason recorded')}); "
                "calibrate on healthy runs only, so leave it out"
            )
        if run.steps.empty:
            raise DataError(f"run {run.path} has no recorded steps; pass runs that trained")
    start_up = base.grad_spikes.start_up
    short = [str(run.path) for run in runs if run.steps["step"].nunique() <= 2 * start_up]
    if short:
        log.warning(
            "%d run(s) have at most %d steps, and the first %d values of each series are never "
            "flagged, so the false-alarm rate rests on few steps: %s",
            len(short),
            2 * start_up,
            start_up,
            ", ".join(short),
        )


def read_runs(run_paths: Sequence[str | os.PathLike[str]]) -> list[Run]:
    """Read each run directory once, in order, even when a path is given twice.

    Raises RunDirError for a missing or unreadable run directory.
    """
    runs: dict[Path, Run] = {}
    for raw in run_paths:
        resolved = Path(raw).resolve()
        if resolved in runs:
            log.warning("run directory %s was given more than once, so it is read once", raw)
            continue
        runs[resolved] = read_run(raw)
    return list(runs.values())


def calibration_summary(result: Calibration) -> str:
    """Return a few lines for a terminal: the chosen thresholds and every rule's result."""
    gradient = result.choice(result.rule, GRADIENT_GROUP)
    loss = result.choice(result.rule, LOSS_GROUP)
    lines = [
        f"calibrated the {result.rule} rule on {len(result.runs)} runs "
        f"({result.recorded_steps} steps): z {gradient.z_threshold:g} on gradient norms, "
        f"z {loss.z_threshold:g} on the loss, {result.rate_per_1000:.2f} false alarms per "
        f"1,000 steps (target {result.target_rate:g} per group)",
        "rule      gradient z  rate    loss z  rate",
    ]
    rules = dict.fromkeys(choice.rule for choice in result.choices)
    for rule in rules:
        cells = []
        for group in GROUPS:
            choice = result.choice(rule, group)
            z = f"{choice.z_threshold:g}" if choice.met else "not met"
            if choice.at_grid_minimum:
                z += "*"
            cells.append(f"{z:>10}  {choice.rate_per_1000:5.2f}")
        lines.append(f"{rule:<9} " + "  ".join(cells))
    if any(choice.at_grid_minimum for choice in result.choices):
        lines.append(
            "* the lowest z scanned: min_ratio alone keeps the false alarms within the target"
        )
    return "\n".join(lines)
