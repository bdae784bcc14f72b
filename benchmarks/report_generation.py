"""Benchmark: ``stabilitylab report`` on a long synthetic run, its time, memory and disk use.

Run: python benchmarks/report_generation.py [--steps 100000] [--layers 30] [--repeats 1]
                                            [--profile]

Writes a finished run of ``--steps`` optimiser steps and ``--layers`` layer groups through
stabilitylab's own ``RunWriter``, in the chunks that a run with the RunConfig defaults
writes. The steps, layers and dense kNN tables get a chunk every ``--flush-every`` steps
(100), and the evals table one chunk per evaluation, every ``--eval-every`` steps (100). The
dense kNN monitor evaluates every ``--dense-every`` steps (20). The signals are log-normal
noise around smooth trends, with a gradient spike planted every 5,000 steps in a layer that
changes each time and a kNN dip every 20,000 steps, so that the detectors have events to
find. The events found and planted are printed.

``stabilitylab report`` then runs in a child process ``--repeats`` times. Printed are the
median wall time of the child, interpreter start and imports included, and its peak
resident memory, ``ru_maxrss`` of ``resource.getrusage(RUSAGE_CHILDREN)`` read by a small
interpreter that starts the child. That figure also counts the small interpreter's own
peak, about 12 MB, because Linux carries a process's peak across ``exec``. Disk use is the
size of the Parquet chunks of each table over its recorded values: every cell but the
``step`` and ``layer`` keys.
Targets: 10 s and 1 GB. ``--profile`` also runs the report in this process under cProfile
and prints the functions with the largest cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _harness import machine_line, positive_int

from stabilitylab.config import build_config, derive
from stabilitylab.runs import TABLE_COLUMNS, RunWriter

# Steps per epoch of the synthetic run, as in the test suite's synthetic runs.
STEPS_PER_EPOCH = 100
# Every this many steps a gradient spike of SPIKE_FACTOR is planted in one layer.
SPIKE_EVERY = 5_000
SPIKE_FACTOR = 20.0
# Every this many steps the kNN accuracy dips by DIP_POINTS for DIP_STEPS steps.
DIP_EVERY = 20_000
DIP_POINTS = 15.0
DIP_STEPS = 300
QUERIES = 1_000
CLASSES = 10
# Columns that identify a row instead of recording a value.
KEY_COLUMNS = ("step", "layer")
TARGET_SECONDS = 10.0
TARGET_BYTES = 10**9


def layer_names(count: int) -> list[str]:
    """Return ``count`` layer-group names as a ViT run records them, blocks in the middle."""
    head = ["patch_embed", "cls_token"]
    tail = ["norm", "projector", "predictor"]
    blocks = [f"blocks.{index:02d}" for index in range(count - len(head) - len(tail))]
    return head + blocks + tail


class SyntheticRun:
    """Tables of one synthetic run, built chunk by chunk from one random generator."""

    def __init__(self, steps: int, layers: list[str], seed: int = 0) -> None:
        self.steps = steps
        self.layers = layers
        self.rng = np.random.default_rng(seed)
        # A query is a hit while the accuracy exceeds its difficulty, so that consecutive
        # evaluations share most of their hits, as the same queries under a slowly changing
        # model do.
        self.difficulty = self.rng.random(QUERIES)

    def _noise(self, count: int, spread: float = 0.1) -> np.ndarray:
        return np.exp(self.rng.normal(0.0, spread, count))

    def steps_chunk(self, step: np.ndarray) -> pd.DataFrame:
        progress = step / self.steps
        frame = pd.DataFrame(
            {
                "step": step,
                "epoch": step / STEPS_PER_EPOCH,
                "loss": (2.0 + 3.0 * np.exp(-5 * progress)) * self._noise(len(step), 0.01),
                "lr": 1e-3 * 0.5 * (1 + np.cos(np.pi * progress)),
                "momentum": 1 - 0.005 * (1 + np.cos(np.pi * progress)),
                "weight_decay": 0.1,
                "grad_norm": self._noise(len(step)),
                "token_grad_norm": 0.1 * self._noise(len(step)),
                "loss_scale": 1.0,
                "samples_per_s": 1000.0 * self._noise(len(step), 0.02),
                "wall_time": 0.1 * step,
            }
        )
        return frame[list(TABLE_COLUMNS["steps"])]

    def layers_chunk(self, step: np.ndarray) -> pd.DataFrame:
        count = len(step) * len(self.layers)
        grad = self._noise(count).reshape(len(step), len(self.layers))  # (steps, layers)
        for row in np.flatnonzero(step % SPIKE_EVERY == SPIKE_EVERY // 2):
            layer = (step[row] // SPIKE_EVERY) % len(self.layers)
            grad[row, layer] *= SPIKE_FACTOR
        return pd.DataFrame(
            {
                "step": np.repeat(step, len(self.layers)),
                "layer": pd.Categorical(np.tile(self.layers, len(step)), categories=self.layers),
                "grad_norm": grad.reshape(-1),
                "weight_norm": 10.0 + np.repeat(step / self.steps, len(self.layers)),
                "update_ratio": 1e-3 * self._noise(count),
            }
        )

    def top1(self, step: int) -> float:
        """Return the kNN accuracy at ``step``: a rise to 80 %, with a dip every DIP_EVERY."""
        accuracy = 80.0 - 70.0 * np.exp(-5 * step / self.steps)
        if step >= DIP_EVERY and step % DIP_EVERY < DIP_STEPS:
            accuracy -= DIP_POINTS
        # Noise well below the dip detector's minimum margin of 1 point.
        return float(accuracy + self.rng.normal(0.0, 0.15))

    def evals_row(self, step: int) -> pd.DataFrame:
        hits = self.difficulty < self.top1(step) / 100
        frame = pd.DataFrame(
            {
                "step": [step],
                "epoch": [step / STEPS_PER_EPOCH],
                "knn_top1": [100 * hits.mean()],
                "knn_top5": [min(100.0, 100 * hits.mean() + 15)],
                "knn_top1_se": [100 * np.sqrt(hits.mean() * (1 - hits.mean()) / QUERIES)],
                "knn_correct": [np.packbits(hits).tobytes()],
                "feature_std": [0.1 * self._noise(1, 0.05)[0]],
                "effective_rank": [20.0 * self._noise(1, 0.05)[0]],
                "n_bank": [5000],
                "n_query": [QUERIES],
                "eval_seconds": [1.0],
            }
        )
        return frame[list(TABLE_COLUMNS["evals"])]

    def dense_chunk(self, step: np.ndarray) -> pd.DataFrame:
        top1 = np.array([self.top1(int(s)) for s in step])
        frame = pd.DataFrame(
            {
                "step": step,
                "epoch": step / STEPS_PER_EPOCH,
                "knn_top1": top1,
                "knn_top5": np.minimum(100.0, top1 + 15),
                "knn_top1_se": 1.5,
                "feature_std": 0.1 * self._noise(len(step), 0.05),
                "n_bank": 512,
                "n_query": QUERIES,
                "eval_seconds": 0.05,
            }
        )
        return frame[list(TABLE_COLUMNS["dense_knn"])]


def write_header(writer: RunWriter, args: argparse.Namespace, names: list[str]) -> None:
    """Write the config.json and the first status.json of the synthetic run of ``args``."""
    epochs = args.steps // STEPS_PER_EPOCH
    config = build_config(
        "digits",
        epochs=epochs,
        warmup_epochs=0.13 * epochs,  # the digits preset's 13 of 100 epochs
        eval_every=args.eval_every,
        dense_knn_every=args.dense_every,
        flush_every=args.flush_every,
        checkpoint_every=1000,
        attention_every=0,
        device="cpu",
    )
    derived = derive(config, config.batch_size * STEPS_PER_EPOCH, 1, CLASSES, 16)
    derived_payload = {
        **derived.to_dict(),
        "layers": names,
        "first_layer": names[0],
        "last_block": [name for name in names if name.startswith("blocks.")][-1],
    }
    writer.write_config(config.to_dict(), derived_payload, {})
    writer.write_status("running", step=0, total_steps=args.steps)


def write_run(path: Path, args: argparse.Namespace) -> None:
    """Write the synthetic run of ``args`` into ``path`` through RunWriter, as a run flushes."""
    names = layer_names(args.layers)
    writer = RunWriter(path)
    write_header(writer, args, names)

    # Evaluations are appended one chunk each, the other tables once per flush.
    run = SyntheticRun(args.steps, names)
    top1 = []
    for start in range(0, args.steps, args.flush_every):
        step = np.arange(start, min(start + args.flush_every, args.steps))
        for evaluated in step[step % args.eval_every == 0]:
            row = run.evals_row(int(evaluated))
            top1.append(float(row["knn_top1"].iloc[0]))
            writer.append("evals", row)
        dense = step[(step % args.dense_every == 0) & (step > 0)]
        if len(dense):
            writer.append("dense_knn", run.dense_chunk(dense))
        writer.append("steps", run.steps_chunk(step))
        writer.append("layers", run.layers_chunk(step))

    writer.write_status(
        "finished",
        step=args.steps,
        total_steps=args.steps,
        wall_seconds=0.1 * args.steps,
        final_knn_top1=top1[-1],
        best_knn_top1=max(top1),
        frozen_check_passed=None,
        skipped_steps=[],
    )


def table_sizes(path: Path) -> list[tuple[str, int, int, int]]:
    """Return (table, chunk files, bytes, recorded values) of every table with chunks."""
    sizes = []
    for table, columns in TABLE_COLUMNS.items():
        chunks = sorted((path / table).glob("part-*.parquet"))
        if not chunks:
            continue
        rows = sum(len(pd.read_parquet(chunk, columns=["step"])) for chunk in chunks)
        values = rows * len([name for name in columns if name not in KEY_COLUMNS])
        sizes.append((table, len(chunks), sum(chunk.stat().st_size for chunk in chunks), values))
    return sizes


# Runs the command in argv[1:] and prints its seconds, peak RSS in KiB and exit status. A
# child's ru_maxrss starts at the peak of the process that started it (Linux keeps it across
# exec), so the report runs under this small interpreter instead of under this script.
_MEASURE = """
import json, resource, subprocess, sys, time
started = time.perf_counter()
result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({
    "seconds": time.perf_counter() - started,
    "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    "returncode": result.returncode,
    "stderr": result.stderr[-2000:],
}))
"""


def measure_report(run_dir: Path, out: Path) -> tuple[float, int]:
    """Run ``stabilitylab report`` on ``run_dir`` in a child; return its seconds and peak bytes."""
    report = [sys.executable, "-m", "stabilitylab", "report", str(run_dir), "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, *report], capture_output=True, text=True, check=True
    )
    measured = json.loads(result.stdout)
    if measured["returncode"] != 0:
        raise RuntimeError(
            f"stabilitylab report exited with {measured['returncode']}: "
            f"{measured['stderr'].strip()}"
        )
    return measured["seconds"], 1024 * measured["maxrss_kib"]  # ru_maxrss is in KiB on Linux


def count_events(report_dir: Path) -> dict[str, int]:
    """Count the spikes and dips that the report's events.json lists for the one run."""
    run = json.loads((report_dir / "events.json").read_text(encoding="utf-8"))["runs"][0]
    gradient_spikes = sum(
        len(events) for series, events in run["spikes"].items() if series.startswith("grad_norm[")
    )
    return {
        "layer gradient spikes": gradient_spikes,
        "kNN dips": len(run["dips"]),
        "dense kNN dips": len(run["dense_dips"]),
    }


