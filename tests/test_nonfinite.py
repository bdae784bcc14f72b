"""Non-finite losses and gradients in ``stabilitylab run``: stop, skip and gradient scaling.

Every run here trains one epoch of the tiny digits configuration (21 steps). It writes a
checkpoint every 5 steps and flushes every 8, so a fault at step 12 reaches the host only
at the checkpoint of step 15, three steps later.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RUN

from stabilitylab.config import build_config
from stabilitylab.detect import Divergence, RunEvents, detect_run, loss_scale_changes
from stabilitylab.detect.training_events import recorded_divergence, skipped_steps, step_ranges
from stabilitylab.errors import ConfigError, TrainingError
from stabilitylab.methods.mocov3 import MoCoV3
from stabilitylab.report import write_report
from stabilitylab.report.training import MAX_TRAINING_EVENT_ROWS, training_events_table
from stabilitylab.runs import Run, empty_table, read_run
from stabilitylab.train import loop
from stabilitylab.train.checkpoint import load_checkpoint
from stabilitylab.train.loop import Trainer, run_training

BASE = {
    **TINY_RUN,
    "epochs": 1,
    "dense_knn_every": 0,
    "checkpoint_every": 5,
    # 8 px digits (4 patches of 4 px) and a small kNN bank and query set keep each run short.
    "img_size": 8,
    "knn_max_bank": 256,
    "knn_max_query": 128,
}
STEPS = 21
BAD_STEP = 12
INIT_SCALE = 2.0**16
GROWTH_INTERVAL = 4
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")


def train(tmp_path_factory, name: str, **overrides):
    """Train a run with ``overrides`` and return its folder and the TrainingError, if any."""
    out = tmp_path_factory.mktemp(name) / "run"
    config = build_config("digits", **{**BASE, **overrides})
    try:
        run_training(config, out, show_progress=False)
    except TrainingError as error:
        return out, error
    return out, None


@contextlib.contextmanager
def loss_fault(step: int, fault: str):
    """Make the loss NaN (``nan``) or its scaled gradient infinite (``overflow``) at ``step``.

    ``overflow`` leaves the loss finite and makes every parameter gradient inf or NaN, as an
    fp16 overflow of the scaled gradients does.
    """
    original = MoCoV3.loss_and_features
    calls = itertools.count()

    def faulty(self, view1, view2):
        loss, features = original(self, view1, view2)
        if next(calls) != step:
            return loss, features
        if fault == "nan":
            return loss * math.nan, features
        loss.register_hook(lambda grad: grad * math.inf)
        return loss, features

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MoCoV3, "loss_and_features", faulty)
        yield


@contextlib.contextmanager
def no_host_reads_in_steps():
    """Fail any training step that reads a tensor back to the host."""
    original = Trainer.train_step

    def host_read(*args, **kwargs):
        raise AssertionError("a training step read a tensor back to the host")

    def guarded(self, *args, **kwargs):
        with pytest.MonkeyPatch.context() as patch:
            for name in HOST_READS:
                patch.setattr(torch.Tensor, name, host_read)
            return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "train_step", guarded)
        yield


def expected_scales(steps: int, overflow_step: int) -> list[float]:
    """Return the GradScaler's scale at each step, with one overflow at ``overflow_step``."""
    scale, clean, scales = INIT_SCALE, 0, []
    for step in range(steps):
        scales.append(scale)
        if step == overflow_step:
            scale, clean = scale / 2, 0
        else:
            clean += 1
            if clean == GROWTH_INTERVAL:
                scale, clean = scale * 2, 0
    return scales


def status_of(run_dir) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def status_run(status: dict) -> Run:
    """Return an in-memory run without rows, with ``status`` as its status.json."""
    tables = {table: empty_table(table) for table in ("steps", "layers", "evals")}
    return Run(path=Path("run"), config={}, derived={}, environment={}, status=status, **tables)


@pytest.fixture(scope="module")
def grad_diverged(tmp_path_factory):
    # A factor of 1e30 keeps every gradient finite, but the norm overflows fp32.
    return train(tmp_path_factory, "grad", inject_spikes=(f"{BAD_STEP}:blocks.00:1e30",))


@pytest.fixture(scope="module")
def loss_diverged(tmp_path_factory):
    # The update of step 12 throws the weights far out, so the loss of step 13 is NaN.
    return train(tmp_path_factory, "loss", lr_spikes=(f"{BAD_STEP}:1e30",))


