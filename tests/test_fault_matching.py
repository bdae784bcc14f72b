"""Tests of matching planted faults to detected spikes, on synthetic runs and one real run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from synthetic import layers_frame, log_noise, memory_run, spike_event, steps_frame

from stabilitylab.detect import detect_run
from stabilitylab.detect.faults import (
    GRADIENT_FAULT,
    LR_FAULT,
    FaultMatchParams,
    PlantedFault,
    count_clear_steps,
    follow_on_window,
    match_planted_faults,
    planted_faults_from_plan,
)
from stabilitylab.errors import ConfigError, RunDirError
from stabilitylab.report.faults import planted_faults_table
from stabilitylab.runs import Run

STEPS = 400
LAYERS = ["patch_embed", "cls_token", "blocks.00", "blocks.01", "norm", "projector", "predictor"]


def synthetic_run(
    plan: dict | None,
    layer_spikes: dict[str, dict[int, float]] | None = None,
    loss_spikes: dict[int, float] | None = None,
) -> Run:
    """Return an in-memory run with the given spikes in its data and ``plan`` as its faults."""
    layer_spikes = layer_spikes or {}
    step = np.arange(STEPS)
    # The loss moves about 1 % from step to step, and a planted factor multiplies it.
    loss = 3.0 * log_noise(1, STEPS) ** 0.1
    for spike_step, factor in (loss_spikes or {}).items():
        loss[spike_step] *= factor
    steps = steps_frame(
        step, loss, grad_norm=log_noise(2, STEPS), token_grad_norm=log_noise(3, STEPS)
    )
    grads = {
        layer: log_noise(10 + index, STEPS, layer_spikes.get(layer))
        for index, layer in enumerate(LAYERS)
    }
    derived = {"layers": LAYERS}
    if plan is not None:
        derived["faults"] = plan
    return memory_run(steps, layers_frame(step, grads), derived=derived)


def gradient_plan(*faults: tuple[int, str, float]) -> dict:
    return {
        "gradient_spikes": [
            {"step": step, "layer": layer, "factor": factor} for step, layer, factor in faults
        ],
        "lr_spikes": [],
    }


def lr_plan(step: int, factor: float) -> dict:
    return {"gradient_spikes": [], "lr_spikes": [{"step": step, "factor": factor}]}


def test_gradient_fault_matched_layer_and_step():
    run = synthetic_run(
        gradient_plan((150, "patch_embed", 30.0), (250, "blocks.01", 30.0)),
        layer_spikes={"patch_embed": {150: 30.0}, "blocks.01": {250: 30.0}},
    )
    first, second = detect_run(run).planted_faults
    assert first.found
    assert first.series == "grad_norm[patch_embed]"
    assert first.detected_start_step == 150
    assert first.lag_steps == 0
    assert second.found
    assert second.layer == "blocks.01"
    assert second.series == "grad_norm[blocks.01]"
    assert second.detected_peak_step == 250


def test_gradient_fault_other_layer_missed():
    # The data spikes in patch_embed, but the plan names blocks.00, whose series is quiet.
    run = synthetic_run(
        gradient_plan((150, "blocks.00", 30.0)), layer_spikes={"patch_embed": {150: 30.0}}
    )
    (match,) = detect_run(run).planted_faults
    assert not match.found
    assert match.series is None
    assert match.lag_steps is None


def test_gradient_fault_without_spike_missed():
    (match,) = detect_run(synthetic_run(gradient_plan((200, "projector", 1.5)))).planted_faults
    assert match.kind == GRADIENT_FAULT
    assert match.step == 200
    assert not match.found
    assert match.detected_start_step is None


@pytest.mark.parametrize(
    ("start", "end", "found", "lag"),
    [
        (150, 150, True, 0),
        (152, 153, True, 2),  # starts within the tolerance after the fault
        (148, 148, True, -2),  # starts within the tolerance before it
        (140, 155, True, -10),  # began earlier and covers the fault step
        (153, 153, False, None),  # starts one step past the tolerance
        (140, 149, False, None),  # ended before the fault, further than the tolerance
    ],
)
def test_gradient_fault_tolerance(start, end, found, lag):
    fault = PlantedFault(GRADIENT_FAULT, 150, 20.0, "patch_embed")
    spikes = {"grad_norm[patch_embed]": [spike_event("grad_norm[patch_embed]", start, end)]}
    (match,) = match_planted_faults([fault], spikes, range(STEPS)).faults
    assert match.found is found
    assert match.lag_steps == lag


def test_gradient_fault_prefers_closest_start():
    fault = PlantedFault(GRADIENT_FAULT, 150, 20.0, "blocks.00")
    series = "grad_norm[blocks.00]"
    spikes = {series: [spike_event(series, 140, 160), spike_event(series, 151)]}
    (match,) = match_planted_faults([fault], spikes, range(STEPS)).faults
    assert match.detected_start_step == 151


def test_lr_fault_matched_within_tolerance():
    run = synthetic_run(lr_plan(200, 20.0), loss_spikes={202: 2.0})
    (match,) = detect_run(run).planted_faults
    assert match.kind == LR_FAULT
    assert match.layer is None
    assert match.found
    assert match.series == "loss"
    assert match.lag_steps == 2


@pytest.mark.parametrize(("start", "found"), [(200, True), (205, True), (206, False), (199, False)])
def test_lr_fault_window(start, found):
    fault = PlantedFault(LR_FAULT, 200, 20.0)
    spikes = {"grad_norm[norm]": [spike_event("grad_norm[norm]", start)], "loss": []}
    (match,) = match_planted_faults([fault], spikes, range(STEPS)).faults
    assert match.found is found


def test_lr_fault_takes_earliest_response():
    fault = PlantedFault(LR_FAULT, 200, 20.0)
    spikes = {
        "loss": [spike_event("loss", 203)],
        "grad_norm": [spike_event("grad_norm", 201, ratio=3.0)],
        "grad_norm[blocks.00]": [spike_event("grad_norm[blocks.00]", 201, ratio=9.0)],
    }
    (match,) = match_planted_faults([fault], spikes, range(STEPS)).faults
    assert match.series == "grad_norm[blocks.00]"
    assert match.detected_start_step == 201


def test_lr_fault_ignores_other_series():
    fault = PlantedFault(LR_FAULT, 200, 20.0)
    spikes = {"update_ratio[norm]": [spike_event("update_ratio[norm]", 201)]}
    (match,) = match_planted_faults([fault], spikes, range(STEPS)).faults
    assert not match.found


def test_false_alarms_counted_outside_windows():
    fault = PlantedFault(GRADIENT_FAULT, 150, 20.0, "patch_embed")
    spikes = {
        "grad_norm[patch_embed]": [spike_event("grad_norm[patch_embed]", 150)],
        "grad_norm[blocks.01]": [
            spike_event("grad_norm[blocks.01]", 160),
            spike_event("grad_norm[blocks.01]", 300),
        ],
        "loss": [spike_event("loss", 80), spike_event("loss", 176)],
    }
    matching = match_planted_faults([fault], spikes, range(STEPS))
    assert [(alarm.series, alarm.start_step) for alarm in matching.false_alarms] == [
        ("loss", 80),
        ("loss", 176),
        ("grad_norm[blocks.01]", 300),
    ]
    assert matching.recorded_steps == STEPS
    # The window runs from 148 to 175, 28 steps.
    assert matching.clear_steps == STEPS - 28
    assert matching.false_alarm_rate == pytest.approx(1000 * 3 / (STEPS - 28))


def test_false_alarms_on_synthetic_run():
    run = synthetic_run(
        gradient_plan((150, "patch_embed", 30.0)),
        layer_spikes={"patch_embed": {150: 30.0}, "norm": {160: 30.0, 320: 30.0}},
    )
    events = detect_run(run)
    matching = match_planted_faults(
        planted_faults_from_plan(run.derived["faults"]), events.spikes, run.steps["step"]
    )
    assert matching.found_count == 1
    assert [(alarm.series, alarm.start_step) for alarm in matching.false_alarms] == [
        ("grad_norm[norm]", 320)
    ]


def test_run_without_faults_all_alarms():
    spikes = {"loss": [spike_event("loss", 80)], "grad_norm": [spike_event("grad_norm", 90)]}
    matching = match_planted_faults([], spikes, range(100))
    assert matching.faults == []
    assert len(matching.false_alarms) == 2
    assert matching.clear_steps == 100
    assert matching.false_alarm_rate == pytest.approx(20.0)


def test_follow_on_window_bounds():
    params = FaultMatchParams(gradient_tolerance=2, follow_on_steps=25)
    assert follow_on_window(PlantedFault(GRADIENT_FAULT, 150, 5.0, "norm"), params) == range(
        148, 176
    )
    assert follow_on_window(PlantedFault(LR_FAULT, 150, 5.0), params) == range(150, 176)
    assert follow_on_window(PlantedFault(GRADIENT_FAULT, 1, 5.0, "norm"), params) == range(0, 27)


def test_clear_steps_merge_overlapping_windows():
    faults = [PlantedFault(LR_FAULT, 10, 5.0), PlantedFault(LR_FAULT, 20, 5.0)]
    recorded, clear = count_clear_steps(range(100), faults, FaultMatchParams(follow_on_steps=15))
    assert recorded == 100
    assert clear == 100 - 26  # steps 10 to 35


def test_match_params_reject_negative():
    with pytest.raises(ConfigError, match="follow_on_steps -1"):
        FaultMatchParams(follow_on_steps=-1)


def test_plan_parsed_in_step_order():
    plan = {
        "gradient_spikes": [{"step": 90, "layer": "norm", "factor": 3}],
        "lr_spikes": [{"step": 40, "factor": 10.0}],
    }
    assert planted_faults_from_plan(plan) == [
        PlantedFault(LR_FAULT, 40, 10.0),
        PlantedFault(GRADIENT_FAULT, 90, 3.0, "norm"),
    ]
    assert planted_faults_from_plan(None) == []


@pytest.mark.parametrize(
    "plan",
    [
        [1, 2],
        {"gradient_spikes": {"step": 3}},
        {"gradient_spikes": [{"step": "x", "layer": "norm", "factor": 2}]},
        {"gradient_spikes": [{"step": 3, "layer": "", "factor": 2}]},
        {"lr_spikes": [{"step": 3, "factor": -2}]},
    ],
)
def test_plan_damaged_raises(plan):
    with pytest.raises(RunDirError, match="config.json"):
        planted_faults_from_plan(plan)


def test_events_json_lists_planted_faults():
    run = synthetic_run(
        gradient_plan((150, "patch_embed", 30.0)), layer_spikes={"patch_embed": {150: 30.0}}
    )
    payload = json.loads(json.dumps(detect_run(run).to_dict()))
    assert payload["planted_faults"] == [
        {
            "kind": "gradient",
            "step": 150,
            "layer": "patch_embed",
            "factor": 30.0,
            "found": True,
            "series": "grad_norm[patch_embed]",
            "detected_start_step": 150,
            "detected_peak_step": 150,
            "lag_steps": 0,
        }
    ]


def test_faults_table_rows_and_note():
    run = synthetic_run(
        gradient_plan((150, "patch_embed", 30.0), (250, "blocks.00", 1.2)),
        layer_spikes={"patch_embed": {150: 30.0}, "norm": {320: 30.0}},
    )
    table = planted_faults_table(detect_run(run))
    assert table.caption == "Planted faults"
    assert table.rows[0][:6] == (
        "gradient",
        "150",
        "patch_embed",
        "30",
        "yes",
        "grad_norm[patch_embed]",
    )
    assert table.rows[1][:5] == ("gradient", "250", "blocks.00", "1.2", "no (missed)")
    assert "1 of 2 planted faults found" in table.note
    assert "1 spikes elsewhere are false alarms" in table.note


def test_faults_table_absent_without_faults():
    assert planted_faults_table(detect_run(synthetic_run(None))) is None


@pytest.fixture(scope="module")
def faulted_report(tmp_path_factory):
    from conftest import TINY_RUN

    from stabilitylab.config import build_config
    from stabilitylab.report import write_report
    from stabilitylab.train.loop import run_training

    config = build_config(
        "digits",
        **{
            **TINY_RUN,
            # 63 steps: the detector flags nothing in the first 40, so the faults come later.
            "epochs": 3,
            "eval_every": 30,
            "dense_knn_every": 0,
            "inject_spikes": ("45:patch_embed:50", "55:blocks.01:50"),
        },
    )
    run_dir = run_training(config, tmp_path_factory.mktemp("planted") / "run").run_dir
    return write_report(run_dir)


def test_real_run_report_lists_faults(faulted_report):
    events = json.loads((faulted_report / "events.json").read_text())["runs"][0]
    faults = events["planted_faults"]
    assert [(fault["step"], fault["layer"]) for fault in faults] == [
        (45, "patch_embed"),
        (55, "blocks.01"),
    ]
    assert [fault["found"] for fault in faults] == [True, True]
    assert [fault["series"] for fault in faults] == [
        "grad_norm[patch_embed]",
        "grad_norm[blocks.01]",
    ]
    assert [fault["detected_start_step"] for fault in faults] == [45, 55]


def test_real_run_markdown_faults_table(faulted_report):
    markdown = (faulted_report / "report.md").read_text()
    assert "**Planted faults**" in markdown
    assert (
        "| gradient | 45 | patch\\_embed | 50 | yes | grad\\_norm\\[patch\\_embed\\] |" in markdown
    )
    assert "| gradient | 55 | blocks.01 | 50 | yes | grad\\_norm\\[blocks.01\\] |" in markdown
