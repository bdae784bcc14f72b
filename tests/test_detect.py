"""Tests of the spike and dip detectors on synthetic series with planted events."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from stabilitylab.detect import (
    GRAD_NORM,
    LOSS,
    TOKEN_GRAD_NORM,
    DetectorParams,
    DipParams,
    SpikeParams,
    detect_run,
    dip_margin,
    find_dips,
    find_spikes,
    layer_series_name,
    score_spikes,
    select_first_layer,
    select_last_block,
)
from stabilitylab.errors import ConfigError
from stabilitylab.runs import TABLE_COLUMNS, RunWriter, read_run

LAYERS = ["patch_embed", "cls_token", "blocks.00", "blocks.01", "norm", "projector"]


def noisy_series(count: int, seed: int = 0, sigma: float = 0.1, trend: float = 1.0) -> pd.Series:
    """Return log-normal noise around a level that grows by ``trend`` times over the series."""
    rng = np.random.default_rng(seed)
    level = np.exp(np.linspace(0.0, math.log(trend), count))
    values = level * np.exp(rng.normal(0.0, sigma, count))
    return pd.Series(values, index=np.arange(count) * 2, name="g")


def reference_scores(series: pd.Series, params: SpikeParams) -> pd.DataFrame:
    """Score spikes with a full baseline recomputation on every pass, without shortcuts."""
    log_values = np.log(series)
    masked = np.zeros(len(series), dtype=bool)
    for _ in range(params.passes):
        history = log_values.where(~masked)
        median = history.rolling(params.window, min_periods=params.min_periods).median().shift(1)
        deviation = (history - median).abs()
        mad = deviation.rolling(params.window, min_periods=params.min_periods).median().shift(1)
        excess = log_values - median
        z = 0.6745 * excess / mad
        flagged = ((z >= params.z_threshold) & (np.exp(excess) >= params.min_ratio)).to_numpy()
        if np.array_equal(flagged, masked):
            break
        masked = flagged
    return pd.DataFrame({"baseline": np.exp(median), "z": z, "spike": flagged})


# Spikes


def test_spikes_planted_found_at_their_steps():
    series = noisy_series(2000, trend=5.0)
    series.iloc[400] *= 8.0
    series.iloc[1200:1203] *= 5.0
    events = find_spikes(series)
    assert len(events) == 2
    single, triple = events
    assert single.start_step == 800
    assert single.end_step == 800
    assert single.duration_steps == 1
    assert single.ratio == pytest.approx(8.0, rel=0.35)
    assert single.series == "g"
    assert triple.start_step == 2400
    assert triple.end_step == 2404
    assert triple.duration_steps == 5
    assert 2400 <= triple.peak_step <= 2404
    assert triple.ratio == pytest.approx(5.0, rel=0.35)
    assert triple.z >= SpikeParams().z_threshold


def test_spikes_baseline_is_the_level_before():
    series = noisy_series(1000, sigma=0.05)
    series.iloc[600] = 50.0
    (event,) = find_spikes(series)
    assert event.peak_value == 50.0
    assert event.baseline == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("trend", [20.0, 0.05])
def test_spikes_clean_trend_gives_none(trend):
    for seed in range(5):
        series = noisy_series(3000, seed=seed, sigma=0.15, trend=trend)
        assert find_spikes(series) == []


def test_spikes_small_ratio_not_flagged():
    # A near-constant series has a tiny MAD, so z is huge for a 50 % rise, but the rise is
    # below the minimum ratio of 2.
    series = noisy_series(600, sigma=1e-4)
    series.iloc[400] *= 1.5
    scores = score_spikes(series)
    assert scores["z"].iloc[400] > 100
    assert find_spikes(series) == []
    assert len(find_spikes(series, SpikeParams(min_ratio=1.4))) == 1


def test_spikes_burst_does_not_raise_baseline():
    series = noisy_series(2000, seed=3)
    series.iloc[1000:1030] *= 20.0
    series.iloc[1040] *= 2.3
    masked_events = find_spikes(series)
    assert [event.start_step for event in masked_events] == [2000, 2080]
    second = masked_events[1]
    assert second.baseline == pytest.approx(1.0, rel=0.05)
    # Without masking, the burst inflates the baseline MAD and hides the second spike.
    unmasked_steps = [event.start_step for event in find_spikes(series, SpikeParams(passes=1))]
    assert unmasked_steps == [2000]


def test_spikes_partial_update_matches_full_passes():
    series = noisy_series(5000, seed=7, sigma=0.2)
    rng = np.random.default_rng(1)
    for position in rng.choice(np.arange(300, 5000), size=40, replace=False):
        series.iloc[position] *= rng.uniform(1.5, 30.0)
    series.iloc[2000:2060] *= 10.0
    params = SpikeParams(passes=5)
    fast = score_spikes(series, params)
    slow = reference_scores(series, params)
    np.testing.assert_array_equal(fast["spike"].to_numpy(), slow["spike"].to_numpy())
    np.testing.assert_allclose(fast["baseline"].to_numpy(), slow["baseline"].to_numpy())
    np.testing.assert_allclose(fast["z"].to_numpy(), slow["z"].to_numpy())


def test_spikes_all_nan_gives_none():
    series = pd.Series(np.full(500, np.nan), index=np.arange(500))
    assert find_spikes(series) == []
    assert score_spikes(series).empty


def test_spikes_empty_series_gives_none():
    assert find_spikes(pd.Series([], dtype="float64")) == []


def test_spikes_nan_and_inf_skipped():
    series = noisy_series(1000)
    series.iloc[::7] = np.nan
    series.iloc[300] = np.inf
    series.iloc[301] = 0.0
    series.iloc[302] = -4.0
    series.iloc[600] = 30.0
    events = find_spikes(series)
    assert [event.peak_step for event in events] == [1200]
    scores = score_spikes(series)
    assert 600 not in scores.index
    assert scores["value"].notna().all()


def test_spikes_nan_gap_does_not_split_event():
    series = noisy_series(1000)
    series.iloc[500] *= 10.0
    series.iloc[501] = np.nan
    series.iloc[502] *= 10.0
    (event,) = find_spikes(series)
    assert event.start_step == 1000
    assert event.end_step == 1004


def test_spikes_repeated_step_keeps_later_value():
    series = noisy_series(500)
    repeated = pd.concat([series, pd.Series([40.0], index=[series.index[300]])])
    (event,) = find_spikes(repeated)
    assert event.peak_step == series.index[300]
    assert event.peak_value == 40.0


def test_spikes_first_values_need_history():
    series = noisy_series(500)
    series.iloc[10] *= 100.0
    scores = score_spikes(series, SpikeParams(min_periods=20))
    assert scores["baseline"].iloc[:20].isna().all()
    assert not scores["spike"].iloc[:40].any()


def test_spikes_zero_mad_gives_infinite_z():
    series = pd.Series(np.ones(300), index=np.arange(300))
    series.iloc[250] = 5.0
    (event,) = find_spikes(series, name="flat")
    assert math.isinf(event.z)
    assert event.to_dict()["z"] is None
    assert event.series == "flat"


@pytest.mark.parametrize(
    "overrides",
    [
        {"window": 1},
        {"min_periods": 0},
        {"min_periods": 200},
        {"z_threshold": 0.0},
        {"min_ratio": 0.5},
        {"passes": 0},
    ],
)
def test_spike_params_invalid_raise(overrides):
    with pytest.raises(ConfigError):
        SpikeParams(**overrides)


def test_spikes_long_series():
    series = noisy_series(100_000, sigma=0.2)
    series.iloc[::5000] *= 10.0
    events = find_spikes(series)
    # Steps are positions x 2. Every planted spike is found but the one at step 0, which
    # has no baseline before it.
    assert [e.peak_step for e in events] == list(range(10_000, 200_000, 10_000))


# Dips


def eval_frame(steps: list[int], top1: list[float], n_query: float = 1000) -> pd.DataFrame:
    return pd.DataFrame({"step": steps, "knn_top1": top1, "n_query": n_query})


def test_dip_margin_binomial_and_minimum():
    params = DipParams(min_margin=1.0, z=3.0)
    # 50 % over 1000 images: standard error 1.58 points, so the margin is 4.74.
    assert dip_margin(50.0, 1000, params) == pytest.approx(3 * 100 * math.sqrt(0.25 / 1000))
    assert dip_margin(50.0, 1_000_000, params) == pytest.approx(1.0)
    assert dip_margin(50.0, np.nan, params) == pytest.approx(1.0)
    assert dip_margin(100.0, 1000, params) == pytest.approx(1.0)


def test_dip_planted_found_with_recovery():
    steps = [0, 100, 200, 300, 400, 500, 600, 700, 800]
    top1 = [10.0, 30.0, 50.0, 46.0, 40.0, 35.0, 45.5, 44.0, 52.0]
    dip, second = find_dips(eval_frame(steps, top1))
    # The margin at 50 % over 1000 images is 4.74, so 46 and 45.5 are within it. The fall to
    # 44 after the recovery is a second dip.
    assert dip.margin == pytest.approx(4.743, abs=1e-3)
    assert dip.peak_step == 200
    assert dip.peak_top1 == 50.0
    assert dip.start_step == 400
    assert dip.bottom_step == 500
    assert dip.bottom_top1 == 35.0
    assert dip.depth == pytest.approx(15.0)
    assert dip.recovery_step == 600
    assert dip.duration_steps == 200
    assert dip.recovered
    assert (second.start_step, second.bottom_step, second.recovery_step) == (700, 700, 800)


def test_dip_unrecovered_has_no_recovery():
    steps = [0, 100, 200, 300, 400]
    top1 = [20.0, 40.0, 60.0, 50.0, 48.0]
    (dip,) = find_dips(eval_frame(steps, top1, n_query=10_000))
    assert dip.start_step == 300
    assert dip.bottom_step == 400
    assert dip.depth == pytest.approx(12.0)
    assert dip.recovery_step is None
    assert dip.duration_steps == 100
    assert not dip.recovered


def test_dip_small_wiggles_ignored():
    steps = list(range(0, 1000, 100))
    top1 = [10, 20, 30, 29.5, 31, 30.2, 32, 31.4, 33, 34]
    assert find_dips(eval_frame(steps, top1, n_query=1e7)) == []


def test_dip_two_dips_use_latest_peak():
    steps = list(range(0, 900, 100))
    top1 = [20.0, 60.0, 50.0, 61.0, 62.0, 62.0, 40.0, 41.0, 70.0]
    dips = find_dips(eval_frame(steps, top1, n_query=1e7))
    assert [(dip.peak_step, dip.start_step, dip.recovery_step) for dip in dips] == [
        (100, 200, 300),
        (500, 600, 800),
    ]
    assert dips[1].depth == pytest.approx(22.0)


def test_dip_without_n_query_uses_min_margin():
    evals = pd.DataFrame({"step": [0, 1, 2], "knn_top1": [50.0, 48.5, 50.0]})
    assert find_dips(evals, DipParams(min_margin=2.0)) == []
    (dip,) = find_dips(evals, DipParams(min_margin=1.4))
    assert dip.margin == pytest.approx(1.4)
    assert dip.depth == pytest.approx(1.5)


def test_dip_empty_and_nan_evals():
    empty = pd.DataFrame({"step": [], "knn_top1": [], "n_query": []}, dtype="float64")
    assert find_dips(empty) == []
    nan_only = eval_frame([0, 100], [np.nan, np.nan])
    assert find_dips(nan_only) == []


def test_dip_params_invalid_raise():
    with pytest.raises(ConfigError):
        DipParams(min_margin=-1.0)
    with pytest.raises(ConfigError):
        DipParams(z=-0.5)


# Whole runs


def write_run(path, frozen: bool, steps: int = 400, with_tables: bool = True):
    """Write a run with first-layer spikes at step 248, a total one at 250 and a dip at 300."""
    writer = RunWriter(path)
    writer.write_config(
        {"freeze_patch_embed": frozen, "seed": 0, "lr": 1.5e-4, "batch_size": 256},
        {"layers": LAYERS, "lr": 1.5e-4, "total_steps": steps, "steps_per_epoch": 100},
        {},
    )
    writer.write_status("finished")
    if not with_tables:
        return path

    rng = np.random.default_rng(5)
    step = np.arange(steps)
    writer.append("steps", steps_table(step, rng))
    writer.append("layers", layers_table(step, rng, frozen))
    writer.append("evals", evals_table())
    return path


def steps_table(step: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    grad = np.exp(rng.normal(0.0, 0.1, len(step)))
    grad[250] *= 10.0
    token = np.exp(rng.normal(-2.0, 0.1, len(step)))
    token[248] *= 12.0
    frame = pd.DataFrame(
        {
            "step": step,
            "epoch": step / 100,
            "loss": 2.0 * np.exp(rng.normal(0.0, 0.01, len(step))),
            "lr": 1.5e-4,
            "momentum": 0.99,
            "weight_decay": 0.1,
            "grad_norm": grad,
            "token_grad_norm": token,
            "loss_scale": 1.0,
            "samples_per_s": 1000.0,
            "wall_time": step * 0.1,
        }
    )
    return frame[list(TABLE_COLUMNS["steps"])]


def layers_table(step: np.ndarray, rng: np.random.Generator, frozen: bool) -> pd.DataFrame:
    rows = []
    for layer in LAYERS:
        values = np.exp(rng.normal(0.0, 0.1, len(step)))
        if layer == "patch_embed":
            values[248] *= 15.0
            if frozen:
                values[:] = np.nan
        if layer == "blocks.01":
            values[251] *= 9.0
        rows.append(
            pd.DataFrame(
                {
                    "step": step,
                    "layer": layer,
                    "grad_norm": values,
                    "weight_norm": 1.0,
                    "update_ratio": 1e-3,
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


def evals_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "step": [0, 100, 200, 300, 399],
            "epoch": [0.0, 1.0, 2.0, 3.0, 4.0],
            "knn_top1": [10.0, 30.0, 40.0, 25.0, 42.0],
            "knn_top5": np.nan,
            "feature_std": 0.1,
            "effective_rank": 20.0,
            "n_bank": 5000,
            "n_query": 1000,
            "eval_seconds": 1.0,
        }
    )


def test_detect_run_learned_uses_patch_embed(tmp_path):
    run = read_run(write_run(tmp_path / "learned", frozen=False))
    events = detect_run(run)
    assert events.first_layer == layer_series_name("patch_embed")
    assert events.last_layer == layer_series_name("blocks.01")
    assert [event.peak_step for event in events.spikes_on(events.first_layer)] == [248]
    assert [event.peak_step for event in events.spikes_on(events.last_layer)] == [251]
    assert [event.peak_step for event in events.spikes_on(GRAD_NORM)] == [250]
    assert [event.peak_step for event in events.spikes_on(TOKEN_GRAD_NORM)] == [248]
    assert events.spikes_on(LOSS) == []
    assert [(dip.peak_step, dip.bottom_step, dip.recovery_step) for dip in events.dips] == [
        (200, 300, 399)
    ]


def test_detect_run_frozen_uses_token_grad(tmp_path):
    run = read_run(write_run(tmp_path / "frozen", frozen=True))
    events = detect_run(run)
    assert events.arm == "frozen"
    assert events.first_layer == TOKEN_GRAD_NORM
    assert events.spikes_on(layer_series_name("patch_embed")) == []
    key, values = select_first_layer(run)
    assert key == TOKEN_GRAD_NORM
    assert len(values) == 400


def test_detect_run_json_ready(tmp_path):
    events = detect_run(read_run(write_run(tmp_path / "run", frozen=False)))
    payload = events.to_dict()
    text = json.dumps(payload, allow_nan=False)
    decoded = json.loads(text)
    assert decoded["first_layer"] == "grad_norm[patch_embed]"
    assert decoded["spikes"]["grad_norm"][0]["peak_step"] == 250
    assert decoded["dips"][0]["recovery_step"] == 399
    assert set(decoded["spikes"]) == {
        LOSS,
        GRAD_NORM,
        TOKEN_GRAD_NORM,
        *(layer_series_name(layer) for layer in LAYERS),
    }


def test_detect_run_without_tables(tmp_path):
    run = read_run(write_run(tmp_path / "killed", frozen=True, with_tables=False))
    events = detect_run(run)
    assert events.dips == []
    assert all(spikes == [] for spikes in events.spikes.values())
    assert events.first_layer == TOKEN_GRAD_NORM
    assert select_last_block(run)[0] == layer_series_name("blocks.01")


def test_detector_params_custom_thresholds(tmp_path):
    run = read_run(write_run(tmp_path / "run", frozen=False))
    strict = DetectorParams(grad_spikes=SpikeParams(min_ratio=20.0))
    events = detect_run(run, strict)
    assert events.spikes_on(GRAD_NORM) == []
    assert strict.to_dict()["grad_spikes"]["min_ratio"] == 20.0
    assert strict.to_dict()["loss_spikes"]["min_ratio"] == 1.25
