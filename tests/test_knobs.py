"""The ablation knobs of ``stabilitylab run``: help, config.json, their effect, bad values.

One short run through the CLI carries most knobs at once. The model-level checks build the
model, or train one step, in memory.
"""

from __future__ import annotations

import json
import math
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RUN
from timm.optim import Lamb, Lars
from torch import nn

from stabilitylab.cli import build_parser, main
from stabilitylab.config import METHOD_DEFAULTS, RunConfig, build_config, derive
from stabilitylab.data import build_data
from stabilitylab.errors import ConfigError
from stabilitylab.models.layers import head_groups, named_groups, vit_layer_groups
from stabilitylab.models.vit import fixed_parameters
from stabilitylab.runs import prepare_run_dir, read_run
from stabilitylab.train.loop import Trainer, build_model, build_optimizer, epoch_loader

# Every ablation knob of ``stabilitylab run``, as its flags appear in --help.
KNOB_FLAGS = (
    "--pos-embed",
    "--pool",
    "--qk-norm",
    "--no-qk-norm",
    "--optimizer",
    "--weight-decay-end",
    "--grad-clip",
    "--grad-clip-mode",
    "--predictor",
    "--no-predictor",
    "--head-bn",
    "--no-head-bn",
    "--proj-layers",
    "--momentum",
    "--temperature",
    "--warmup-epochs",
    "--weight-decay",
    "--crop-min-scale",
    "--method",
)

# The knobs of the one CLI run, each away from its digits-preset value, as config.json
# should record them.
RUN_KNOBS = {
    "method": "mocov3",
    "pos_embed": "learned",
    "pool": "gap",
    "qk_norm": True,
    "optimizer": "lamb",
    "weight_decay": 0.05,
    "weight_decay_end": 0.3,
    "grad_clip": 0.5,
    "predictor": False,
    "head_bn": False,
    "proj_layers": 2,
    "momentum": 0.9,
    "temperature": 0.3,
    "warmup_epochs": 0.5,
    "crop_min_scale": 0.5,
}
# One epoch of 21 steps at batch 64, with few evaluations, keeps the run to a few seconds.
RUN_SIZE = {**TINY_RUN, "epochs": 1, "eval_every": 10, "dense_knn_every": 0}


def option_args(values: dict) -> list[str]:
    """Return the command-line form of configuration ``values``: --NAME VALUE, --[no-]FLAG."""
    args = []
    for key, value in values.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            args.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            args += [f"--{flag}", str(value)]
    return args


def call_cli(argv: list[str]) -> int:
    """Run the CLI in this process and return its exit status, argparse's exits included."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        return main(argv)
    except SystemExit as exit_:
        return int(exit_.code)
    finally:
        # The run command installs its own SIGTERM handler; pytest keeps the default.
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="module")
def knob_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train the one short run that carries RUN_KNOBS and return its folder."""
    out = tmp_path_factory.mktemp("knobs") / "run"
    status = call_cli(["run", "--out", str(out), "--quiet", *option_args(RUN_SIZE | RUN_KNOBS)])
    assert status == 0
    return out


def test_help_lists_every_knob():
    parser = build_parser().commands["run"]
    text = parser.format_help()
    options = {flag for action in parser._actions for flag in action.option_strings}
    for flag in KNOB_FLAGS:
        assert flag in options, flag
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), flag


def test_config_json_records_knobs(knob_run):
    recorded = json.loads((knob_run / "config.json").read_text(encoding="utf-8"))["config"]
    for key, value in RUN_KNOBS.items():
        assert recorded[key] == value, key


def test_run_layer_groups_follow_knobs(knob_run):
    run = read_run(knob_run)
    groups = list(dict.fromkeys(run.layers["layer"]))
    blocks = [f"blocks.{index:02d}" for index in range(4)]
    assert groups == ["patch_embed", "pos_embed", *blocks, "norm", "projector"]
    assert run.derived["layers"] == groups
    assert "cls_token" not in groups
    assert "predictor" not in groups


def test_learned_pos_embed_trains(knob_run):
    layers = read_run(knob_run).layers
    pos_embed = layers[layers["layer"] == "pos_embed"]
    assert np.isfinite(pos_embed["grad_norm"]).all()
    assert (pos_embed["grad_norm"] > 0).all()
    # Step 0 has lr 0 in the warmup, so the first update is that of step 1.
    assert (pos_embed[pos_embed["step"] > 0]["update_ratio"] > 0).all()


def test_weight_decay_follows_cosine(knob_run):
    run = read_run(knob_run)
    total = run.derived["total_steps"]
    step = run.steps["step"].to_numpy()
    start, end = RUN_KNOBS["weight_decay"], RUN_KNOBS["weight_decay_end"]
    expected = end + 0.5 * (start - end) * (1 + np.cos(np.pi * step / total))
    np.testing.assert_allclose(run.steps["weight_decay"].to_numpy(), expected, rtol=1e-6)
    assert run.steps["weight_decay"].iloc[0] == pytest.approx(start)
    assert np.all(np.diff(run.steps["weight_decay"].to_numpy()) > 0)


