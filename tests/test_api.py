"""The public Python API: load_run, load_runs, the event frame, comparisons and sweep frames."""

from __future__ import annotations

import functools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_RUN
from synthetic import evals_frame, layers_frame, log_noise, steps_frame

import stabilitylab
from stabilitylab import (
    ConfigError,
    RunData,
    RunDirError,
    RunSet,
    compare_runs,
    load_run,
    load_runs,
    lr_sensitivity,
    paired_differences,
    paired_summary,
    sweep_table,
)
from stabilitylab.analysis import (
    COMPARE_COLUMNS,
    EVENT_COLUMNS,
    LEAD_COLUMNS,
    SENSITIVITY_COLUMNS,
    SWEEP_COLUMNS,
)
from stabilitylab.detect import DetectorParams, SpikeParams, detect_run
from stabilitylab.detect.params_file import write_detector_file
from stabilitylab.report import write_report
from stabilitylab.runs import TABLE_COLUMNS, Run, RunWriter, read_run
from stabilitylab.sweep import build_manifest, make_grid, run_name, run_sweep

LAYERS = ["patch_embed", "cls_token", "blocks.00", "blocks.01", "norm", "projector", "predictor"]
STEPS = 160
SPIKE_STEP = 100  # patch_embed and token_grad_norm; blocks.01 follows 3 steps later
LAST_BLOCK_SPIKE_STEP = 103
FAULT_STEP = 130  # a planted gradient fault in blocks.00, with its spike
DIP_STEP = 120
RECOVERY_STEP = 159

# The tiny run for one epoch at the digits' native 8 px with a small kNN bank, as in the
# sweep tests. The 1e30 lr diverges within a few steps, so its runs are cheap.
SWEEP_OPTIONS = {
    **{key: value for key, value in TINY_RUN.items() if key != "batch_size"},
    "epochs": 1,
    "img_size": 8,
    "knn_max_bank": 256,
    "knn_max_query": 128,
}
SWEEP_BATCH_SIZE = TINY_RUN["batch_size"]
STABLE_LR = 3e-3
DIVERGING_LR = 1e30


@functools.cache
def train_tiny_sweep(base: Path) -> Path:
    """Train a 2 lr x 2 arm x 1 seed sweep under ``base`` once per session.

    test_notebooks imports this function, so both modules read the same sweep folder.
    """
    out = base / "api-sweep"
    grid = make_grid([STABLE_LR, DIVERGING_LR], [SWEEP_BATCH_SIZE], "both", [0])
    manifest = build_manifest(grid, "digits", SWEEP_OPTIONS)
    run_sweep(manifest, out, report=False, show_progress=False)
    return out


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    return train_tiny_sweep(tmp_path_factory.getbasetemp())


def write_synthetic_run(path: Path, frozen: bool = False, seed: int = 0) -> Path:
    """Write a run with a first-layer spike, a later last-block spike, a dip and a fault."""
    writer = RunWriter(path)
    faults = {"gradient_spikes": [{"step": FAULT_STEP, "layer": "blocks.00", "factor": 20.0}]}
    writer.write_config(
        {"freeze_patch_embed": frozen, "seed": seed, "lr": 1.5e-4, "batch_size": 256},
        {"layers": LAYERS, "lr": 1.5e-4, "total_steps": STEPS, "faults": faults},
        {},
    )
    writer.write_status("finished")
    rng = np.random.default_rng(seed)
    step = np.arange(STEPS)
    writer.append("steps", synthetic_steps(step, rng))
    writer.append("layers", synthetic_layers(step, rng, frozen))
    writer.append("evals", synthetic_evals())
    return path


