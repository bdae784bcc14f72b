"""Tests of stabilitylab sweep: the grid, resume, errors, and the sweep report."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_RUN

from stabilitylab import cli
from stabilitylab.detect import detect_run
from stabilitylab.errors import ConfigError, RunDirError
from stabilitylab.report import write_report
from stabilitylab.report.sweep import (
    collect_point_runs,
    final_loss,
    load_report_sweep,
    lr_sensitivity,
    sensitivity_rows,
)
from stabilitylab.runs import TABLE_COLUMNS, RunWriter, read_run
from stabilitylab.sweep import (
    SWEEP_FILE,
    SWEPT_FIELDS,
    build_manifest,
    make_grid,
    plan_sweep,
    read_manifest,
    run_name,
    run_sweep,
    write_manifest,
)

# The tiny run for one epoch, on the digits at their native 8 px (4 patches instead of 16)
# and with a small kNN bank, which about halves the time of a run on a 2-core CPU.
SWEEP_OPTIONS = {
    **TINY_RUN,
    "epochs": 1,
    "img_size": 8,
    "knn_max_bank": 256,
    "knn_max_query": 128,
}
SHARED_OPTIONS = {key: value for key, value in SWEEP_OPTIONS.items() if key != "batch_size"}
BATCH_SIZE = SWEEP_OPTIONS["batch_size"]
STABLE_LR = 3e-3
# The weights overflow in the first steps, so this lr diverges after a few cheap steps.
DIVERGING_LR = 1e30
LRS = (STABLE_LR, DIVERGING_LR)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SWEEP_SECTIONS = (
    "## Sweep\n",
    "## Sweep: accuracy against lr",
    "## Sweep: dips against lr",
    "## Sweep: LR sensitivity",
    "## Sweep: grid points",
)
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def sweep_argv(out: Path) -> list[str]:
    args = ["sweep", "--out", str(out), "--lr", *(repr(lr) for lr in LRS)]
    args += ["--batch-size", str(BATCH_SIZE), "--arms", "both", "--seeds", "0", "--quiet"]
    args += [f"--{key.replace('_', '-')}={value}" for key, value in SHARED_OPTIONS.items()]
    return args


def run_main(argv: list[str]) -> int:
    """Call the CLI in this process, restoring the SIGTERM handler that it installs."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        return cli.main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def tiny_manifest(lrs=LRS, arms="both", seeds=(0,), **changes):
    grid = make_grid(lrs, [BATCH_SIZE], arms, seeds)
    return build_manifest(grid, "digits", {**SHARED_OPTIONS, **changes})


def mtimes(folder: Path) -> dict[str, int]:
    """Return the modification time of each run folder's config.json, keyed by folder name."""
    return {
        child.name: (child / "config.json").stat().st_mtime_ns
        for child in folder.iterdir()
        if (child / "config.json").is_file()
    }


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """A 2 lr x 2 arm x 1 seed sweep, trained through the CLI; the high lr diverges."""
    out = tmp_path_factory.mktemp("sweep") / "grid"
    code = run_main(sweep_argv(out))
    return out, code


@pytest.fixture(scope="module")
def resumed(sweep_dir, tmp_path_factory):
    """A copy of the sweep rerun with the same command after marking one run interrupted.

    The interrupted run is a diverging one, so that training it again takes a few steps.
    """
    original, _ = sweep_dir
    out = tmp_path_factory.mktemp("resumed") / "grid"
    shutil.copytree(original, out)
    interrupted = out / run_name(DIVERGING_LR, BATCH_SIZE, "learned", 0)
    status = json.loads((interrupted / "status.json").read_text())
    (interrupted / "status.json").write_text(json.dumps({**status, "state": "interrupted"}))
    before = mtimes(out)
    code = run_main(sweep_argv(out))
    return out, before, mtimes(out), code


def test_sweep_exit_zero_with_diverged(sweep_dir):
    _, code = sweep_dir
    assert code == 0


def test_sweep_run_folders_named(sweep_dir):
    out, _ = sweep_dir
    expected = {
        "lr0.003-bs64-learned-s0",
        "lr0.003-bs64-frozen-s0",
        "lr1e+30-bs64-learned-s0",
        "lr1e+30-bs64-frozen-s0",
    }
    runs = {child.name for child in out.iterdir() if child.is_dir() and child.name != "report"}
    assert runs == expected


def test_sweep_run_states(sweep_dir):
    out, _ = sweep_dir
    for arm in ("learned", "frozen"):
        stable = read_run(out / run_name(STABLE_LR, BATCH_SIZE, arm, 0))
        diverged = read_run(out / run_name(DIVERGING_LR, BATCH_SIZE, arm, 0))
        assert stable.status["state"] == "finished"
        assert stable.frozen == (arm == "frozen")
        assert diverged.status["state"] == "failed"
        assert diverged.status["reason"] == "non-finite loss"