def test_warmup_epochs_set_lr_peak(knob_run):
    run = read_run(knob_run)
    warmup = run.derived["warmup_steps"]
    assert warmup == round(RUN_KNOBS["warmup_epochs"] * run.derived["steps_per_epoch"])
    lr = run.steps.set_index("step")["lr"]
    assert lr[0] == 0.0
    assert lr.idxmax() == warmup
    assert lr.max() == pytest.approx(run.derived["lr"])


def _derived(config: RunConfig):
    return derive(config, train_size=1347, in_chans=1, num_classes=10)


def _model(**overrides):
    config = build_config("digits", **{**TINY_RUN, **overrides})
    return config, build_model(config, _derived(config))


def _group_names(config: RunConfig, model) -> list[str]:
    groups = named_groups(model.online_modules(), skip=fixed_parameters(config.pos_embed))
    return [name for name, _ in groups]


@pytest.mark.parametrize(
    ("pos_embed", "trainable"), [("sincos", False), ("learned", True), ("none", None)]
)
def test_pos_embed_choice(pos_embed, trainable):
    config, model = _model(pos_embed=pos_embed)
    table = model.backbone.pos_embed
    if trainable is None:
        assert table is None
    else:
        assert table.requires_grad is trainable
    assert ("pos_embed" in _group_names(config, model)) is bool(trainable)


@pytest.mark.parametrize(
    ("pos_embed", "pool", "predictor"),
    [("sincos", "cls", True), ("learned", "gap", False), ("none", "gap", True)],
)
def test_groups_match_config_layer_names(pos_embed, pool, predictor):
    config, model = _model(pos_embed=pos_embed, pool=pool, predictor=predictor)
    expected = vit_layer_groups(
        config.model_spec.depth,
        class_token=pool == "cls",
        learned_pos_embed=pos_embed == "learned",
        heads=head_groups(config.method, predictor),
    )
    assert _group_names(config, model) == expected


def test_gap_pools_patch_mean():
    _, model = _model(pool="gap")
    backbone = model.backbone.eval()
    assert backbone.cls_token is None
    images = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        tokens = backbone.forward_features(images)  # (B, N, C), N = 16 patches
        assert tokens.shape == (4, 16, 64)
        expected = backbone.fc_norm(tokens.mean(dim=1))
        torch.testing.assert_close(model.features(images), expected)


def test_cls_pools_class_token():
    _, model = _model(pool="cls")
    backbone = model.backbone.eval()
    assert backbone.cls_token is not None
    images = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        tokens = backbone.forward_features(images)  # (B, 1 + N, C)
        assert tokens.shape == (4, 17, 64)
        torch.testing.assert_close(model.features(images), tokens[:, 0])


@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_in_every_block(qk_norm):
    _, model = _model(qk_norm=qk_norm)
    for block in model.backbone.blocks:
        for norm in (block.attn.q_norm, block.attn.k_norm):
            assert isinstance(norm, nn.LayerNorm) is qk_norm


@pytest.mark.parametrize(
    ("name", "expected"), [("adamw", torch.optim.AdamW), ("lamb", Lamb), ("lars", Lars)]
)
def test_optimizer_choice_builds_timm(name, expected):
    config, model = _model(optimizer=name, weight_decay=0.07)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(config, trainable, lr=1e-3)
    assert type(optimizer) is expected
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.07]
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(trainable)


@pytest.mark.parametrize("head_bn", [True, False])
def test_head_bn_choice(head_bn):
    _, model = _model(head_bn=head_bn)
    for head in (model.projector, model.predictor):
        batch_norms = [m for m in head.modules() if isinstance(m, nn.BatchNorm1d)]
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        assert bool(batch_norms) is head_bn
        # BN makes a bias of the linear layer before it redundant.
        assert all((linear.bias is None) is head_bn for linear in linears)


def test_no_predictor_has_no_predictor():
    config, model = _model(predictor=False)
    assert isinstance(model.predictor, nn.Identity)
    assert "predictor" not in model.online_modules()
    assert "predictor" not in _group_names(config, model)
    assert not any(name.startswith("predictor.") for name, _ in model.named_parameters())