def synthetic_steps(step: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    token = log_noise(rng, len(step), {SPIKE_STEP: 12.0}, spread=0.05, log_mean=-2.0)
    return steps_frame(
        step,
        loss=2.0 * np.exp(rng.normal(0.0, 0.005, len(step))),
        grad_norm=log_noise(rng, len(step), spread=0.05),
        token_grad_norm=token,
        epoch=step / 40,
        lr=1.5e-4,
        samples_per_s=1000.0,
    )


def synthetic_layers(step: np.ndarray, rng: np.random.Generator, frozen: bool) -> pd.DataFrame:
    planted = {
        "patch_embed": {SPIKE_STEP: 15.0},
        "blocks.01": {LAST_BLOCK_SPIKE_STEP: 9.0},
        "blocks.00": {FAULT_STEP: 20.0},
    }
    grads = {layer: log_noise(rng, len(step), planted.get(layer), spread=0.05) for layer in LAYERS}
    if frozen:
        grads["patch_embed"][:] = np.nan
    weights = {layer: float(position + 1) for position, layer in enumerate(LAYERS)}
    return layers_frame(step, grads, weight_norm=weights)


def synthetic_evals() -> pd.DataFrame:
    return evals_frame(
        [0, 40, 80, DIP_STEP, RECOVERY_STEP],
        [10.0, 40.0, 50.0, 30.0, 51.0],
        epoch=[0.0, 1.0, 2.0, 3.0, 3.975],
    )


@pytest.fixture
def learned_dir(tmp_path) -> Path:
    return write_synthetic_run(tmp_path / "runs" / "learned")


@pytest.fixture
def learned(learned_dir) -> RunData:
    return load_run(learned_dir)


@pytest.fixture
def frozen(tmp_path) -> RunData:
    return load_run(write_synthetic_run(tmp_path / "runs" / "frozen", frozen=True))


def only_row(frame: pd.DataFrame) -> pd.Series:
    assert len(frame) == 1, frame
    return frame.iloc[0]


# load_run and RunData


def test_load_run_extends_run(learned, learned_dir):
    stored = read_run(learned_dir)
    assert isinstance(learned, Run)
    assert learned.name == "learned"
    assert learned.arm == "learned"
    assert learned.label == "learned"
    assert learned.state == "finished"
    assert learned.seed == 0
    assert learned.config == stored.config
    assert learned.derived["layers"] == LAYERS
    pd.testing.assert_frame_equal(learned.steps, stored.steps)
    pd.testing.assert_frame_equal(learned.layers, stored.layers)
    pd.testing.assert_frame_equal(learned.evals, stored.evals)
    assert learned.dense_knn.empty


def test_load_run_accuracy_summary(learned):
    assert learned.final_top1 == 51.0
    assert learned.best_top1 == 51.0
    assert learned.verdict == "recovered dips"
    assert learned.verdict_reasons


def test_load_run_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(RunDirError, match="nowhere does not exist"):
        load_run(missing)


def test_load_run_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="contains no config.json"):
        load_run(tmp_path / "empty")


def test_load_run_sweep_folder(sweep_dir):
    with pytest.raises(RunDirError, match="is a sweep folder") as error:
        load_run(sweep_dir)
    assert "load_runs" in str(error.value)


def test_load_run_detector_file(learned_dir, tmp_path):
    quiet = DetectorParams(grad_spikes=SpikeParams(z_threshold=1000.0))
    path = write_detector_file(tmp_path / "detectors.json", quiet)
    run = load_run(learned_dir, detectors=path)
    assert run.detector_params == quiet
    assert not (run.events["kind"] == "spike").any()


def test_load_run_bad_detector_file(learned_dir, tmp_path):
    with pytest.raises(ConfigError, match="missing.json does not exist"):
        load_run(learned_dir, detectors=tmp_path / "missing.json")


def test_run_data_equality_is_identity(learned_dir):
    first, second = load_run(learned_dir), load_run(learned_dir)
    assert first == first
    assert first != second
    assert len({first, second}) == 2


def test_repr_names_run(learned):
    text = repr(learned)
    assert text.startswith("RunData(name='learned'")
    assert "steps=160" in text


# The events frame


def test_events_columns_and_kinds(learned):
    events = learned.events
    assert list(events.columns) == list(EVENT_COLUMNS)
    assert dict(events.dtypes.astype(str)) == EVENT_COLUMNS
    assert set(events["kind"]) == {"spike", "dip", "gradient_fault"}
    assert events["step"].is_monotonic_increasing


def test_events_one_row_per_detection(learned):
    detection = detect_run(learned)
    spikes = sum(len(events) for events in detection.spikes.values())
    kinds = learned.events["kind"]
    assert (kinds == "spike").sum() == spikes
    assert (kinds == "dip").sum() == len(detection.dips)
    assert (kinds == "gradient_fault").sum() == len(detection.planted_faults)


def test_events_first_layer_spike(learned):
    events = learned.events
    row = only_row(events[events["series"] == "grad_norm[patch_embed]"])
    assert row["layer"] == "patch_embed"
    assert row["step"] == SPIKE_STEP
    assert row["peak_step"] == SPIKE_STEP
    assert row["score"] > 10.0
    assert row["dip_step"] == DIP_STEP
    assert pd.isna(row["depth"])


