"""Benchmark: the time that stabilitylab's monitors add to a training step.

Run: python benchmarks/monitor_overhead.py [--part all] [--rounds 6] [--steps 10]
                                           [--harness-rounds 8] [--harness-steps 5] [--device cpu]

Plain loop (``--part plain``): two models of each kind are built from the same seed, one of
them with ``stabilitylab.Monitor`` attached (``flush_every`` 100). Each round times a block
of ``--steps`` steps of the plain model, then one of the monitored model, on the same fixed
batch. The medians over the rounds of the per-step times, and their ratio, are printed.
Models: the timm ViT of ``docs/instrument.md`` on 8x8 one-channel images (batch 64), and a
torchvision ResNet-18 on 32x32 RGB images (batch 32), both with AdamW.

Harness (``--part harness``): four trainers of the configuration that ``stabilitylab run``
uses without options (the digits preset: MoCo v3, vit_micro, batch 256) take
``Trainer.train_step`` on the run's first batch at every step, each with another monitor:

- every signal: the run's own TrainingMonitor and MetricsRecorder, flushed to the run
  directory every ``flush_every`` steps (25) as in a run;
- none: an object with the monitor's interface that records nothing;
- naive: one ``.item()`` per parameter gradient norm at every step, a host sync each;
- histogram: a 64-bin ``torch.histc`` of every parameter's gradient and weights, copied to
  the host at every step, as wandb's ``watch(log="all", log_freq=1)`` records them.

Blocks of ``--harness-steps`` steps of the four arms alternate for ``--harness-rounds``
rounds. Flushes are timed on their own and amortised over ``flush_every`` steps, because a
median over blocks would otherwise hide them. Printed are the steps per second from the
median block, and the ratio to "none" as the median over rounds of each round's ratio. The
target for every signal is an overhead of at most 3 %.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from _harness import (
    HarnessArm,
    digits_config,
    digits_trainers,
    fixed_views,
    hardware_line,
    interleave,
    paired_ratio,
    positive_int,
    round_ratios,
    spread_text,
    timed,
)
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import stabilitylab
from stabilitylab.monitor.signals import TrainingMonitor
from stabilitylab.train.loop import Trainer

# Bins of the histogram arm, as wandb's watch() uses.
HISTOGRAM_BINS = 64
# The every-signal overhead that the harness part checks against, in percent.
TARGET_OVERHEAD = 3.0


# -- plain loop with stabilitylab.Monitor --------------------------------------------------


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
    def block() -> None:
        for _ in range(steps):
            step()

    return timed(block, device) / steps


def measure_plain(name: str, rounds: int, steps: int, device: torch.device, folder: Path) -> None:
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


def run_plain_part(rounds: int, steps: int, device: torch.device) -> None:
    print(f"plain loop, stabilitylab.Monitor: medians of {rounds} blocks of {steps} steps")
    print("| model | layer groups | plain step (ms) | monitored step (ms) | ratio |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in MODELS:
            measure_plain(name, rounds, steps, device, Path(folder))


# -- Trainer.train_step with baseline monitors ---------------------------------------------


class SilentMonitor:
    """The interface of TrainingMonitor that Trainer.train_step calls, recording nothing."""

    def __init__(self, parameters: list[nn.Parameter], device: torch.device) -> None:
        self.params = parameters
        self.device = device
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.full = False

    def record_gradients(
        self,
        loss: torch.Tensor,
        loss_scale: torch.Tensor | None = None,
        *,
        overflow: torch.Tensor | bool = False,
        skip_nonfinite: bool = False,
    ) -> torch.Tensor:
        """Return the skip flag of a step that is always applied, 0.0 on the device."""
        return torch.zeros((), device=self.device)

    def snapshot_weights(self) -> None:
        pass

    def record_updates(self) -> None:
        pass

    def close(self) -> None:
        pass


class PerParameterSyncMonitor(SilentMonitor):
    """Read every parameter's gradient norm to the host with ``.item()``, one sync each."""

    def record_gradients(self, loss: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        self.grad_norms = [p.grad.norm().item() for p in self.params if p.grad is not None]
        return super().record_gradients(loss)


class HistogramMonitor(SilentMonitor):
    """Copy a histogram of every parameter's gradient and weights to the host at every step.

    Each histogram spans the tensor's own minimum and maximum (``torch.histc`` with
    ``min=max=0``), in :data:`HISTOGRAM_BINS` bins.
    """

    def record_gradients(self, loss: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        self.gradient_histograms = [_histogram(p.grad) for p in self.params if p.grad is not None]
        return super().record_gradients(loss)

    def record_updates(self) -> None:
        self.weight_histograms = [_histogram(p) for p in self.params]


def _histogram(tensor: torch.Tensor) -> torch.Tensor:
    return torch.histc(tensor.detach().float().flatten(), bins=HISTOGRAM_BINS).cpu()


class NullRecorder:
    """The interface of MetricsRecorder that Trainer calls, keeping no rows and never due."""

    due = False

    def add(self, host: object) -> None:
        pass

    def flush(self) -> None:
        return None


def install_monitor(trainer: Trainer, monitor: SilentMonitor) -> None:
    """Replace the trainer's monitor and recorder; the run's monitor removes its hook first."""
    if isinstance(trainer.monitor, TrainingMonitor):
        trainer.monitor.close()  # the tensor hook that measures the token gradient
    trainer.monitor = monitor  # type: ignore[assignment]
    trainer.recorder = NullRecorder()  # type: ignore[assignment]


def _baseline_block(
    trainer: Trainer, views: list[torch.Tensor], labels: torch.Tensor, steps: int
) -> Callable[[], float]:
    def step() -> None:
        trainer.train_step(views, 0.0, labels=labels)

    return lambda: _time_block(step, steps, trainer.device)


BASELINES: dict[str, type[SilentMonitor]] = {
    "none": SilentMonitor,
    "naive (.item() per parameter)": PerParameterSyncMonitor,
    "histogram (wandb-like, every step)": HistogramMonitor,
}


def run_harness_part(rounds: int, steps: int, device: str) -> None:
    config = digits_config(device)
    with digits_trainers(config, count=1 + len(BASELINES)) as trainers:
        views, labels = fixed_views(trainers[0])
        every = HarnessArm(trainers[0], views, labels, steps)
        arms: dict[str, Callable[[], float]] = {"every signal": every.block}
        for trainer, (name, monitor_type) in zip(trainers[1:], BASELINES.items(), strict=True):
            install_monitor(trainer, monitor_type(trainer.trainable, trainer.device))
            arms[name] = _baseline_block(trainer, views, labels, steps)
        every.warm_up(2)
        for trainer in trainers[1:]:
            for _ in range(2):
                trainer.train_step(views, 0.0, labels=labels)
        times = interleave(arms, rounds)
        times["every signal"] = every.with_flushes(times["every signal"])
        flush_ms = 1000 * every.flush_median()
        groups = len(trainers[0].layer_names)
        parameters = len(trainers[0].trainable)
    _print_harness(times, rounds, steps, config.flush_every, flush_ms, groups, parameters)


def _print_harness(
    times: dict[str, list[float]],
    rounds: int,
    steps: int,
    flush_every: int,
    flush_ms: float,
    groups: int,
    parameters: int,
) -> None:
    print(
        f"harness, Trainer.train_step of the digits preset ({groups} layer groups, "
        f"{parameters} parameter tensors): medians of {rounds} blocks of {steps} steps"
    )
    print("| monitor | steps/s | step (ms) | step time / none |")
    print("|---|---|---|---|")
    ratios = {name: paired_ratio(values, times["none"]) for name, values in times.items()}
    for name, values in times.items():
        seconds = statistics.median(values)
        print(f"| {name} | {1 / seconds:.2f} | {1000 * seconds:.1f} | {ratios[name]:.3f} |")
    overhead = 100 * (ratios["every signal"] - 1)
    spread = spread_text(round_ratios(times["every signal"], times["none"]))
    verdict = "met" if overhead <= TARGET_OVERHEAD else "missed"
    print(
        f"every signal: flush {flush_ms:.1f} ms every {flush_every} steps (included), overhead "
        f"{overhead:+.1f} % against none ({spread}); target at most {TARGET_OVERHEAD:.0f} %: "
        f"{verdict}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part",
        choices=("all", "plain", "harness"),
        default="all",
        help="the plain-loop part, the harness part or both",
    )
    parser.add_argument(
        "--rounds", type=positive_int, default=6, help="plain loop: timed blocks per model and arm"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=10, help="plain loop: optimiser steps per block"
    )
    parser.add_argument(
        "--harness-rounds", type=positive_int, default=8, help="harness: timed blocks per arm"
    )
    parser.add_argument(
        "--harness-steps", type=positive_int, default=5, help="harness: optimiser steps per block"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(hardware_line(device))
    if args.part in ("all", "plain"):
        run_plain_part(args.rounds, args.steps, device)
    if args.part in ("all", "harness"):
        run_harness_part(args.harness_rounds, args.harness_steps, args.device)


if __name__ == "__main__":
    main()