@pytest.mark.parametrize("layers", [1, 2, 4])
def test_proj_layers_count(layers):
    _, model = _model(proj_layers=layers)
    linears = [m for m in model.projector.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == layers
    assert linears[-1].out_features == TINY_RUN["proj_dim"]


def test_momentum_and_temperature_reach_method():
    _, model = _model(momentum=0.9, temperature=0.3)
    assert model.temperature == 0.3
    assert model.momentum_at(0) == pytest.approx(0.9)
    assert model.momentum_at(model.schedule.total_steps) == pytest.approx(1.0)


def test_crop_min_scale_reaches_views():
    data = build_data(build_config("digits", **{**TINY_RUN, "crop_min_scale": 0.6}))
    assert data.batch_views.crop_min_scale == 0.6


def _trainer(config: RunConfig, run_dir: Path) -> Trainer:
    data = build_data(config)
    derived = derive(config, len(data.train), data.in_chans, data.num_classes, data.img_size)
    return Trainer(config, prepare_run_dir(run_dir), data, derived, torch.device("cpu"))


def _total_grad_norm(trainer: Trainer) -> float:
    norms = [p.grad.detach().norm() for p in trainer.trainable if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def _one_step_each(tmp_path: Path, **clip) -> tuple[Trainer, Trainer]:
    """Train one step of a run clipped by ``clip`` and of an unclipped twin, on equal views."""
    clipped = _trainer(build_config("digits", **RUN_SIZE, **clip), tmp_path / "clip")
    free = _trainer(build_config("digits", **RUN_SIZE), tmp_path / "free")
    batch = next(iter(epoch_loader(free.data, free.config, 0, free.device)))
    views = free.views(batch)  # drawn once, so both runs see the same augmentation
    for trainer in (clipped, free):
        trainer.train_step([view.clone() for view in views], 0.0, labels=batch[1])
    return clipped, free


def test_grad_clip_bounds_total_norm(tmp_path):
    clip = 0.05
    clipped, free = _one_step_each(tmp_path, grad_clip=clip, grad_clip_mode="total")
    unclipped_norm = _total_grad_norm(free)
    assert unclipped_norm > 10 * clip  # so clipping has work to do
    assert _total_grad_norm(clipped) <= clip * (1 + 1e-5)
    # Clipping rescales the whole gradient, keeping its direction.
    scale = _total_grad_norm(clipped) / unclipped_norm
    for mine, theirs in zip(clipped.trainable, free.trainable, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad * scale, rtol=1e-4, atol=1e-9)
    # The monitor reads the norm before clipping, so the steps table shows the spike.
    clipped.write_header({})
    clipped.flush()
    recorded = read_run(clipped.run_dir).steps["grad_norm"].iloc[0]
    assert recorded == pytest.approx(unclipped_norm, rel=1e-4)
    for trainer in (clipped, free):
        trainer.close()


def test_grad_clip_bounds_each_parameter(tmp_path):
    clip = 0.1
    clipped, free = _one_step_each(tmp_path, grad_clip=clip, grad_clip_mode="parameter")
    norms = [float(p.grad.norm()) for p in free.trainable]
    assert sum(norm > clip for norm in norms) > 1  # several tensors need clipping
    assert sum(norm < clip for norm in norms) > 0  # and some keep their gradient
    for mine, theirs, norm in zip(clipped.trainable, free.trainable, norms, strict=True):
        assert float(mine.grad.norm()) <= clip * (1 + 1e-5)
        scale = min(1.0, clip / (norm + 1e-6))
        torch.testing.assert_close(mine.grad, theirs.grad * scale, rtol=1e-4, atol=1e-9)
    for trainer in (clipped, free):
        trainer.close()


# Steps of a 21-step run: the start, a third of the way (cos(pi / 3) = 0.5), the end.
@pytest.mark.parametrize(
    ("end", "step", "expected"),
    [(None, 7, 0.04), (None, 21, 0.04), (0.4, 0, 0.04), (0.4, 7, 0.13), (0.4, 21, 0.4)],
)
def test_weight_decay_at(tmp_path, end, step, expected):
    config = build_config("digits", **RUN_SIZE, weight_decay=0.04, weight_decay_end=end)
    trainer = _trainer(config, tmp_path / "run")
    assert trainer.derived.total_steps == 21
    assert trainer.weight_decay_at(step) == pytest.approx(expected)
    trainer.close()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--pos-embed", "rope"], "argument --pos-embed: invalid choice: 'rope'"),
        (["--pool", "max"], "argument --pool: invalid choice: 'max'"),
        (["--optimizer", "sgd"], "argument --optimizer: invalid choice: 'sgd'"),
        (["--method", "moco"], "argument --method: invalid choice: 'moco'"),
        (["--qk-norm=yes"], "ignored explicit argument 'yes'"),
        (["--proj-layers", "two"], "argument --proj-layers: invalid int value: 'two'"),
        (["--grad-clip", "0"], "--grad-clip 0.0 is invalid"),
        (["--grad-clip", "-1"], "--grad-clip -1.0 is invalid"),
        (["--weight-decay-end", "-0.1"], "--weight-decay-end -0.1 is invalid"),
        (["--weight-decay", "-1"], "--weight-decay -1.0 is invalid"),
        (["--proj-layers", "0"], "--proj-layers 0 is invalid"),
        (["--momentum", "1.5"], "--momentum 1.5 is invalid"),
        (["--temperature", "0"], "--temperature 0.0 is invalid"),
        (["--warmup-epochs", "-1"], "--warmup-epochs -1.0 is invalid"),
        (["--warmup-epochs", "100"], "--warmup-epochs 100.0 is invalid"),
        (["--crop-min-scale", "0"], "--crop-min-scale 0.0 is invalid"),
        (["--crop-min-scale", "1.5"], "--crop-min-scale 1.5 is invalid"),
        (
            ["--on-nonfinite", "skip", "--optimizer", "lamb"],
            "--on-nonfinite skip needs --optimizer adamw",
        ),
        (
            ["--teacher-temperature", "0.05"],
            "--teacher-temperature is only read with --method dino, not mocov3",
        ),
        (
            ["--method", "simclr", "--momentum", "0.9"],
            "--momentum is only read with --method mocov3, byol or dino, not simclr",
        ),
        (
            ["--method", "simclr", "--no-predictor"],
            "--no-predictor is only read with --method mocov3 or byol, not simclr",
        ),
        (["--method", "byol", "--no-predictor"], "--no-predictor is invalid with --method byol"),
        (
            ["--method", "dino", "--local-crops", "1000"],
            "--local-crops 1000 is invalid: it must be 0 to 32 crops per image",
        ),
    ],
)
def test_bad_knob_rejected(capsys, tmp_path, args, expected):
    out = tmp_path / "run"
    status = call_cli(["run", "--out", str(out), "--quiet", *args])
    stderr = capsys.readouterr().err
    assert status == 2
    assert expected in stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists()


