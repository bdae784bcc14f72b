"""Model, freeze and MoCo v3 loss: gradients, bit-identical frozen weights, chance level."""

from __future__ import annotations

import math

import pytest
import torch
from method_runs import assert_gradients_flow, derived_for
from timm.layers import DropPath
from timm.optim import create_optimizer_v2

from stabilitylab.config import build_config
from stabilitylab.errors import ConfigError
from stabilitylab.methods.base import pooled
from stabilitylab.methods.mocov3 import contrastive_loss, momentum_at
from stabilitylab.models.vit import sincos_2d_position_embedding
from stabilitylab.train.loop import build_model, parameter_fingerprint


def _step(model, optimizer, batch=32, size=16):
    view1 = torch.rand(batch, 1, size, size)
    view2 = torch.rand(batch, 1, size, size)
    optimizer.zero_grad(set_to_none=True)
    loss = model(view1, view2)
    loss.backward()
    optimizer.step()
    return loss


def test_every_trainable_parameter_gets_gradient(tiny_config):
    config = tiny_config()
    torch.manual_seed(0)
    model = build_model(config, derived_for(config))
    loss = model(torch.rand(16, 1, 16, 16), torch.rand(16, 1, 16, 16))
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    assert_gradients_flow(trainable)
    for name, parameter in model.named_parameters():
        if name.startswith("momentum_"):
            assert parameter.grad is None, name


def test_frozen_patch_embed_bit_identical_under_weight_decay(tiny_config):
    config = tiny_config(freeze_patch_embed=True, weight_decay=0.5)
    model = build_model(config, derived_for(config))
    frozen = {
        name: p.detach().clone()
        for name, p in model.named_parameters()
        if ".patch_embed." in f".{name}"
    }
    assert sorted(frozen) == sorted(
        [
            "backbone.patch_embed.proj.weight",
            "backbone.patch_embed.proj.bias",
            "momentum_backbone.patch_embed.proj.weight",
            "momentum_backbone.patch_embed.proj.bias",
        ]
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = create_optimizer_v2(trainable, opt="adamw", lr=1e-2, weight_decay=0.5)
    for _ in range(3):
        _step(model, optimizer)
        model.update_momentum_encoder(0.9)
    parameters = dict(model.named_parameters())
    for name, initial in frozen.items():
        assert parameters[name].grad is None, name
        assert torch.equal(parameters[name].detach(), initial), name
    # The rest of the backbone did train.
    assert not torch.equal(
        parameters["backbone.blocks.0.attn.qkv.weight"],
        model.momentum_backbone.blocks[0].attn.qkv.weight,
    )


def test_both_arms_start_identical(tiny_config):
    learned = build_model(tiny_config(), derived_for(tiny_config()))
    frozen_config = tiny_config(freeze_patch_embed=True)
    frozen = build_model(frozen_config, derived_for(frozen_config))
    assert parameter_fingerprint(learned) == parameter_fingerprint(frozen)
    other_seed = build_model(tiny_config(seed=1), derived_for(tiny_config(seed=1)))
    assert parameter_fingerprint(other_seed) != parameter_fingerprint(learned)


def _drop_rates(backbone) -> list[float]:
    """Return the drop rate of each residual branch; timm puts no DropPath where it is 0."""
    return [
        branch.drop_prob if isinstance(branch, DropPath) else 0.0
        for block in backbone.blocks
        for branch in (block.drop_path1, block.drop_path2)
    ]


@pytest.mark.parametrize(
    ("method", "extra"), [("mocov3", {}), ("byol", {}), ("dino", {"num_prototypes": 64})]
)
def test_drop_path_in_online_backbone_only(tiny_config, method, extra):
    config = tiny_config(method=method, drop_path=0.2, **extra)
    model = build_model(config, derived_for(config))
    depth = len(model.backbone.blocks)
    expected = [0.2 * index / (depth - 1) for index in range(depth) for _ in range(2)]
    assert _drop_rates(model.backbone) == pytest.approx(expected)
    (target,) = model.target_backbones().values()
    assert any(isinstance(module, DropPath) for module in target.modules())
    assert _drop_rates(target) == [0.0] * len(expected)
    # Stochastic depth draws nothing at build time, so the weights equal those without it.
    plain_config = tiny_config(method=method, **extra)
    plain = build_model(plain_config, derived_for(plain_config))
    assert parameter_fingerprint(model) == parameter_fingerprint(plain)


def test_drop_path_random_in_train_mode_only(tiny_config):
    config = tiny_config(drop_path=0.5)
    model = build_model(config, derived_for(config)).train()
    images = torch.rand(8, 1, 16, 16)
    online = [pooled(model.backbone, images) for _ in range(2)]
    assert not torch.equal(online[0], online[1])
    target = [pooled(model.momentum_backbone, images) for _ in range(2)]
    assert torch.equal(target[0], target[1])
    model.eval()
    evaluated = [pooled(model.backbone, images) for _ in range(2)]
    assert torch.equal(evaluated[0], evaluated[1])
    # In eval mode the online backbone equals its copy, which has the same initial weights.
    assert torch.equal(evaluated[0], pooled(model.momentum_backbone, images))


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5, True])
def test_invalid_drop_path_rejected(rate):
    with pytest.raises(ConfigError, match=f"--drop-path {rate!r} is invalid"):
        build_config("digits", drop_path=rate)


