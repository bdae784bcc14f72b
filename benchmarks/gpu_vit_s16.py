"""Benchmark: ViT-S/16 MoCo v3 training throughput, monitor overhead and MFU on one CUDA GPU.

Run: python benchmarks/gpu_vit_s16.py [--batch-size 128] [--rounds 5] [--steps 10]
[--warmup-steps 3] [--no-compile]

The model is the mocov3-vit-small preset's (ViT-S/16 at 224 px, 12 heads, 4096-256 heads,
timm's AdamW) in its bf16 autocast, built by stabilitylab's Trainer. The Trainer reads a small
``.npz`` of random images, which only satisfies its dataset checks: every timed step trains
on the same random views, drawn on the GPU, so no data loading is timed.

Two arms train from the same seed:

- ``every signal``: ``Trainer.train_step``, with the monitor's loss, gradient, weight, update
  and token-gradient signals and the dense kNN queue push;
- ``no monitor``: the same method's loss, backward, optimiser step and EMA update, without
  the monitor, on a second model.

Each round times a block of ``--steps`` steps of one arm, then one of the other (the order
alternates), bracketed by ``torch.cuda.synchronize``, and the medians over the rounds are
reported. The eager arms
run first, then both again with each transformer block compiled, as ``--compile`` does.
The FLOPs of a step come from ``count_flops``. The MFU divides the achieved FLOP/s by the
measured bf16 matmul rate and by the vendor's dense bf16 peak where the GPU is known
(stabilitylab.train.flops). The ``every signal`` eager arm is also timed by a
``ThroughputMeter``, whose CUDA-event time per step should agree with the block time.

NOTE: not yet run on a GPU. The run time, estimated at a few minutes on an H100-class GPU
with most of it in the two compilations, is unmeasured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from stabilitylab.methods.base import Method
from stabilitylab.models.compiled import compile_blocks
from stabilitylab.train.flops import (
    ThroughputMeter,
    count_flops,
    format_si,
    measure_matmul_flops,
    peak_flops,
)
from stabilitylab.train.loop import Trainer, build_model, build_optimizer
from stabilitylab.train.precision import autocast_factory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_flops import (  # noqa: E402  (a sibling script, not a package)
    build_trainer,
    hardware_line,
    random_views,
    vit_s16_config,
    write_random_images,
)

STARTED = time.perf_counter()


def _log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {message}", flush=True)


def _plain_step(
    model: Method,
    optimizer: torch.optim.Optimizer,
    autocast: Callable[[], object],
    views: list[torch.Tensor],
) -> Callable[[], None]:
    """Return one optimiser step of ``model`` without the monitor, as the trainer orders it."""

    def step() -> None:
        with autocast():
            loss, _ = model.training_loss(views, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        model.adjust_gradients(0)
        optimizer.step()
        model.after_optimizer_step(0)

    return step


def _time_block(step: Callable[[], None], steps: int) -> float:
    """Return the seconds per step of ``steps`` calls of ``step``, between two device syncs."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def _interleaved(
    arms: dict[str, Callable[[], None]],
    before_block: Callable[[], None],
    rounds: int,
    steps: int,
    warmup_steps: int,
) -> dict[str, float]:
    """Return the median seconds per step of each arm over ``rounds`` interleaved blocks."""
    for step in arms.values():
        for _ in range(warmup_steps):
            step()
    times: dict[str, list[float]] = {name: [] for name in arms}
    for index in range(rounds):
        # Every other round runs the arms in reverse, so neither always follows the other.
        order = list(arms.items()) if index % 2 == 0 else list(reversed(arms.items()))
        for name, step in order:
            before_block()
            times[name].append(_time_block(step, steps))
    return {name: statistics.median(values) for name, values in times.items()}


def _print_rows(
    label: str,
    medians: dict[str, float],
    batch_size: int,
    flops_per_step: int,
    matmul: float,
    peak: float | None,
) -> None:
    for name, seconds in medians.items():
        achieved = flops_per_step / seconds
        of_peak = f"{achieved / peak:.1%}" if peak is not None else "n/a"
        print(
            f"| {name} | {label} | {1000 * seconds:.1f} | {batch_size / seconds:.0f} | "
            f"{format_si(achieved)}FLOP/s | {achieved / matmul:.1%} | {of_peak} |",
            flush=True,
        )
    ratio = medians["every signal"] / medians["no monitor"]
    print(f"| monitor overhead | {label} | ratio {ratio:.3f} | | | | |", flush=True)


