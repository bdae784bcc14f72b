"""DINO: loss, centre, teacher temperature, last-layer freeze, teacher EMA, runs and resume.

The runs train on the small digits split of method_runs.py, so each takes seconds on a CPU.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from method_runs import (
    check_frozen_patch_embed,
    check_resume_bit_exact,
    derived_for,
    small_run,
    uninterrupted_run,
)
from test_nonfinite import HOST_READS
from test_resume import SMALL_ARGS, run_cli_here, small_digits, status_of, use_data
from torch import nn

import stabilitylab.train.loop as loop
from stabilitylab.config import build_config
from stabilitylab.data.augment import default_local_crop_size
from stabilitylab.errors import ConfigError
from stabilitylab.methods.base import StepSchedule, pooled
from stabilitylab.methods.dino import DINO, dino_loss, teacher_temperature_at
from stabilitylab.runs import read_run
from stabilitylab.train.checkpoint import load_checkpoint

# Multi-crop on, a small output layer, and the last layer frozen for the first epoch of 6
# steps, so the resumed steps cover both the frozen and the trained last layer. The ViT-S/16
# recipe's stochastic depth and trained last-layer norms are on, so that the resume covers
# their random numbers and parameters.
DINO_RUN = small_run(
    "dino",
    num_prototypes=64,
    local_crops=2,
    freeze_last_layer_epochs=1.0,
    drop_path=0.1,
    norm_last_layer=False,
)
DINO_ARGS = [
    *SMALL_ARGS,
    "--method=dino",
    "--num-prototypes=64",
    "--local-crops=2",
    "--freeze-last-layer-epochs=1",
    "--drop-path=0.1",
    "--no-norm-last-layer",
]
STEPS_PER_EPOCH = 6


def _model(tiny_config, **overrides) -> DINO:
    config = tiny_config(method="dino", **{"num_prototypes": 256, "local_crops": 2, **overrides})
    return loop.build_model(config, derived_for(config))


def _views(batch: int = 8, local_crops: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    views = [torch.rand(batch, 1, 16, 16, generator=generator) for _ in range(2)]
    views += [torch.rand(batch, 1, 8, 8, generator=generator) for _ in range(local_crops)]
    return views


def _teacher_logits(model: DINO, views: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        features = pooled(model.teacher_backbone, torch.cat(views[:2]))
        return model.teacher_prototypes(F.normalize(model.teacher_projector(features), dim=-1))


# -- loss ----------------------------------------------------------------------------------


def _reference_loss(student, teacher, center, student_tau, teacher_tau) -> float:
    """DINO's loss with explicit loops over views, samples and outputs, in float64."""
    total, pairs = 0.0, 0
    for t_index, t_logits in enumerate(teacher):
        for s_index, s_logits in enumerate(student):
            if s_index == t_index:
                continue
            per_sample = []
            for t_row, s_row in zip(t_logits, s_logits, strict=True):
                q = np.exp((t_row - center) / teacher_tau)
                q = q / q.sum()
                log_p = s_row / student_tau - np.log(np.exp(s_row / student_tau).sum())
                per_sample.append(-sum(q[k] * log_p[k] for k in range(len(q))))
            total += sum(per_sample) / len(per_sample)
            pairs += 1
    return total / pairs


def test_loss_hand_computed():
    student = [
        np.array([[0.5, -0.2, 0.1], [0.0, 0.3, -0.4]]),
        np.array([[-0.1, 0.2, 0.6], [0.4, 0.4, -0.2]]),
        np.array([[0.9, -0.5, 0.0], [-0.3, 0.1, 0.2]]),  # a local crop
    ]
    teacher = [
        np.array([[0.2, 0.1, -0.3], [0.5, -0.5, 0.0]]),
        np.array([[0.0, 0.4, 0.1], [0.1, 0.2, 0.3]]),
    ]
    center = np.array([0.05, -0.1, 0.02])
    expected = _reference_loss(student, teacher, center, 0.1, 0.04)
    loss = dino_loss(
        [torch.tensor(s, dtype=torch.float32) for s in student],
        [torch.tensor(t, dtype=torch.float32) for t in teacher],
        torch.tensor(center, dtype=torch.float32)[None],
        student_temperature=0.1,
        teacher_temperature=0.04,
    )
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_uniform_student_scores_ln_k():
    # Whatever the teacher's targets, a uniform prediction costs ln K per pair.
    teacher = [torch.randn(4, 10), torch.randn(4, 10)]
    student = [torch.zeros(4, 10) for _ in range(5)]
    loss = dino_loss(student, teacher, torch.zeros(1, 10), 0.1, 0.04)
    assert loss.item() == pytest.approx(math.log(10), rel=1e-6)


