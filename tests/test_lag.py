"""Tests of the first-to-last-layer lag on series with planted spike delays."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from synthetic import layers_frame, log_noise, memory_run, spike_event, steps_frame

from stabilitylab.detect import DetectorParams, LagParams, detect_run
from stabilitylab.detect.lag import (
    bootstrap_median_interval,
    cross_correlation,
    lag_statistics,
    match_spikes,
)
from stabilitylab.detect.spikes import find_spikes
from stabilitylab.errors import ConfigError
from stabilitylab.runs import Run

STEPS = 700
SOURCE_SPIKES = (100, 300, 500)
DELAY = 7
LAYERS = ["patch_embed", "cls_token", "blocks.00", "blocks.01", "norm", "projector", "predictor"]


def noisy(seed: int, spikes: dict[int, float], count: int = STEPS) -> pd.Series:
    """Return log-normal noise with 10 % spread, multiplied at the given steps."""
    return pd.Series(log_noise(seed, count, spikes), index=np.arange(count))


def planted_pair(delay: int = DELAY) -> tuple[pd.Series, pd.Series]:
    source = noisy(1, {step: 20.0 for step in SOURCE_SPIKES})
    target = noisy(2, {step + delay: 8.0 for step in SOURCE_SPIKES})
    return source, target


def synthetic_run(frozen: bool) -> Run:
    """Return an in-memory run: first-layer spikes at SOURCE_SPIKES, the last block DELAY later.

    In the frozen arm the patch projection has no gradient and token_grad_norm carries the
    first-layer spikes.
    """
    step = np.arange(STEPS)
    steps = steps_frame(
        step,
        loss=3.0 * log_noise(4, STEPS) ** 0.1,
        grad_norm=log_noise(5, STEPS),
        token_grad_norm=0.1 * log_noise(3, STEPS, {s: 15.0 for s in SOURCE_SPIKES}),
    )
    grads = {}
    for index, layer in enumerate(LAYERS):
        planted: dict[int, float] = {}
        if layer == "patch_embed":
            planted = {s: 20.0 for s in SOURCE_SPIKES}
        if layer == "blocks.01":
            planted = {s + DELAY: 8.0 for s in SOURCE_SPIKES}
        if layer == "projector":
            planted = {s + DELAY + 2: 8.0 for s in SOURCE_SPIKES}
        grad = log_noise(10 + index, STEPS, planted)
        if layer == "patch_embed" and frozen:
            grad[:] = np.nan
        grads[layer] = grad
    return memory_run(
        steps,
        layers_frame(step, grads),
        name="frozen" if frozen else "learned",
        config={"freeze_patch_embed": frozen, "model": "vit_micro", "seed": 0},
        derived={"layers": LAYERS},
    )


def test_match_planted_delays():
    source = [spike_event("a", step) for step in SOURCE_SPIKES]
    target = [spike_event("b", step + DELAY) for step in SOURCE_SPIKES]
    matches = match_spikes(source, target, max_lag=50)
    assert [match.delay_steps for match in matches] == [DELAY] * 3


def test_match_beyond_max_lag_unmatched():
    matches = match_spikes([spike_event("a", 100)], [spike_event("b", 151)], max_lag=50)
    assert matches[0].target_start_step is None
    assert matches[0].delay_steps is None


def test_match_earlier_target_ignored():
    matches = match_spikes(
        [spike_event("a", 100)], [spike_event("b", 99), spike_event("b", 104)], max_lag=50
    )
    assert matches[0].delay_steps == 4


def test_match_target_used_once():
    matches = match_spikes(
        [spike_event("a", 100), spike_event("a", 102)], [spike_event("b", 105)], max_lag=50
    )
    assert matches[0].delay_steps == 5
    assert matches[1].delay_steps is None


def test_match_same_step_is_zero_delay():
    (match,) = match_spikes([spike_event("a", 200)], [spike_event("b", 200)], max_lag=50)
    assert match.delay_steps == 0


def test_bootstrap_single_value_is_nan():
    low, high = bootstrap_median_interval([7.0], samples=100, confidence=0.95, seed=0)
    assert math.isnan(low)
    assert math.isnan(high)


def test_bootstrap_constant_values_collapse():
    assert bootstrap_median_interval([7, 7, 7], 200, 0.95, 0) == (7.0, 7.0)


def test_bootstrap_interval_brackets_median():
    delays = [3, 5, 7, 9, 11, 13, 40]
    low, high = bootstrap_median_interval(delays, samples=2000, confidence=0.95, seed=0)
    assert low <= 9.0 <= high
    assert low >= 3
    assert high <= 40
    assert low < high


def test_bootstrap_same_seed_same_interval():
    delays = [1, 4, 6, 10, 30]
    first = bootstrap_median_interval(delays, 500, 0.95, seed=3)
    assert bootstrap_median_interval(delays, 500, 0.95, seed=3) == first


def test_xcorr_peak_at_planted_lag():
    source, target = planted_pair()
    correlations = cross_correlation(source, target, max_lag=20, baseline_window=100)
    assert list(correlations.index) == list(range(-20, 21))
    assert int(correlations.idxmax()) == DELAY
    assert correlations.max() > 0.5


def test_xcorr_negative_when_target_leads():
    source, target = planted_pair(delay=-4)
    correlations = cross_correlation(source, target, max_lag=20, baseline_window=100)
    assert int(correlations.idxmax()) == -4


def test_xcorr_empty_series_all_nan():
    source, _ = planted_pair()
    empty = pd.Series(np.nan, index=source.index)
    correlations = cross_correlation(source, empty, max_lag=5, baseline_window=100)
    assert correlations.isna().all()


def test_lag_statistics_planted_delay():
    source, target = planted_pair()
    stats = lag_statistics(
        "first",
        source,
        find_spikes(source),
        "last",
        target,
        find_spikes(target),
        LagParams(max_lag=20),
    )
    assert stats.source_spikes == 3
    assert stats.matched == 3
    assert stats.unmatched == 0
    assert stats.delays == [DELAY] * 3
    assert stats.median_delay == DELAY
    assert stats.mean_delay == DELAY
    assert stats.median_delay_ci == (DELAY, DELAY)
    assert stats.xcorr.lag == DELAY
    assert stats.xcorr.correlation > 0.5
    assert [peak.lag for peak in stats.window_peaks] == [DELAY] * 3
    assert stats.median_window_lag == DELAY


def test_lag_statistics_no_spikes_nan():
    source, target = noisy(1, {}), noisy(2, {})
    stats = lag_statistics("first", source, [], "last", target, [], LagParams())
    assert stats.source_spikes == 0
    assert math.isnan(stats.median_delay)
    assert math.isnan(stats.median_delay_ci[0])
    payload = stats.to_dict()
    assert payload["median_delay"] is None
    assert payload["median_delay_ci"] == [None, None]
    json.dumps(payload, allow_nan=False)


def test_detect_run_learned_lag_from_patch_embed():
    events = detect_run(synthetic_run(frozen=False))
    assert events.lag is not None
    assert events.lag.source == "grad_norm[patch_embed]"
    assert events.lag.target == "grad_norm[blocks.01]"
    assert events.lag.matched == 3
    assert events.lag.median_delay == DELAY
    assert events.lag.xcorr.lag == DELAY


def test_detect_run_frozen_lag_from_tokens():
    events = detect_run(synthetic_run(frozen=True))
    assert events.lag.source == "token_grad_norm"
    assert events.lag.median_delay == DELAY
    assert events.lag.xcorr.lag == DELAY


def test_detect_run_head_lags_listed():
    events = detect_run(synthetic_run(frozen=False))
    targets = [lag.target for lag in events.head_lags]
    assert targets == ["grad_norm[norm]", "grad_norm[projector]", "grad_norm[predictor]"]
    projector = events.head_lags[1]
    assert projector.median_delay == DELAY + 2
    assert events.head_lags[0].matched == 0


def test_detect_run_lag_in_json():
    events = detect_run(synthetic_run(frozen=False), DetectorParams(lag=LagParams(max_lag=30)))
    payload = json.loads(json.dumps(events.to_dict(), allow_nan=False))
    assert payload["lag"]["median_delay"] == DELAY
    assert payload["lag"]["delays"] == [DELAY] * 3
    assert payload["lag"]["xcorr"]["lag"] == DELAY
    assert len(payload["head_lags"]) == 3


@pytest.mark.parametrize(
    "overrides",
    [
        {"max_lag": -1},
        {"baseline_window": 1},
        {"max_lag": 60, "window_steps": 50},
        {"bootstrap_samples": 0},
        {"confidence": 1.0},
    ],
)
def test_lag_params_invalid_raise(overrides):
    with pytest.raises(ConfigError, match="invalid lag"):
        LagParams(**overrides)


@pytest.mark.parametrize(("size", "max_lag"), [(1000, 20), (60, 50), (5, 3)])
def test_lagged_correlations_match_per_lag(size, max_lag):
    from stabilitylab.detect.lag import _lagged_correlation, _lagged_correlations

    rng = np.random.default_rng(size)
    a = rng.normal(size=size)
    b = np.roll(a, 3) + 0.5 * rng.normal(size=size)
    a[rng.random(size) < 0.1] = np.nan
    b[rng.random(size) < 0.1] = np.nan
    fast = _lagged_correlations(a, b, max_lag)
    slow = np.array([_lagged_correlation(a, b, lag) for lag in range(-max_lag, max_lag + 1)])
    assert np.array_equal(np.isnan(fast), np.isnan(slow))
    np.testing.assert_allclose(fast[~np.isnan(slow)], slow[~np.isnan(slow)], atol=1e-12)


def test_lagged_correlations_of_constant_are_nan():
    from stabilitylab.detect.lag import _lagged_correlations

    values = _lagged_correlations(np.ones(100), np.random.default_rng(0).normal(size=100), 5)
    assert np.isnan(values).all()