@pytest.fixture(scope="module")
def skipped_nan(tmp_path_factory):
    with loss_fault(BAD_STEP, "nan"), no_host_reads_in_steps():
        return train(tmp_path_factory, "skip", on_nonfinite="skip")


def cpu_scaler(precision, device):
    """Return an enabled GradScaler on the CPU, standing in for fp16's on CUDA."""
    return torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=GROWTH_INTERVAL)


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch, loss_fault(BAD_STEP, "overflow"):
        patch.setattr(loop, "build_scaler", cpu_scaler)
        return train(tmp_path_factory, "scaled")


def test_skip_policy_with_scaler(tmp_path_factory):
    # The skip policy steps the fused AdamW itself, with the scaler's overflow folded in.
    with pytest.MonkeyPatch.context() as patch, loss_fault(BAD_STEP, "overflow"):
        patch.setattr(loop, "build_scaler", cpu_scaler)
        out, error = train(tmp_path_factory, "scaled-skip", on_nonfinite="skip")
    run = read_run(out)
    state = load_checkpoint(out / "checkpoint.pt")
    adam_steps = {float(entry["step"]) for entry in state["optimizer"]["state"].values()}
    assert error is None
    assert run.status["skipped_steps"] == [BAD_STEP]
    assert list(run.steps["loss_scale"]) == expected_scales(STEPS, BAD_STEP)
    assert adam_steps == {STEPS - 1.0}


@pytest.fixture(scope="module")
def report(grad_diverged, loss_diverged, skipped_nan, scaled, tmp_path_factory):
    runs = [grad_diverged[0], loss_diverged[0], skipped_nan[0], scaled[0]]
    folder = write_report(runs, tmp_path_factory.mktemp("report"))
    return json.loads((folder / "events.json").read_text()), (folder / "report.md").read_text()


def test_grad_divergence_error_names_step(grad_diverged):
    _, error = grad_diverged
    assert error is not None
    message = str(error)
    assert f"the gradient norm became non-finite at step {BAD_STEP}" in message
    assert "precision fp32" in message
    assert "lr 0.000" in message
    assert "the checkpoint written after 10 steps is kept" in message


def test_grad_divergence_status(grad_diverged):
    status = status_of(grad_diverged[0])
    assert status["state"] == "failed"
    assert status["reason"] == "non-finite gradient norm"
    assert status["diverged"]["step"] == BAD_STEP
    assert status["diverged"]["signal"] == "grad_norm"
    assert status["diverged"]["precision"] == "fp32"
    assert status["diverged"]["checkpoint_step"] == 10
    assert status["skipped_steps"] == []


@pytest.mark.parametrize("which", ["grad", "loss"])
def test_divergence_tables_end_at_bad_step(grad_diverged, loss_diverged, which):
    out = (grad_diverged if which == "grad" else loss_diverged)[0]
    bad = status_of(out)["diverged"]["step"]
    run = read_run(out)
    assert bad == (BAD_STEP if which == "grad" else BAD_STEP + 1)
    assert run.steps["step"].max() == bad
    assert run.layers["step"].max() == bad
    assert (run.evals["step"] <= bad).all()
    assert np.isfinite(run.steps["loss"].iloc[:-1]).all()


@pytest.mark.parametrize("which", ["grad", "loss"])
def test_divergence_keeps_earlier_checkpoint(grad_diverged, loss_diverged, which):
    out = (grad_diverged if which == "grad" else loss_diverged)[0]
    bad = status_of(out)["diverged"]["step"]
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] <= bad
    assert state["step"] == 10
    assert all(torch.isfinite(value).all() for value in state["model"].values())


def test_loss_divergence_status(loss_diverged):
    _, error = loss_diverged
    status = status_of(loss_diverged[0])
    assert f"the loss became non-finite at step {BAD_STEP + 1}" in str(error)
    assert status["reason"] == "non-finite loss"
    assert status["diverged"]["signal"] == "loss"


def test_report_shows_divergence(report):
    events, markdown = report
    grad, loss = events["runs"][0], events["runs"][1]
    assert grad["divergence"]["step"] == BAD_STEP
    assert grad["divergence"]["signal"] == "grad_norm"
    assert grad["verdict"]["verdict"] == "diverged"
    assert f"non-finite gradient norm at step {BAD_STEP}" in grad["verdict"]["reasons"]
    assert loss["divergence"]["step"] == BAD_STEP + 1
    assert loss["verdict"]["verdict"] == "diverged"
    assert f"| diverged | {BAD_STEP} | the gradient norm became non-finite" in markdown
    assert f"| diverged | {BAD_STEP + 1} | the loss became non-finite" in markdown


