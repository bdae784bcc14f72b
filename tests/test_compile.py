"""``--compile``: compiled transformer blocks train like eager ones, with the monitor's hooks.

torch.compile on the CPU builds C++ kernels, so these tests take some seconds each.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from distributed_steps import global_views

from stabilitylab.config import build_config, derive
from stabilitylab.data import build_data
from stabilitylab.models.compiled import compile_blocks, eager_blocks, is_compiled
from stabilitylab.runs import read_run
from stabilitylab.train.loop import Trainer, seed_everything

STEPS = 2
RUN = {
    "img_size": 8,
    "patch_size": 2,
    "batch_size": 16,
    "epochs": 2,
    "warmup_epochs": 0,
    "eval_every": 1000,
    "dense_knn_every": 0,
    "attention_every": 1,
    "flush_every": STEPS,
    "device": "cpu",
}


def train(out, compile_blocks_too: bool):
    config = build_config("digits", **RUN, compile=compile_blocks_too)
    seed_everything(config.seed)
    data = build_data(config)
    derived = derive(config, len(data.train), data.in_chans, data.num_classes)
    out.mkdir()
    trainer = Trainer(config, out, data, derived, torch.device("cpu"))
    trainer.write_header({})
    assert is_compiled(trainer.model.backbone) is compile_blocks_too
    for views in global_views("mocov3")[:STEPS]:
        trainer.train_step(views, epoch=0.0)
        trainer.probe_attention()
    trainer.flush()
    trainer.close()
    return read_run(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    return train(root / "eager", False), train(root / "compiled", True)


def test_compiled_steps_record_what_eager_ones_do(runs):
    eager, compiled = runs
    # The kernels fuse differently, so the sums round differently.
    for column in ("loss", "grad_norm", "token_grad_norm"):
        np.testing.assert_allclose(compiled.steps[column], eager.steps[column], rtol=1e-4)
    np.testing.assert_allclose(compiled.layers["grad_norm"], eager.layers["grad_norm"], rtol=1e-3)
    # The token gradient comes from a hook on the first block, outside the compiled code.
    assert np.isfinite(compiled.steps["token_grad_norm"]).all()


def test_attention_probes_run_on_compiled_blocks(runs):
    eager, compiled = runs
    assert len(compiled.attention) == len(eager.attention) > 0
    np.testing.assert_allclose(compiled.attention["entropy"], eager.attention["entropy"], rtol=1e-3)


def test_eager_blocks_restores_the_compiled_forward():
    class Backbone(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(3, 3)])

    backbone = Backbone()
    eager = backbone.blocks[0].forward
    compile_blocks(backbone)
    compiled = backbone.blocks[0].forward
    assert compiled is not eager
    with eager_blocks(backbone):
        assert backbone.blocks[0].forward == eager
    assert backbone.blocks[0].forward is compiled
    compile_blocks(backbone)  # a second call changes nothing
    assert backbone.blocks[0].forward is compiled
