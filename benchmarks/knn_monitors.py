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
import statistics

import torch
from _harness import Batches, digits_config, digits_trainers, hardware_line, timed

from stabilitylab.train.loop import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (default: 10)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed first steps")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    args = parser.parse_args()

    config = digits_config(args.device)
    with digits_trainers(config) as (trainer,):
        times = _measure(trainer, args.rounds, args.warmup_steps)
    _print_results(times, config.eval_every, config.dense_knn_every, trainer.device)


def _measure(trainer: Trainer, rounds: int, warmup_steps: int) -> dict[str, list[float]]:
    batches = Batches(trainer)
    device = trainer.device

    def step() -> float:
        views, labels = batches.next()
        return timed(lambda: trainer.train_step(views, 0.0, labels=labels), device)

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
        times["validation"].append(timed(trainer.evaluate, device))
        times["dense reused"].append(timed(trainer.evaluate_dense, device))
        times["step"].append(step())
        times["dense own"].append(timed(trainer.evaluate_dense, device))
    return times


def _print_results(
    times: dict[str, list[float]], eval_every: int, dense_every: int, device: torch.device
) -> None:
    medians = {name: statistics.median(values) for name, values in times.items()}
    step = medians["step"]
    print(hardware_line(device))
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