def test_events_last_block_spike(learned):
    events = learned.events
    row = only_row(events[events["series"] == learned.last_layer])
    assert row["layer"] == "blocks.01"
    assert row["step"] == LAST_BLOCK_SPIKE_STEP
    assert row["dip_step"] == DIP_STEP


def test_events_dip_row(learned):
    row = only_row(learned.events.query("kind == 'dip'"))
    assert row["series"] == "knn_top1"
    assert row["step"] == DIP_STEP
    assert row["peak_step"] == DIP_STEP
    assert row["end_step"] == RECOVERY_STEP
    assert row["depth"] == pytest.approx(20.0)
    assert row["value"] == pytest.approx(30.0)
    assert row["baseline"] == pytest.approx(50.0)
    assert row["score"] > 1.0
    assert bool(row["recovered"]) is True
    assert pd.isna(row["layer"])


def test_events_fault_row(learned):
    events = learned.events
    row = only_row(events.query("kind == 'gradient_fault'"))
    spike = only_row(events[(events["kind"] == "spike") & (events["series"] == row["series"])])
    assert row["series"] == "grad_norm[blocks.00]"
    assert row["layer"] == "blocks.00"
    assert row["step"] == FAULT_STEP
    assert bool(row["found"]) is True
    assert row["factor"] == 20.0
    assert row["lag_steps"] == 0
    assert row["score"] == spike["score"]


def test_events_frozen_first_layer(frozen):
    events = frozen.events
    assert frozen.first_layer == "token_grad_norm"
    assert not (events["series"] == "grad_norm[patch_embed]").any()
    row = only_row(events[events["series"] == "token_grad_norm"])
    assert row["step"] == SPIKE_STEP
    assert pd.isna(row["layer"])


def test_events_empty_run(tmp_path):
    writer = RunWriter(tmp_path / "killed")
    writer.write_config({"freeze_patch_embed": False, "seed": 0}, {"layers": LAYERS}, {})
    run = load_run(tmp_path / "killed")
    assert run.events.empty
    assert list(run.events.columns) == list(EVENT_COLUMNS)
    assert dict(run.events.dtypes.astype(str)) == EVENT_COLUMNS
    assert run.verdict == "undetermined"
    assert run.state == "unknown"


def test_lags_first_to_last_block(learned):
    lags = learned.lags
    first = lags.iloc[0]
    assert first["source"] == "grad_norm[patch_embed]"
    assert first["target"] == "grad_norm[blocks.01]"
    assert first["matched"] == 1
    assert first["median_delay"] == LAST_BLOCK_SPIKE_STEP - SPIKE_STEP
    assert list(lags["target"][1:]) == [f"grad_norm[{name}]" for name in LAYERS[-3:]]


# Wide and long views


def test_layer_frame_wide(learned):
    wide = learned.layer_frame("grad_norm")
    assert wide.shape == (STEPS, len(LAYERS))
    assert list(wide.columns) == LAYERS
    assert wide.index.name == "step"
    long = learned.layers
    expected = long[(long["layer"] == "blocks.01") & (long["step"] == LAST_BLOCK_SPIKE_STEP)]
    assert wide.loc[LAST_BLOCK_SPIKE_STEP, "blocks.01"] == only_row(expected)["grad_norm"]


def test_layer_frame_weight_norm(learned):
    wide = learned.layer_frame("weight_norm")
    assert list(wide.iloc[0]) == [float(position + 1) for position in range(len(LAYERS))]


def test_layer_frame_frozen_patch_embed_nan(frozen):
    wide = frozen.layer_frame()
    assert wide["patch_embed"].isna().all()
    assert wide["blocks.00"].notna().all()


def test_layer_frame_later_record_kept(learned):
    repeated = learned.layers.iloc[[0]].assign(grad_norm=123.0)
    learned.layers = pd.concat([learned.layers, repeated], ignore_index=True)
    wide = learned.layer_frame()
    assert wide.loc[0, "patch_embed"] == 123.0
    assert len(wide) == STEPS


def test_layer_frame_rejects_signal(learned):
    with pytest.raises(ConfigError, match="'loss' is not a column of the layers table"):
        learned.layer_frame("loss")