def test_loss_at_init_near_chance(tiny_config):
    # Every output at init is a cosine with a random unit row, about N(0, 1/d) for the
    # d = 256 bottleneck, so the student's logits spread over the outputs by 1/(tau_s
    # sqrt(d)). That spread adds at most 1/(2 d tau_s^2) to ln K. Teacher and student start
    # equal, so on similar views the targets also follow the student's logits, which takes
    # off at most 1/(d tau_s tau_t), the mean of a logit under targets tilted by it.
    model = _model(tiny_config, proj_dim=256, proj_hidden_dim=256, num_prototypes=4096)
    with torch.no_grad():
        loss, _ = model.training_loss(_views(batch=64), step=0)
    d, tau_s, tau_t = 256, model.student_temperature, model.teacher_temperature_at(0)
    chance = math.log(4096)
    assert chance - 1 / (d * tau_s * tau_t) - 0.05 < loss.item() < chance + 1 / (2 * d * tau_s**2)


def test_loss_float32_under_bf16(tiny_config):
    model = _model(tiny_config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, features = model.training_loss(_views(), step=0)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert model.center.dtype == torch.float32
    assert features.shape == (8, 64)


# -- centre, temperature, features ---------------------------------------------------------


def test_center_update_formula(tiny_config):
    model = _model(tiny_config, center_momentum=0.8, teacher_temperature_warmup_epochs=1.0)
    views = _views()
    old_center = torch.randn(1, 256) * 0.1
    model.center.copy_(old_center)
    teacher = _teacher_logits(model, views)
    step = 5  # inside the temperature warmup: neither end of it
    loss, _ = model.training_loss(views, step)

    expected_center = old_center * 0.8 + teacher.mean(dim=0, keepdim=True) * 0.2
    torch.testing.assert_close(model.center, expected_center, rtol=1e-5, atol=1e-7)
    # The loss used the centre from before the update.
    with torch.no_grad():
        features = torch.cat(
            [
                pooled(model.backbone, torch.cat(views[:2])),
                pooled(model.backbone, torch.cat(views[2:])),
            ]
        )
        student = model.prototypes(F.normalize(model.projector(features), dim=-1))
    expected_loss = dino_loss(
        student.split(8), teacher.split(8), old_center, 0.1, model.teacher_temperature_at(step)
    )
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)


def test_center_is_buffer(tiny_config):
    model = _model(tiny_config)
    assert "center" in dict(model.named_buffers())
    assert "center" in model.state_dict()
    assert model.center.shape == (1, 256)


@pytest.mark.parametrize(
    ("step", "warmup", "expected"),
    [
        (0, 10, 0.04),
        (5, 10, 0.055),
        (9, 10, 0.04 + 0.03 * 0.9),
        (10, 10, 0.07),
        (500, 10, 0.07),
        (0, 0, 0.07),  # no warmup
    ],
)
def test_teacher_temperature_schedule(step, warmup, expected):
    assert teacher_temperature_at(step, warmup, 0.04, 0.07) == pytest.approx(expected)


def test_teacher_temperature_warmup_in_epochs(tiny_config):
    model = _model(
        tiny_config,
        teacher_temperature=0.07,
        teacher_temperature_warmup=0.04,
        teacher_temperature_warmup_epochs=0.5,
    )
    warmup_steps = model.schedule.epochs_to_steps(0.5)  # 1347 // 64 = 21 steps an epoch
    assert warmup_steps == 10
    assert model.teacher_temperature_at(0) == pytest.approx(0.04)
    assert model.teacher_temperature_at(5) == pytest.approx(0.055)
    assert model.teacher_temperature_at(warmup_steps) == pytest.approx(0.07)