def _compile_blocks(model: Method) -> None:
    # What --compile does: each transformer block compiled, the monitor's hooks eager.
    for backbone in (model.backbone, *model.target_backbones().values()):
        compile_blocks(backbone)


def run(args: argparse.Namespace) -> None:
    device = torch.device("cuda")
    print(hardware_line(device), flush=True)
    with tempfile.TemporaryDirectory() as folder:
        data_file = write_random_images(Path(folder) / "random.npz", 2 * args.batch_size, 32)
        config = vit_s16_config(data_file, args.batch_size, "bf16", "cuda")
        trainer = build_trainer(config, Path(folder), device)
        try:
            _measure(args, trainer)
        finally:
            trainer.close()
    _log("done")


def _measure(args: argparse.Namespace, trainer: Trainer) -> None:
    config, device = trainer.config, trainer.device
    model = build_model(config, trainer.derived).to(device)
    optimizer = build_optimizer(
        config, [p for p in model.parameters() if p.requires_grad], trainer.derived.lr
    )
    print(
        f"{config.optimizer}, fused: {bool(trainer.optimizer.defaults.get('fused'))}, "
        f"precision {config.precision}, batch {args.batch_size}, "
        f"{args.rounds} rounds of {args.steps} steps",
        flush=True,
    )
    views, labels = random_views(trainer, args.batch_size)
    plain = _plain_step(model, optimizer, autocast_factory(config.precision, device), views)
    # The meter counts the first warm-up step and skips the other warm-up steps, so that it
    # times the same steps as the blocks.
    meter = ThroughputMeter(device, warmup_steps=max(args.warmup_steps - 1, 0))

    def monitored() -> None:
        trainer.train_step(views, 0.0, labels=labels)

    def metered() -> None:
        with meter.step():
            monitored()

    _log("measuring the bf16 matmul rate")
    matmul = measure_matmul_flops(device, torch.bfloat16)
    peak = peak_flops(device, torch.bfloat16)
    flops_per_step = count_flops(plain)
    peak_text = f"{format_si(peak)}FLOP/s" if peak is not None else "unknown for this GPU"
    print(
        f"matmul bf16 {format_si(matmul)}FLOP/s, vendor dense bf16 peak {peak_text}, "
        f"{format_si(flops_per_step)}FLOP per step without the monitor",
        flush=True,
    )

    print("| arm | mode | step (ms) | images/s | achieved | of matmul | of peak |")
    print("|---|---|---|---|---|---|---|")
    _log("eager arms")
    arms = {"every signal": metered, "no monitor": plain}
    medians = _interleaved(arms, trainer.flush, args.rounds, args.steps, args.warmup_steps)
    _print_rows("eager", medians, args.batch_size, flops_per_step, matmul, peak)
    print(f"ThroughputMeter, every signal, eager: {meter.summary(matmul, peak)}")
    print(
        f"  CUDA-event time per step {1000 * meter.seconds() / max(meter.steps, 1):.1f} ms, "
        f"block median {1000 * medians['every signal']:.1f} ms",
        flush=True,
    )
    if args.no_compile:
        return

    _compile_blocks(trainer.model)
    _compile_blocks(model)
    _log("compiled arms (the warm-up steps compile)")
    arms = {"every signal": monitored, "no monitor": plain}
    medians = _interleaved(arms, trainer.flush, args.rounds, args.steps, args.warmup_steps)
    _print_rows("compiled", medians, args.batch_size, flops_per_step, matmul, peak)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--batch-size", type=int, default=128, help="images a step")
    parser.add_argument("--rounds", type=int, default=5, help="timed blocks per arm")
    parser.add_argument("--steps", type=int, default=10, help="optimiser steps per timed block")
    parser.add_argument(
        "--warmup-steps", type=int, default=3, help="untimed steps per arm before its blocks"
    )
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled arms")
    args = parser.parse_args()
    if min(args.batch_size, args.rounds, args.steps, args.warmup_steps) < 1:
        # The first warm-up step of the monitored arm is the one whose FLOPs are counted.
        parser.error("--batch-size, --rounds, --steps and --warmup-steps must be at least 1")
    if not torch.cuda.is_available():
        print(
            f"gpu_vit_s16.py needs a CUDA GPU, but torch {torch.__version__} finds none; "
            "run it on a GPU machine, or run benchmarks/step_flops.py on the CPU",
            file=sys.stderr,
        )
        raise SystemExit(2)
    run(args)


if __name__ == "__main__":
    main()