def test_first_last_frame_learned(learned):
    frame = learned.first_last_frame()
    assert list(frame.columns) == ["step", "position", "series", "grad_norm", "relative"]
    series = frame.groupby("position")["series"].first()
    assert series["first layer"] == "grad_norm[patch_embed]"
    assert series["last block"] == "grad_norm[blocks.01]"
    medians = frame.groupby("position")["relative"].median()
    assert medians.to_numpy() == pytest.approx([1.0, 1.0])


def test_first_last_frame_frozen(frozen):
    frame = frozen.first_last_frame()
    first = frame[frame["position"] == "first layer"]
    assert set(first["series"]) == {"token_grad_norm"}
    assert len(first) == STEPS


# load_runs and RunSet


def test_load_runs_glob_skips_other_folders(learned_dir, tmp_path):
    write_synthetic_run(tmp_path / "runs" / "frozen", frozen=True)
    (tmp_path / "runs" / "report").mkdir()
    runs = load_runs(str(tmp_path / "runs" / "*"))
    assert isinstance(runs, RunSet)
    assert [run.name for run in runs] == ["frozen", "learned"]
    assert runs.sweep is None


def test_load_runs_folder_of_runs(learned_dir):
    runs = load_runs(learned_dir.parent)
    assert [run.name for run in runs] == ["learned"]


def test_load_runs_each_folder_once(learned_dir):
    runs = load_runs([learned_dir, str(learned_dir), learned_dir / ".." / "learned"])
    assert len(runs) == 1


def test_load_runs_empty_glob(tmp_path):
    pattern = str(tmp_path / "nothing-*")
    with pytest.raises(RunDirError, match="matches nothing"):
        load_runs(pattern)


def test_load_runs_glob_without_runs(tmp_path):
    (tmp_path / "notes-a").mkdir()
    with pytest.raises(RunDirError, match="matches 1 paths but no run folder"):
        load_runs(str(tmp_path / "notes-*"))


def test_load_runs_empty_list():
    with pytest.raises(RunDirError, match="no run folder was given"):
        load_runs([])


def test_load_runs_missing_path(tmp_path):
    with pytest.raises(RunDirError, match="missing does not exist"):
        load_runs([tmp_path / "missing"])


def test_load_runs_folder_without_runs(tmp_path):
    (tmp_path / "plain" / "child").mkdir(parents=True)
    with pytest.raises(RunDirError, match="no subfolder of it is a run"):
        load_runs(tmp_path / "plain")


def test_run_set_table_stacks_runs(learned_dir, tmp_path):
    write_synthetic_run(tmp_path / "runs" / "frozen", frozen=True)
    runs = load_runs(tmp_path / "runs")
    evals = runs.table("evals")
    assert list(evals.columns[:5]) == ["run", "arm", "seed", "run_lr", "run_batch_size"]
    assert list(evals.columns[5:]) == list(runs[0].evals.columns)
    assert len(evals) == 2 * len(synthetic_evals())
    assert set(evals["run"]) == {"frozen", "learned"}
    events = runs.table("events")
    assert len(events) == sum(len(run.events) for run in runs)


@pytest.mark.parametrize("name", ["steps", "layers", "evals", "dense_knn", "events"])
def test_run_set_table_every_name(learned_dir, tmp_path, name):
    write_synthetic_run(tmp_path / "runs" / "frozen", frozen=True)
    runs = load_runs(tmp_path / "runs")
    stacked = runs.table(name)
    assert list(stacked.columns[:5]) == list(LEAD_COLUMNS)
    assert list(stacked.columns[5:]) == list(getattr(runs[0], name).columns)
    assert len(stacked) == sum(len(getattr(run, name)) for run in runs)


def test_run_set_table_steps_keeps_step_lr(learned_dir, tmp_path):
    write_synthetic_run(tmp_path / "runs" / "frozen", frozen=True)
    steps = load_runs(tmp_path / "runs").table("steps")
    assert (steps["run_lr"] == 1.5e-4).all()
    assert (steps["run_batch_size"] == 256).all()
    assert steps["lr"].tolist() == [1.5e-4] * (2 * STEPS)


def test_run_set_table_lead_names_not_in_tables():
    for columns in [*TABLE_COLUMNS.values(), EVENT_COLUMNS]:
        assert not set(LEAD_COLUMNS) & set(columns)


def test_run_set_table_rejects_name(learned_dir):
    with pytest.raises(ConfigError, match="'config' is not a run table"):
        load_runs(learned_dir).table("config")


