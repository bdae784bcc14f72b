"""The CLI through a subprocess, as a user runs it: errors, a tiny run, reports, a killed run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_RUN_ARGS

from stabilitylab.train.checkpoint import load_checkpoint

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def run_cli(command, *args, timeout=300):
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "--lr", "-1"], "--lr -1.0 is invalid"),
        (["run", "--batch-size", "0"], "--batch-size 0 is invalid"),
        (["run", "--batch-size", "1"], "need at least 2 images per step"),
        (["run", "--lr", "1e400"], "'1e400' is not a finite number"),
        (["run", "--seed", "99999999999999999999"], "--seed 99999999999999999999 is invalid"),
        (
            ["run", "--data-dir", "/data"],
            "--data-dir '/data' is only read with --dataset imagefolder",
        ),
        (["run", "--img-size", "18"], "--img-size 18 is not divisible by --patch-size 4"),
        (["run", "--preset", "nope"], "invalid choice: 'nope'"),
        (["run", "--model", "vit_huge"], "invalid choice: 'vit_huge'"),
        (["run", "--device", "tpu"], "--device 'tpu' is invalid"),
        (["run", "--batch-size", "5000"], "--batch-size 5000 is larger than the training split"),
        (["run", "--lr", "abc"], "invalid float value: 'abc'"),
        (["run", "--no-such-option", "1"], "unrecognized arguments: --no-such-option"),
        (["run", "--precision", "fp16", "--device", "cpu"], "--precision fp16 needs a CUDA device"),
    ],
)
def test_run_rejects_bad_value(cli_command, tmp_path, args, expected):
    out = tmp_path / "run"
    result = run_cli(cli_command, *args, "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


def test_report_rejects_missing_and_empty_dirs(cli_command, tmp_path):
    missing = run_cli(cli_command, "report", str(tmp_path / "absent"))
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli(cli_command, "report", str(empty))
    assert result.returncode == 2
    assert "contains no config.json" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_run_rejects_existing_out(cli_command, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = run_cli(cli_command, "run", "--out", str(out), "--overwrite")
    assert result.returncode == 2
    assert "not a run directory" in result.stderr
    assert (out / "notes.txt").read_text() == "keep me"


def test_help_explains_options(cli_command):
    result = run_cli(cli_command, "run", "--help")
    assert result.returncode == 0
    for option in (
        "--freeze-patch-embed",
        "--lr",
        "--batch-size",
        "--eval-every",
        "--preset",
        "--device",
        "--inject-spike",
        "--lr-spike",
    ):
        assert option in result.stdout
    assert "per 256 images" in result.stdout
    assert "(digits preset: 0.001)" in result.stdout
    report = run_cli(cli_command, "report", "--help")
    assert report.returncode == 0
    assert "--out" in report.stdout


@pytest.mark.slow
def test_run_then_report_both_arms(cli_command, tmp_path):
    runs = {}
    for arm, extra in (("learned", []), ("frozen", ["--freeze-patch-embed"])):
        out = tmp_path / arm
        result = run_cli(cli_command, "run", "--out", str(out), *TINY_RUN_ARGS, *extra)
        assert result.returncode == 0, result.stderr
        runs[arm] = out

    learned_config = json.loads((runs["learned"] / "config.json").read_text())
    frozen_config = json.loads((runs["frozen"] / "config.json").read_text())
    assert (
        learned_config["derived"]["init_fingerprint"]
        == frozen_config["derived"]["init_fingerprint"]
    )
    assert frozen_config["config"]["freeze_patch_embed"] is True
    assert learned_config["environment"]["torch"]
    assert learned_config["derived"]["total_steps"] == 2 * (1347 // 64)

    check = json.loads((runs["frozen"] / "frozen_check.json").read_text())
    assert check["applies"] is True
    assert check["passed"] is True
    assert len(check["parameters"]) == 4
    assert check["max_abs_diff"] == 0.0

    steps = pd.read_parquet(runs["frozen"] / "steps")
    layers = pd.read_parquet(runs["frozen"] / "layers")
    evals = pd.read_parquet(runs["frozen"] / "evals")
    assert list(steps["step"]) == list(range(42))
    assert steps["token_grad_norm"].gt(0).all()
    assert layers.loc[layers["layer"] == "patch_embed", "grad_norm"].isna().all()
    assert layers.loc[layers["layer"] == "blocks.00", "grad_norm"].gt(0).all()
    assert list(evals["step"]) == [0, 10, 20, 30, 40, 42]
    assert evals["knn_top1"].between(0, 100).all()
    assert evals["feature_std"].between(0, 1).all()
    assert evals["effective_rank"].between(1, 64).all()  # at most the 64-wide embedding
    checkpoint = load_checkpoint(runs["frozen"] / "checkpoint.pt")  # weights_only=True
    assert checkpoint["step"] == 42
    assert "backbone.patch_embed.proj.weight" in checkpoint["model"]
    status = json.loads((runs["frozen"] / "status.json").read_text())
    assert status["state"] == "finished"

    report_dir = tmp_path / "report"
    result = run_cli(
        cli_command, "report", str(runs["learned"]), str(runs["frozen"]), "--out", str(report_dir)
    )
    assert result.returncode == 0, result.stderr
    html = (report_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
    assert "learned" in html
    assert "frozen" in html
    assert (report_dir / "report.md").is_file()
    assert json.loads((report_dir / "events.json").read_text())
    assert len(list(report_dir.glob("*.png"))) >= 4


@pytest.mark.slow
def test_report_after_sigkill(cli_command, tmp_path):
    out = tmp_path / "killed"
    args = [*TINY_RUN_ARGS, "--epochs=20", "--flush-every=4"]
    process = subprocess.Popen(
        [*cli_command, "run", "--out", str(out), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    deadline = time.monotonic() + 240
    try:
        # Wait until a few chunks have been flushed, then kill without warning.
        while time.monotonic() < deadline:
            if len(list(out.glob("steps/part-*.parquet"))) >= 3:
                break
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("no metrics were flushed within the time limit")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert json.loads((out / "status.json").read_text())["state"] == "running"
    # A kill during a write can leave a hidden temporary file, never a damaged chunk.
    assert all(p.name.startswith(".") for p in out.rglob("*.tmp"))
    for chunk in out.glob("*/part-*.parquet"):
        assert len(pd.read_parquet(chunk)) > 0, chunk

    report_dir = tmp_path / "report"
    result = run_cli(cli_command, "report", str(out), "--out", str(report_dir))
    assert result.returncode == 0, result.stderr
    html = (report_dir / "report.html").read_text()
    assert "data:image/png;base64," in html
    assert "running" in html or "incomplete" in html


def test_python_m_entry_point(cli_command):
    result = run_cli(cli_command, "--version")
    assert result.returncode == 0
    assert "stabilitylab" in result.stdout


def test_run_out_below_file_rejected(cli_command, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_cli(cli_command, "run", "--out", str(blocker / "run"))
    assert result.returncode == 2
    assert "cannot be created" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_option_names_subcommand(cli_command, tmp_path):
    result = run_cli(cli_command, "run", "--out", str(tmp_path / "x"), "--bogus", "1")
    assert result.returncode == 2
    assert result.stderr.startswith("stabilitylab run: error: unrecognized arguments: --bogus")


@pytest.mark.slow
def test_sigterm_flushes_and_checkpoints(cli_command, tmp_path):
    out = tmp_path / "terminated"
    process = subprocess.Popen(
        [*cli_command, "run", "--out", str(out), *TINY_RUN_ARGS, "--epochs=40"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not list(out.glob("steps/part-*.parquet")):
        assert process.poll() is None, "the run ended before it could be terminated"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    assert "interrupted" in stderr
    assert "Traceback" not in stderr
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "interrupted"
    steps = pd.read_parquet(out / "steps")
    assert len(steps) == status["step"]  # every step taken was flushed
    assert (out / "checkpoint.pt").is_file()


@pytest.mark.slow
def test_diverged_run_stops_and_reports(cli_command, tmp_path):
    out = tmp_path / "diverged"
    result = run_cli(cli_command, "run", "--out", str(out), *TINY_RUN_ARGS, "--lr=1e6")
    assert result.returncode == 1
    # At this lr the gradient norm overflows a step before the loss does.
    assert "became non-finite at step" in result.stderr
    assert "Traceback" not in result.stderr
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed"
    assert status["diverged"]["step"] == status["step"]
    steps = pd.read_parquet(out / "steps")
    signal = status["diverged"]["signal"]
    assert steps["step"].iloc[-1] == status["step"]
    assert steps[signal].iloc[:-1].notna().all()
    assert not np.isfinite(steps[signal].iloc[-1])  # the failing step itself is kept
    evals = pd.read_parquet(out / "evals")
    assert (evals["step"] <= status["step"]).all()  # no evaluation of the broken model
    report = run_cli(cli_command, "report", str(out), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    assert f"failed: {status['reason']}" in (tmp_path / "report" / "report.md").read_text()


def test_bad_fault_spec_rejected(cli_command, tmp_path):
    out = tmp_path / "run"
    result = run_cli(cli_command, "run", "--out", str(out), "--inject-spike", "10:blocks.99:5")
    assert result.returncode == 2
    assert "layer 'blocks.99' is not a layer group" in result.stderr
    assert not out.exists()


def test_report_detector_options_in_events(cli_command, tmp_path):
    from test_detect import write_run

    run_dir = write_run(tmp_path / "run", frozen=False)
    report_dir = tmp_path / "report"
    result = run_cli(
        cli_command,
        "report",
        str(run_dir),
        "--out",
        str(report_dir),
        "--spike-preset=olmo-core",
        "--spike-z=5",
        "--spike-window=64",
        "--persistence=2",
        "--co-occurrence=3",
        "--co-window=20",
        "--dip-z=3",
    )
    assert result.returncode == 0, result.stderr
    params = json.loads((report_dir / "events.json").read_text())["detector_params"]
    grad = params["grad_spikes"]
    assert (grad["rule"], grad["window"], grad["z_threshold"]) == ("mean_std", 64, 5.0)
    assert grad["persistence"] == 2
    assert params["loss_spikes"]["rule"] == "mean_std"
    assert params["loss_spikes"]["min_ratio"] == 1.25
    assert params["co_occurrence"] == {"min_series": 3, "window_steps": 20}
    assert params["dips"]["z"] == 3.0


def test_report_rejects_unknown_spike_preset(cli_command, tmp_path):
    from test_detect import write_run

    run_dir = write_run(tmp_path / "run", frozen=False, with_tables=False)
    report_dir = tmp_path / "report"
    result = run_cli(
        cli_command, "report", str(run_dir), "--out", str(report_dir), "--spike-preset", "nope"
    )
    assert result.returncode == 2
    assert "unknown spike preset 'nope': expected one of robust, olmo2" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not report_dir.exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--spike-window", "1"], "--spike-window 1 is invalid: pass a window of at least 2"),
        (["--spike-z", "0"], "--spike-z 0.0 is invalid: pass a z threshold above 0"),
        (["--co-occurrence", "0"], "--co-occurrence 0 is invalid: pass at least 1 series"),
        (["--co-window", "-1"], "--co-window -1 is invalid: pass 0 steps or more"),
        (["--persistence", "0"], "--persistence 0 is invalid: pass at least 1 value"),
        (["--dip-z", "-1"], "--dip-z -1.0 is invalid: pass 0 or more standard errors"),
    ],
)
def test_report_rejects_bad_detector_value(capsys, tmp_path, args, expected):
    # In the test process, because a fresh interpreter per case would mostly measure imports.
    from test_detect import write_run

    from stabilitylab.cli import main

    run_dir = write_run(tmp_path / "run", frozen=False, with_tables=False)
    report_dir = tmp_path / "report"
    status = main(["report", str(run_dir), "--out", str(report_dir), "--quiet", *args])
    stderr = capsys.readouterr().err
    assert status == 2
    assert expected in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not report_dir.exists()


def test_report_detector_defaults_match_library():
    from stabilitylab.cli import build_parser
    from stabilitylab.detect import (
        SPIKE_PRESETS,
        CoOccurrenceParams,
        DetectorParams,
        DipParams,
        SpikeParams,
    )

    report = build_parser().commands["report"]
    assert SPIKE_PRESETS[report.get_default("spike_preset")] == DetectorParams().grad_spikes
    assert report.get_default("persistence") == SpikeParams().persistence
    assert report.get_default("co_occurrence") == CoOccurrenceParams().min_series
    assert report.get_default("co_window") == CoOccurrenceParams().window_steps
    assert report.get_default("dip_z") == DipParams().z
    help_text = report.format_help()
    for name in SPIKE_PRESETS:
        assert name in help_text
