"""Benchmark: the cost of the two kNN monitors as ratios to a training step, in one run.

Run: python benchmarks/knn_monitors.py [--rounds 10] [--device cpu] [--warmup-steps 3]

Trains the digits preset (MoCo v3, vit_micro, batch 256) and, in each round, times
interleaved in one process:

- a training step (the two views, forward, backward, optimiser and momentum updates, the
  push of view-1 features into the dense queue);
- a validation-split evaluation (encode the 1347-image training bank and the 450 validation
  images, weighted kNN, bootstrap SE, collapse signals);
- a dense evaluation right after it, which reuses those validation features;
- a dense evaluation after the next training step, which encodes the validation images
  itself.

Medians over the rounds are reported as ratios to the median training step. Scaled by the
preset's ``eval_every`` and ``dense_knn_every``, they give the fraction of training time
that each monitor adds over a run.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from stabilitylab.config import build_config, derive
from stabilitylab.data import build_data
from stabilitylab.runs import prepare_run_dir
from stabilitylab.train.environment import resolve_device
from stabilitylab.train.loop import Trainer, epoch_loader, seed_everything


def _timed(action: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    action()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


class _Batches:
    """Training batches of the digits preset, epoch after epoch, in the run's order."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.epoch = 0
        self.iterator = iter(())

    def next(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        batch = next(self.iterator, None)
        if batch is None:
            trainer = self.trainer
            self.iterator = iter(
                epoch_loader(trainer.data, trainer.config, self.epoch, trainer.device)
            )
            self.epoch += 1
            batch = next(self.iterator)
        return self.trainer.views(batch), batch[1].to(self.trainer.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (default: 10)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed first steps")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    args = parser.parse_args()

    config = build_config("digits", device=args.device)
    device = resolve_device(config.device)
    seed_everything(config.seed)
    data = build_data(config)
    derived = derive(config, len(data.train), data.in_chans, data.num_classes)
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(config, prepare_run_dir(Path(folder) / "run"), data, derived, device)
        try:
            times = _measure(trainer, args.rounds, args.warmup_steps)
        finally:
            trainer.close()
    _print_results(times, config.eval_every, config.dense_knn_every, device)


def _measure(trainer: Trainer, rounds: int, warmup_steps: int) -> dict[str, list[float]]:
    batches = _Batches(trainer)
    device = trainer.device

    def step() -> float:
        views, labels = batches.next()
        return _timed(lambda: trainer.train_step(views, 0.0, labels=labels), device)

    for _ in range(warmup_steps):
        step()
    trainer.evaluate()  # warm-up of the evaluation code paths
    trainer.evaluate_dense()
    times: dict[str, list[float]] = {
        "step": [],
        "validation": [],
        "dense reused": [],
        "dense own": [],
    }
    for _ in range(rounds):
        times["step"].append(step())
        times["validation"].append(_timed(trainer.evaluate, device))
        times["dense reused"].append(_timed(trainer.evaluate_dense, device))
        times["step"].append(step())
        times["dense own"].append(_timed(trainer.evaluate_dense, device))
    return times


def _print_results(
    times: dict[str, list[float]], eval_every: int, dense_every: int, device: torch.device
) -> None:
    medians = {name: statistics.median(values) for name, values in times.items()}
    step = medians["step"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"machine: {platform.machine()} ({name or 'unknown CPU'}), {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
    )
    print(f"training step: {1000 * step:.1f} ms (median of {len(times['step'])})")
    for key in ("validation", "dense own", "dense reused"):
        print(f"{key} evaluation: {1000 * medians[key]:.1f} ms, {medians[key] / step:.3f} steps")
    # Over a run the validation monitor runs every eval_every steps. The dense monitor runs
    # every dense_every steps and reuses the validation features at common multiples.
    validation_share = medians["validation"] / eval_every / step
    common = math.lcm(eval_every, dense_every)
    reused_fraction = dense_every / common
    dense_per_step = (
        reused_fraction * medians["dense reused"] + (1 - reused_fraction) * medians["dense own"]
    ) / dense_every
    print(
        f"per run (validation every {eval_every}, dense every {dense_every} steps): "
        f"validation adds {100 * validation_share:.1f} % of training time, "
        f"dense adds {100 * dense_per_step / step:.1f} %"
    )


if __name__ == "__main__":
    main()