def test_skip_continues_past_nan(skipped_nan):
    out, error = skipped_nan
    status = status_of(out)
    steps = read_run(out).steps
    assert error is None
    assert status["state"] == "finished"
    assert status["skipped_steps"] == [BAD_STEP]
    assert "diverged" not in status
    assert len(steps) == STEPS
    assert math.isnan(steps["loss"].iloc[BAD_STEP])
    assert np.isfinite(steps["loss"].drop(index=BAD_STEP)).all()


def test_skip_leaves_weights_and_moments(skipped_nan):
    out, _ = skipped_nan
    layers = read_run(out).layers
    at_bad = layers[layers["step"] == BAD_STEP]
    before = layers[layers["step"] == BAD_STEP - 1]
    state = load_checkpoint(out / "checkpoint.pt")
    adam_steps = {float(entry["step"]) for entry in state["optimizer"]["state"].values()}
    assert (at_bad["update_ratio"] == 0.0).all()
    assert (before["update_ratio"] > 0.0).all()
    assert adam_steps == {STEPS - 1.0}  # the skipped step is not counted
    assert all(torch.isfinite(value).all() for value in state["model"].values())


def test_skip_after_broken_weights(tmp_path_factory):
    # After the lr spike every forward pass is non-finite, so every later step is skipped,
    # and the evaluations of the broken model still complete.
    out, error = train(tmp_path_factory, "skip-lr", on_nonfinite="skip", lr_spikes=("12:1e30",))
    run = read_run(out)
    assert error is None
    assert run.status["state"] == "finished"
    assert run.status["skipped_steps"] == list(range(BAD_STEP + 1, STEPS))
    assert run.evals["knn_top1"].iloc[-1] < run.evals["knn_top1"].max()
    assert detect_run(run).verdict.verdict == "partial failure"


def test_skip_recorded_in_report(report):
    events, markdown = report
    skipped = events["runs"][2]
    spike_steps = {
        step
        for series in skipped["spikes"].values()
        for spike in series
        for step in range(spike["start_step"], spike["end_step"] + 1)
    }
    assert skipped["skipped_steps"] == [BAD_STEP]
    assert skipped["divergence"] is None
    assert skipped["verdict"]["verdict"] != "diverged"
    assert BAD_STEP not in spike_steps
    assert f"| skipped step | {BAD_STEP} | optimiser step not applied |" in markdown


def test_scaler_overflow_skips_step(scaled):
    out, error = scaled
    status = status_of(out)
    steps = read_run(out).steps
    assert error is None
    assert status["state"] == "finished"
    assert status["skipped_steps"] == [BAD_STEP]
    assert np.isfinite(steps["loss"]).all()
    assert not np.isfinite(steps["grad_norm"].iloc[BAD_STEP])


def test_scaler_loss_scale_events(scaled):
    steps = read_run(scaled[0]).steps
    scales = expected_scales(STEPS, BAD_STEP)
    changes = loss_scale_changes(steps)
    expected = [step for step in range(1, STEPS) if scales[step] != scales[step - 1]]
    assert list(steps["loss_scale"]) == scales
    assert [change.step for change in changes] == expected
    assert [change.kind for change in changes if change.step == BAD_STEP + 1] == ["decrease"]


def test_scaler_norms_unscaled(scaled, grad_diverged):
    # Scaling by a power of two is exact, so the steps before the fault train identically
    # with and without the scaler. Their recorded norms must therefore match.
    with_scaler = read_run(scaled[0]).steps.iloc[:BAD_STEP]
    without = read_run(grad_diverged[0]).steps.iloc[:BAD_STEP]
    for column in ("loss", "grad_norm", "token_grad_norm"):
        assert np.allclose(with_scaler[column], without[column], rtol=1e-5), column
    assert (with_scaler["loss_scale"] > 1.0).all()
    assert (without["loss_scale"] == 1.0).all()


def test_scaler_overflow_not_a_spike(scaled):
    run = read_run(scaled[0])
    events = detect_run(run)
    assert events.skipped_steps == [BAD_STEP]
    assert events.verdict.verdict != "diverged"
    for series, spikes in events.spikes.items():
        assert all(spike.start_step != BAD_STEP for spike in spikes), series


