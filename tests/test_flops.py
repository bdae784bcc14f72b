"""FLOP counting, the matmul and peak references, the throughput meter and its line."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RUN
from torch import nn

from stabilitylab.config import RunConfig, build_config, derive
from stabilitylab.data import build_data
from stabilitylab.runs import prepare_run_dir
from stabilitylab.train import flops
from stabilitylab.train.flops import (
    ThroughputMeter,
    count_flops,
    format_si,
    measure_matmul_flops,
    peak_flops,
    peak_flops_for_name,
)
from stabilitylab.train.loop import Trainer, epoch_loader, seed_everything

REPO = Path(__file__).resolve().parent.parent


def _linear_step(layer: nn.Linear, inputs: torch.Tensor) -> None:
    layer(inputs).sum().backward()


# -- count_flops -------------------------------------------------------------------------------


def test_linear_flops_match_hand_count():
    batch, n_in, n_out = 8, 32, 16
    layer = nn.Linear(n_in, n_out)
    matmul = 2 * batch * n_in * n_out
    # Forward, then the weight gradient. The input needs no gradient.
    inputs = torch.randn(batch, n_in)
    assert count_flops(lambda: _linear_step(layer, inputs)) == 2 * matmul
    # With an input that needs a gradient, backward adds the input gradient's matmul.
    inputs = torch.randn(batch, n_in, requires_grad=True)
    assert count_flops(lambda: _linear_step(layer, inputs)) == 3 * matmul


def test_cpu_attention_is_counted():
    batch, heads, tokens, dim = 2, 4, 16, 8
    query, key, value = (
        torch.randn(batch, heads, tokens, dim, requires_grad=True) for _ in range(3)
    )

    def attention_step() -> None:
        F.scaled_dot_product_attention(query, key, value).sum().backward()

    # Two matmuls of (N, D) by (D, N) shape forward, five backward (the scores are recomputed).
    matmul = 2 * batch * heads * tokens * tokens * dim
    assert count_flops(attention_step) == 7 * matmul


def _trainer(config: RunConfig, run_dir: Path) -> Trainer:
    seed_everything(config.seed)
    data = build_data(config)
    derived = derive(config, len(data.train), data.in_chans, data.num_classes, data.img_size)
    return Trainer(config, prepare_run_dir(run_dir), data, derived, torch.device("cpu"))


def _first_batch(trainer: Trainer) -> tuple[list[torch.Tensor], torch.Tensor]:
    batch = next(iter(epoch_loader(trainer.data, trainer.config, 0, trainer.device)))
    return trainer.views(batch), batch[1]


def _step_flops(config: RunConfig, run_dir: Path) -> int:
    trainer = _trainer(config, run_dir)
    views, labels = _first_batch(trainer)
    try:
        return count_flops(lambda: trainer.train_step(views, 0.0, labels=labels))
    finally:
        trainer.close()


def test_training_step_flops_scale_with_batch(tmp_path):
    counts = {
        batch_size: _step_flops(
            build_config("digits", **{**TINY_RUN, "batch_size": batch_size}),
            tmp_path / str(batch_size),
        )
        for batch_size in (32, 64)
    }
    assert counts[32] > 0
    # Every layer's work is linear in the batch, and MoCo v3's (B, B) logits add a little.
    assert counts[64] >= 2 * counts[32]
    assert counts[64] < 2.05 * counts[32]


def _state_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    for index, state in enumerate(trainer.optimizer.state.values()):
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
    # The monitor's device buffers of the recorded step.
    tensors["monitor.steps"] = trainer.monitor._steps[: trainer.monitor.rows]
    tensors["monitor.layers"] = trainer.monitor._layers[: trainer.monitor.rows]
    return tensors


def test_counting_keeps_step_numerics(tmp_path):
    config = build_config("digits", **TINY_RUN)
    counted = _trainer(config, tmp_path / "counted")
    plain = _trainer(config, tmp_path / "plain")
    views, labels = _first_batch(plain)
    try:
        flop_count = count_flops(
            lambda: counted.train_step([v.clone() for v in views], 0.0, labels=labels)
        )
        plain.train_step([v.clone() for v in views], 0.0, labels=labels)
        assert flop_count > 0
        counted_tensors, plain_tensors = _state_tensors(counted), _state_tensors(plain)
        assert counted_tensors.keys() == plain_tensors.keys()
        different = [
            name
            for name, tensor in counted_tensors.items()
            if not torch.equal(tensor, plain_tensors[name])
        ]
        assert different == []
    finally:
        counted.close()
        plain.close()


# -- measure_matmul_flops ----------------------------------------------------------------------


def test_matmul_flops_positive_on_cpu():
    rate = measure_matmul_flops("cpu", torch.float32, size=256, repeats=2, budget_seconds=0.05)
    assert math.isfinite(rate)
    assert rate > 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dtype": torch.int32}, "not floating point"),
        ({"size": 0}, "positive side length"),
        ({"repeats": 0}, "at least 1"),
        ({"budget_seconds": 0.0}, "must be positive"),
    ],
)
def test_matmul_flops_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        measure_matmul_flops("cpu", **options)


# -- peak_flops --------------------------------------------------------------------------------


def test_peak_flops_none_on_cpu():
    assert peak_flops("cpu", torch.bfloat16) is None
    assert peak_flops(torch.device("cpu"), torch.float32) is None


@pytest.mark.parametrize(
    ("name", "dtype", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.5e12),
        ("NVIDIA H100 80GB HBM3", torch.float16, 989.5e12),
        ("NVIDIA H200", torch.bfloat16, 989.5e12),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.5e12),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
        ("NVIDIA A100 80GB PCIe", torch.bfloat16, 312e12),
        ("NVIDIA L40S", torch.bfloat16, 362.05e12),
        ("NVIDIA L4", torch.bfloat16, 121e12),
        ("NVIDIA L4", torch.float32, None),
        # Boards whose figures are not in the table, and a MIG slice.
        ("NVIDIA H100 NVL", torch.bfloat16, None),
        ("NVIDIA H200 NVL", torch.bfloat16, None),
        ("NVIDIA GH200 480GB", torch.bfloat16, None),
        ("NVIDIA L40", torch.bfloat16, None),
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", torch.bfloat16, None),
        ("NVIDIA GeForce RTX 4090", torch.bfloat16, None),
        ("NVIDIA H100 80GB HBM3", torch.float64, None),
    ],
)
def test_peak_flops_table(name, dtype, expected):
    assert peak_flops_for_name(name, dtype) == expected


@pytest.mark.parametrize(("tf32", "expected"), [(True, 494.5e12), (False, 67e12)])
def test_peak_flops_float32_follows_tf32(monkeypatch, tf32, expected):
    monkeypatch.setattr(flops, "_tf32_matmuls", lambda: tf32)
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3", torch.float32) == expected


# -- ThroughputMeter ---------------------------------------------------------------------------


def test_meter_counts_first_step_then_times():
    layer = nn.Linear(32, 16)
    inputs = torch.randn(8, 32)
    meter = ThroughputMeter("cpu")
    with meter.step():
        _linear_step(layer, inputs)
    assert meter.flops_per_step == 2 * 2 * 8 * 32 * 16
    assert meter.steps == 0
    for _ in range(3):
        with meter.step():
            _linear_step(layer, inputs)
    assert meter.steps == 3
    assert meter.seconds() > 0
    assert meter.achieved_flops() == pytest.approx(meter.flops_per_step * 3 / meter.seconds())


def test_meter_warmup_steps_untimed():
    layer = nn.Linear(32, 16)
    inputs = torch.randn(8, 32)
    meter = ThroughputMeter("cpu", warmup_steps=2)
    for _ in range(3):
        with meter.step():
            _linear_step(layer, inputs)
    assert meter.flops_per_step == 2 * 2 * 8 * 32 * 16
    assert meter.steps == 0
    assert meter.summary().endswith(
        "no timed steps (the counted first step and 2 warm-up steps are not timed)"
    )
    with meter.step():
        _linear_step(layer, inputs)
    assert meter.steps == 1
    assert meter.seconds() > 0


def test_meter_rejects_negative_warmup():
    with pytest.raises(ValueError, match="warmup_steps -1"):
        ThroughputMeter("cpu", warmup_steps=-1)


def test_meter_skips_failed_step():
    meter = ThroughputMeter("cpu")
    with pytest.raises(RuntimeError, match="boom"), meter.step():
        raise RuntimeError("boom")
    assert meter.flops_per_step is None
    meter.flops_per_step = 100
    with pytest.raises(RuntimeError, match="boom"), meter.step():
        raise RuntimeError("boom")
    assert meter.steps == 0
    assert meter.seconds() == 0
    # A warm-up step that raises leaves the warm-up step for the next call.
    meter = ThroughputMeter("cpu", warmup_steps=1)
    meter.flops_per_step = 100
    with pytest.raises(RuntimeError, match="boom"), meter.step():
        raise RuntimeError("boom")
    with meter.step():
        pass
    assert meter.steps == 0


def test_meter_summary_line():
    meter = ThroughputMeter("cpu")
    meter.flops_per_step = 2_000_000_000
    meter.add(4.0, steps=2)
    assert meter.summary(matmul_flops=4e9, peak=1e10) == (
        "training step FLOPs: 2 GFLOP per step, 2 timed steps in 4 s, 1 GFLOP/s achieved; "
        "MFU 25.0% of the measured matmul rate (4 GFLOP/s), 10.0% of the vendor peak "
        "(10 GFLOP/s)"
    )
    assert meter.summary() == (
        "training step FLOPs: 2 GFLOP per step, 2 timed steps in 4 s, 1 GFLOP/s achieved"
    )
    assert meter.summary(peak=1e10).endswith("; MFU 10.0% of the vendor peak (10 GFLOP/s)")


def test_meter_summary_before_timed_steps():
    meter = ThroughputMeter("cpu")
    assert meter.summary() == "training step FLOPs: not counted, because no step ran"
    meter.flops_per_step = 16_400_000_000
    assert meter.summary(4e9) == (
        "training step FLOPs: 16.4 GFLOP per step, no timed steps "
        "(the first step is counted, not timed)"
    )
    assert meter.achieved_flops() is None


def test_meter_to_dict():
    meter = ThroughputMeter("cpu")
    meter.flops_per_step = 1000
    meter.add(2.0, steps=4)
    assert meter.to_dict(matmul_flops=4000.0) == {
        "flops_per_step": 1000,
        "timed_steps": 4,
        "timed_seconds": 2.0,
        "achieved_flops": 2000.0,
        "matmul_flops": 4000.0,
        "peak_flops": None,
        "mfu_of_matmul": 0.5,
        "mfu_of_peak": None,
    }


def test_meter_add_rejects_negative():
    with pytest.raises(ValueError, match="-1.0 s"):
        ThroughputMeter("cpu").add(-1.0)


@pytest.mark.parametrize(
    ("value", "text"),
    [(0, "0 "), (5, "5 "), (16_400_000_000, "16.4 G"), (989.5e12, "990 T"), (999.7e9, "1 T")],
)
def test_format_si(value, text):
    assert format_si(value) == text


# -- benchmarks/gpu_vit_s16.py -----------------------------------------------------------------


def test_gpu_benchmark_refuses_without_cuda():
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_vit_s16.py")],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