def profile_report(run_dir: Path, out: Path, rows: int = 25) -> str:
    """Run the report in this process under cProfile; return the top ``rows`` by cumulative."""
    from stabilitylab.report import write_report

    profiler = cProfile.Profile()
    profiler.runcall(write_report, run_dir, out)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(rows)
    return text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=100_000,
        help=f"optimiser steps of the run, a multiple of {STEPS_PER_EPOCH}",
    )
    parser.add_argument(
        "--layers", type=positive_int, default=30, help="layer groups of the run, at least 6"
    )
    parser.add_argument(
        "--flush-every", type=positive_int, default=100, help="steps per steps/layers chunk"
    )
    parser.add_argument("--eval-every", type=positive_int, default=100, help="steps per evaluation")
    parser.add_argument(
        "--dense-every", type=positive_int, default=20, help="steps per dense kNN evaluation"
    )
    parser.add_argument("--repeats", type=positive_int, default=1, help="timed report runs")
    parser.add_argument(
        "--profile", action="store_true", help="also profile one report run in this process"
    )
    args = parser.parse_args()
    if args.steps % STEPS_PER_EPOCH:
        parser.error(f"--steps {args.steps} is not a multiple of {STEPS_PER_EPOCH}")
    if args.layers < 6:
        parser.error(f"--layers {args.layers} is too few: pass at least 6 (one block)")

    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        started = time.perf_counter()
        write_run(run_dir, args)
        write_seconds = time.perf_counter() - started
        sizes = table_sizes(run_dir)
        measured = [
            measure_report(run_dir, Path(folder) / f"report{i}") for i in range(args.repeats)
        ]
        seconds = [value for value, _ in measured]
        peak_bytes = max(peak for _, peak in measured)
        events = count_events(Path(folder) / "report0")
        profile = profile_report(run_dir, Path(folder) / "profiled") if args.profile else None

    _print_results(args, write_seconds, sizes, seconds, peak_bytes)
    planted = {
        "layer gradient spikes": len(range(SPIKE_EVERY // 2, args.steps, SPIKE_EVERY)),
        "kNN dips": len(range(DIP_EVERY, args.steps, DIP_EVERY)),
        "dense kNN dips": len(range(DIP_EVERY, args.steps, DIP_EVERY)),
    }
    print(
        "found (planted): "
        + ", ".join(f"{count} ({planted[name]}) {name}" for name, count in events.items())
    )
    if profile is not None:
        print(profile)


def _print_results(
    args: argparse.Namespace,
    write_seconds: float,
    sizes: list[tuple[str, int, int, int]],
    seconds: list[float],
    peak_bytes: int,
) -> None:
    print(f"{machine_line()}, Python {platform.python_version()}, pandas {pd.__version__}")
    print(
        f"synthetic run: {args.steps} steps, {args.layers} layer groups, written in "
        f"{write_seconds:.1f} s"
    )
    print("| table | chunk files | bytes | recorded values | bytes per value |")
    print("|---|---|---|---|---|")
    for table, files, size, values in sizes:
        print(f"| {table} | {files} | {size} | {values} | {size / values:.2f} |")
    total_size = sum(size for _, _, size, _ in sizes)
    total_values = sum(values for *_, values in sizes)
    print(
        f"| all | {sum(files for _, files, _, _ in sizes)} | {total_size} | {total_values} | "
        f"{total_size / total_values:.2f} |"
    )
    report_seconds = statistics.median(seconds)
    print(
        f"stabilitylab report: {report_seconds:.1f} s (median of {len(seconds)}; target "
        f"{TARGET_SECONDS:.0f} s: {'met' if report_seconds <= TARGET_SECONDS else 'missed'}), "
        f"peak RSS {peak_bytes / 1e6:.0f} MB (target 1 GB: "
        f"{'met' if peak_bytes <= TARGET_BYTES else 'missed'})"
    )


if __name__ == "__main__":
    main()