def test_report_shows_loss_scale(report):
    events, markdown = report
    changes = events["runs"][3]["loss_scale_changes"]
    decrease = [change for change in changes if change["kind"] == "decrease"]
    assert decrease == [
        {
            "step": BAD_STEP + 1,
            "previous_scale": decrease[0]["previous_scale"],
            "scale": decrease[0]["previous_scale"] / 2,
            "kind": "decrease",
        }
    ]
    assert f"| loss scale decrease | {BAD_STEP + 1} |" in markdown
    assert "| loss scale increase | 4 | 65536 to 131072 |" in markdown


def test_bf16_cpu_run(tmp_path_factory):
    out, error = train(tmp_path_factory, "bf16", precision="bf16")
    run = read_run(out)
    assert error is None
    assert run.status["state"] == "finished"
    assert run.config["precision"] == "bf16"
    assert len(run.steps) == STEPS
    assert np.isfinite(run.steps["loss"]).all()
    assert np.isfinite(run.steps["grad_norm"]).all()
    assert (run.steps["loss_scale"] == 1.0).all()
    assert np.isfinite(run.evals["knn_top1"]).all()


def test_on_nonfinite_rejects_unknown(tiny_config):
    with pytest.raises(ConfigError, match="--on-nonfinite 'ignore' is not one of: stop, skip"):
        tiny_config(on_nonfinite="ignore")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast needs a CUDA device")
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_fp16_cuda_overflow(tmp_path_factory, policy):
    with loss_fault(BAD_STEP, "overflow"):
        out, error = train(
            tmp_path_factory, f"fp16-{policy}", precision="fp16", device="cuda", on_nonfinite=policy
        )
    run = read_run(out)
    skipped = run.status["skipped_steps"]
    scales = run.steps.set_index("step")["loss_scale"]
    assert error is None
    assert run.status["state"] == "finished"
    assert BAD_STEP in skipped
    assert np.isfinite(run.steps["loss"]).all()
    # Unscaled norms of this run are about 1e2, and scaled ones would be 65536 times larger.
    applied = run.steps[~run.steps["step"].isin(skipped)]
    assert applied["grad_norm"].max() < 1e4
    assert applied["token_grad_norm"].max() < 1e4
    for step in skipped:
        if step + 1 in scales.index:
            assert scales[step + 1] == scales[step] / 2, step
    assert detect_run(run).verdict.verdict != "diverged"


def test_step_ranges_groups_consecutive():
    assert step_ranges([1, 2, 3, 7, 9, 10]) == [(1, 3), (7, 7), (9, 10)]
    assert step_ranges([]) == []


def test_skipped_steps_ignores_non_steps():
    run = status_run({"state": "finished", "skipped_steps": [9, "a", True, 1, 9]})
    assert skipped_steps(run) == [1, 9]
    assert skipped_steps(status_run({"state": "finished", "skipped_steps": "3"})) == []


@pytest.mark.parametrize(
    "diverged",
    [{"step": "3", "signal": "loss"}, {"step": 3, "signal": "weights"}, [3, "loss"]],
)
def test_recorded_divergence_rejects_malformed(diverged):
    assert recorded_divergence(status_run({"state": "failed", "diverged": diverged})) is None


def test_recorded_divergence_reads_status():
    diverged = {"step": 3, "signal": "grad_norm", "lr": 0.5, "checkpoint_step": None}
    divergence = recorded_divergence(status_run({"state": "failed", "diverged": diverged}))
    assert divergence == Divergence(step=3, signal="grad_norm", lr=0.5)


def test_training_table_caps_rows():
    skipped = list(range(0, 3 * (MAX_TRAINING_EVENT_ROWS + 10), 3))
    events = RunEvents("run", "run", "learned", "token_grad_norm", None, {}, [])
    events.skipped_steps = skipped
    table = training_events_table(events)
    assert len(table.rows) == MAX_TRAINING_EVENT_ROWS
    assert table.rows[0] == ("skipped step", "0", "optimiser step not applied")
    assert f"The first {MAX_TRAINING_EVENT_ROWS} of {len(skipped)} events" in table.note


def test_training_table_none_without_events():
    events = RunEvents("run", "run", "learned", "token_grad_norm", None, {}, [])
    assert training_events_table(events) is None
