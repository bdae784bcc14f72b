"""Planted gradient and learning-rate spikes: parsing, validation and their effect on a run."""

from __future__ import annotations

import json

import pytest

from stabilitylab.detect import detect_run
from stabilitylab.errors import ConfigError
from stabilitylab.runs import read_run
from stabilitylab.train.faults import (
    GradientSpike,
    LrSpike,
    parse_gradient_spike,
    parse_lr_spike,
    warn_undetectable_steps,
)
from stabilitylab.train.loop import run_training


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("300:patch_embed:20", GradientSpike(300, "patch_embed", 20.0)),
        ("0:blocks.03:0.5", GradientSpike(0, "blocks.03", 0.5)),
        ("12:projector:1e3", GradientSpike(12, "projector", 1000.0)),
    ],
)
def test_parse_gradient_spike(spec, expected):
    assert parse_gradient_spike(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("300:patch_embed", "write STEP:LAYER:FACTOR"),
        ("300::20", "write STEP:LAYER:FACTOR"),
        ("x:patch_embed:20", "step 'x' is not a whole number"),
        ("-1:patch_embed:20", "step -1 is invalid"),
        ("3:patch_embed:big", "factor 'big' is not a number"),
        ("3:patch_embed:0", "factor 0.0 must be positive"),
        ("3:patch_embed:inf", "factor inf must be positive and finite"),
    ],
)
def test_parse_gradient_spike_rejects(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_gradient_spike(spec)


def test_parse_lr_spike():
    assert parse_lr_spike("40:10") == LrSpike(40, 10.0)
    with pytest.raises(ConfigError, match="write STEP:FACTOR"):
        parse_lr_spike("40:blocks.00:10")


def test_config_rejects_unknown_layer(tiny_config):
    with pytest.raises(ConfigError, match="layer 'blocks.09' is not a layer group"):
        tiny_config(inject_spikes=("3:blocks.09:10",))


def test_config_rejects_frozen_layer(tiny_config):
    with pytest.raises(ConfigError, match="'patch_embed' is frozen in this run"):
        tiny_config(inject_spikes=("3:patch_embed:10",), freeze_patch_embed=True)
    assert tiny_config(inject_spikes=("3:blocks.00:10",), freeze_patch_embed=True)


def test_fault_after_last_step_rejected(tiny_config, tmp_path):
    config = tiny_config(lr_spikes=("42:10",))  # TINY_RUN has 42 steps, 0 to 41
    with pytest.raises(ConfigError, match="step 42 would never happen"):
        run_training(config, tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run").exists()


def test_early_fault_warned(caplog):
    warn_undetectable_steps([GradientSpike(10, "patch_embed", 50.0), LrSpike(39, 10.0)])
    assert "step 10, 39 fall in the first 40 steps" in caplog.text


def test_late_fault_not_warned(caplog):
    warn_undetectable_steps([GradientSpike(40, "patch_embed", 50.0)])
    assert caplog.text == ""


@pytest.fixture(scope="module")
def faulted_run(tmp_path_factory):
    from conftest import TINY_RUN

    from stabilitylab.config import build_config

    config = build_config(
        "digits",
        **{
            **TINY_RUN,
            "epochs": 4,  # 84 steps, so the detector has a baseline before step 60
            "inject_spikes": ("60:patch_embed:50",),
            "lr_spikes": ("50:10",),
        },
    )
    return run_training(
        config, tmp_path_factory.mktemp("faults") / "run", show_progress=False
    ).run_dir


def test_faults_recorded_in_config(faulted_run):
    derived = json.loads((faulted_run / "config.json").read_text())["derived"]
    assert derived["faults"] == {
        "gradient_spikes": [{"step": 60, "layer": "patch_embed", "factor": 50.0}],
        "lr_spikes": [{"step": 50, "factor": 10.0}],
    }


def test_gradient_spike_multiplies_layer(faulted_run):
    run = read_run(faulted_run)
    patch = run.layers[run.layers["layer"] == "patch_embed"].set_index("step")["grad_norm"]
    neighbours = patch.loc[[58, 59, 61, 62]].median()
    assert patch.loc[60] > 20 * neighbours
    block = run.layers[run.layers["layer"] == "blocks.00"].set_index("step")["grad_norm"]
    assert block.loc[60] < 5 * block.loc[[58, 59, 61, 62]].median()


def test_lr_spike_multiplies_lr(faulted_run):
    lr = read_run(faulted_run).steps.set_index("step")["lr"]
    assert lr.loc[50] == pytest.approx(10 * lr.loc[49], rel=0.1)
    assert lr.loc[51] == pytest.approx(lr.loc[49], rel=0.1)


def test_detector_finds_planted_spike(faulted_run):
    events = detect_run(read_run(faulted_run))
    peaks = [spike.peak_step for spike in events.spikes["grad_norm[patch_embed]"]]
    assert 60 in peaks