def test_features_are_first_global_view(tiny_config):
    model = _model(tiny_config)
    views = _views()
    with torch.no_grad():
        _, features = model.training_loss(views, step=0)
        expected = model.features(views[0])
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


# -- head, last layer and its freeze -------------------------------------------------------


def test_head_layout_and_init(tiny_config):
    model = _model(tiny_config)
    linears = [m for m in model.projector if isinstance(m, nn.Linear)]
    assert len(linears) == 3
    assert [type(m) for m in model.projector].count(nn.GELU) == 2
    assert not any(isinstance(m, (nn.ReLU, nn.BatchNorm1d)) for m in model.projector)
    assert linears[-1].out_features == 32  # the proj_dim bottleneck
    for linear in linears:
        assert torch.count_nonzero(linear.bias) == 0
        assert linear.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.prototypes.weight.shape == (256, 32)
    assert model.prototypes.bias is None
    assert list(model.online_modules()) == ["backbone", "projector", "prototypes"]


def test_head_bn_adds_hidden_batch_norm(tiny_config):
    model = _model(tiny_config, head_bn=True)
    layers = list(model.projector)
    assert [type(m) for m in layers].count(nn.BatchNorm1d) == 2
    assert isinstance(layers[-1], nn.Linear)  # no BN after the bottleneck


def test_last_layer_norm_fixed(tiny_config):
    model = _model(tiny_config)
    magnitude = model.prototypes.parametrizations.weight.original0
    direction = model.prototypes.parametrizations.weight.original1
    assert not magnitude.requires_grad
    assert direction.requires_grad
    assert torch.equal(magnitude, torch.ones(256, 1))
    # Every output is a cosine similarity: the rows of the effective weight have norm 1.
    row_norms = model.prototypes.weight.norm(dim=1)
    torch.testing.assert_close(row_norms, torch.ones(256))


def test_last_layer_norm_trains_without_norm_last_layer(tiny_config):
    model = _model(tiny_config, norm_last_layer=False)
    magnitude = model.prototypes.parametrizations.weight.original0
    teacher_magnitude = model.teacher_prototypes.parametrizations.weight.original0
    assert magnitude.requires_grad
    assert not teacher_magnitude.requires_grad
    assert torch.equal(magnitude, torch.ones(256, 1))
    step = 30  # after the last layer's frozen epoch
    loss, _ = model.training_loss(_views(), step)
    loss.backward()
    model.adjust_gradients(step)
    assert magnitude.grad is not None
    assert magnitude.grad.abs().sum() > 0
    # The teacher's norms follow the student's by EMA.
    with torch.no_grad():
        magnitude.mul_(2.0)
    model.after_optimizer_step(step)
    momentum = model.momentum_at(step)
    expected = torch.full((256, 1), momentum + 2.0 * (1 - momentum))
    torch.testing.assert_close(teacher_magnitude.detach(), expected)
    # The first epoch's freeze keeps the norms fixed with the rest of the layer.
    model.zero_grad(set_to_none=True)
    loss, _ = model.training_loss(_views(), 0)
    loss.backward()
    model.adjust_gradients(0)
    assert magnitude.grad is None


def test_norm_last_layer_only_with_dino():
    with pytest.raises(ConfigError, match="--no-norm-last-layer is only read with --method dino"):
        build_config("digits", norm_last_layer=False)


def test_last_layer_frozen_first_epoch(tiny_config):
    model = _model(tiny_config)  # 21 steps an epoch, last layer frozen for one
    direction = model.prototypes.parametrizations.weight.original1
    for step, frozen in ((0, True), (20, True), (21, False), (40, False)):
        model.zero_grad(set_to_none=True)
        loss, _ = model.training_loss(_views(), step)
        loss.backward()
        model.adjust_gradients(step)
        assert model.last_layer_frozen(step) is frozen
        if frozen:
            assert direction.grad is None, step
        else:
            assert direction.grad is not None, step
            assert direction.grad.abs().sum() > 0, step
        assert model.prototypes.parametrizations.weight.original0.grad is None
        for name, parameter in model.projector.named_parameters():
            assert parameter.grad is not None, (step, name)


