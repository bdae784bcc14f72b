"""Benchmark: recall, precision and false alarms of the spike detectors on planted faults.

Run: python benchmarks/planted_faults.py [--quick] [--out DIR] [--jobs N]

It trains digits runs with the product's defaults, shortened and with sparse kNN evaluations,
because spikes do not need the accuracy curve:

- healthy runs, several seeds, each with a learned and a frozen patch projection;
- faulted runs of the same kind, each with several planted faults. Their steps are random,
  after the detector's warm-in and at least ``MIN_GAP`` steps apart so that follow-on
  windows do not overlap. Each fault is an lr fault with probability ``LR_SHARE`` and
  otherwise a gradient fault in a random trainable layer group. Factors are log-uniform, 2 to
  100 for gradients and 2 to 50 for the lr. One seeded generator draws every fault, so a
  seed gives the same plan every time.

The thresholds are calibrated on the healthy runs of the first half of the seeds, and the
false-alarm rate is measured on the other half. Recall, precision and lag error are
measured on the faulted runs for the default detector parameters and for the calibrated
ones, with faults matched as :mod:`stabilitylab.detect.faults` describes.

Precision counts each found fault once and each false alarm once:
found / (found + false alarms), on the faulted runs. The run directories stay in
``DIR/runs``, and a finished run whose configuration matches the plan is reused, so a second
invocation only repeats the analysis. Results go to ``DIR/planted_faults.json`` and
``DIR/planted_faults.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stabilitylab.config import build_config
from stabilitylab.detect import DetectorParams, RunEvents, detect_run
from stabilitylab.detect.calibrate import calibrated_params, rate_per_1000
from stabilitylab.detect.faults import (
    GRADIENT_FAULT,
    FaultMatch,
    FaultMatchParams,
    match_planted_faults,
    planted_faults_from_plan,
)
from stabilitylab.detect.spikes import RULES
from stabilitylab.errors import TrainingError
from stabilitylab.models.layers import vit_layer_groups
from stabilitylab.runs import Run, read_run

log = logging.getLogger("planted_faults")

# The robust rule flags nothing in the first 2 * min_periods = 40 values, and faults start
# 20 steps later so that every rule has a settled baseline.
FIRST_FAULT_STEP = 60
# 1,347 training digits in batches of 256, the last partial batch dropped.
STEPS_PER_EPOCH = 5
# Follow-on window (25 steps) plus the gradient tolerance (2 steps) plus a margin.
MIN_GAP = 32
LR_SHARE = 0.25
GRADIENT_FACTORS = (2.0, 100.0)
LR_FACTORS = (2.0, 50.0)
# Factor buckets of the recall table: below the split and at or above it.
FACTOR_SPLIT = 10.0
# z thresholds of the default rule evaluated besides the default and the calibrated one, to
# show how recall and false alarms trade off.
Z_SWEEP = (2.0, 3.0, 4.0, 5.0, 6.0, 8.0)
TARGET_RECALL = 0.95
TARGET_FALSE_ALARMS = 1.0  # per 1,000 steps


@dataclass(frozen=True)
class Scale:
    """How much the benchmark trains: run length, seeds and faults per run."""

    epochs: int
    healthy_seeds: int
    faulted_seeds: int
    faults_per_run: int
    eval_every: int


FULL = Scale(epochs=60, healthy_seeds=4, faulted_seeds=4, faults_per_run=7, eval_every=50)
QUICK = Scale(epochs=30, healthy_seeds=2, faulted_seeds=1, faults_per_run=3, eval_every=50)


@dataclass(frozen=True)
class RunPlan:
    """One run to train: its folder name, seed, arm and planted faults."""

    name: str
    seed: int
    frozen: bool
    gradient_specs: tuple[str, ...] = ()
    lr_specs: tuple[str, ...] = ()

    @property
    def arm(self) -> str:
        return "frozen" if self.frozen else "learned"


def run_overrides(plan: RunPlan, scale: Scale) -> dict[str, Any]:
    """Return the configuration overrides of one planned run on the digits preset."""
    steps = scale.epochs * STEPS_PER_EPOCH
    return {
        "epochs": scale.epochs,
        "seed": plan.seed,
        "freeze_patch_embed": plan.frozen,
        "eval_every": scale.eval_every,
        "dense_knn_every": 0,
        "checkpoint_every": steps,
        "flush_every": 50,
        "device": "cpu",
        "inject_spikes": plan.gradient_specs,
        "lr_spikes": plan.lr_specs,
    }


def draw_fault_steps(rng: np.random.Generator, count: int, total_steps: int) -> list[int]:
    """Draw ``count`` steps in [FIRST_FAULT_STEP, total_steps - 5] at least MIN_GAP apart.

    The steps are sorted uniform draws from a range shortened by the gaps, each moved up by
    one gap per rank, so neighbours are at least MIN_GAP apart.
    """
    last = total_steps - 5
    slack = last - FIRST_FAULT_STEP - (count - 1) * MIN_GAP
    if slack < 0:
        raise ValueError(f"{count} faults {MIN_GAP} steps apart do not fit in {total_steps} steps")
    offsets = np.sort(rng.choice(slack + 1, size=count, replace=True))
    return [FIRST_FAULT_STEP + int(offset) + rank * MIN_GAP for rank, offset in enumerate(offsets)]


def log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """Draw a factor log-uniformly from [low, high], rounded to 3 significant digits."""
    value = math.exp(rng.uniform(math.log(low), math.log(high)))
    return float(f"{value:.3g}")


def plan_faulted_run(
    rng: np.random.Generator, name: str, seed: int, frozen: bool, scale: Scale
) -> RunPlan:
    layers = vit_layer_groups(build_config("digits").model_spec.depth)
    trainable = [layer for layer in layers if not (frozen and layer == "patch_embed")]
    gradient_specs, lr_specs = [], []
    for step in draw_fault_steps(rng, scale.faults_per_run, scale.epochs * STEPS_PER_EPOCH):
        if rng.random() < LR_SHARE:
            lr_specs.append(f"{step}:{log_uniform(rng, *LR_FACTORS):g}")
        else:
            layer = trainable[int(rng.integers(len(trainable)))]
            gradient_specs.append(f"{step}:{layer}:{log_uniform(rng, *GRADIENT_FACTORS):g}")
    return RunPlan(name, seed, frozen, tuple(gradient_specs), tuple(lr_specs))


def plan_runs(scale: Scale, seed: int) -> tuple[list[RunPlan], list[RunPlan]]:
    """Return the healthy and the faulted runs, both arms for every seed."""
    healthy = [
        RunPlan(f"healthy-s{index}-{arm}", index, arm == "frozen")
        for index in range(scale.healthy_seeds)
        for arm in ("learned", "frozen")
    ]
    rng = np.random.default_rng(seed)
    faulted = [
        plan_faulted_run(rng, f"faulted-s{index}-{arm}", 100 + index, arm == "frozen", scale)
        for index in range(scale.faulted_seeds)
        for arm in ("learned", "frozen")
    ]
    return healthy, faulted


def train_one(job: tuple[RunPlan, Scale, str, int]) -> dict[str, Any]:
    """Train one planned run unless a finished run with the same configuration exists."""
    plan, scale, folder, threads = job
    import torch

    from stabilitylab.train.loop import run_training

    torch.set_num_threads(threads)
    config = build_config("digits", **run_overrides(plan, scale))
    run_dir = Path(folder) / plan.name
    if _finished_with(run_dir, config.to_dict()):
        return {"name": plan.name, "reused": True, "seconds": 0.0, "error": None}
    started = time.perf_counter()
    error = None
    try:
        run_training(config, run_dir, overwrite=True, show_progress=False)
    except TrainingError as failure:
        # A large lr fault can make the loss non-finite; the steps before it still count.
        error = str(failure)
    return {
        "name": plan.name,
        "reused": False,
        "seconds": time.perf_counter() - started,
        "error": error,
    }


def _finished_with(run_dir: Path, config: dict[str, Any]) -> bool:
    try:
        payload = json.loads((run_dir / "config.json").read_text())
        status = json.loads((run_dir / "status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return status.get("state") in ("finished", "failed") and payload.get("config") == json.loads(
        json.dumps(config)
    )


def train_all(
    plans: Sequence[RunPlan], scale: Scale, folder: Path, jobs: int, threads: int
) -> list[dict]:
    """Train every planned run, ``jobs`` at a time, and return one result per run."""
    folder.mkdir(parents=True, exist_ok=True)
    work = [(plan, scale, str(folder), threads) for plan in plans]
    if jobs <= 1:
        return [_log_result(train_one(job)) for job in work]
    # spawn, because forking a process that has started torch's thread pools can hang.
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        return [_log_result(result) for result in pool.imap(train_one, work)]


def _log_result(result: dict[str, Any]) -> dict[str, Any]:
    if result["reused"]:
        log.info("reused the finished run %s", result["name"])
    elif result["error"]:
        log.warning("run %s stopped early: %s", result["name"], result["error"])
    else:
        log.info("trained %s in %.0f s", result["name"], result["seconds"])
    return result


@dataclass(frozen=True)
class FaultRecord:
    """One planted fault of a faulted run, matched with one detector setting."""

    run: str
    arm: str
    match: FaultMatch
    reached: bool  # False when the run stopped before the fault's step


def fault_records(detected: Sequence[tuple[Run, RunEvents]], match_params: FaultMatchParams):
    """Match every fault of the faulted runs; return the records and the false-alarm counts."""
    records: list[FaultRecord] = []
    false_alarms = clear_steps = 0
    for run, events in detected:
        planted = planted_faults_from_plan(run.derived.get("faults"))
        matching = match_planted_faults(planted, events.spikes, run.steps["step"], match_params)
        last_step = int(run.steps["step"].max()) if not run.steps.empty else -1
        records += [
            FaultRecord(run.name, run.arm, match, reached=match.step <= last_step)
            for match in matching.faults
        ]
        false_alarms += len(matching.false_alarms)
        clear_steps += matching.clear_steps
    return records, false_alarms, clear_steps


# Bins of the step offset between a spike and the latest planted fault before it.
OFFSET_BINS = ((-2, 0), (1, 5), (6, 10), (11, 25), (26, 31))


def follow_on_offsets(detected: Sequence[tuple[Run, RunEvents]]) -> dict[str, int]:
    """Count spikes by their offset from the latest fault at most 2 steps after their start.

    Faults are at least MIN_GAP steps apart, so spikes of the last bins would fall outside
    the follow-on window, and few there support its length.
    """
    counts = {f"{low} to {high}": 0 for low, high in OFFSET_BINS}
    counts["later or before the first fault"] = 0
    for run, run_events in detected:
        steps = sorted(fault.step for fault in planted_faults_from_plan(run.derived.get("faults")))
        for events in run_events.spikes.values():
            for event in events:
                earlier = [step for step in steps if step <= event.start_step + 2]
                offset = event.start_step - earlier[-1] if earlier else None
                label = next(
                    (
                        f"{low} to {high}"
                        for low, high in OFFSET_BINS
                        if offset is not None and low <= offset <= high
                    ),
                    "later or before the first fault",
                )
                counts[label] += 1
    return counts


def healthy_alarms(detected: Sequence[tuple[Run, RunEvents]]) -> dict[str, Any]:
    """Count spike events on every series of healthy runs, where each one is a false alarm."""
    gradient = loss = steps = 0
    for run, events in detected:
        loss += len(events.spikes.get("loss", []))
        gradient += sum(len(found) for series, found in events.spikes.items() if series != "loss")
        steps += int(run.steps["step"].nunique())
    return {
        "runs": len(detected),
        "recorded_steps": steps,
        "false_alarms": gradient + loss,
        "gradient_false_alarms": gradient,
        "loss_false_alarms": loss,
        "rate_per_1000": rate_per_1000(gradient + loss, steps),
    }


def recall(records: Sequence[FaultRecord]) -> dict[str, Any]:
    found = sum(record.match.found for record in records)
    return {
        "faults": len(records),
        "found": found,
        "recall": found / len(records) if records else math.nan,
    }


def lag_summary(records: Sequence[FaultRecord]) -> dict[str, Any]:
    lags = [record.match.lag_steps for record in records if record.match.found]
    if not lags:
        return {"found": 0, "mean": math.nan, "min": None, "max": None, "max_abs": None}
    return {
        "found": len(lags),
        "mean": float(np.mean(lags)),
        "min": int(min(lags)),
        "max": int(max(lags)),
        "max_abs": int(max(abs(lag) for lag in lags)),
    }


def bucket(record: FaultRecord) -> str:
    kind = "gradient" if record.match.kind == GRADIENT_FAULT else "lr"
    size = f">= {FACTOR_SPLIT:g}" if record.match.factor >= FACTOR_SPLIT else f"< {FACTOR_SPLIT:g}"
    return f"{kind}, factor {size}"


def summarise_faults(records: Sequence[FaultRecord], false_alarms: int, clear_steps: int):
    reached = [record for record in records if record.reached]
    buckets: dict[str, list[FaultRecord]] = {}
    for record in sorted(reached, key=bucket):
        buckets.setdefault(bucket(record), []).append(record)
    layers: dict[str, list[FaultRecord]] = {}
    for record in reached:
        if record.match.kind == GRADIENT_FAULT:
            layers.setdefault(record.match.layer or "", []).append(record)
    found = sum(record.match.found for record in reached)
    return {
        "planted": len(records),
        "not_reached": len(records) - len(reached),
        "overall": recall(reached),
        "by_bucket": {name: recall(group) for name, group in buckets.items()},
        "by_layer": {name: recall(layers[name]) for name in _layer_order(layers)},
        "by_arm": {
            arm: recall([record for record in reached if record.arm == arm])
            for arm in ("learned", "frozen")
        },
        "lag_steps": {
            "all": lag_summary(reached),
            "gradient": lag_summary([r for r in reached if r.match.kind == GRADIENT_FAULT]),
            "lr": lag_summary([r for r in reached if r.match.kind != GRADIENT_FAULT]),
        },
        "false_alarms": false_alarms,
        "clear_steps": clear_steps,
        "false_alarm_rate_per_1000": rate_per_1000(false_alarms, clear_steps),
        "precision": found / (found + false_alarms) if found + false_alarms else math.nan,
        "missed": [
            {"run": record.run, **record.match.to_dict()}
            for record in reached
            if not record.match.found
        ],
    }


def _layer_order(layers: dict[str, list[FaultRecord]]) -> list[str]:
    order = vit_layer_groups(build_config("digits").model_spec.depth)
    return sorted(layers, key=lambda name: order.index(name) if name in order else len(order))


def detector_settings(base: DetectorParams, choices: dict[tuple[str, str], Any]):
    """Return the detector settings to evaluate: the defaults, each preset, each calibration."""
    from stabilitylab.detect.settings import build_detector_params
    from stabilitylab.detect.spikes import SPIKE_PRESETS

    settings = {"default": base}
    for name in SPIKE_PRESETS:
        if name != "robust":  # the robust preset is the default
            settings[f"preset {name}"] = build_detector_params(spike_preset_name=name)
    for rule in RULES:
        gradient, loss = choices[(rule, "gradient")], choices[(rule, "loss")]
        if gradient.met and loss.met:
            settings[f"calibrated {rule}"] = calibrated_params(base, rule, gradient, loss)
    for z in Z_SWEEP:
        if z == base.grad_spikes.z_threshold:
            continue  # the default row has it
        settings[f"{base.grad_spikes.rule} z {z:g}"] = dataclasses.replace(
            base,
            grad_spikes=dataclasses.replace(base.grad_spikes, z_threshold=z),
            loss_spikes=dataclasses.replace(base.loss_spikes, z_threshold=z),
        )
    return settings


def calibrate_choices(runs: Sequence[Run], base: DetectorParams, target: float):
    """Calibrate every rule on both groups; unlike calibrate(), an unmet target is a result."""
    from stabilitylab.detect.calibrate import GROUPS, calibrate_group, run_series

    series = [run_series(run) for run in runs]
    return {
        (rule, group): calibrate_group(series, base, rule, group, target)
        for rule in RULES
        for group in GROUPS
    }


def machine_info(jobs: int, threads: int) -> dict[str, Any]:
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "jobs": jobs,
        "torch_threads_per_job": threads,
        "gpu": torch.cuda.is_available(),
    }


def evaluate(
    settings: dict[str, DetectorParams],
    healthy_test: Sequence[Run],
    faulted: Sequence[Run],
    match_params: FaultMatchParams,
) -> dict[str, Any]:
    results = {}
    for name, params in settings.items():
        log.info("evaluating %s", name)
        healthy_events = [(run, detect_run(run, params)) for run in healthy_test]
        faulted_events = [(run, detect_run(run, params)) for run in faulted]
        records, false_alarms, clear = fault_records(faulted_events, match_params)
        results[name] = {
            "grad_z_threshold": params.grad_spikes.z_threshold,
            "loss_z_threshold": params.loss_spikes.z_threshold,
            "rule": params.grad_spikes.rule,
            "params": params.to_dict(),
            "healthy_test": healthy_alarms(healthy_events),
            "faulted": summarise_faults(records, false_alarms, clear),
            "spike_offsets_from_fault": follow_on_offsets(faulted_events),
        }
        results[name]["targets_met"] = targets_met(results[name])
    return results


def targets_met(result: dict[str, Any]) -> dict[str, Any]:
    strong = result["faulted"]["by_bucket"].get(f"gradient, factor >= {FACTOR_SPLIT:g}")
    strong_recall = strong["recall"] if strong else math.nan
    rate = result["healthy_test"]["rate_per_1000"]
    return {
        "gradient_recall_at_10": strong_recall,
        "recall_ok": bool(strong_recall >= TARGET_RECALL),
        "healthy_rate_per_1000": rate,
        "false_alarms_ok": bool(rate <= TARGET_FALSE_ALARMS),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a few-minute smoke version: fewer, shorter runs"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/benchmarks/planted_faults"),
        help="folder for the run directories and the results (default: %(default)s)",
    )
    parser.add_argument(
        "--jobs", type=int, default=2, help="runs trained at once (default: %(default)s)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per run (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the fault plan (default: %(default)s)"
    )
    parser.add_argument(
        "--target",
        type=float,
        default=0.5,
        help="calibration target, false alarms per 1,000 steps per group (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    scale = QUICK if args.quick else FULL
    started = time.perf_counter()
    healthy_plans, faulted_plans = plan_runs(scale, args.seed)
    run_folder = args.out / ("runs-quick" if args.quick else "runs")
    trained = train_all(
        [*healthy_plans, *faulted_plans], scale, run_folder, args.jobs, args.threads
    )
    train_seconds = time.perf_counter() - started

    analysis_started = time.perf_counter()
    runs = {
        plan.name: read_run(run_folder / plan.name) for plan in [*healthy_plans, *faulted_plans]
    }
    split = max(1, scale.healthy_seeds // 2)
    calibration_runs = [runs[plan.name] for plan in healthy_plans if plan.seed < split]
    test_runs = [runs[plan.name] for plan in healthy_plans if plan.seed >= split]
    faulted_runs = [runs[plan.name] for plan in faulted_plans]
    base = DetectorParams()
    choices = calibrate_choices(calibration_runs, base, args.target)
    settings = detector_settings(base, choices)
    match_params = FaultMatchParams()
    results = evaluate(settings, test_runs, faulted_runs, match_params)
    analysis_seconds = time.perf_counter() - analysis_started

    payload = {
        "command": "python benchmarks/planted_faults.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "scale": dataclasses.asdict(scale),
        "plan": {
            "seed": args.seed,
            "first_fault_step": FIRST_FAULT_STEP,
            "min_gap_steps": MIN_GAP,
            "lr_share": LR_SHARE,
            "gradient_factors": GRADIENT_FACTORS,
            "lr_factors": LR_FACTORS,
        },
        "machine": machine_info(args.jobs, args.threads),
        "seconds": {
            "train": train_seconds,
            "analysis": analysis_seconds,
            "total": time.perf_counter() - started,
        },
        "training": trained,
        "runs": {
            "calibration": [run.name for run in calibration_runs],
            "healthy_test": [run.name for run in test_runs],
            "faulted": [
                {
                    "name": plan.name,
                    "gradient_spikes": plan.gradient_specs,
                    "lr_spikes": plan.lr_specs,
                }
                for plan in faulted_plans
            ],
        },
        "match_params": match_params.to_dict(),
        "calibration": {
            "target_rate_per_1000": args.target,
            "recorded_steps": sum(int(run.steps["step"].nunique()) for run in calibration_runs),
            "choices": [choice.to_dict() for choice in choices.values()],
        },
        "targets": {
            "gradient_recall_at_10": TARGET_RECALL,
            "false_alarms_per_1000": TARGET_FALSE_ALARMS,
        },
        "settings": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "planted_faults_quick" if args.quick else "planted_faults"
    json_path = args.out / f"{stem}.json"
    json_path.write_text(
        json.dumps(_strict(payload), indent=2, default=_json_default, allow_nan=False) + "\n"
    )
    markdown_path = args.out / f"{stem}.md"
    markdown_path.write_text(render_markdown(payload))
    print(markdown_path.read_text())
    print(f"results written to {json_path} and {markdown_path}")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _strict(value: Any) -> Any:
    """Return ``value`` with NaN and infinite floats replaced by None, for strict JSON."""
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _cell(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _recall_cell(entry: dict[str, Any] | None) -> str:
    if not entry or not entry["faults"]:
        return "n/a"
    return f"{entry['recall']:.2f} ({entry['found']}/{entry['faults']})"


def render_markdown(payload: dict[str, Any]) -> str:
    """Render the results as Markdown: calibration, one summary row per setting, details."""
    settings = payload["settings"]
    machine = payload["machine"]
    lines = [
        "# Planted-fault benchmark",
        "",
        f"`{payload['command']}`",
        "",
        f"Machine: {machine['cpu']}, {machine['cpus']} CPUs, torch {machine['torch']}, "
        f"{machine['jobs']} runs at once with {machine['torch_threads_per_job']} torch threads "
        f"each. Training {payload['seconds']['train']:.0f} s ({_trained_text(payload)}), "
        f"analysis {payload['seconds']['analysis']:.0f} s.",
        "",
    ]
    lines += _calibration_table(payload)
    buckets = sorted(
        {name for result in settings.values() for name in result["faulted"]["by_bucket"]}
    )
    lines += [
        "",
        "## Results",
        "",
        f"Recall is found / planted faults. Healthy false alarms are spike events on any series "
        f"per 1,000 steps of the {len(payload['runs']['healthy_test'])} held-out healthy runs. "
        "Precision is found / (found + false alarms) on the faulted runs. Lag is the detected "
        "start minus the planted step.",
        "",
        _row(
            [
                "setting",
                "grad z",
                "loss z",
                "recall",
                *[f"recall {b}" for b in buckets],
                *RESULT_COLUMNS,
            ]
        ),
        _row(["---"] * (4 + len(buckets) + len(RESULT_COLUMNS))),
    ]
    lines += [_result_row(name, result, buckets) for name, result in settings.items()]
    lines += _layer_table(settings)
    lines += _offset_table(settings)
    lines += _missed_list(settings)
    return "\n".join(lines) + "\n"


def _trained_text(payload: dict[str, Any]) -> str:
    training = payload["training"]
    reused = sum(result["reused"] for result in training)
    stopped = sum(bool(result["error"]) for result in training)
    return f"{len(training) - reused} runs trained, {reused} reused, {stopped} stopped early"


def _calibration_table(payload: dict[str, Any]) -> list[str]:
    calibration = payload["calibration"]
    lines = [
        "## Calibration",
        "",
        f"Target {calibration['target_rate_per_1000']:g} false alarms per 1,000 steps per "
        f"group, on {len(payload['runs']['calibration'])} healthy runs "
        f"({calibration['recorded_steps']} steps).",
        "",
        _row(["rule", "group", "z threshold", "false alarms", "per 1,000 steps"]),
        _row(["---"] * 5),
    ]
    for choice in calibration["choices"]:
        z = _cell(choice["z_threshold"]) if choice["met"] else "not met"
        if choice.get("at_grid_minimum"):
            z += " (lowest scanned)"
        cells = [choice["rule"], choice["group"], z, str(choice["false_alarms"])]
        lines.append(_row([*cells, _cell(choice["rate_per_1000"])]))
    return lines


def _offset_table(settings: dict[str, Any]) -> list[str]:
    bins = list(settings["default"]["spike_offsets_from_fault"])
    lines = [
        "",
        "## Spikes on faulted runs by steps after the latest fault",
        "",
        _row(["setting", *bins]),
        _row(["---"] * (len(bins) + 1)),
    ]
    for name, result in settings.items():
        offsets = result["spike_offsets_from_fault"]
        lines.append(_row([name, *[str(offsets[label]) for label in bins]]))
    return lines


RESULT_COLUMNS = (
    "precision",
    "healthy false alarms / 1,000",
    "faulted false alarms / 1,000",
    "lag mean",
    "lag max",
    "targets met",
)


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _result_row(name: str, result: dict[str, Any], buckets: Sequence[str]) -> str:
    faulted = result["faulted"]
    lag = faulted["lag_steps"]["all"]
    met = result["targets_met"]
    cells = [
        name,
        _cell(result["grad_z_threshold"]),
        _cell(result["loss_z_threshold"]),
        _recall_cell(faulted["overall"]),
        *[_recall_cell(faulted["by_bucket"].get(bucket_name)) for bucket_name in buckets],
        _cell(faulted["precision"]),
        _cell(result["healthy_test"]["rate_per_1000"]),
        _cell(faulted["false_alarm_rate_per_1000"]),
        _cell(lag["mean"]),
        _cell(lag["max"]),
        "yes" if met["recall_ok"] and met["false_alarms_ok"] else "no",
    ]
    return _row(cells)


def _layer_table(settings: dict[str, Any]) -> list[str]:
    layers = list(
        dict.fromkeys(
            name for result in settings.values() for name in result["faulted"]["by_layer"]
        )
    )
    lines = [
        "",
        "## Gradient-fault recall by layer group",
        "",
        "| setting | " + " | ".join(layers) + " |",
        "| " + " | ".join("---" for _ in range(len(layers) + 1)) + " |",
    ]
    for name, result in settings.items():
        by_layer = result["faulted"]["by_layer"]
        lines.append(
            f"| {name} | "
            + " | ".join(_recall_cell(by_layer.get(layer)) for layer in layers)
            + " |"
        )
    return lines


def _missed_list(settings: dict[str, Any]) -> list[str]:
    lines = ["", "## Missed faults", ""]
    for name in ("default", *[key for key in settings if key.startswith("calibrated")]):
        if name not in settings:
            continue
        missed = settings[name]["faulted"]["missed"]
        described = ", ".join(
            f"{item['kind']} x{item['factor']:g} at {item['step']}"
            + (f" in {item['layer']}" if item["layer"] else "")
            for item in missed
        )
        lines.append(f"- {name}: {described or 'none'}")
    return lines


if __name__ == "__main__":
    main()
