"""Benchmark: the time that ``stabilitylab.Monitor`` adds to a training step of a plain loop.

Run: python benchmarks/monitor_overhead.py [--rounds 10] [--steps 20] [--device cpu]

Two models of each kind are built from the same seed, one of them with a monitor attached
(``flush_every`` 100, so flushes fall inside the timed steps). Each round times a block of
``--steps`` steps of the plain model, then one of the monitored model, on the same fixed
batch. The medians over the rounds of the per-step times, and their ratio, are printed.

Models: the timm ViT of ``docs/instrument.md`` on 8x8 one-channel images (batch 64), and a
torchvision ResNet-18 on 32x32 RGB images (batch 32), both with AdamW.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import stabilitylab


def _vit() -> tuple[nn.Module, tuple[int, ...]]:
    model = VisionTransformer(
        img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=48, depth=4, num_heads=3
    )
    return model, (64, 1, 8, 8)


def _resnet18() -> tuple[nn.Module, tuple[int, ...]]:
    return torchvision.models.resnet18(weights=None, num_classes=10), (32, 3, 32, 32)


MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]] = {
    "vit (docs example)": _vit,
    "resnet18": _resnet18,
}


def _step_fn(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    monitor: stabilitylab.Monitor | None,
) -> Callable[[], None]:
    def step() -> None:
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        if monitor is not None:
            monitor.after_backward(loss)
        optimizer.step()

    return step


def _time_block(step: Callable[[], None], steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / steps


def measure(name: str, rounds: int, steps: int, device: torch.device, folder: Path) -> None:
    build = MODELS[name]
    torch.manual_seed(0)
    plain_model, shape = build()
    torch.manual_seed(0)
    monitored_model, _ = build()
    plain_model.to(device).train()
    monitored_model.to(device).train()
    images = torch.randn(shape, device=device)
    labels = torch.randint(0, 10, (shape[0],), device=device)
    plain_optimizer = torch.optim.AdamW(plain_model.parameters(), lr=1e-4)
    monitored_optimizer = torch.optim.AdamW(monitored_model.parameters(), lr=1e-4)
    out = folder / name.split()[0]
    with stabilitylab.Monitor(monitored_model, monitored_optimizer, out=out) as monitor:
        plain = _step_fn(plain_model, plain_optimizer, images, labels, None)
        monitored = _step_fn(monitored_model, monitored_optimizer, images, labels, monitor)
        for step in (plain, monitored):  # warm-up
            _time_block(step, 3, device)
        plain_times, monitored_times = [], []
        for _ in range(rounds):
            plain_times.append(_time_block(plain, steps, device))
            monitored_times.append(_time_block(monitored, steps, device))
        groups = len(monitor.grouping.groups)
    plain_ms = 1000 * statistics.median(plain_times)
    monitored_ms = 1000 * statistics.median(monitored_times)
    print(
        f"| {name} | {groups} | {plain_ms:.1f} | {monitored_ms:.1f} | "
        f"{monitored_ms / plain_ms:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed blocks per model and arm")
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps per timed block")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
    )
    print("| model | layer groups | plain step (ms) | monitored step (ms) | ratio |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in MODELS:
            measure(name, args.rounds, args.steps, device, Path(folder))


if __name__ == "__main__":
    main()