# -- teacher -------------------------------------------------------------------------------


def test_teacher_gets_no_gradient(tiny_config):
    model = _model(tiny_config)
    loss, _ = model.training_loss(_views(), step=30)
    loss.backward()
    teacher = [(name, p) for name, p in model.named_parameters() if name.startswith("teacher_")]
    assert teacher
    for name, parameter in teacher:
        assert not parameter.requires_grad, name
        assert parameter.grad is None, name
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and not name.startswith("prototypes."):
            assert parameter.grad is not None, name


def test_teacher_ema_formula(tiny_config):
    model = _model(tiny_config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.01)
    pairs = [
        (model.teacher_backbone, model.backbone),
        (model.teacher_projector, model.projector),
        (model.teacher_prototypes, model.prototypes),
    ]

    before = [
        [
            (t.detach().clone(), o.detach().clone(), o.requires_grad)
            for t, o in zip(tm.parameters(), om.parameters(), strict=True)
        ]
        for tm, om in pairs
    ]
    step = 17
    momentum = model.momentum_at(step)
    total = model.schedule.total_steps
    assert momentum == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi * step / total)) * 0.004)
    model.after_optimizer_step(step)

    for (teacher_module, _), values in zip(pairs, before, strict=True):
        for parameter, (teacher, online, trained) in zip(
            teacher_module.parameters(), values, strict=True
        ):
            expected = momentum * teacher + (1 - momentum) * online if trained else teacher
            torch.testing.assert_close(parameter.detach(), expected, rtol=1e-6, atol=1e-7)

    # The fixed norm of the last layer stays 1 in the teacher too.
    teacher_magnitude = model.teacher_prototypes.parametrizations.weight.original0
    assert torch.equal(teacher_magnitude, torch.ones(256, 1))


def test_step_hooks_read_nothing_to_host(tiny_config, monkeypatch):
    model = _model(tiny_config)
    views = _views()

    def host_read(*args, **kwargs):
        raise AssertionError("the method read a tensor back to the host")

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, host_read)
    for step in (0, 30):  # last layer frozen, then trained
        loss, _ = model.training_loss(views, step)
        loss.backward()
        model.adjust_gradients(step)
        model.after_optimizer_step(step)


def test_target_backbones_name_teacher(tiny_config):
    model = _model(tiny_config)
    assert model.target_backbones() == {"teacher_backbone": model.teacher_backbone}


def test_from_config_reads_fields(tiny_config):
    config = tiny_config(
        method="dino",
        num_prototypes=128,
        temperature=0.2,
        center_momentum=0.5,
        momentum=0.9,
        teacher_temperature=0.06,
    )
    model = DINO.from_config(config, _model(tiny_config).backbone, StepSchedule(100, 10))
    assert model.prototypes.weight.shape[0] == 128
    assert model.student_temperature == 0.2
    assert model.center_momentum == 0.5
    assert model.momentum_at(0) == pytest.approx(0.9)
    assert model.teacher_temperature_at(0) == pytest.approx(0.06)


# -- runs ----------------------------------------------------------------------------------


