"""Benchmark: time of each spike preset on one 100,000-value gradient-norm series.

Run: python benchmarks/spike_rules.py [--repeats 5] [--values 100000]

The series is log-normal noise (sigma 0.2) with a 10x spike every 5,000 values and a
30-value burst at 20x, so the multi-pass masking has work to do. The presets are timed
interleaved in one process, and each is reported in ms per series and as a ratio to the
default robust preset, which is steadier than either time.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import pandas as pd

from stabilitylab.detect import SPIKE_PRESETS, find_spikes


def make_series(count: int) -> pd.Series:
    rng = np.random.default_rng(0)
    values = np.exp(rng.normal(0.0, 0.2, count))
    values[::5000] *= 10.0
    burst = count // 2
    values[burst : burst + 30] *= 20.0
    return pd.Series(values, index=np.arange(count), name="grad_norm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs per preset (default: %(default)s)"
    )
    parser.add_argument(
        "--values", type=int, default=100_000, help="values in the series (default: %(default)s)"
    )
    args = parser.parse_args()

    series = make_series(args.values)
    totals = dict.fromkeys(SPIKE_PRESETS, 0.0)
    events = {}
    for name, params in SPIKE_PRESETS.items():  # warm-up
        events[name] = len(find_spikes(series, params))
    for _ in range(args.repeats):
        for name, params in SPIKE_PRESETS.items():
            started = time.perf_counter()
            find_spikes(series, params)
            totals[name] += time.perf_counter() - started

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, pandas {pd.__version__}")
    for name, total in totals.items():
        milliseconds = 1000 * total / args.repeats
        ratio = total / totals["robust"]
        print(
            f"{name}: {milliseconds:.1f} ms per series, {ratio:.2f}x robust, {events[name]} events"
        )


if __name__ == "__main__":
    main()
