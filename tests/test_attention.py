"""Attention probes: the recomputed attention, its statistics, the table, detection and report.

The runs train on the first 48 images of the digits training split at 8 px (4 patches and a
class token), 18 optimiser steps in 3 epochs of batch 8, so each takes a few seconds on a CPU.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_RUN
from timm.models.vision_transformer import Attention
from torch.utils.data import Subset

import stabilitylab as sl
from stabilitylab.config import ModelSpec, build_config
from stabilitylab.data import build_data
from stabilitylab.detect import attention_series_name, detect_run, find_attention_spikes
from stabilitylab.detect.spikes import SpikeParams
from stabilitylab.errors import ConfigError
from stabilitylab.models.vit import build_backbone
from stabilitylab.monitor.attention import (
    AttentionProbe,
    attention_due,
    attention_logits,
    attention_statistics,
    probe_batch,
)
from stabilitylab.report import write_report
from stabilitylab.runs import TABLE_COLUMNS, RunWriter, read_run
from stabilitylab.train import loop, resume
from stabilitylab.train.checkpoint import load_checkpoint
from stabilitylab.train.precision import autocast_factory

TRAIN_IMAGES = 48
EVERY = 4
RUN = {
    **TINY_RUN,
    "epochs": 3,
    "batch_size": 8,
    "img_size": 8,
    "eval_every": 6,
    "dense_knn_every": 6,
    "dense_knn_size": 24,
    "flush_every": 5,
    "checkpoint_every": 7,
    "knn_max_bank": 96,
    "knn_max_query": 64,
    "attention_images": 16,
}
STEPS = 18
DEPTH, HEADS = 4, 4  # vit_micro
PROBED_STEPS = [0, 4, 8, 12, 16, 18]
TIMING_COLUMNS = {
    "steps": ["wall_time", "samples_per_s"],
    "layers": [],
    "evals": ["eval_seconds"],
    "dense_knn": ["eval_seconds"],
}
TINY_SPEC = ModelSpec(embed_dim=32, depth=2, num_heads=4, patch_size=4, img_size=16)


def small_digits(config):
    data = build_data(config)
    data.train = Subset(data.train, range(TRAIN_IMAGES))
    return data


def train(out: Path, **overrides) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        for module in (loop, resume):
            patch.setattr(module, "build_data", small_digits)
        loop.run_training(build_config("digits", **{**RUN, **overrides}), out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("probed") / "run", attention_every=EVERY)


@pytest.fixture(scope="module")
def unprobed(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("unprobed") / "run", attention_every=0)


def tiny_backbone(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(TINY_SPEC, 16, 4, 1, **options).eval()


# -- the recomputed attention ----------------------------------------------------------------


@pytest.mark.parametrize(
    "options", [{}, {"qk_norm": True}, {"pool": "gap"}, {"pool": "gap", "qk_norm": True}]
)
def test_reconstructed_attention_matches_timm(options):
    backbone = tiny_backbone(**options)
    attn = backbone.blocks[1].attn
    assert attn.fused_attn  # the output to match comes from scaled_dot_product_attention
    captured = {}

    def keep(module, args, output):
        captured["input"], captured["output"] = args[0], output

    handle = attn.register_forward_hook(keep)
    with torch.no_grad():
        backbone.forward_features(torch.randn(3, 1, 16, 16))
    handle.remove()
    x = captured["input"]
    B, N, C = x.shape
    assert N == (17 if options.get("pool", "cls") == "cls" else 16)
    with torch.no_grad():
        weights = attention_logits(attn, x).softmax(dim=-1)  # (B, heads, N, N)
        v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim)[:, :, 2]
        heads = weights @ v.transpose(1, 2)  # (B, heads, N, head_dim)
        rebuilt = attn.proj(attn.norm(heads.transpose(1, 2).reshape(B, N, C)))
    torch.testing.assert_close(rebuilt, captured["output"], rtol=1e-5, atol=1e-5)


def test_uniform_attention_entropy_is_one():
    entropy, max_logit = attention_statistics(torch.zeros(2, 3, 5, 5))
    torch.testing.assert_close(entropy, torch.ones(3))
    torch.testing.assert_close(max_logit, torch.zeros(3))


def test_one_hot_attention_entropy_is_zero():
    logits = torch.full((1, 1, 4, 4), -1e4)
    logits[..., 0] = 0.0
    entropy, _ = attention_statistics(logits)
    assert entropy.item() == pytest.approx(0.0, abs=1e-6)


def test_single_key_entropy_is_nan():
    entropy, max_logit = attention_statistics(torch.ones(1, 2, 1, 1))
    assert torch.isnan(entropy).all()
    assert max_logit.tolist() == [1.0, 1.0]


def identity_attention(qk_norm: bool) -> Attention:
    """One head of width 2 whose q, k and v are the input itself."""
    attn = Attention(2, num_heads=1, qkv_bias=True, qk_norm=qk_norm, norm_layer=torch.nn.LayerNorm)
    with torch.no_grad():
        attn.qkv.weight.copy_(torch.eye(2).repeat(3, 1))
        attn.qkv.bias.zero_()
    return attn


def test_max_logit_by_hand():
    # Tokens (1, 0) and (0, 2): q.k is [[1, 0], [0, 4]], times the scale 1 / sqrt(2).
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    entropy, max_logit = attention_statistics(attention_logits(identity_attention(False), x))
    assert max_logit.item() == pytest.approx(4 / math.sqrt(2), rel=1e-6)
    # Each query's two keys get softmax([a, 0]) with a = 1 / sqrt(2) and a = 4 / sqrt(2).
    expected = []
    for a in (1 / math.sqrt(2), 4 / math.sqrt(2)):
        p = math.exp(a) / (math.exp(a) + 1)
        expected.append(-(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2))
    assert entropy.item() == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_max_logit_after_qk_norm():
    # LayerNorm turns (1, 0) into (1, -1) and (0, 2) into (-1, 1), so q.k is at most 2.
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    _, max_logit = attention_statistics(attention_logits(identity_attention(True), x))
    assert max_logit.item() == pytest.approx(2 / math.sqrt(2), rel=1e-4)


def test_probe_rows_per_block_and_head():
    backbone = tiny_backbone(qk_norm=True)
    probe = AttentionProbe(backbone, torch.randn(4, 1, 16, 16))
    probe.record(0)
    probe.record(5)
    rows = probe.drain()
    assert tuple(rows.columns) == TABLE_COLUMNS["attention"]
    assert rows["step"].tolist() == [0] * 8 + [5] * 8
    assert rows["layer"].astype(str).tolist()[:8] == ["blocks.00"] * 4 + ["blocks.01"] * 4
    assert rows["head"].tolist() == [0, 1, 2, 3] * 4
    assert rows["entropy"].between(0, 1).all()
    assert probe.drain().empty
    assert backbone._forward_pre_hooks == {}
    assert all(not block.attn._forward_pre_hooks for block in backbone.blocks)


def test_probe_bf16_close_to_fp32():
    backbone = tiny_backbone()
    images = torch.randn(4, 1, 16, 16)
    fp32 = AttentionProbe(backbone, images)
    bf16 = AttentionProbe(backbone, images, autocast_factory("bf16", torch.device("cpu")))
    fp32.record(0)
    bf16.record(0)
    exact, rounded = fp32.drain(), bf16.drain()
    assert np.isfinite(rounded[["entropy", "max_logit"]].to_numpy()).all()
    np.testing.assert_allclose(rounded["entropy"], exact["entropy"], atol=0.02)
    np.testing.assert_allclose(rounded["max_logit"], exact["max_logit"], rtol=0.05, atol=0.05)


def test_probe_keeps_training_mode():
    backbone = tiny_backbone().train()
    AttentionProbe(backbone, torch.randn(2, 1, 16, 16)).record(0)
    assert all(module.training for module in backbone.modules())


def test_probe_batch_private_and_fixed():
    data = build_data(build_config("digits", **RUN))
    state = torch.get_rng_state()
    first = probe_batch(data.knn_query, 16, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, probe_batch(data.knn_query, 16, seed=3))
    assert not torch.equal(first, probe_batch(data.knn_query, 16, seed=4))
    assert probe_batch(data.knn_query, 65, seed=3).shape[0] == len(data.knn_query)


def test_due_steps():
    due = [step for step in range(STEPS + 1) if attention_due(EVERY, step, STEPS)]
    assert due == PROBED_STEPS
    assert not any(attention_due(0, step, STEPS) for step in range(STEPS + 1))


# -- the table -------------------------------------------------------------------------------


def test_table_written_and_read(probed):
    table = read_run(probed).attention
    assert tuple(table.columns) == TABLE_COLUMNS["attention"]
    assert sorted(table["step"].unique().tolist()) == PROBED_STEPS
    assert len(table) == len(PROBED_STEPS) * DEPTH * HEADS
    layers = [f"blocks.{index:02d}" for index in range(DEPTH)]
    assert sorted(table["layer"].astype(str).unique()) == layers
    assert table["entropy"].between(0, 1).all()
    assert np.isfinite(table["max_logit"]).all()
    assert (table.groupby("step")["entropy"].count() == DEPTH * HEADS).all()


def test_unprobed_run_reads_empty(unprobed, tmp_path):
    assert read_run(unprobed).attention.empty
    assert not list((unprobed / "attention").iterdir())
    older = tmp_path / "older"
    shutil.copytree(unprobed, older)
    shutil.rmtree(older / "attention")  # a run written before the table existed
    table = read_run(older).attention
    assert table.empty
    assert tuple(table.columns) == TABLE_COLUMNS["attention"]


def test_probes_change_no_training_metric(probed, unprobed):
    on, off = read_run(probed), read_run(unprobed)
    for table, timings in TIMING_COLUMNS.items():
        pd.testing.assert_frame_equal(
            getattr(on, table).drop(columns=timings),
            getattr(off, table).drop(columns=timings),
            check_exact=True,
            obj=table,
        )
    weights_on = load_checkpoint(probed / "checkpoint.pt")["model"]
    weights_off = load_checkpoint(unprobed / "checkpoint.pt")["model"]
    assert [
        name for name in weights_on if not torch.equal(weights_on[name], weights_off[name])
    ] == []


def test_more_images_than_split_uses_all(tmp_path):
    out = tmp_path / "run"
    train(out, attention_every=EVERY, attention_images=100)
    attention = read_run(out).attention
    assert not attention.empty
    assert attention["entropy"].notna().all()


# -- resume ----------------------------------------------------------------------------------


def test_resume_keeps_table_consistent(probed, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    train_step = loop.Trainer.train_step

    def signalled(self, *args, **kwargs):
        if self.step == 9:
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(self, *args, **kwargs)

    monkeypatch.setattr(loop.Trainer, "train_step", signalled)
    with pytest.raises(KeyboardInterrupt):
        train(out, attention_every=EVERY)
    assert json.loads((out / "status.json").read_text())["checkpoint_step"] == 10
    assert sorted(read_run(out).attention["step"].unique()) == [0, 4, 8]
    monkeypatch.undo()
    monkeypatch.setattr(resume, "build_data", small_digits)
    resume.resume_training(out, show_progress=False)
    pd.testing.assert_frame_equal(
        read_run(out).attention, read_run(probed).attention, check_exact=True
    )


def test_truncate_keeps_rows_up_to_checkpoint(tmp_path):
    writer = RunWriter(tmp_path)
    writer.write_config({}, {"layers": []}, {})
    steps_rows = {name: np.arange(12, dtype=float) for name in TABLE_COLUMNS["steps"]}
    writer.append("steps", pd.DataFrame(steps_rows).astype({"step": "int64"}))
    for steps in ([0, 4], [8, 12]):
        writer.append(
            "attention",
            pd.DataFrame(
                {
                    "step": steps,
                    "layer": ["blocks.00"] * 2,
                    "head": [0, 0],
                    "entropy": [0.9, 0.8],
                    "max_logit": [2.0, 3.0],
                }
            ),
        )
    dropped = resume.truncate_tables(tmp_path, step=8, has_checkpoint=True, layers_per_step=0)
    assert dropped["attention"] == 1
    assert read_run(tmp_path).attention["step"].tolist() == [0, 4, 8]
    resume.truncate_tables(tmp_path, step=0, has_checkpoint=False, layers_per_step=0)
    assert read_run(tmp_path).attention.empty


# -- detection and the analysis API ----------------------------------------------------------


def planted_table(steps: int = 120) -> pd.DataFrame:
    """Two blocks of two heads: head 1 of blocks.01 collapses at step 80, a logit spike at 60."""
    rng = np.random.default_rng(0)
    rows = []
    for step in range(steps):
        for layer in ("blocks.00", "blocks.01"):
            for head in (0, 1):
                entropy = 0.9 * math.exp(rng.normal(0, 0.01))
                logit = 3.0 * math.exp(rng.normal(0, 0.02))
                if layer == "blocks.01" and head == 1 and step == 80:
                    entropy = 0.2
                if layer == "blocks.00" and head == 0 and step == 60:
                    logit = 15.0
                rows.append((step, layer, head, entropy, logit))
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS["attention"]))


def test_detector_finds_planted_events():
    spikes = find_attention_spikes(planted_table(), SpikeParams())
    assert set(spikes) == {
        attention_series_name(column, layer)
        for column in ("entropy", "max_logit")
        for layer in ("blocks.00", "blocks.01")
    }
    (drop,) = spikes["attention_entropy[blocks.01]"]
    assert drop.peak_step == 80
    assert drop.peak_value == pytest.approx(0.2)
    assert drop.baseline == pytest.approx(0.9, rel=0.05)
    assert drop.ratio == pytest.approx(drop.baseline / drop.peak_value)
    (rise,) = spikes["attention_max_logit[blocks.00]"]
    assert (rise.peak_step, rise.peak_value) == (60, 15.0)
    assert spikes["attention_entropy[blocks.00]"] == []
    assert spikes["attention_max_logit[blocks.01]"] == []


def test_detect_run_and_api(probed, tmp_path):
    copy = tmp_path / "planted"
    shutil.copytree(probed, copy)
    shutil.rmtree(copy / "attention")
    writer = RunWriter(copy)
    writer.append("attention", planted_table())
    run = sl.load_run(copy)
    assert len(run.detection.attention_spikes["attention_entropy[blocks.01]"]) == 1
    events = run.events[run.events["kind"] == "attention_spike"]
    assert events["series"].tolist() == [
        "attention_max_logit[blocks.00]",
        "attention_entropy[blocks.01]",
    ]
    assert events["layer"].tolist() == ["blocks.00", "blocks.01"]
    wide = run.attention_frame("entropy")
    assert list(wide.columns) == ["blocks.00", "blocks.01"]
    assert wide.loc[80, "blocks.01"] == pytest.approx(0.2)
    assert run.attention_frame("max_logit").loc[60, "blocks.00"] == 15.0
    with pytest.raises(ConfigError, match="attention signal 'loss'"):
        run.attention_frame("loss")
    assert "attention_spikes" in detect_run(read_run(probed)).to_dict()


# -- report ----------------------------------------------------------------------------------


def test_report_with_probes(probed, unprobed, tmp_path):
    out = write_report([probed, unprobed], tmp_path / "report")
    assert (out / "attention.png").read_bytes().startswith(b"\x89PNG")
    markdown = (out / "report.md").read_text()
    assert "](attention.png)" in markdown
    summary = [line for line in markdown.splitlines() if line.startswith("Attention probes, ")]
    assert len(summary) == 2
    assert "/run (learned): lowest entropy 0." in summary[0]
    assert summary[1].endswith("/run (learned): none recorded (--attention-every 0).")
    assert "No attention entropy drops or max-logit spikes detected." in markdown
    events = json.loads((out / "events.json").read_text())["runs"]
    assert len(events[0]["attention_spikes"]) == 2 * DEPTH
    assert events[1]["attention_spikes"] == {}


def test_report_without_probes(unprobed, tmp_path):
    out = write_report([unprobed], tmp_path / "report")
    assert not (out / "attention.png").exists()
    markdown = (out / "report.md").read_text()
    assert "Attention probes" not in markdown
    assert "Attention events" not in markdown
    assert "No attention" not in markdown


def test_tensorboard_attention_scalars(probed, tmp_path):
    pytest.importorskip("tensorboard")
    from stabilitylab.importers.tensorboard import read_tensorboard
    from stabilitylab.train.tensorboard import TensorBoardRunWriter

    writer = TensorBoardRunWriter(tmp_path / "run", tmp_path / "run" / "tensorboard")
    table = read_run(probed).attention
    writer.append("attention", table)
    writer.close()
    series = read_tensorboard(tmp_path / "run" / "tensorboard").series
    entropy = series["attention_entropy/blocks.02"]
    expected = table[table["layer"] == "blocks.02"].groupby("step")["entropy"].min()
    assert entropy.index.tolist() == PROBED_STEPS
    np.testing.assert_allclose(entropy.to_numpy(), expected.to_numpy(), rtol=1e-6)
    assert "attention_max_logit/blocks.00" in series