def test_loss_decreases_with_local_crops(tmp_path, monkeypatch):
    # An untrained ViT maps all digits to nearly one feature, which the centre removes, so
    # the BN-free head gets near-uniform targets and a run this short settles at ln K (a
    # collapse to uniform outputs). The BN in the head spreads the batch, so the student
    # learns in 120 steps: its loss falls from above ln K = 5.55 to below it.
    use_data(small_digits, monkeypatch)
    overrides = {
        **DINO_RUN,
        "num_prototypes": 256,
        "proj_dim": 64,
        "head_bn": True,
        "epochs": 40,
        "batch_size": 16,
        "lr": 5e-3,
        "warmup_epochs": 5,
        "momentum": 0.99,
        "eval_every": 1000,
        "dense_knn_every": 0,
        "checkpoint_every": 1000,
        "flush_every": 40,
        "drop_path": 0.0,
        "norm_last_layer": True,
    }
    result = loop.run_training(
        build_config("digits", **overrides), tmp_path / "run", show_progress=False
    )
    assert result.steps == 120
    run = read_run(tmp_path / "run")
    expected_side = default_local_crop_size(run.derived["img_size"], run.derived["patch_size"])
    assert run.derived["local_crop_size"] == expected_side
    losses = run.steps["loss"]
    assert losses.notna().all()
    first, last = losses.iloc[:10].mean(), losses.iloc[-10:].mean()
    assert last < first - 0.2, (first, last)
    assert last < math.log(256), last


def test_frozen_patch_embed_bit_identical(tmp_path, monkeypatch):
    # The rest of the student and the teacher did train.
    block = "blocks.0.attn.qkv.weight"
    trained = [f"backbone.{block}", f"teacher_backbone.{block}"]
    check = check_frozen_patch_embed(DINO_RUN, tmp_path / "run", monkeypatch, trained)
    names = sorted(entry["name"] for entry in check["parameters"])
    assert names == [
        "backbone.patch_embed.proj.bias",
        "backbone.patch_embed.proj.weight",
        "teacher_backbone.patch_embed.proj.bias",
        "teacher_backbone.patch_embed.proj.weight",
    ]


def test_prototype_gradients_absent_first_epoch(tmp_path, monkeypatch):
    use_data(small_digits, monkeypatch)
    config = build_config("digits", **{**DINO_RUN, "epochs": 2})
    loop.run_training(config, tmp_path / "run", show_progress=False)
    layers = read_run(tmp_path / "run").layers
    prototypes = layers[layers["layer"] == "prototypes"].set_index("step")
    assert prototypes.loc[: STEPS_PER_EPOCH - 1, "grad_norm"].isna().all()
    assert (prototypes.loc[: STEPS_PER_EPOCH - 1, "update_ratio"] == 0).all()
    assert prototypes.loc[STEPS_PER_EPOCH:, "grad_norm"].notna().all()
    assert (prototypes.loc[STEPS_PER_EPOCH:, "update_ratio"] > 0).all()
    projector = layers[layers["layer"] == "projector"]
    assert projector["grad_norm"].notna().all()


reference = uninterrupted_run(
    DINO_RUN, "An uninterrupted DINO run with local crops on the small split."
)


def test_resume_bit_exact(reference, tmp_path, monkeypatch):
    # Interrupted in epoch 1, after the last layer starts training.
    _, resumed = check_resume_bit_exact(
        DINO_RUN, reference, tmp_path / "interrupted", monkeypatch, interrupt_step=8
    )
    uninterrupted = load_checkpoint(reference / "checkpoint.pt")["model"]
    assert torch.equal(resumed["center"], uninterrupted["center"])
    assert resumed["center"].abs().sum() > 0


@pytest.mark.parametrize("arm", ["learned", "frozen"])
def test_cli_runs_dino(arm, tmp_path, monkeypatch):
    out = tmp_path / arm
    use_data(small_digits, monkeypatch)
    args = ["run", "--out", str(out), "--quiet", *DINO_ARGS, "--epochs=1"]
    if arm == "frozen":
        args.append("--freeze-patch-embed")
    assert run_cli_here(args) == 0
    assert status_of(out)["state"] == "finished"
    recorded = json.loads((out / "config.json").read_text())["config"]
    assert recorded["method"] == "dino"
    assert recorded["local_crops"] == 2
    assert recorded["drop_path"] == 0.1
    assert recorded["norm_last_layer"] is False
    check = json.loads((out / "frozen_check.json").read_text())
    assert check["passed"] is (True if arm == "frozen" else None)
    assert len(read_run(out).steps) == STEPS_PER_EPOCH