def test_sweep_manifest_records_grid(sweep_dir):
    out, _ = sweep_dir
    payload = json.loads((out / SWEEP_FILE).read_text())
    assert payload["grid"] == {
        "lr": list(LRS),
        "batch_size": [BATCH_SIZE],
        "arm": ["learned", "frozen"],
        "seed": [0],
    }
    assert payload["options"]["epochs"] == 1
    assert payload["shared_config"]["epochs"] == 1
    assert "lr" not in payload["shared_config"]
    assert len(payload["runs"]) == 4
    assert read_manifest(out) == tiny_manifest()


def test_sweep_report_has_sections(sweep_dir):
    out, _ = sweep_dir
    report = out / "report"
    markdown = (report / "report.md").read_text()
    html = (report / "report.html").read_text()
    for heading in SWEEP_SECTIONS:
        assert heading in markdown
    assert "Sweep: LR sensitivity" in html
    for name in ("sweep_knn_top1.png", "sweep_dips.png"):
        assert (report / name).read_bytes().startswith(PNG_SIGNATURE)
    # The usual comparison report is there as well.
    assert "## Summary" in markdown
    assert (report / "knn_top1.png").is_file()


def test_sweep_report_events_json(sweep_dir):
    out, _ = sweep_dir
    payload = json.loads((out / "report" / "events.json").read_text())
    sweep = payload["sweep"]
    outcomes = {entry["name"]: entry["outcome"] for entry in sweep["runs"]}
    assert outcomes[run_name(STABLE_LR, BATCH_SIZE, "learned", 0)] == "finished"
    assert outcomes[run_name(DIVERGING_LR, BATCH_SIZE, "frozen", 0)] == "diverged"
    assert len(payload["runs"]) == 4
    rows = {row["arm"]: row for row in sweep["lr_sensitivity"]}
    learned = read_run(out / run_name(STABLE_LR, BATCH_SIZE, "learned", 0))
    initial = float(learned.steps["loss"].iloc[0])
    expected = (0.0 + initial - final_loss(learned)) / 2  # the diverged lr counts as initial
    assert rows["learned"]["lr_sensitivity"] == pytest.approx(expected)
    assert rows["learned"]["diverged"] == 1
    assert rows["learned"]["best_lr"] == STABLE_LR


def test_report_command_on_sweep_dir(sweep_dir, tmp_path):
    out, _ = sweep_dir
    folder = write_report([out], tmp_path / "again")
    markdown = (folder / "report.md").read_text()
    for heading in SWEEP_SECTIONS:
        assert heading in markdown
    assert markdown.startswith("# Sweep report: grid, 4 grid points")


def test_resume_exit_zero(resumed):
    *_, code = resumed
    assert code == 0


@pytest.mark.parametrize("arm", ["learned", "frozen"])
def test_resume_skips_finished(resumed, arm):
    _, before, after, _ = resumed
    name = run_name(STABLE_LR, BATCH_SIZE, arm, 0)
    assert after[name] == before[name]


def test_resume_redoes_interrupted(resumed):
    out, before, after, _ = resumed
    name = run_name(DIVERGING_LR, BATCH_SIZE, "learned", 0)
    assert after[name] != before[name]
    assert json.loads((out / name / "status.json").read_text())["state"] == "failed"


def test_resume_redoes_diverged(resumed):
    _, before, after, _ = resumed
    name = run_name(DIVERGING_LR, BATCH_SIZE, "frozen", 0)
    assert after[name] != before[name]


def test_changed_grid_raises(sweep_dir):
    out, _ = sweep_dir
    manifest_text = (out / SWEEP_FILE).read_text()
    with pytest.raises(RunDirError) as raised:
        run_sweep(tiny_manifest(lrs=(STABLE_LR,)), out)
    message = str(raised.value)
    assert "--lr 0.003 1e+30 in sweep.json, 0.003 now" in message
    assert "--overwrite" in message
    assert (out / SWEEP_FILE).read_text() == manifest_text


def test_changed_shared_option_raises(sweep_dir):
    out, _ = sweep_dir
    with pytest.raises(RunDirError, match="epochs 1 in sweep.json, 2 now"):
        run_sweep(tiny_manifest(epochs=2), out)


