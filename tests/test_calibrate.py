"""Tests of threshold calibration, detector files and the calibrate command."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from synthetic import layers_frame, log_noise, memory_run, steps_frame

from stabilitylab import cli
from stabilitylab.detect import DetectorParams, detect_run
from stabilitylab.detect.calibrate import (
    DEFAULT_TARGET_RATE,
    GRADIENT_GROUP,
    LOSS_GROUP,
    calibrate,
    calibration_summary,
    rate_per_1000,
    smallest_passing_z,
)
from stabilitylab.detect.params_file import (
    detector_params_from_dict,
    read_detector_file,
    write_detector_file,
)
from stabilitylab.errors import ConfigError, DataError
from stabilitylab.runs import Run

STEPS = 600
# A coarser grid than the default keeps the scans short.
Z_GRID = tuple(float(z) for z in (*np.arange(2.0, 10.0, 0.5), *np.arange(10.0, 20.01, 2.0)))
LAYERS = ["patch_embed", "blocks.00", "blocks.01", "projector"]
# A few moderate outliers per series: healthy-run noise that a low threshold flags.
OUTLIER_FACTOR = 2.5


def noise_with_outliers(seed: int, outliers: int, factor: float = OUTLIER_FACTOR) -> np.ndarray:
    """Return log-normal noise with 10 % spread and ``outliers`` values multiplied by factor."""
    rng = np.random.default_rng(seed)
    values = log_noise(rng, STEPS)
    steps = rng.choice(np.arange(100, STEPS), size=outliers, replace=False)
    values[steps] *= factor
    return values


def healthy_run(
    seed: int, outliers: int = 3, name: str = "healthy", plan: dict | None = None
) -> Run:
    step = np.arange(STEPS)
    steps = steps_frame(
        step,
        loss=3.0 * log_noise(seed, STEPS, spread=0.01),
        grad_norm=noise_with_outliers(seed + 1, outliers),
        token_grad_norm=noise_with_outliers(seed + 2, outliers),
    )
    grads = {
        layer: noise_with_outliers(seed + 10 + index, outliers)
        for index, layer in enumerate(LAYERS)
    }
    derived: dict = {"layers": LAYERS}
    if plan is not None:
        derived["faults"] = plan
    return memory_run(
        steps,
        layers_frame(step, grads),
        name=f"{name}-{seed}",
        config={"freeze_patch_embed": False, "model": "vit_micro", "seed": seed},
        derived=derived,
    )


def spike_count(events) -> int:
    return sum(len(series_events) for series_events in events.spikes.values())


@pytest.fixture(scope="module")
def calibration():
    return calibrate(
        [healthy_run(0), healthy_run(100)],
        target_rate=0.5,
        rules=("robust", "mean_std"),
        z_grid=Z_GRID,
    )


def test_calibrate_meets_target(calibration):
    gradient = calibration.choice("robust", GRADIENT_GROUP)
    assert gradient.met
    assert gradient.rate_per_1000 <= 0.5
    assert calibration.recorded_steps == 2 * STEPS


def test_calibrate_picks_smallest_z(calibration):
    gradient = calibration.choice("robust", GRADIENT_GROUP)
    scan = dict(gradient.scan)
    below = max(z for z in Z_GRID if z < gradient.z_threshold)
    assert below in scan
    assert rate_per_1000(scan[below], calibration.recorded_steps) > 0.5
    assert min(scan) == below


def test_calibrate_reports_its_rate(calibration):
    events = [detect_run(run, calibration.params) for run in (healthy_run(0), healthy_run(100))]
    counted = sum(spike_count(run_events) for run_events in events)
    assert calibration.false_alarms == counted
    assert calibration.rate_per_1000 == pytest.approx(1000 * counted / (2 * STEPS))


def test_calibrate_params_use_chosen_z(calibration):
    assert (
        calibration.params.grad_spikes.z_threshold
        == calibration.choice("robust", GRADIENT_GROUP).z_threshold
    )
    assert (
        calibration.params.loss_spikes.z_threshold
        == calibration.choice("robust", LOSS_GROUP).z_threshold
    )
    assert calibration.params.loss_spikes.min_ratio == DetectorParams().loss_spikes.min_ratio


def test_calibrate_scans_every_rule(calibration):
    rules = {(choice.rule, choice.group) for choice in calibration.choices}
    assert ("mean_std", GRADIENT_GROUP) in rules
    assert ("mean_std", LOSS_GROUP) in rules
    assert ("robust", LOSS_GROUP) in rules


def test_calibrate_other_rule_selected():
    result = calibrate([healthy_run(0)], target_rate=1.0, rule="ema", rules=("ema",), z_grid=Z_GRID)
    assert result.params.grad_spikes.rule == "ema"
    assert result.params.loss_spikes.rule == "ema"


def test_calibrate_unmet_target_raises():
    # 1000x outliers have a z far above the grid's largest value of 20.
    run = healthy_run(0, outliers=5)
    run.steps["grad_norm"] = noise_with_outliers(1, 5, factor=1000.0)
    with pytest.raises(DataError, match="no z threshold up to 20 keeps"):
        calibrate([run], target_rate=0.0, rules=("robust",), z_grid=(4.0, 20.0))


def test_calibrate_rejects_planted_faults():
    plan = {"gradient_spikes": [{"step": 300, "layer": "projector", "factor": 20.0}]}
    with pytest.raises(DataError, match="has planted faults"):
        calibrate([healthy_run(0, plan=plan)])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"target_rate": -1.0}, "invalid target false-alarm rate -1.0"),
        ({"rule": "median"}, "invalid spike rule 'median'"),
        ({"z_grid": ()}, "invalid z grid"),
    ],
)
def test_calibrate_invalid_inputs_raise(arguments, message):
    with pytest.raises(ConfigError, match=message):
        calibrate([healthy_run(0)], **arguments)


def test_smallest_passing_z_needs_larger_to_pass():
    scan = [(2.0, 10), (3.0, 0), (4.0, 1), (5.0, 0)]
    assert smallest_passing_z(scan, recorded_steps=1000, target_rate=0.0) == 5.0
    assert smallest_passing_z(scan, recorded_steps=1000, target_rate=1.0) == 3.0
    assert smallest_passing_z([(2.0, 3)], recorded_steps=1000, target_rate=1.0) is None


def test_params_dict_round_trip():
    params = DetectorParams()
    assert detector_params_from_dict(params.to_dict()) == params


def test_params_file_round_trip(tmp_path):
    params = dataclasses.replace(
        DetectorParams(),
        grad_spikes=dataclasses.replace(DetectorParams().grad_spikes, z_threshold=7.25),
    )
    path = write_detector_file(tmp_path / "detectors.json", params, {"note": "test"})
    assert read_detector_file(path) == params
    assert json.loads(path.read_text())["calibration"] == {"note": "test"}


def test_params_file_partial_keeps_defaults(tmp_path):
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"detector_params": {"loss_spikes": {"z_threshold": 4}}}))
    params = read_detector_file(path)
    assert params.loss_spikes.z_threshold == 4.0
    assert params.grad_spikes == DetectorParams().grad_spikes


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "has no 'detector_params' object"),
        ('{"detector_params": {"grad_spike": {}}}', r"unknown keys \['grad_spike'\]"),
        (
            '{"detector_params": {"grad_spikes": {"z_threshold": "high"}}}',
            "detector_params.grad_spikes.z_threshold is 'high', expected a number",
        ),
        (
            '{"detector_params": {"grad_spikes": {"window": 2.5}}}',
            "detector_params.grad_spikes.window is 2.5, expected a whole number",
        ),
        ('{"detector_params": {"grad_spikes": {"z_threshold": -1}}}', "invalid spike z_threshold"),
        (
            '{"detector_params": {"grad_spikes": {"z_threshold": Infinity}}}',
            "z_threshold is inf, expected a finite number",
        ),
        ('{"detector_params": {"dips": {"z": 1e999}}}', "dips.z is inf, expected a finite number"),
        ('{"detector_params": {"dips": 3}}', "detector_params.dips is 3, expected a JSON object"),
        ('{"format_version": 9, "detector_params": {}}', "format_version 9"),
    ],
)
def test_params_file_invalid_raises(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_detector_file(path)


def test_params_file_missing_raises(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_detector_file(tmp_path / "absent.json")


def test_cli_default_target_matches():
    calibrate_parser = cli.build_parser().commands["calibrate"]
    assert calibrate_parser.get_default("target") == DEFAULT_TARGET_RATE


@pytest.fixture(scope="module")
def healthy_tiny_run(tmp_path_factory):
    from conftest import TINY_RUN

    from stabilitylab.config import build_config
    from stabilitylab.train.loop import run_training

    config = build_config("digits", **{**TINY_RUN, "eval_every": 40, "dense_knn_every": 0})
    return run_training(config, tmp_path_factory.mktemp("healthy") / "run").run_dir


def test_cli_calibrate_then_report(healthy_tiny_run, tmp_path, capsys):
    detectors = tmp_path / "detectors.json"
    code = cli.main(["calibrate", str(healthy_tiny_run), "--out", str(detectors), "--quiet"])
    assert code == 0
    assert "calibrated the robust rule on 1 runs" in capsys.readouterr().out
    written = json.loads(detectors.read_text())
    assert written["calibration"]["runs"] == [str(healthy_tiny_run)]
    report = tmp_path / "report"
    code = cli.main(
        ["report", str(healthy_tiny_run), "--out", str(report), "--detectors", str(detectors)]
    )
    assert code == 0
    events = json.loads((report / "events.json").read_text())
    assert events["detector_params"] == written["detector_params"]
    again = tmp_path / "again"
    code = cli.main(
        [
            "report",
            str(healthy_tiny_run),
            "--out",
            str(again),
            "--detectors",
            str(report / "events.json"),
        ]
    )
    assert code == 0
    repeated = json.loads((again / "events.json").read_text())
    assert repeated["detector_params"] == written["detector_params"]


def test_cli_report_missing_detectors(healthy_tiny_run, tmp_path, capsys):
    missing = tmp_path / "absent.json"
    code = cli.main(["report", str(healthy_tiny_run), "--detectors", str(missing), "--quiet"])
    error = capsys.readouterr().err
    assert code == 2
    assert f"detector file {missing} does not exist" in error
    assert len(error.strip().splitlines()) == 1
    assert not (healthy_tiny_run / "report").exists()


def test_cli_report_invalid_detectors(healthy_tiny_run, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"detector_params": {"grad_spikes": {"z_threshold": 0}}}')
    code = cli.main(["report", str(healthy_tiny_run), "--detectors", str(bad), "--quiet"])
    assert code == 2
    assert "invalid spike z_threshold 0.0" in capsys.readouterr().err


def test_cli_detectors_with_option_rejected(healthy_tiny_run, tmp_path, capsys):
    detectors = write_detector_file(tmp_path / "detectors.json", DetectorParams())
    code = cli.main(
        ["report", str(healthy_tiny_run), "--detectors", str(detectors), "--spike-z", "4"]
    )
    assert code == 2
    assert "--spike-z cannot be combined with it" in capsys.readouterr().err


def test_cli_calibrate_rejects_planted_run(tmp_path, capsys):
    from stabilitylab.runs import RunWriter

    writer = RunWriter(tmp_path / "faulted")
    plan = {"gradient_spikes": [{"step": 50, "layer": "norm", "factor": 20.0}], "lr_spikes": []}
    writer.write_config({}, {"faults": plan}, {})
    code = cli.main(["calibrate", str(tmp_path / "faulted"), "--out", str(tmp_path / "d.json")])
    assert code == 2
    assert "has planted faults" in capsys.readouterr().err
    assert not (tmp_path / "d.json").exists()


def test_cli_calibrate_keeps_foreign_file(tmp_path, capsys):
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": true}')
    code = cli.main(["calibrate", str(tmp_path / "run"), "--out", str(foreign)])
    assert code == 2
    assert "already exists and is not a detector file" in capsys.readouterr().err
    assert foreign.read_text() == '{"mine": true}'


def test_calibrate_grid_minimum_flagged():
    # Without outliers no value reaches min_ratio, so even the smallest z has no false alarm.
    run = healthy_run(0, outliers=0)
    result = calibrate([run], target_rate=0.5, rules=("robust",), z_grid=(3.0, 6.0))
    gradient = result.choice("robust", GRADIENT_GROUP)
    assert gradient.z_threshold == 3.0
    assert gradient.at_grid_minimum
    assert "* the lowest z scanned" in calibration_summary(result)


def test_calibrate_not_at_minimum(calibration):
    assert not calibration.choice("robust", GRADIENT_GROUP).at_grid_minimum


def test_calibrate_rejects_failed_run():
    failed = dataclasses.replace(
        healthy_run(5, name="diverged"),
        status={"state": "failed", "reason": "non-finite loss"},
    )
    with pytest.raises(DataError, match="failed .non-finite loss.; calibrate on healthy"):
        calibrate([healthy_run(1), failed])


def test_calibrate_rejects_run_without_steps():
    empty = dataclasses.replace(healthy_run(6, name="empty"), steps=healthy_run(6).steps[:0])
    with pytest.raises(DataError, match="has no recorded steps"):
        calibrate([healthy_run(1), empty])
