"""Training on a CUDA GPU: no host sync inside a step, fused AdamW, a compiled step, MFU.

Skipped without CUDA. The host-sync checks run ``Trainer.train_step`` under
``torch.cuda.set_sync_debug_mode("error")``, which raises at the synchronising calls torch
checks: ``.item()``, ``nonzero``, a blocking copy between host and device, a stream sync. Only
the step itself is checked. Loading and augmenting the batch happen before it, and the flush
after it reads the monitor's buffers back on purpose. The first step of each trainer runs
outside the check, because it copies the monitor's parameter-group index to the device with
a blocking copy, and later steps reuse that index.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN

from stabilitylab.config import RunConfig, build_config, derive
from stabilitylab.data import build_data
from stabilitylab.models.compiled import is_compiled
from stabilitylab.runs import prepare_run_dir, read_run
from stabilitylab.train.flops import (
    ThroughputMeter,
    measure_matmul_flops,
    peak_flops,
    peak_flops_for_name,
)
from stabilitylab.train.loop import Trainer, epoch_loader, run_training, seed_everything

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEPS = 6  # more than the digits preset's 5 steps an epoch, so an epoch boundary is crossed


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Raise at any host synchronisation of the CUDA work launched inside."""
    torch.cuda.synchronize()  # earlier work must not be waited on inside
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _trainer(config: RunConfig, run_dir: Path) -> Trainer:
    seed_everything(config.seed)
    data = build_data(config)
    derived = derive(config, len(data.train), data.in_chans, data.num_classes, data.img_size)
    trainer = Trainer(config, prepare_run_dir(run_dir), data, derived, torch.device("cuda"))
    trainer.write_header({})
    return trainer


def _device_batches(trainer: Trainer, count: int) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """Return ``count`` batches of the run, as views and labels already on the GPU."""
    batches = []
    epoch = 0
    while len(batches) < count:
        for batch in epoch_loader(trainer.data, trainer.config, epoch, trainer.device):
            batches.append((trainer.views(batch), batch[1].to(trainer.device)))
            if len(batches) == count:
                break
        epoch += 1
    torch.cuda.synchronize()
    return batches


def _train_without_sync(trainer: Trainer, steps: int, warmup_steps: int = 1) -> None:
    """Train ``warmup_steps`` steps, then ``steps`` steps each under :func:`no_host_sync`."""
    batches = _device_batches(trainer, warmup_steps + steps)
    for views, labels in batches[:warmup_steps]:
        trainer.train_step(views, 0.0, labels=labels)
    for views, labels in batches[warmup_steps:]:
        with no_host_sync():
            trainer.train_step(views, 0.0, labels=labels)


def _recorded_losses(trainer: Trainer) -> list[float]:
    trainer.flush()
    return read_run(trainer.run_dir).steps["loss"].tolist()


@pytest.mark.parametrize(
    "options",
    [
        {"precision": "bf16"},
        {"precision": "bf16", "grad_clip": 1.0},
        {"precision": "bf16", "grad_clip": 1.0, "grad_clip_mode": "parameter"},
        {"precision": "bf16", "on_nonfinite": "skip"},
        {"precision": "fp16"},
        {"precision": "fp32"},
    ],
    ids=["bf16", "clip-total", "clip-parameter", "skip-nonfinite", "fp16", "fp32"],
)
def test_digits_step_has_no_host_sync(tmp_path, options):
    trainer = _trainer(build_config("digits", device="cuda", **options), tmp_path / "run")
    try:
        _train_without_sync(trainer, STEPS)
        losses = _recorded_losses(trainer)
    finally:
        trainer.close()
    assert len(losses) == STEPS + 1
    assert all(math.isfinite(loss) for loss in losses)


def test_adamw_is_fused_on_cuda(tmp_path):
    trainer = _trainer(build_config("digits", device="cuda", precision="bf16"), tmp_path / "run")
    try:
        assert trainer.config.optimizer == "adamw"
        assert trainer.optimizer.defaults.get("fused") is True
    finally:
        trainer.close()


def test_compiled_step_has_no_host_sync(tmp_path):
    config = build_config("digits", device="cuda", precision="bf16", compile=True)
    trainer = _trainer(config, tmp_path / "run")
    assert is_compiled(trainer.model.backbone)
    try:
        # Compiling may wait for the device (to benchmark kernels, for one), so the first two
        # steps, where it happens, run outside the check.
        _train_without_sync(trainer, STEPS, warmup_steps=2)
        losses = _recorded_losses(trainer)
    finally:
        trainer.close()
    assert len(losses) == STEPS + 2
    assert all(math.isfinite(loss) for loss in losses)


def test_meter_times_steps_without_sync(tmp_path):
    trainer = _trainer(build_config("digits", device="cuda", precision="bf16"), tmp_path / "run")
    meter = ThroughputMeter(trainer.device)
    try:
        batches = _device_batches(trainer, STEPS + 1)
        views, labels = batches[0]
        with meter.step():  # counted, outside the check like every first step
            trainer.train_step(views, 0.0, labels=labels)
        for views, labels in batches[1:]:
            with no_host_sync(), meter.step():
                trainer.train_step(views, 0.0, labels=labels)
    finally:
        trainer.close()
    assert meter.flops_per_step is not None and meter.flops_per_step > 0
    assert meter.steps == STEPS
    assert meter.seconds() > 0
    matmul = measure_matmul_flops(trainer.device, torch.bfloat16, budget_seconds=0.5)
    assert matmul > 0
    achieved = meter.achieved_flops()
    assert achieved is not None
    assert achieved > 0
    name = torch.cuda.get_device_name(trainer.device)
    assert peak_flops(trainer.device, torch.bfloat16) == peak_flops_for_name(name, torch.bfloat16)
    assert "FLOP/s achieved" in meter.summary(matmul, peak_flops(trainer.device, torch.bfloat16))


def test_tiny_run_finishes_on_cuda(tmp_path):
    config = build_config(
        "digits", **{**TINY_RUN, "device": "cuda", "precision": "bf16", "epochs": 1}
    )
    result = run_training(config, tmp_path / "run", show_progress=False)
    assert result.steps > 0
    assert math.isfinite(result.final_knn_top1)
    assert read_run(tmp_path / "run").steps["loss"].notna().all()
