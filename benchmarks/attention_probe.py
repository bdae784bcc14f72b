"""Benchmark: the cost of one attention probe as a ratio to a training step, in one run.

Run: python benchmarks/attention_probe.py [--rounds 10] [--device cpu] [--warmup-steps 3]
                                          [--attention-images 32]

Trains the digits preset (MoCo v3, vit_micro, batch 256) with the attention probes on. Each
round times, interleaved in one process, a training step (the two views, forward, backward,
optimiser and momentum updates, the dense queue push) and a probe. A probe is a forward pass
of the fixed batch with the hooks, the statistics and the one transfer to the host.
Medians over the rounds are reported as a ratio to the median training step, and that
ratio divided by ``--attention-every`` is the fraction of training time that the probes
add over a run, for a few values of it.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _harness import Batches, digits_config, digits_trainers, hardware_line, timed

from stabilitylab.train.loop import Trainer

# --attention-every values whose share of the training time is printed.
EVERY_VALUES = (1, 2, 5, 10, 25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (default: 10)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed first steps")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument(
        "--attention-images", type=int, default=None, help="probe batch (default: the preset's)"
    )
    args = parser.parse_args()

    # Any value above 0 turns the probes on; the probe is timed directly.
    overrides = {"attention_every": 1}
    if args.attention_images is not None:
        overrides["attention_images"] = args.attention_images
    config = digits_config(args.device, **overrides)
    with digits_trainers(config) as (trainer,):
        times = _measure(trainer, args.rounds, args.warmup_steps)
    _print_results(times, config.attention_images, trainer.device)


def _measure(trainer: Trainer, rounds: int, warmup_steps: int) -> dict[str, list[float]]:
    batches = Batches(trainer)
    device = trainer.device
    probe = trainer.attention
    if probe is None:
        raise RuntimeError("the trainer was built without attention probes")

    def step() -> float:
        views, labels = batches.next()
        return timed(lambda: trainer.train_step(views, 0.0, labels=labels), device)

    for _ in range(warmup_steps):
        step()
    probe.record(trainer.step)  # warm-up of the probe's code path
    times: dict[str, list[float]] = {"step": [], "probe": []}
    for _ in range(rounds):
        times["step"].append(step())
        times["probe"].append(timed(lambda: probe.record(trainer.step), device))
    probe.drain()
    return times


def _print_results(times: dict[str, list[float]], images: int, device: torch.device) -> None:
    medians = {name: statistics.median(values) for name, values in times.items()}
    step, probe = medians["step"], medians["probe"]
    print(hardware_line(device))
    print(f"training step: {1000 * step:.1f} ms (median of {len(times['step'])})")
    print(f"probe of {images} images: {1000 * probe:.2f} ms, {probe / step:.4f} steps")
    shares = ", ".join(
        f"every {every}: {100 * probe / step / every:.2f} %" for every in EVERY_VALUES
    )
    print(f"share of training time with --attention-every {shares}")


if __name__ == "__main__":
    main()
