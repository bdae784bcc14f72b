"""Tests of run verdicts, sanity flags, dip attribution and hidden cost on in-memory runs."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd
import pytest
from synthetic import evals_frame, memory_run, spike_event

from stabilitylab.detect import detect_run
from stabilitylab.detect.attribution import AttributionParams, attribute_dips
from stabilitylab.detect.dips import find_dips
from stabilitylab.detect.sanity import SanityParams, chance_loss, check_sanity
from stabilitylab.detect.verdict import (
    DIVERGED,
    PARTIAL_FAILURE,
    RECOVERED_DIPS,
    STABLE,
    UNDETERMINED,
    RunVerdict,
    hidden_costs,
)
from stabilitylab.errors import ConfigError
from stabilitylab.runs import TABLE_COLUMNS, Run, empty_table

STEPS = 400
EVAL_EVERY = 50
TEMPERATURE = 0.2
BATCH = 256
CHANCE = 4 * TEMPERATURE * math.log(BATCH)
HEALTHY_STD = 0.02  # 0.16 / sqrt(64), like a healthy vit_micro
LAYERS = ["patch_embed", "cls_token", "blocks.00", "blocks.01", "norm", "projector"]


def rising_top1() -> list[float]:
    """Return kNN top-1 rising from 20 to 60 over the evaluations at steps 0, 50, ..., 400."""
    return list(np.linspace(20.0, 60.0, STEPS // EVAL_EVERY + 1))


def make_run(
    top1: list[float] | None = None,
    *,
    loss: np.ndarray | None = None,
    feature_std: list[float] | None = None,
    status: dict | None = None,
    frozen: bool = False,
    seed: int = 0,
) -> Run:
    """Return an in-memory vit_micro MoCo v3 run with evaluations every EVAL_EVERY steps.

    The loss defaults to half the chance level, and the warmup lasts 100 steps.
    """
    top1 = rising_top1() if top1 is None else top1
    eval_steps = np.arange(len(top1)) * EVAL_EVERY
    step = np.arange(STEPS)
    loss = np.full(STEPS, CHANCE / 2) if loss is None else loss
    steps = pd.DataFrame({name: 1.0 for name in TABLE_COLUMNS["steps"]}, index=step)
    steps["step"] = step
    steps["loss"] = loss
    evals = evals_frame(
        eval_steps,
        top1,
        feature_std=feature_std if feature_std is not None else HEALTHY_STD,
        effective_rank=6.0,
        n_bank=1000,
        n_query=10_000,
    )
    config = {
        "freeze_patch_embed": frozen,
        "model": "vit_micro",
        "method": "mocov3",
        "temperature": TEMPERATURE,
        "batch_size": BATCH,
        "warmup_epochs": 1.0,
        "seed": seed,
    }
    return memory_run(
        steps.reset_index(drop=True),
        empty_table("layers"),
        name="frozen" if frozen else "learned",
        config=config,
        derived={"layers": LAYERS, "global_batch_size": BATCH, "steps_per_epoch": 100},
        evals=evals,
        status=status or {"state": "finished"},
    )


def with_dip(recover: bool) -> list[float]:
    top1 = rising_top1()
    top1[4] = top1[3] - 15.0
    if not recover:
        top1[4:] = [top1[3] - 15.0] * (len(top1) - 4)
    return top1


def run_verdict(top1: list[float] | None = None, **options: Any) -> RunVerdict:
    """Return the verdict that detect_run gives a run built by make_run from these arguments."""
    return detect_run(make_run(top1, **options)).verdict


# Verdicts


def test_verdict_stable():
    verdict = run_verdict()
    assert verdict.verdict == STABLE
    assert verdict.evidence.dips == 0
    assert verdict.evidence.lost_accuracy == pytest.approx(0.0)


def test_verdict_recovered_dips():
    verdict = run_verdict(with_dip(recover=True))
    assert verdict.verdict == RECOVERED_DIPS
    assert verdict.evidence.dips == 1
    assert verdict.evidence.unrecovered_dips == 0
    assert verdict.evidence.deepest_dip == pytest.approx(15.0)


def test_verdict_unrecovered_dip_partial():
    verdict = run_verdict(with_dip(recover=False))
    assert verdict.verdict == PARTIAL_FAILURE
    assert verdict.evidence.unrecovered_dips == 1
    assert "1 dip(s) never recovered" in verdict.reasons


def test_verdict_final_below_best_partial():
    # A slow decline stays within the margin from one evaluation to the next but not overall.
    top1 = [50.0, 60.0, 59.5, 59.0, 58.5, 58.0, 57.5, 57.0, 56.5]
    run = make_run(top1)
    events = detect_run(run)
    assert events.verdict.verdict == PARTIAL_FAILURE
    assert events.verdict.evidence.lost_accuracy == pytest.approx(3.5)
    assert events.verdict.evidence.margin == pytest.approx(2.08, abs=0.01)


def test_verdict_final_within_margin_stable():
    top1 = rising_top1()
    top1[-1] = top1[-2] - 0.5
    assert run_verdict(top1).verdict == STABLE


def test_verdict_collapse_at_end_partial():
    std = [HEALTHY_STD] * 8 + [1e-5]
    verdict = run_verdict(feature_std=std)
    assert verdict.verdict == PARTIAL_FAILURE
    assert verdict.evidence.final_collapsed
    assert verdict.evidence.collapsed_steps == [400]


def test_verdict_cleared_collapse_recovered():
    std = [HEALTHY_STD] * 4 + [1e-5] + [HEALTHY_STD] * 4
    verdict = run_verdict(feature_std=std)
    assert verdict.verdict == RECOVERED_DIPS
    assert not verdict.evidence.final_collapsed


def test_verdict_nan_loss_diverged():
    loss = np.full(STEPS, 1.0)
    loss[250] = np.nan
    verdict = run_verdict(loss=loss)
    assert verdict.verdict == DIVERGED
    assert verdict.evidence.nonfinite_loss_step == 250


def failed_verdict(reason: str) -> RunVerdict:
    """Return the verdict of a run whose status is failed at step 120 for ``reason``."""
    return run_verdict(status={"state": "failed", "step": 120, "reason": reason})


def test_verdict_failed_status_diverged():
    verdict = failed_verdict("non-finite loss")
    assert verdict.verdict == DIVERGED
    assert verdict.reasons == ["run failed: non-finite loss"]


def test_verdict_other_failure_not_diverged():
    verdict = failed_verdict("OSError: disk full")
    assert verdict.verdict == STABLE
    assert verdict.evidence.incomplete


def test_verdict_no_evals_undetermined():
    verdict = run_verdict([])
    assert verdict.verdict == UNDETERMINED
    assert math.isnan(verdict.evidence.best_top1)
    json.dumps(verdict.to_dict(), allow_nan=False)


# Sanity flags


def test_chance_loss_formula():
    assert chance_loss(make_run()) == pytest.approx(4 * 0.2 * math.log(256))


def test_chance_loss_needs_method():
    run = make_run()
    del run.config["method"]
    assert chance_loss(run) is None


def test_chance_flag_after_warmup():
    report = check_sanity(make_run(loss=np.full(STEPS, CHANCE * 1.01)))
    # Warmup ends at step 100, and the 50-step window must lie after it.
    assert report.steps_where("at_chance") == [150, 200, 250, 300, 350, 400]
    assert report.chance_loss == pytest.approx(CHANCE)


def test_chance_flag_outside_tolerance_clear():
    report = check_sanity(make_run(loss=np.full(STEPS, CHANCE * 0.9)))
    assert report.steps_where("at_chance") == []


def test_chance_at_end_partial_failure():
    loss = np.full(STEPS, CHANCE / 2)
    loss[300:] = CHANCE
    verdict = run_verdict(loss=loss)
    assert verdict.verdict == PARTIAL_FAILURE
    assert verdict.evidence.at_chance_steps == [350, 400]


def test_collapse_threshold_from_model_width():
    report = check_sanity(make_run(feature_std=[0.0024] * 4 + [0.0026] * 5))
    assert report.feature_dim == 64
    assert report.std_threshold == pytest.approx(0.02 / 8)
    assert report.steps_where("collapsed") == [0, 50, 100, 150]


def test_low_rank_does_not_change_verdict():
    run = make_run()
    run.evals["effective_rank"] = 1.2
    events = detect_run(run)
    assert events.sanity.steps_where("low_rank") == list(range(0, STEPS + 1, EVAL_EVERY))
    assert events.verdict.verdict == STABLE


def test_unknown_model_no_collapse_flag():
    run = make_run(feature_std=[0.0] * 9)
    run.config["model"] = "custom"
    report = check_sanity(run)
    assert report.feature_dim is None
    assert report.steps_where("collapsed") == []


@pytest.mark.parametrize(
    "overrides", [{"collapse_fraction": -0.1}, {"chance_tolerance": 1.0}, {"chance_window": 0}]
)
def test_sanity_params_invalid_raise(overrides):
    with pytest.raises(ConfigError, match="invalid sanity"):
        SanityParams(**overrides)


# Attribution


def test_attribution_window_and_order():
    run = make_run(with_dip(recover=True))
    dips = find_dips(run.evals)
    spikes = {
        "grad_norm": [spike_event("grad_norm", 170)],
        "grad_norm[patch_embed]": [spike_event("grad_norm[patch_embed]", 160)],
        "grad_norm[blocks.01]": [
            spike_event("grad_norm[blocks.01]", 170),
            spike_event("grad_norm[blocks.01]", 200),
        ],
        "token_grad_norm": [spike_event("token_grad_norm", 20)],
    }
    order = ["grad_norm[patch_embed]", "token_grad_norm", "grad_norm[blocks.01]", "grad_norm"]
    (attribution,) = attribute_dips(dips, run.evals, spikes, order, AttributionParams(100))
    assert attribution.dip_start_step == 200
    assert attribution.last_good_step == 150
    assert attribution.window_start_step == 50
    assert attribution.window_end_step == 199
    assert attribution.first_series == "grad_norm[patch_embed]"
    assert attribution.first_spike_step == 160
    # The tie at step 170 goes to the layer nearer the input; step 200 and 20 are outside.
    assert attribution.series_order == [
        "grad_norm[patch_embed]",
        "grad_norm[blocks.01]",
        "grad_norm",
    ]


def test_attribution_without_spikes_empty():
    run = make_run(with_dip(recover=True))
    (attribution,) = attribute_dips(find_dips(run.evals), run.evals, {}, [])
    assert attribution.first_series is None
    assert attribution.series_order == []
    assert attribution.to_dict()["spikes"] == []


def test_attribution_lookback_invalid_raises():
    with pytest.raises(ConfigError, match="lookback_steps"):
        AttributionParams(lookback_steps=-1)


# Hidden cost


def twin_key(run: Run) -> int:
    return run.config["seed"]


def test_hidden_cost_against_stable_twin():
    learned = make_run(with_dip(recover=True), frozen=False)
    frozen = make_run([value + 2.0 for value in rising_top1()], frozen=True)
    runs = [learned, frozen]
    verdicts = [detect_run(run).verdict for run in runs]
    learned_cost, frozen_cost = hidden_costs(runs, verdicts, twin_key)
    assert learned_cost.twin_index == 1
    assert learned_cost.best_cost == pytest.approx(2.0)
    assert learned_cost.final_cost == pytest.approx(2.0)
    # The learned run had a dip, so it is no stable twin for the frozen run.
    assert frozen_cost is None


def test_hidden_cost_other_seed_none():
    runs = [make_run(frozen=False, seed=0), make_run(frozen=True, seed=1)]
    verdicts = [detect_run(run).verdict for run in runs]
    assert hidden_costs(runs, verdicts, twin_key) == [None, None]


def test_hidden_cost_two_twins_ambiguous():
    runs = [make_run(frozen=False), make_run(frozen=True), make_run(frozen=True)]
    verdicts = [detect_run(run).verdict for run in runs]
    costs = hidden_costs(runs, verdicts, twin_key)
    assert costs[0] is None
    assert costs[1].twin_index == 0
    assert costs[1].best_cost == pytest.approx(0.0)


def test_detect_run_verdict_in_json():
    events = detect_run(make_run(with_dip(recover=False)))
    payload = json.loads(json.dumps(events.to_dict(), allow_nan=False))
    assert payload["verdict"]["verdict"] == PARTIAL_FAILURE
    assert payload["verdict"]["evidence"]["unrecovered_dips"] == 1
    assert payload["sanity"]["chance_loss"] == pytest.approx(CHANCE)
    assert len(payload["attributions"]) == 1
    assert payload["attributions"][0]["window_end_step"] == 199