def test_patch_projection_init_bound(tiny_config):
    config = tiny_config()
    model = build_model(config, derived_for(config))
    proj = model.backbone.patch_embed.proj
    bound = math.sqrt(6.0 / (1 * 4 * 4 + 64))
    assert proj.weight.abs().max() <= bound
    assert proj.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(proj.bias) == 0
    assert not model.backbone.pos_embed.requires_grad


def test_sincos_embedding_layout():
    table = sincos_2d_position_embedding(grid_size=4, dim=16)
    assert table.shape == (16, 16)
    # Token 0 sits at x = y = 0: sin parts 0, cos parts 1.
    assert torch.allclose(table[0, 0:4], torch.zeros(4))
    assert torch.allclose(table[0, 4:8], torch.ones(4))
    # Tokens in one row share the y half of the table.
    assert torch.allclose(table[0, 8:], table[3, 8:])
    assert not torch.allclose(table[0, :8], table[3, :8])
    with pytest.raises(ValueError):
        sincos_2d_position_embedding(grid_size=4, dim=18)


@pytest.mark.parametrize("batch", [64, 256])
def test_loss_at_init_near_chance(tiny_config, batch):
    # The recipe's 256-wide output keeps the random logits' variance, which adds about
    # 2 / (proj_dim * tau) to 4 tau ln(B), small.
    config = tiny_config(proj_dim=256, proj_hidden_dim=256)
    torch.manual_seed(0)
    model = build_model(config, derived_for(config))
    with torch.no_grad():
        loss = model(torch.rand(batch, 1, 16, 16), torch.rand(batch, 1, 16, 16)).item()
    chance = 4 * config.temperature * math.log(batch)
    assert abs(loss - chance) < 0.05 * chance, (loss, chance)


def test_contrastive_loss_hand_computed():
    query = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    key = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    tau = 0.5
    # Normalised: q = [[1, 0], [0, 1]], k = [[1, 0], [s, s]] with s = 1/sqrt(2).
    s = 1 / math.sqrt(2)
    row0 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(s / tau)))
    row1 = -math.log(math.exp(s / tau) / (math.exp(0 / tau) + math.exp(s / tau)))
    expected = (row0 + row1) / 2 * 2 * tau
    assert contrastive_loss(query, key, tau).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("step", "total", "base", "expected"),
    [
        (0, 100, 0.99, 0.99),
        (50, 100, 0.99, 0.995),
        (100, 100, 0.99, 1.0),
        (25, 100, 0.9, 1 - 0.05 * (1 + math.cos(math.pi / 4))),
    ],
)
def test_momentum_schedule(step, total, base, expected):
    assert momentum_at(step, total, base) == pytest.approx(expected)