def test_mismatched_run_folder_raises(tmp_path, tiny_config):
    manifest = tiny_manifest(lrs=(STABLE_LR,), arms="learned")
    point = manifest.points[0]
    folder = tmp_path / point.name
    other = tiny_config(**{**SWEEP_OPTIONS, "lr": 1e-2})
    RunWriter(folder).write_config(other.to_dict(), {}, {})
    with pytest.raises(RunDirError) as raised:
        plan_sweep(manifest, tmp_path)
    assert point.name in str(raised.value)
    assert "lr 0.01 in config.json, 0.003 now" in str(raised.value)


def test_run_of_earlier_version_skipped(tmp_path, tiny_config):
    manifest = tiny_manifest(lrs=(STABLE_LR,), arms="learned")
    point = manifest.points[0]
    recorded = manifest.point_config(point).to_dict()
    del recorded["on_nonfinite"]  # a field added after the run was recorded
    writer = RunWriter(tmp_path / point.name)
    writer.write_config(recorded, {}, {})
    writer.write_status("finished")
    (entry,) = plan_sweep(manifest, tmp_path)
    assert entry.action == "skip"


def test_mismatched_run_folder_overwrite(tmp_path, tiny_config):
    manifest = tiny_manifest(lrs=(STABLE_LR,), arms="learned")
    folder = tmp_path / manifest.points[0].name
    other = tiny_config(**{**SWEEP_OPTIONS, "lr": 1e-2})
    RunWriter(folder).write_config(other.to_dict(), {}, {})
    (entry,) = plan_sweep(manifest, tmp_path, overwrite=True)
    assert entry.action == "retrain"


def test_non_sweep_folder_raises(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="no sweep.json"):
        run_sweep(tiny_manifest(), tmp_path)
    assert not (tmp_path / SWEEP_FILE).exists()


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (
            {"grid": {"lr": ["fast"], "batch_size": [8], "arm": ["learned"], "seed": [0]}},
            "malformed 'grid' entry \\(could not convert string to float: 'fast'\\)",
        ),
        (
            {"grid": {"lr": [0.1], "arm": ["learned"], "seed": [0]}},
            "malformed 'grid' entry \\(no 'batch_size' field\\)",
        ),
        ({"options": None}, "has no 'options' entry"),
    ],
)
def test_damaged_manifest_named(tmp_path, damage, expected):
    payload = {**tiny_manifest().to_dict(), **damage}
    payload = {key: value for key, value in payload.items() if value is not None}
    (tmp_path / SWEEP_FILE).write_text(json.dumps(payload))
    with pytest.raises(RunDirError, match=expected):
        read_manifest(tmp_path)


def test_interrupt_stops_sweep(tmp_path, monkeypatch):
    from stabilitylab.train import loop

    real_run_training = loop.run_training

    def interrupt_frozen(config, out, **kwargs):
        if config.freeze_patch_embed:
            raise KeyboardInterrupt
        return real_run_training(config, out, **kwargs)

    monkeypatch.setattr(loop, "run_training", interrupt_frozen)
    out = tmp_path / "grid"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(tiny_manifest(lrs=(DIVERGING_LR,)), out)
    assert (out / SWEEP_FILE).is_file()
    assert not (out / "report").exists()
    learned = out / run_name(DIVERGING_LR, BATCH_SIZE, "learned", 0)
    assert json.loads((learned / "status.json").read_text())["state"] == "failed"


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (([1e-3, 1e-3], [64], "both", [0]), "--lr value 0.001 is given more than once"),
        (([], [64], "both", [0]), "--lr needs at least one value"),
        (([1e-3], [64], "none", [0]), "--arms 'none' is not one of"),
    ],
)
def test_make_grid_rejects(values, expected):
    with pytest.raises(ConfigError, match=expected):
        make_grid(*values)


def test_cli_swept_fields_match_library():
    assert cli.SWEPT_FIELDS == SWEPT_FIELDS


