"""Set-up that the benchmark scripts share: the digits trainer, its batches and the timers.

Each script imports this module by name, which works because ``python benchmarks/NAME.py``
puts the ``benchmarks`` folder first on ``sys.path``. torch and the trainer are imported in
the functions that use them, so that a script that needs neither (report_generation.py)
starts without them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from stabilitylab.config import RunConfig, build_config, derive

if TYPE_CHECKING:
    import torch

    from stabilitylab.train.loop import Trainer


def machine_line() -> str:
    """Describe the machine: its architecture, CPU model and CPU count."""
    name = platform.processor() or _cpu_model_name()
    return f"machine: {platform.machine()} ({name or 'unknown CPU'}), {os.cpu_count()} CPUs"


def hardware_line(device: torch.device) -> str:
    """Describe the machine, the torch version and threads, and the device, in one line."""
    import torch

    line = machine_line()
    if device.type == "cuda":
        line += f", {torch.cuda.get_device_name(device)}"
    return f"{line}, torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"


def _cpu_model_name() -> str:
    """Return the CPU's ``model name`` from /proc/cpuinfo, or "" where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return ""


def synchronize(device: torch.device) -> None:
    """Wait for the queued kernels of ``device``, so that a host clock reads their time."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def timed(action: Callable[[], object], device: torch.device) -> float:
    """Return the seconds that ``action`` takes, its device kernels included."""
    synchronize(device)
    started = time.perf_counter()
    action()
    synchronize(device)
    return time.perf_counter() - started


def interleave(arms: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each arm once per round and collect what each returns, by arm.

    The order of the arms rotates by one each round (ABC, BCA, CAB, ...), so no arm always
    runs right after the same other one, for example after the one that writes files.
    """
    names = list(arms)
    results: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(arms[name]())
    return results


def positive_int(text: str) -> int:
    """Parse a command-line count of 1 or more, for ``argparse``'s ``type``."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"invalid count {text!r}: pass a whole number of 1 or more"
        )
    return value


def paired_ratio(seconds: list[float], reference: list[float]) -> float:
    """Return the median over rounds of ``seconds[i] / reference[i]``.

    Pairing the blocks of one round cancels load that changes slowly across rounds, which a
    ratio of the two medians would keep.
    """
    return statistics.median(round_ratios(seconds, reference))


def round_ratios(seconds: list[float], reference: list[float]) -> list[float]:
    """Return ``seconds[i] / reference[i]`` of every round."""
    return [a / b for a, b in zip(seconds, reference, strict=True)]


def spread_text(ratios: list[float]) -> str:
    """Describe the spread of per-round ratios, such as ``rounds 0.95 to 1.04``."""
    return f"rounds {min(ratios):.3f} to {max(ratios):.3f}"


def digits_config(device: str, **overrides: object) -> RunConfig:
    """Return the configuration of ``stabilitylab run`` with no options: the digits preset."""
    return build_config("digits", device=device, **overrides)


@contextlib.contextmanager
def digits_trainers(config: RunConfig, count: int = 1) -> Iterator[list[Trainer]]:
    """Build ``count`` trainers of ``config`` on one data bundle, each in a temporary run dir.

    Every trainer builds its model from ``config.seed``, so all of them start from the same
    weights. They are closed, and their run directories removed, on exit.
    """
    from stabilitylab.data import build_data
    from stabilitylab.runs import prepare_run_dir
    from stabilitylab.train.environment import resolve_device
    from stabilitylab.train.loop import Trainer, seed_everything

    device = resolve_device(config.device)
    seed_everything(config.seed)
    data = build_data(config)
    derived = derive(config, len(data.train), data.in_chans, data.num_classes, data.img_size)
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as stack:
        trainers = []
        for index in range(count):
            run_dir = prepare_run_dir(Path(folder) / f"run{index}")
            trainer = Trainer(config, run_dir, data, derived, device)
            stack.callback(trainer.close)
            trainers.append(trainer)
        yield trainers


class Batches:
    """Training batches of a trainer's data, epoch after epoch, in the run's order."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.epoch = 0
        self.iterator: Iterator = iter(())

    def next(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Return the views and the labels of the next batch, on the trainer's device."""
        from stabilitylab.train.loop import epoch_loader

        batch = next(self.iterator, None)
        if batch is None:
            trainer = self.trainer
            self.iterator = iter(
                epoch_loader(trainer.data, trainer.config, self.epoch, trainer.device)
            )
            self.epoch += 1
            batch = next(self.iterator)
        return self.trainer.views(batch), batch[1].to(self.trainer.device)


def fixed_views(trainer: Trainer) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Return the views and the labels of the run's first batch, to train on at every step."""
    return Batches(trainer).next()


class HarnessArm:
    """Steps of ``Trainer.train_step`` on fixed views, flushed to the run directory as a run is.

    A flush happens every ``flush_every`` steps, so a block of fewer steps may or may not
    contain one, and the median over blocks would hide it. :meth:`block` therefore returns
    the step time without the flushes, which are timed on their own and amortised over
    ``flush_every`` steps by :meth:`with_flushes`.
    """

    def __init__(
        self, trainer: Trainer, views: list[torch.Tensor], labels: torch.Tensor, steps: int
    ) -> None:
        self.trainer = trainer
        self.views = views
        self.labels = labels
        self.steps = steps
        self.flush_seconds: list[float] = []

    def warm_up(self, steps: int) -> None:
        """Take ``steps`` untimed steps and one untimed flush."""
        for _ in range(steps):
            self.trainer.train_step(self.views, 0.0, labels=self.labels)
        self.trainer.flush()

    def block(self) -> float:
        """Take ``steps`` steps; return the seconds per step, flushes left out."""
        trainer, device = self.trainer, self.trainer.device
        synchronize(device)
        started = time.perf_counter()
        flushing = 0.0
        for _ in range(self.steps):
            trainer.train_step(self.views, 0.0, labels=self.labels)
            if trainer.recorder.due:
                seconds = timed(trainer.flush, device)
                self.flush_seconds.append(seconds)
                flushing += seconds
        synchronize(device)
        return (time.perf_counter() - started - flushing) / self.steps

    def flush_median(self) -> float:
        """Return the median flush time, timing one flush now if the blocks contained none.

        NOTE: that flush writes fewer than ``flush_every`` rows. Its time is mostly the fixed
        cost of two Parquet files and a status file, so it is used in place of a full one.
        """
        if not self.flush_seconds:
            self.flush_seconds.append(timed(self.trainer.flush, self.trainer.device))
        return statistics.median(self.flush_seconds)

    def with_flushes(self, block_seconds: list[float]) -> list[float]:
        """Return each block's seconds per step with the amortised flush time added."""
        amortised = self.flush_median() / self.trainer.config.flush_every
        return [seconds + amortised for seconds in block_seconds]
