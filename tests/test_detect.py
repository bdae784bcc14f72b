"""Tests of the spike and dip detectors on synthetic series with planted events."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
from synthetic import evals_frame, layers_frame, log_noise, spike_event, steps_frame

from stabilitylab.detect import (
    GRAD_NORM,
    LOSS,
    SPIKE_PRESETS,
    TOKEN_GRAD_NORM,
    CoOccurrenceParams,
    DetectorParams,
    DipParams,
    SpikeParams,
    detect_run,
    dip_margin,
    filter_co_occurring,
    find_dips,
    find_spikes,
    layer_series_name,
    score_spikes,
    select_first_layer,
    select_last_block,
    spike_preset,
)
from stabilitylab.detect.baselines import MAD_TO_SIGMA, robust_baseline
from stabilitylab.detect.dips import unpack_hits
from stabilitylab.detect.settings import build_detector_params
from stabilitylab.errors import ConfigError
from stabilitylab.runs import RunWriter, read_run

# The dip margins worked out in these tests use z = 2.12 standard errors of the difference.
DIP_PARAMS = DipParams(z=2.12)
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
    # At z 6 the 2.3x spike sits just above the threshold, so masking decides whether it
    # is found.
    params = SpikeParams(z_threshold=6.0)
    masked_events = find_spikes(series, params)
    assert [event.start_step for event in masked_events] == [2000, 2080]
    second = masked_events[1]
    assert second.baseline == pytest.approx(1.0, rel=0.05)
    # Without masking, the burst inflates the baseline MAD and hides the second spike.
    unmasked = find_spikes(series, dataclasses.replace(params, passes=1))
    unmasked_steps = [event.start_step for event in unmasked]
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
    events = find_spikes(series, SpikeParams(z_threshold=6.0))
    # Steps are positions x 2. Every planted spike is found but the one at step 0, which
    # has no baseline before it.
    assert [e.peak_step for e in events] == list(range(10_000, 200_000, 10_000))


# Dips


def eval_frame(steps: list[int], top1: list[float], n_query: float = 1000) -> pd.DataFrame:
    return pd.DataFrame({"step": steps, "knn_top1": top1, "n_query": n_query})


def test_dip_margin_binomial_and_minimum():
    params = DipParams(min_margin=1.0, z=2.0)
    # Two evaluations of 50 % over 1000 images: the difference has a standard error of
    # 100 * sqrt(0.25 * 2 / 1000) = 2.24 points, so the margin is 4.47.
    assert dip_margin(50.0, 1000, params) == pytest.approx(2 * 100 * math.sqrt(0.5 / 1000))
    assert dip_margin(50.0, 1000, params, n_query_current=250) == pytest.approx(
        2 * 100 * math.sqrt(0.25 * (1 / 1000 + 1 / 250))
    )
    assert dip_margin(50.0, 1_000_000, params) == pytest.approx(1.0)
    assert dip_margin(50.0, np.nan, params) == pytest.approx(1.0)
    assert dip_margin(100.0, 1000, params) == pytest.approx(1.0)


def test_dip_planted_found_with_recovery():
    steps = [0, 100, 200, 300, 400, 500, 600, 700, 800]
    top1 = [10.0, 30.0, 50.0, 46.0, 40.0, 35.0, 45.5, 44.0, 52.0]
    dip, second = find_dips(eval_frame(steps, top1), DIP_PARAMS)
    # The margin at 50 % over 1000 images is 2.12 * 2.24 = 4.74, so 46 and 45.5 are within
    # it. The fall to 44 after the recovery is a second dip.
    assert dip.margin == pytest.approx(2.12 * 100 * math.sqrt(0.5 / 1000))
    assert dip.margin_source == "binomial"
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
    (dip,) = find_dips(eval_frame(steps, top1, n_query=10_000), DIP_PARAMS)
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
    grad = log_noise(rng, len(step), {250: 10.0})
    token = log_noise(rng, len(step), {248: 12.0}, log_mean=-2.0)
    loss = 2.0 * log_noise(rng, len(step), spread=0.01)
    return steps_frame(step, loss, grad, token, lr=1.5e-4, samples_per_s=1000.0)


def layers_table(step: np.ndarray, rng: np.random.Generator, frozen: bool) -> pd.DataFrame:
    planted = {"patch_embed": {248: 15.0}, "blocks.01": {251: 9.0}}
    grads = {}
    for layer in LAYERS:
        values = log_noise(rng, len(step), planted.get(layer))
        if layer == "patch_embed" and frozen:
            values[:] = np.nan
        grads[layer] = values
    return layers_frame(step, grads)


def evals_table() -> pd.DataFrame:
    return evals_frame(
        [0, 100, 200, 300, 399],
        [10.0, 30.0, 40.0, 25.0, 42.0],
        epoch=[0.0, 1.0, 2.0, 3.0, 4.0],
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


# Spike rules and presets


def reference_baseline(log_values: np.ndarray, masked: np.ndarray, params: SpikeParams):
    """Compute the mean_std or ema baseline value by value, straight from its definition."""
    count = len(log_values)
    centre = np.full(count, np.nan)
    scale = np.full(count, np.nan)
    if params.rule == "mean_std":
        for t in range(count):
            lo = max(0, t - params.window)
            history = log_values[lo:t][~masked[lo:t]]
            if len(history) >= params.min_periods and len(history) >= 2:
                centre[t] = history.mean()
                scale[t] = history.std(ddof=1)
        return centre, scale
    weighted_sum = weight = weighted_square = square_weight = 0.0
    seen = 0
    for t in range(count):
        if seen >= params.min_periods:
            centre[t] = weighted_sum / weight
            scale[t] = math.sqrt(weighted_square / square_weight)
        if masked[t]:
            continue
        weighted_sum = params.alpha * weighted_sum + log_values[t]
        weight = params.alpha * weight + 1.0
        deviation = log_values[t] - weighted_sum / weight
        weighted_square = params.alpha * weighted_square + deviation**2
        square_weight = params.alpha * square_weight + 1.0
        seen += 1
    return centre, scale


def reference_trailing_median(values: np.ndarray, window: int, min_periods: int) -> np.ndarray:
    """Median of the finite values among the ``window`` positions before each, by a loop."""
    medians = np.full(len(values), np.nan)
    for t in range(len(values)):
        history = values[max(0, t - window) : t]
        history = history[np.isfinite(history)]
        if len(history) >= min_periods:
            medians[t] = np.median(history)
    return medians


@pytest.mark.parametrize("count", [0, 1, 2, 19, 21, 60, 250])
@pytest.mark.parametrize(("window", "min_periods"), [(100, 20), (2, 1), (10, 10), (300, 5)])
def test_robust_baseline_matches_definition(count, window, min_periods):
    rng = np.random.default_rng(count + window)
    log_values = rng.normal(size=count)
    log_values[rng.random(count) < 0.05] = -np.inf
    masked = rng.random(count) < 0.2
    median, scale = robust_baseline(pd.Series(log_values), masked, window, min_periods)
    history = np.where(masked, np.nan, log_values)
    expected_median = reference_trailing_median(history, window, min_periods)
    with np.errstate(invalid="ignore"):
        deviation = np.abs(history - expected_median)
    expected_mad = reference_trailing_median(deviation, window, min_periods)
    np.testing.assert_array_equal(median, expected_median)
    np.testing.assert_array_equal(scale, expected_mad / MAD_TO_SIGMA)
    if count > 2 * min_periods + 1 and min_periods < window:
        assert np.isfinite(median).any()
        assert np.isfinite(scale).any()


def reference_rule_scores(series: pd.Series, params: SpikeParams) -> pd.DataFrame:
    """Score spikes with the loop baselines above, recomputed in full on every pass."""
    log_values = np.log(series.to_numpy())
    masked = np.zeros(len(series), dtype=bool)
    for _ in range(params.passes):
        centre, scale = reference_baseline(log_values, masked, params)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (log_values - centre) / scale
        ratio = np.exp(log_values - centre)
        flagged = (z >= params.z_threshold) & (ratio >= params.min_ratio)
        if np.array_equal(flagged, masked):
            break
        masked = flagged
    return pd.DataFrame({"baseline": np.exp(centre), "z": z, "spike": flagged})


@pytest.mark.parametrize("preset", sorted(SPIKE_PRESETS))
def test_spike_rules_find_planted(preset):
    # A gentle trend, because olmo2's 1000-value mean lags the level by half a window.
    series = noisy_series(3000, trend=2.0)
    series.iloc[1200] *= 8.0
    series.iloc[2000:2003] *= 5.0
    events = find_spikes(series, SPIKE_PRESETS[preset])
    assert [(event.start_step, event.end_step) for event in events] == [
        (2400, 2400),
        (4000, 4004),
    ]
    assert events[0].ratio == pytest.approx(8.0, rel=0.35)
    assert events[1].ratio == pytest.approx(5.0, rel=0.35)


@pytest.mark.parametrize("preset", sorted(SPIKE_PRESETS))
@pytest.mark.parametrize("trend", [20.0, 0.05])
def test_spike_rules_ignore_noise(preset, trend):
    for seed in range(3):
        series = noisy_series(3000, seed=seed, sigma=0.15, trend=trend)
        assert find_spikes(series, SPIKE_PRESETS[preset]) == []


@pytest.mark.parametrize("preset", sorted(SPIKE_PRESETS))
def test_spike_rules_mask_earlier_burst(preset):
    # The robust preset at z 6, where the 2.3x spike is close to the threshold.
    params = SPIKE_PRESETS[preset]
    if params.rule == "robust":
        params = dataclasses.replace(params, z_threshold=6.0)
    series = noisy_series(3000, seed=3)
    series.iloc[1500:1530] *= 20.0
    series.iloc[1540] *= 2.3
    burst, second = find_spikes(series, params)
    assert (burst.start_step, burst.end_step) == (3000, 3058)
    assert second.peak_step == 3080
    assert second.baseline == pytest.approx(1.0, rel=0.05)
    # Without masking the burst stays in the baseline and hides the later spike.
    unmasked = find_spikes(series, dataclasses.replace(params, passes=1))
    assert 3080 not in [event.peak_step for event in unmasked]


@pytest.mark.parametrize(
    "params",
    [
        SpikeParams(rule="mean_std", window=50, min_periods=10, z_threshold=4.0, passes=12),
        SpikeParams(rule="ema", alpha=0.9, min_periods=10, z_threshold=3.0, passes=12),
    ],
    ids=["mean_std", "ema"],
)
def test_spike_rules_match_reference(params):
    series = noisy_series(700, seed=11, sigma=0.2)
    rng = np.random.default_rng(4)
    for position in rng.choice(np.arange(30, 700), size=15, replace=False):
        series.iloc[position] *= rng.uniform(1.5, 30.0)
    series.iloc[400:412] *= 15.0
    fast = score_spikes(series, params)
    slow = reference_rule_scores(series, params)
    np.testing.assert_array_equal(fast["spike"].to_numpy(), slow["spike"].to_numpy())
    np.testing.assert_allclose(fast["baseline"].to_numpy(), slow["baseline"].to_numpy())
    np.testing.assert_allclose(fast["z"].to_numpy(), slow["z"].to_numpy(), rtol=1e-6)
    assert fast["spike"].to_numpy()[400:412].all()


@pytest.mark.parametrize("preset", sorted(SPIKE_PRESETS))
def test_spike_rules_long_series(preset):
    series = noisy_series(100_000, sigma=0.1)
    series.iloc[::5000] *= 10.0
    events = find_spikes(series, SPIKE_PRESETS[preset])
    assert [event.peak_step for event in events] == list(range(10_000, 200_000, 10_000))


def test_spike_params_ema_ignores_window():
    params = SpikeParams(rule="ema", window=10, min_periods=25)
    assert params.min_periods == 25
    with pytest.raises(ConfigError, match="at most the window size"):
        SpikeParams(rule="mean_std", window=10, min_periods=25)


def test_spike_rule_unknown_raises():
    with pytest.raises(ConfigError, match="'median'.*robust, mean_std, ema"):
        SpikeParams(rule="median")


@pytest.mark.parametrize("overrides", [{"alpha": 0.0}, {"alpha": 1.0}, {"persistence": 0}])
def test_spike_params_new_fields_invalid_raise(overrides):
    with pytest.raises(ConfigError):
        SpikeParams(**overrides)


def test_spike_preset_unknown_raises():
    with pytest.raises(ConfigError) as error:
        spike_preset("nope")
    message = str(error.value)
    assert "'nope'" in message
    for name in SPIKE_PRESETS:
        assert name in message


def test_spike_preset_values_and_overrides():
    assert spike_preset("robust") == SpikeParams()
    olmo2 = spike_preset("olmo2")
    assert (olmo2.rule, olmo2.window, olmo2.z_threshold) == ("mean_std", 1000, 7.0)
    olmo_core = spike_preset("olmo-core")
    assert (olmo_core.rule, olmo_core.window, olmo_core.z_threshold) == ("mean_std", 128, 6.0)
    zclip = spike_preset("zclip")
    assert (zclip.rule, zclip.z_threshold, zclip.alpha) == ("ema", 2.5, 0.97)
    changed = spike_preset("olmo2", z_threshold=5.0)
    assert changed.z_threshold == 5.0
    assert changed.window == 1000
    with pytest.raises(ConfigError):
        spike_preset("olmo2", window=1)


# Persistence


def test_spikes_persistence_drops_blip():
    series = noisy_series(1000)
    series.iloc[400] *= 10.0
    series.iloc[800:803] *= 10.0
    assert [event.start_step for event in find_spikes(series)] == [800, 1600]
    (event,) = find_spikes(series, SpikeParams(persistence=2))
    assert (event.start_step, event.end_step) == (1600, 1604)
    assert find_spikes(series, SpikeParams(persistence=4)) == []


def test_spikes_persistence_keeps_blip_masked():
    series = noisy_series(1000)
    series.iloc[400] *= 10.0
    single = score_spikes(series, SpikeParams())
    persistent = score_spikes(series, SpikeParams(persistence=2))
    assert bool(persistent["outlier"].iloc[400])
    assert not bool(persistent["spike"].iloc[400])
    np.testing.assert_array_equal(persistent["baseline"], single["baseline"])
    np.testing.assert_array_equal(persistent["outlier"], single["outlier"])


def test_spikes_persistence_across_nan_gap():
    series = noisy_series(1000)
    series.iloc[500] *= 10.0
    series.iloc[501] = np.nan
    series.iloc[502] *= 10.0
    (event,) = find_spikes(series, SpikeParams(persistence=2))
    assert (event.start_step, event.end_step) == (1000, 1004)


# Co-occurrence


def test_co_occurrence_keeps_pair_drops_lone():
    spikes = {
        "a": [spike_event("a", 100), spike_event("a", 900)],
        "b": [spike_event("b", 112)],
        "c": [],
    }
    kept = filter_co_occurring(spikes, CoOccurrenceParams(min_series=2, window_steps=20))
    assert kept["a"] == [spike_event("a", 100)]
    assert kept["b"] == [spike_event("b", 112)]
    assert kept["c"] == []
    assert list(kept) == ["a", "b", "c"]
    assert len(spikes["a"]) == 2


def test_co_occurrence_window_edge():
    spikes = {
        "a": [spike_event("a", 100, 110)],
        "b": [spike_event("b", 130)],
        "c": [spike_event("c", 80)],
    }
    params = CoOccurrenceParams(min_series=2, window_steps=20)
    kept = filter_co_occurring(spikes, params)
    # b starts 20 steps after a ends, c ends 20 steps before a starts: both within the window.
    assert kept == spikes
    narrow = filter_co_occurring(spikes, dataclasses.replace(params, window_steps=19))
    assert narrow == {"a": [], "b": [], "c": []}


def test_co_occurrence_long_span_overlaps():
    spikes = {"a": [spike_event("a", 100, 400)], "b": [spike_event("b", 380)]}
    kept = filter_co_occurring(spikes, CoOccurrenceParams(min_series=2, window_steps=0))
    assert kept == spikes


def test_co_occurrence_same_series_counts_once():
    spikes = {"a": [spike_event("a", 100), spike_event("a", 105)], "b": [spike_event("b", 500)]}
    kept = filter_co_occurring(spikes, CoOccurrenceParams(min_series=2, window_steps=50))
    assert kept == {"a": [], "b": []}


def test_co_occurrence_three_series_needed():
    spikes = {
        "a": [spike_event("a", 100)],
        "b": [spike_event("b", 110)],
        "c": [spike_event("c", 300)],
    }
    params = CoOccurrenceParams(min_series=3, window_steps=50)
    assert filter_co_occurring(spikes, params) == {"a": [], "b": [], "c": []}
    spikes["c"] = [spike_event("c", 140)]
    assert filter_co_occurring(spikes, params) == spikes


def test_co_occurrence_off_keeps_all():
    spikes = {"a": [spike_event("a", 100)], "b": []}
    kept = filter_co_occurring(spikes, CoOccurrenceParams())
    assert kept == spikes
    assert kept["a"] is not spikes["a"]
    assert filter_co_occurring({}, CoOccurrenceParams(min_series=2)) == {}


@pytest.mark.parametrize("overrides", [{"min_series": 0}, {"window_steps": -1}])
def test_co_occurrence_params_invalid_raise(overrides):
    with pytest.raises(ConfigError):
        CoOccurrenceParams(**overrides)


def test_detect_run_co_occurrence(tmp_path):
    run = read_run(write_run(tmp_path / "run", frozen=False))
    # Four gradient series spike within 3 steps: patch_embed, token, the total and blocks.01.
    four = detect_run(run, DetectorParams(co_occurrence=CoOccurrenceParams(min_series=4)))
    assert [event.peak_step for event in four.spikes_on(GRAD_NORM)] == [250]
    assert [event.peak_step for event in four.spikes_on(four.last_layer)] == [251]
    five = detect_run(run, DetectorParams(co_occurrence=CoOccurrenceParams(min_series=5)))
    assert all(events == [] for events in five.spikes.values())
    assert LOSS in five.spikes
    assert five.to_dict()["spikes"][GRAD_NORM] == []
    params = DetectorParams(co_occurrence=CoOccurrenceParams(min_series=5)).to_dict()
    assert params["co_occurrence"] == {"min_series": 5, "window_steps": 50}


# Dip margins from the bootstrap standard error


def bootstrap_frame(top1: list[float], se: list[float], n_query: float = 1000) -> pd.DataFrame:
    steps = list(range(0, 100 * len(top1), 100))
    return pd.DataFrame({"step": steps, "knn_top1": top1, "knn_top1_se": se, "n_query": n_query})


def test_dip_bootstrap_margin_used():
    evals = bootstrap_frame([40.0, 50.0, 47.0, 51.0], [0.6, 0.5, 0.8, 0.5])
    (dip,) = find_dips(evals, DIP_PARAMS)
    # The binomial margin at 50 % over 1000 images would be 4.74, so the 3-point drop would
    # not count. The bootstrap standard errors give 2.12 * sqrt(0.5^2 + 0.8^2) = 2.0.
    assert dip.margin_source == "bootstrap"
    assert dip.margin == pytest.approx(2.12 * math.sqrt(0.5**2 + 0.8**2))
    assert (dip.peak_step, dip.start_step, dip.recovery_step) == (100, 200, 300)
    assert dip.to_dict()["margin_source"] == "bootstrap"


def test_dip_bootstrap_minimum_margin():
    evals = bootstrap_frame([50.0, 48.5, 50.0], [0.1, 0.1, 0.1])
    (dip,) = find_dips(evals, DipParams(min_margin=1.0))
    assert dip.margin == pytest.approx(1.0)
    assert dip.margin_source == "bootstrap"


@pytest.mark.parametrize("missing", [1, 2])
def test_dip_bootstrap_nan_falls_back(missing):
    # A NaN standard error at the peak (1) or at the dip (2) gives the binomial margin there.
    se = [0.5, 0.5, 0.5, 0.5]
    se[missing] = np.nan
    evals = bootstrap_frame([40.0, 50.0, 44.0, 51.0], se)
    (dip,) = find_dips(evals, DIP_PARAMS)
    assert dip.margin_source == "binomial"
    assert dip.margin == pytest.approx(2.12 * 100 * math.sqrt(0.25 * 2 / 1000))


def test_dip_fallback_per_row():
    evals = bootstrap_frame([50.0, 47.0, 50.0, 47.0, 50.0], [0.5, 0.5, 0.5, np.nan, 0.5])
    dips = find_dips(evals, DIP_PARAMS)
    # The first 3-point drop exceeds the bootstrap margin of 1.5, the second stays inside
    # the binomial margin of 4.74.
    assert [dip.start_step for dip in dips] == [100]
    assert dips[0].margin_source == "bootstrap"


def test_dip_margin_sources_without_columns():
    no_se = pd.DataFrame({"step": [0, 1, 2], "knn_top1": [50.0, 40.0, 50.0], "n_query": 1000})
    (binomial,) = find_dips(no_se)
    assert binomial.margin_source == "binomial"
    bare = pd.DataFrame({"step": [0, 1, 2], "knn_top1": [50.0, 40.0, 50.0]})
    (minimum,) = find_dips(bare)
    assert minimum.margin_source == "minimum"
    assert minimum.margin == pytest.approx(1.0)


def test_dip_margin_bootstrap_arguments():
    params = DipParams(min_margin=0.0, z=2.0)
    margin = dip_margin(50.0, 1000, params, se_peak=0.3, se_current=0.4)
    assert margin == pytest.approx(1.0)
    fallback = dip_margin(50.0, 1000, params, se_peak=0.3, se_current=np.nan)
    assert fallback == pytest.approx(2 * 100 * math.sqrt(0.5 / 1000))


def test_dip_other_accuracy_column():
    evals = pd.DataFrame(
        {
            "step": [0, 100, 200, 300],
            "dense_top1": [50.0, 52.0, 45.0, 53.0],
            "dense_top1_se": [1.0, 1.0, 1.0, 1.0],
            "knn_top1": [50.0, 52.0, 52.0, 53.0],
        }
    )
    (dip,) = find_dips(evals, DIP_PARAMS, column="dense_top1")
    assert dip.series == "dense_top1"
    assert dip.margin_source == "bootstrap"
    assert dip.margin == pytest.approx(2.12 * math.sqrt(2.0))
    assert find_dips(evals, DIP_PARAMS) == []
    assert find_dips(evals, column="absent_top1") == []
    (named,) = find_dips(
        evals.rename(columns={"dense_top1_se": "spread"}),
        DIP_PARAMS,
        column="dense_top1",
        se_column="spread",
    )
    assert named.margin_source == "bootstrap"


# Detector parameters from the report options


def test_build_detector_params_defaults():
    assert build_detector_params() == DetectorParams()


def test_build_detector_params_window_lowers_min_periods():
    params = build_detector_params(spike_preset_name="olmo-core", spike_window=8)
    assert params.grad_spikes.window == 8
    assert params.grad_spikes.min_periods == 8
    assert params.loss_spikes.min_periods == 8


def test_build_detector_params_preset_and_overrides():
    params = build_detector_params(
        spike_preset_name="zclip",
        spike_z=3.0,
        spike_window=10,
        persistence=2,
        co_occurrence=3,
        co_window_steps=20,
        dip_z=3.0,
    )
    assert params.grad_spikes.rule == "ema"
    assert params.grad_spikes.z_threshold == 3.0
    assert params.grad_spikes.window == 10
    # The EMA has no window, so its warm-up stays at the preset's 25 values.
    assert params.grad_spikes.min_periods == 25
    assert params.grad_spikes.persistence == 2
    assert params.loss_spikes.rule == "ema"
    assert params.loss_spikes.min_ratio == 1.25
    assert params.grad_spikes.min_ratio == 2.0
    assert params.co_occurrence == CoOccurrenceParams(min_series=3, window_steps=20)
    assert params.dips.z == 3.0
    assert params.dips.min_margin == 1.0


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"spike_preset_name": "nope"}, "unknown spike preset 'nope'"),
        ({"spike_window": 1}, "--spike-window 1 is invalid"),
        ({"spike_z": -1.0}, "--spike-z -1.0 is invalid"),
        ({"persistence": 0}, "--persistence 0 is invalid"),
        ({"co_occurrence": 0}, "--co-occurrence 0 is invalid"),
        ({"dip_z": -2.0}, "--dip-z -2.0 is invalid"),
    ],
)
def test_build_detector_params_invalid_raise(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        build_detector_params(**overrides)


def paired_frame(hits: list[np.ndarray]) -> pd.DataFrame:
    """Return evaluations on one query set from per-query hit arrays, with packed hits."""
    count = len(hits[0])
    return pd.DataFrame(
        {
            "step": [100 * index for index in range(len(hits))],
            "knn_top1": [100.0 * row.mean() for row in hits],
            "knn_top1_se": 100.0 * np.sqrt(0.25 / count),
            "knn_correct": [np.packbits(row.astype(bool)).tobytes() for row in hits],
            "n_query": count,
        }
    )


def test_dip_paired_margin_used():
    # 1000 queries at 80 %: the drop of 2 points flips 20 hits to misses and nothing else,
    # which is a clear change on the same queries, though it is inside the unpaired margin.
    peak = np.zeros(1000, dtype=np.int8)
    peak[:800] = 1
    drop = peak.copy()
    drop[780:800] = 0
    (dip,) = find_dips(paired_frame([peak, drop, peak]))
    difference = drop - peak
    assert dip.margin_source == "paired"
    assert dip.margin == pytest.approx(max(1.0, 3.0 * 100 * difference.std() / math.sqrt(1000)))
    assert (dip.start_step, dip.recovery_step) == (100, 200)


def test_dip_paired_churn_is_noise():
    # The same 2-point drop, but 100 queries changed in both directions: no dip.
    rng = np.random.default_rng(0)
    peak = (rng.random(1000) < 0.8).astype(np.int8)
    churn = peak.copy()
    hits = np.flatnonzero(peak == 1)
    misses = np.flatnonzero(peak == 0)
    churn[hits[:60]] = 0
    churn[misses[:40]] = 1
    assert 100 * (peak.mean() - churn.mean()) == pytest.approx(2.0)
    assert find_dips(paired_frame([peak, churn, peak])) == []


def test_dip_paired_needs_equal_counts():
    peak = np.ones(1000, dtype=np.int8)
    drop = np.ones(900, dtype=np.int8)
    drop[:100] = 0
    evals = paired_frame([peak, peak])
    evals.loc[1, "knn_correct"] = np.packbits(drop.astype(bool)).tobytes()
    evals.loc[1, "n_query"] = 900
    evals.loc[1, "knn_top1"] = 100.0 * drop.mean()
    (dip,) = find_dips(evals)
    assert dip.margin_source == "bootstrap"


def test_unpack_hits_rejects_short_buffer():
    packed = np.packbits(np.ones(16, dtype=bool)).tobytes()
    assert unpack_hits(packed, 16).sum() == 16
    assert unpack_hits(packed, 17) is None
    assert unpack_hits(float("nan"), 16) is None


def test_dip_successive_floor_for_turnover():
    # A flat curve with 2-point noise between evaluations: its drops exceed the bootstrap
    # margin of 2.1 points but not 3 times the spread of successive differences.
    top1 = list(50.0 + 2.0 * np.random.default_rng(2).standard_normal(12))
    evals = bootstrap_frame(top1, [0.5] * len(top1))
    assert len(find_dips(evals)) == 4
    assert find_dips(evals, successive_noise=True) == []
    deep = bootstrap_frame([*top1, 30.0], [0.5] * (len(top1) + 1))
    (dip,) = find_dips(deep, successive_noise=True)
    assert dip.margin_source == "successive"
    assert dip.bottom_top1 == 30.0
