"""Benchmark: the FLOP/s a training step achieves, against the machine's measured matmul FLOP/s.

Run: python benchmarks/step_flops.py [--steps 10] [--vit-batch-size 4] [--vit-steps 2]
[--device cpu] [--no-vit]

Rows:

- ``digits default``: the training step of a default ``stabilitylab run`` (the digits preset:
  MoCo v3, vit_micro at 16 px, batch 256, fp32), built by stabilitylab's Trainer and fed the
  run's own batches;
- ``ViT-S/16 224 px``: the mocov3-vit-small preset's model (ViT-S/16, 12 heads, 4096-256
  heads) at batch ``--vit-batch-size`` in fp32, on random views. The preset trains in bf16,
  which runs far slower than fp32 on a CPU without bf16 matrix instructions. The Trainer
  reads a small ``.npz`` of random images, which only satisfies its dataset checks.

Each row counts the FLOPs of its first step with ``count_flops`` and times the steps after it
with ``ThroughputMeter`` (both in stabilitylab.train.flops), the way a run reports them. The
matmul rate comes from ``measure_matmul_flops`` on the same device and dtype, in this process
and with its thread count. The last column is the achieved rate as a fraction of it: the
MFU against the measured matmul rate.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from stabilitylab.config import RunConfig, build_config, derive
from stabilitylab.data import build_data
from stabilitylab.runs import prepare_run_dir
from stabilitylab.train.flops import (
    MATMUL_DTYPES,
    ThroughputMeter,
    format_si,
    measure_matmul_flops,
    peak_flops,
)
from stabilitylab.train.loop import Trainer, epoch_loader, seed_everything

IMG_SIZE = 224
# Fewer training images than the kNN monitor's 20 neighbours fail the configuration checks.
MIN_TRAIN_IMAGES = 32


def build_trainer(config: RunConfig, folder: Path, device: torch.device) -> Trainer:
    """Build the Trainer of ``config`` with its run directory in ``folder``."""
    seed_everything(config.seed)
    data = build_data(config)
    derived = derive(config, len(data.train), data.in_chans, data.num_classes, data.img_size)
    trainer = Trainer(config, prepare_run_dir(folder / "run"), data, derived, device)
    trainer.write_header({})
    return trainer


def write_random_images(path: Path, train: int, val: int) -> Path:
    """Write an npz of random RGB images at IMG_SIZE px with 10 classes, and return its path."""
    rng = np.random.default_rng(0)
    shape = (IMG_SIZE, IMG_SIZE, 3)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (train, *shape), dtype=np.uint8),
        y_train=np.arange(train) % 10,
        x_val=rng.integers(0, 256, (val, *shape), dtype=np.uint8),
        y_val=np.arange(val) % 10,
    )
    return path


def vit_s16_config(data_file: Path, batch_size: int, precision: str, device: str) -> RunConfig:
    """Build the mocov3-vit-small preset's configuration for ``data_file`` and ``batch_size``."""
    return build_config(
        "mocov3-vit-small",
        dataset="npz",
        data_dir=str(data_file),
        batch_size=batch_size,
        precision=precision,
        device=device,
        workers=0,
    )


def random_views(trainer: Trainer, batch_size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Return two random global views (B, C, H, W) and random labels, on the trainer's device."""
    device, derived = trainer.device, trainer.derived
    shape = (batch_size, derived.in_chans, derived.img_size, derived.img_size)
    views = [torch.randn(shape, device=device) for _ in range(2)]
    labels = torch.randint(0, derived.num_classes, (batch_size,), device=device)
    return views, labels


def _batches(trainer: Trainer) -> Callable[[], tuple[list[torch.Tensor], torch.Tensor]]:
    """Return a function that yields the run's batches, epoch after epoch, on the device."""
    state = {"epoch": 0, "iterator": iter(())}

    def next_batch() -> tuple[list[torch.Tensor], torch.Tensor]:
        batch = next(state["iterator"], None)
        if batch is None:
            loader = epoch_loader(trainer.data, trainer.config, state["epoch"], trainer.device)
            state["iterator"] = iter(loader)
            state["epoch"] += 1
            batch = next(state["iterator"])
        return trainer.views(batch), batch[1].to(trainer.device)

    return next_batch


def measure_row(
    name: str,
    trainer: Trainer,
    next_batch: Callable[[], tuple[list[torch.Tensor], torch.Tensor]],
    steps: int,
) -> None:
    """Count one step of ``trainer``, time ``steps`` more, and print the row of the table."""
    meter = ThroughputMeter(trainer.device)
    for _ in range(steps + 1):  # the first step is counted, the others timed
        views, labels = next_batch()  # loading and augmenting stay outside the timed step
        with meter.step():
            trainer.train_step(views, 0.0, labels=labels)
        if trainer.recorder.due:
            trainer.flush()
    dtype = MATMUL_DTYPES[trainer.config.precision]
    matmul = measure_matmul_flops(trainer.device, dtype)
    achieved = meter.achieved_flops()
    assert achieved is not None and meter.flops_per_step is not None
    per_step = meter.seconds() / meter.steps
    print(
        f"| {name} | {trainer.config.batch_size} | {trainer.config.precision} | "
        f"{format_si(meter.flops_per_step)}FLOP | {1000 * per_step:.1f} | "
        f"{format_si(achieved)}FLOP/s | {format_si(matmul)}FLOP/s | {achieved / matmul:.1%} |"
    )
    peak = peak_flops(trainer.device, dtype)
    if peak is not None:
        print(f"  {name}: {meter.summary(matmul, peak)}")


def _cpu_name() -> str:
    """Return the CPU model from /proc/cpuinfo on Linux, else what ``platform`` reports."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown CPU"


def hardware_line(device: torch.device) -> str:
    """Describe the machine, torch and the thread count in one line."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return (
        f"machine: {platform.machine()} ({name}), {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=10, help="timed digits steps")
    parser.add_argument("--vit-batch-size", type=int, default=4, help="ViT-S/16 images a step")
    parser.add_argument("--vit-steps", type=int, default=2, help="timed ViT-S/16 steps")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--no-vit", action="store_true", help="leave out the ViT-S/16 row")
    args = parser.parse_args()
    if min(args.steps, args.vit_steps, args.vit_batch_size) < 1:
        parser.error("--steps, --vit-steps and --vit-batch-size must be at least 1")
    device = torch.device(args.device)

    print(hardware_line(device))
    print(
        "| step | batch | precision | FLOPs per step | step (ms) | achieved | matmul rate | "
        "achieved / matmul |"
    )
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        trainer = build_trainer(build_config("digits", device=args.device), Path(folder), device)
        try:
            measure_row("digits default", trainer, _batches(trainer), args.steps)
        finally:
            trainer.close()
        if args.no_vit:
            return
        batch_size = args.vit_batch_size
        data_file = write_random_images(
            Path(folder) / "random.npz", max(2 * batch_size, MIN_TRAIN_IMAGES), 16
        )
        config = vit_s16_config(data_file, batch_size, "fp32", args.device)
        trainer = build_trainer(config, Path(folder) / "vit", device)
        try:
            measure_row(
                "ViT-S/16 224 px",
                trainer,
                lambda: random_views(trainer, batch_size),
                args.vit_steps,
            )
        finally:
            trainer.close()


if __name__ == "__main__":
    main()