# The digits preset is a MoCo v3 preset, so every other method drops its method keys.
@pytest.mark.parametrize("method", sorted(set(METHOD_DEFAULTS) - {"mocov3"}))
def test_method_defaults_replace_preset(method):
    config = build_config("digits", method=method)
    for key, value in METHOD_DEFAULTS[method].items():
        assert getattr(config, key) == value, key
    # Keys outside METHOD_DEFAULTS keep the digits preset's values.
    assert config.lr == 1e-3
    assert config.eval_every == 2
    assert config.crop_min_scale == 0.3


def test_own_method_keeps_preset_values():
    config = build_config("digits", method="mocov3")
    # The digits preset narrows the heads below MoCo v3's 4096 -> 256.
    assert config.proj_hidden_dim == 512
    assert config.proj_dim == 128


def test_preset_method_keys_dropped_for_other_method():
    simclr = build_config("digits", method="simclr")
    assert simclr.proj_hidden_dim == METHOD_DEFAULTS["simclr"]["proj_hidden_dim"]
    assert simclr.temperature == 0.1
    assert simclr.predictor is False
    byol = build_config("mocov3-vit-small", method="byol", data_dir="images")
    assert byol.momentum == 0.996
    assert byol.dataset == "imagefolder"
    assert byol.batch_size == 1024


def test_explicit_value_beats_method_default():
    config = build_config("digits", method="dino", weight_decay=0.05, grad_clip=1.0)
    assert config.weight_decay == 0.05
    assert config.grad_clip == 1.0
    assert config.weight_decay_end == 0.4


def test_method_only_key_rejected_in_library():
    with pytest.raises(ConfigError, match="--sinkhorn-iterations is only read with --method"):
        build_config("digits", method="dino", sinkhorn_iterations=5)


def test_dino_defaults_are_study_knobs():
    config = build_config("digits", method="dino")
    assert config.head_bn is False
    assert config.weight_decay == 0.04
    assert math.isclose(config.weight_decay_end, 0.4)
    assert config.grad_clip == 3.0


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"method": "dino", "freeze_last_layer_epochs": 200}, "lasts the whole run"),
        ({"method": "swav", "queue_start_epochs": 100}, "lasts the whole run"),
        (
            {"method": "dino", "teacher_temperature_warmup_epochs": 100},
            "never reaches --teacher-temperature",
        ),
        ({"grad_clip_mode": "parameter"}, "--grad-clip-mode has no effect without --grad-clip"),
        ({"method": "dino", "local_crop_size": 8}, "have no effect without --local-crops"),
    ],
)
def test_ineffective_option_warns(overrides, expected, caplog):
    with caplog.at_level("WARNING", logger="stabilitylab.config"):
        build_config("digits", **overrides)
    assert expected in caplog.text


def test_effective_options_do_not_warn(caplog):
    with caplog.at_level("WARNING", logger="stabilitylab.config"):
        build_config("digits", method="dino", freeze_last_layer_epochs=1, local_crops=2)
    assert caplog.text == ""