def test_manifest_rejects_swept_option():
    with pytest.raises(ConfigError, match="seed is set by the sweep grid"):
        build_manifest(make_grid([1e-3], [64], "both", [0]), "digits", {"seed": 3})


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--lr", "1e-3", "0.001"], "--lr value 0.001 is given more than once"),
        (["--lr", "-1"], "--lr -1.0 is invalid"),
        (["--lr", "1e-3", "--batch-size", "64", "5000"], "--batch-size 5000 is larger than"),
        (["--lr", "1e-3", "--freeze-patch-embed"], "unrecognized arguments: --freeze-patch-embed"),
    ],
)
def test_cli_sweep_rejects_bad_value(cli_command, tmp_path, args, expected):
    out = tmp_path / "grid"
    result = subprocess.run(
        [*cli_command, "sweep", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_lr_sensitivity_formula():
    # min(final, initial) - best: (3 - 2), (2 - 2), (5 - 2) for the diverged lr.
    value = lr_sensitivity([5.0, 5.0, 5.0], [3.0, 2.0, math.inf])
    assert value == pytest.approx(4 / 3)


def test_lr_sensitivity_all_diverged():
    assert math.isnan(lr_sensitivity([5.0, 5.0], [math.inf, math.inf]))


# Hand-made sweep: per seed, the final loss at each lr (None: diverged).
HAND_LRS = (1e-3, 1e-2, 1e-1)
HAND_INITIAL = 5.0
HAND_FINAL = {0: (3.0, 2.0, None), 1: (3.5, 2.5, 6.0)}
HAND_STEPS = 100  # the final loss is the mean of the last 5 steps


def write_hand_run(path: Path, final: float | None) -> None:
    """Write a run whose loss starts at HAND_INITIAL and ends at ``final`` for 5 steps."""
    writer = RunWriter(path)
    writer.write_config({"freeze_patch_embed": False, "seed": 0}, {"total_steps": HAND_STEPS}, {})
    steps = HAND_STEPS if final is not None else 10
    loss = np.linspace(HAND_INITIAL, 4.0, steps)
    if final is None:
        loss[-1] = np.nan
    else:
        loss[-5:] = final
        loss[-6] = 100.0  # outside the trailing window, so it must not count
    frame = pd.DataFrame({column: np.ones(steps) for column in TABLE_COLUMNS["steps"]})
    frame["step"] = np.arange(steps)
    frame["loss"] = loss
    writer.append("steps", frame)
    if final is None:
        writer.write_status("failed", step=steps - 1, reason="non-finite loss")
    else:
        writer.write_status("finished", step=steps, total_steps=HAND_STEPS)


@pytest.fixture
def hand_sweep(tmp_path):
    out = tmp_path / "hand"
    manifest = build_manifest(make_grid(HAND_LRS, [64], "learned", [0, 1]), "digits", {})
    out.mkdir()
    write_manifest(out, manifest)
    for point in manifest.points:
        write_hand_run(out / point.name, HAND_FINAL[point.seed][HAND_LRS.index(point.lr)])
    return out


def hand_rows(out: Path):
    sweep = load_report_sweep([out])
    runs = [read_run(path) for path in sweep.run_paths]
    point_runs = collect_point_runs(sweep, runs, [detect_run(run) for run in runs])
    return sensitivity_rows(point_runs, sweep.manifest.grid)


def test_final_loss_trailing_mean(hand_sweep):
    run = read_run(hand_sweep / run_name(1e-3, 64, "learned", 0))
    assert final_loss(run) == pytest.approx(3.0)


def test_final_loss_diverged_is_inf(hand_sweep):
    run = read_run(hand_sweep / run_name(1e-1, 64, "learned", 0))
    assert final_loss(run) == math.inf


def test_hand_sweep_sensitivity(hand_sweep):
    (row,) = hand_rows(hand_sweep)
    # Seed 0: (1 + 0 + 3) / 3. Seed 1: (1 + 0 + 2.5) / 3, its 6.0 is capped at 5.0.
    seed0, seed1 = 4 / 3, 3.5 / 3
    assert row.sensitivity == pytest.approx((seed0 + seed1) / 2)
    assert row.sensitivity_std == pytest.approx(abs(seed0 - seed1) / math.sqrt(2))
    assert row.seeds_used == 2
    assert row.best_final_loss == pytest.approx(2.25)
    assert row.best_lr == 1e-2
    assert row.diverged == 1
    assert row.initial_loss == pytest.approx(HAND_INITIAL)


def test_hand_sweep_missing_run_left_out(hand_sweep):
    shutil.rmtree(hand_sweep / run_name(1e-2, 64, "learned", 1))
    (row,) = hand_rows(hand_sweep)
    assert row.seeds_used == 1
    assert row.seeds_left_out == 1
    assert row.sensitivity == pytest.approx(4 / 3)


def test_hand_sweep_report_table(hand_sweep):
    folder = write_report([hand_sweep])
    assert folder == hand_sweep / "report"
    markdown = (folder / "report.md").read_text()
    assert "| 64 | learned | 2 | 1.2500 |" in markdown
    payload = json.loads((folder / "events.json").read_text())
    assert payload["sweep"]["lr_sensitivity"][0]["lr_sensitivity"] == pytest.approx(1.25)


def test_report_sweep_without_runs_raises(tmp_path):
    write_manifest(tmp_path, build_manifest(make_grid([1e-3], [64], "learned", [0]), "digits", {}))
    with pytest.raises(RunDirError, match="has none of its 1 runs yet"):
        write_report([tmp_path], tmp_path / "report")