def test_compare_runs_synthetic(learned, frozen):
    frame = compare_runs([learned, frozen])
    assert list(frame.columns) == list(COMPARE_COLUMNS)
    row = frame.set_index("arm").loc["learned"]
    assert row["dips"] == 1
    assert row["deepest_dip"] == pytest.approx(20.0)
    assert row["first_layer_spikes"] == 1
    assert row["median_delay"] == LAST_BLOCK_SPIKE_STEP - SPIKE_STEP
    assert row["verdict"] == "recovered dips"
    assert math.isnan(row["hidden_cost_final"])


# Real runs: a tiny sweep


def test_load_runs_sweep_in_grid_order(sweep_dir):
    runs = load_runs(sweep_dir)
    names = [
        run_name(lr, SWEEP_BATCH_SIZE, arm, 0)
        for lr in (STABLE_LR, DIVERGING_LR)
        for arm in ("learned", "frozen")
    ]
    assert [run.name for run in runs] == names
    assert runs.sweep is not None
    assert runs.sweep.missing == []


def test_compare_runs_sweep(sweep_dir):
    frame = compare_runs(sweep_dir)
    assert len(frame) == 4
    by_name = frame.set_index("name")
    stable = by_name.loc[run_name(STABLE_LR, SWEEP_BATCH_SIZE, "learned", 0)]
    diverged = by_name.loc[run_name(DIVERGING_LR, SWEEP_BATCH_SIZE, "frozen", 0)]
    assert stable["state"] == "finished"
    assert stable["steps"] == stable["total_steps"]
    assert stable["lr"] == STABLE_LR
    assert stable["peak_lr"] == pytest.approx(STABLE_LR * SWEEP_BATCH_SIZE / 256)
    assert 0.0 < stable["final_top1"] <= 100.0
    assert diverged["state"] == "failed"
    assert diverged["verdict"] == "diverged"
    assert diverged["arm"] == "frozen"


def test_paired_differences_sweep(sweep_dir):
    runs = load_runs(sweep_dir)
    pairs = paired_differences(runs)
    compared = compare_runs(runs).set_index("run")
    assert len(pairs) == 2
    assert list(pairs["seed"]) == [0, 0]
    assert pairs.attrs["unpaired"] == []
    for _, pair in pairs.iterrows():
        expected = (
            compared.loc[pair["frozen"], "final_top1"] - compared.loc[pair["learned"], "final_top1"]
        )
        assert pair["final_top1_diff"] == pytest.approx(expected)


def test_paired_summary_sweep(sweep_dir):
    runs = load_runs(sweep_dir)
    pairs = paired_differences(runs)
    summary = paired_summary(runs).set_index("quantity")
    assert summary.loc["best_top1", "n"] == 2
    assert summary.loc["best_top1", "mean"] == pytest.approx(pairs["best_top1_diff"].mean())
    assert summary.loc["best_top1", "low"] <= summary.loc["best_top1", "mean"]


def test_paired_summary_without_pairs(learned):
    summary = paired_summary([learned]).set_index("quantity")
    assert summary.loc["final_top1", "n"] == 0
    assert math.isnan(summary.loc["final_top1", "mean"])


def test_sweep_table_outcomes(sweep_dir):
    table = sweep_table(sweep_dir)
    assert list(table.columns) == list(SWEEP_COLUMNS)
    outcomes = table.set_index(["lr", "arm"])["outcome"]
    assert outcomes[(STABLE_LR, "learned")] == "finished"
    assert outcomes[(DIVERGING_LR, "frozen")] == "diverged"
    diverged = table[table["outcome"] == "diverged"]
    assert np.isinf(diverged["final_loss"]).all()
    assert set(diverged["verdict"]) == {"diverged"}


def test_lr_sensitivity_per_arm(sweep_dir):
    frame = lr_sensitivity(load_runs(sweep_dir))
    assert list(frame.columns) == list(SENSITIVITY_COLUMNS)
    assert list(frame["arm"]) == ["learned", "frozen"]
    assert list(frame["diverged"]) == [1, 1]
    assert list(frame["best_lr"]) == [STABLE_LR, STABLE_LR]
    assert (frame["lr_sensitivity"] > 0).all()


def test_sweep_table_rejects_plain_runs(learned):
    with pytest.raises(RunDirError, match="not read from a sweep folder"):
        sweep_table(RunSet([learned]))


# The package


