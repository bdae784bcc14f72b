"""The batched monitor against a per-parameter reference, frozen groups and the token gradient."""

from __future__ import annotations

import math

import torch
from timm.optim import create_optimizer_v2

from stabilitylab.config import derive
from stabilitylab.models.layers import named_groups
from stabilitylab.models.vit import FIXED_PARAMETERS
from stabilitylab.monitor.signals import TrainingMonitor
from stabilitylab.train.loop import build_model
from stabilitylab.train.precision import scale_tensor


def _setup(config):
    derived = derive(config, train_size=1347, in_chans=1, num_classes=10)
    torch.manual_seed(0)
    model = build_model(config, derived)
    groups = named_groups(model.online_modules(), skip=FIXED_PARAMETERS)
    monitor = TrainingMonitor(groups, model.backbone.blocks[0], torch.device("cpu"), capacity=4)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = create_optimizer_v2(trainable, opt="adamw", lr=1e-3, weight_decay=0.1)
    return model, groups, monitor, optimizer


def _monitored_step(model, monitor, optimizer):
    view1, view2 = torch.rand(16, 1, 16, 16), torch.rand(16, 1, 16, 16)
    optimizer.zero_grad(set_to_none=True)
    loss = model(view1, view2)
    loss.backward()
    monitor.record_gradients(loss)
    reference_grads = {id(p): p.grad.clone() for p in model.parameters() if p.grad is not None}
    before = {id(p): p.detach().clone() for p in model.parameters()}
    monitor.snapshot_weights()
    optimizer.step()
    monitor.record_updates()
    return loss, reference_grads, before


def test_layer_names_in_flow_order(tiny_config):
    _, groups, _, _ = _setup(tiny_config())
    names = [name for name, _ in groups]
    assert names == [
        "patch_embed",
        "cls_token",
        "blocks.00",
        "blocks.01",
        "blocks.02",
        "blocks.03",
        "norm",
        "projector",
        "predictor",
    ]


def test_group_norms_match_reference(tiny_config):
    model, groups, monitor, optimizer = _setup(tiny_config())
    loss, grads, before = _monitored_step(model, monitor, optimizer)
    drained = monitor.drain()
    assert drained.layers.shape == (1, len(groups), 3)
    assert drained.steps[0, 0].item() == loss.item()
    total_sq = 0.0
    for index, (name, members) in enumerate(groups):
        grad_sq = sum(grads[id(p)].double().pow(2).sum().item() for _, p in members)
        weight_sq = sum(p.detach().double().pow(2).sum().item() for _, p in members)
        update_sq = sum(
            (p.detach() - before[id(p)]).double().pow(2).sum().item() for _, p in members
        )
        before_sq = sum(before[id(p)].double().pow(2).sum().item() for _, p in members)
        total_sq += grad_sq
        grad_norm, weight_norm, update_ratio = drained.layers[0, index].tolist()
        assert math.isclose(grad_norm, math.sqrt(grad_sq), rel_tol=1e-4), name
        assert math.isclose(weight_norm, math.sqrt(weight_sq), rel_tol=1e-4), name
        assert math.isclose(update_ratio, math.sqrt(update_sq / before_sq), rel_tol=1e-3), name
    assert math.isclose(drained.steps[0, 1].item(), math.sqrt(total_sq), rel_tol=1e-4)


def test_frozen_group_recorded_as_missing(tiny_config):
    model, groups, monitor, optimizer = _setup(tiny_config(freeze_patch_embed=True))
    _monitored_step(model, monitor, optimizer)
    drained = monitor.drain()
    names = [name for name, _ in groups]
    frozen = names.index("patch_embed")
    grad_norm, weight_norm, update_ratio = drained.layers[0, frozen].tolist()
    assert math.isnan(grad_norm)
    assert math.isnan(update_ratio)
    assert weight_norm > 0  # the weights exist even though they do not train
    others = [i for i in range(len(names)) if i != frozen]
    assert torch.isfinite(drained.layers[0, others, 0]).all()
    assert (drained.layers[0, others, 0] > 0).all()


def test_token_gradient_in_both_arms(tiny_config):
    for freeze in (False, True):
        model, _, monitor, optimizer = _setup(tiny_config(freeze_patch_embed=freeze))
        _monitored_step(model, monitor, optimizer)
        token = monitor.drain().steps[0, 2].item()
        assert math.isfinite(token), freeze
        assert token > 0, freeze


def test_token_gradient_matches_autograd(tiny_config):
    model, _, monitor, _ = _setup(tiny_config())
    captured = []
    handle = model.backbone.blocks[0].register_forward_pre_hook(
        lambda module, args: captured.append(args[0]) or args[0].retain_grad()
    )
    loss = model(torch.rand(8, 1, 16, 16), torch.rand(8, 1, 16, 16))
    loss.backward()
    handle.remove()
    online = [t for t in captured if t.grad is not None]
    assert len(online) == 2  # one per view; the momentum encoder records no gradient
    expected = math.sqrt(sum(t.grad.pow(2).sum().item() for t in online))
    monitor.record_gradients(loss)
    monitor.snapshot_weights()
    monitor.record_updates()
    assert math.isclose(monitor.drain().steps[0, 2].item(), expected, rel_tol=1e-5)


def test_drain_returns_copies(tiny_config):
    model, _, monitor, optimizer = _setup(tiny_config())
    _monitored_step(model, monitor, optimizer)
    first = monitor.drain()
    _monitored_step(model, monitor, optimizer)
    assert torch.isfinite(first.steps).all()
    assert monitor.rows == 1


def test_norms_measured_after_unscaling(tiny_config):
    # The gradient scaler's path, exercised on the CPU: every recorded norm must equal the
    # unscaled run's, and the loss scale is recorded as such.
    recorded = []
    for scale in (None, 1024.0):
        model, _, monitor, optimizer = _setup(tiny_config())
        torch.manual_seed(1)
        view1, view2 = torch.rand(16, 1, 16, 16), torch.rand(16, 1, 16, 16)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale or 1.0, enabled=scale is not None)
        optimizer.zero_grad(set_to_none=True)
        loss = model(view1, view2)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        monitor.record_gradients(loss, scale_tensor(scaler, torch.device("cpu")))
        monitor.snapshot_weights()
        scaler.step(optimizer)
        scaler.update()
        monitor.record_updates()
        recorded.append(monitor.drain())
    plain, scaled = recorded
    assert torch.allclose(scaled.steps[0, :3], plain.steps[0, :3], rtol=1e-4)
    assert torch.allclose(scaled.layers[0, :, 0], plain.layers[0, :, 0], rtol=1e-4)
    assert plain.steps[0, 3].item() == 1.0
    assert scaled.steps[0, 3].item() == 1024.0