def test_import_does_not_load_torch():
    code = (
        "import sys, stabilitylab; stabilitylab.load_run; stabilitylab.compare_runs; "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_public_names_resolve():
    for name in stabilitylab.__all__:
        assert getattr(stabilitylab, name) is not None, name
    assert "Monitor" in stabilitylab.__all__


def test_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'load_everything'"):
        stabilitylab.load_everything  # noqa: B018


# Runs without transformer blocks, damaged runs, wrong argument types


def write_resnet_like_run(path: Path) -> Path:
    """Write a run grouped like a ResNet (no blocks.NN) whose token_grad_norm is all NaN."""
    writer = RunWriter(path)
    layers = ["stem", "layer1", "fc"]
    writer.write_config({"seed": 0, "source": "monitor"}, {"layers": layers}, {})
    writer.write_status("finished")
    rng = np.random.default_rng(0)
    step = np.arange(60)
    steps = steps_frame(
        step,
        loss=2.0 * np.exp(rng.normal(0.0, 0.005, len(step))),
        grad_norm=log_noise(rng, len(step), spread=0.05),
        token_grad_norm=np.full(len(step), np.nan),
    )
    grads = {layer: log_noise(rng, len(step), spread=0.05) for layer in layers}
    writer.append("steps", steps)
    writer.append("layers", layers_frame(step, grads))
    return path


def test_lag_reason_without_blocks(tmp_path):
    run = load_run(write_resnet_like_run(tmp_path / "resnet"))
    assert run.lags.empty
    assert "no transformer blocks (blocks.NN)" in run.lag_reason
    assert run.lags.attrs["reason"] == run.lag_reason


def test_first_layer_none_without_signal(tmp_path):
    run = load_run(write_resnet_like_run(tmp_path / "resnet"))
    assert run.first_layer is None
    assert "first-layer signal (token_grad_norm) has no finite" in run.lag_reason
    assert pd.isna(compare_runs([run])["first_layer_spikes"].iloc[0])


def test_lag_reason_none_with_blocks(learned):
    assert learned.lag_reason is None


def test_report_explains_missing_lag(tmp_path):
    run_dir = write_resnet_like_run(tmp_path / "resnet")
    report = write_report([run_dir]) / "report.md"
    text = report.read_text()
    assert "no transformer blocks (blocks.NN) in this run's layer groups" in text
    assert "n/a (no first-layer signal)" in text


def test_load_runs_skips_damaged_found_run(learned_dir, tmp_path, caplog):
    damaged = tmp_path / "runs" / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text("{not json")
    with caplog.at_level("WARNING", logger="stabilitylab.analysis.collection"):
        runs = load_runs(tmp_path / "runs")
    assert [run.name for run in runs] == ["learned"]
    assert len(runs.skipped) == 1
    assert str(damaged) in runs.skipped[0]
    assert "is skipped" in caplog.text


def test_load_runs_damaged_named_run_raises(tmp_path):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text("{not json")
    with pytest.raises(RunDirError, match="not valid JSON"):
        load_runs([damaged])


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda: load_run(None), "load_run got a NoneType"),
        (lambda: load_run(["a"]), "stabilitylab.load_runs reads several"),
        (lambda: load_runs(None), "load_runs got a NoneType"),
        (lambda: load_runs([1]), "load_runs got a int"),
    ],
)
def test_wrong_argument_types(call, expected):
    with pytest.raises(TypeError, match=re.escape(expected)):
        call()


def test_damaged_derived_layers_ignored(tmp_path, caplog):
    path = write_synthetic_run(tmp_path / "run")
    payload = json.loads((path / "config.json").read_text())
    payload["derived"]["layers"] = "oops"
    (path / "config.json").write_text(json.dumps(payload))
    run = load_run(path)
    assert run.layer_names == LAYERS
    assert any("derived.layers" in warning for warning in run.warnings)


def test_paired_differences_names_lone_run(learned):
    frame = paired_differences([learned])
    assert frame.empty
    assert frame.attrs["unpaired"] == ["learned: no frozen run with seed 0"]


def test_events_training_rows(tmp_path):
    path = write_synthetic_run(tmp_path / "run")
    RunWriter(path).write_status("finished", skipped_steps=[5, 6])
    events = load_run(path).events
    skipped = events[events["kind"] == "skipped_step"]
    assert skipped["step"].tolist() == [5, 6]
    assert skipped["series"].isna().all()
