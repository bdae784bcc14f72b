"""Presets, validation and derived values; the lr schedule, table-driven."""

from __future__ import annotations

import math

import pytest
import torch

from stabilitylab.config import (
    available_presets,
    build_config,
    derive,
    load_preset,
    unread_by,
)
from stabilitylab.errors import ConfigError
from stabilitylab.train.schedules import build_lr_schedule, lr_at


def test_presets_shipped_and_valid():
    assert {"digits", "mocov3-vit-small", "mocov3-vit-base"} <= set(available_presets())
    for name in available_presets():
        data_dir = "somewhere" if load_preset(name)["dataset"] == "imagefolder" else None
        config = build_config(name, data_dir=data_dir)
        assert config.preset == name


def test_recipe_presets_match_moco_v3():
    base = load_preset("mocov3-vit-base")
    assert base["batch_size"] == 4096
    assert base["lr"] == 1.5e-4
    assert base["weight_decay"] == 0.1
    assert (base["epochs"], base["warmup_epochs"]) == (300, 40)
    assert build_config("mocov3-vit-small", data_dir="x").model_spec.num_heads == 12


def test_override_beats_preset():
    config = build_config("digits", lr=3e-3, freeze_patch_embed=True)
    assert config.lr == 3e-3
    assert config.freeze_patch_embed is True
    assert config.batch_size == load_preset("digits")["batch_size"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr": -1.0}, "--lr -1.0 is invalid"),
        ({"lr": math.nan}, "--lr nan is invalid"),
        ({"batch_size": 0}, "--batch-size 0 is invalid"),
        ({"epochs": 0}, "--epochs 0 is invalid"),
        ({"img_size": 18}, "--img-size 18 is not divisible by --patch-size 4"),
        ({"warmup_epochs": 200}, "--warmup-epochs 200 is invalid"),
        ({"momentum": 1.5}, "--momentum 1.5 is invalid"),
        ({"weight_decay": -0.1}, "--weight-decay -0.1 is invalid"),
        ({"crop_min_scale": 0.0}, "--crop-min-scale 0.0 is invalid"),
        ({"device": "gpu"}, "--device 'gpu' is invalid"),
        ({"dataset": "imagefolder"}, "needs --data-dir"),
        ({"data_dir": "/data"}, "--data-dir '/data' is only read with --dataset imagefolder"),
        ({"seed": 2**40}, "--seed 1099511627776 is invalid"),
        ({"lr": math.inf}, "--lr inf is invalid: it must be a positive, finite number"),
        ({"model": "vit_huge"}, "--model 'vit_huge' is not one of"),
        ({"no_such_key": 1}, "unknown configuration keys ['no_such_key']"),
    ],
)
def test_invalid_values_rejected(overrides, message):
    with pytest.raises(ConfigError) as error:
        build_config("digits", **overrides)
    assert message in str(error.value)


def test_unknown_preset_lists_choices():
    with pytest.raises(
        ConfigError, match="unknown preset 'nope'; choose one of: .*digits, digits-byol"
    ):
        build_config("nope")


def test_derived_lr_scales_with_batch():
    config = build_config("digits", batch_size=512, lr=1e-3)
    derived = derive(config, train_size=1347, in_chans=1, num_classes=10)
    assert derived.lr == pytest.approx(2e-3)
    assert derived.steps_per_epoch == 2
    assert derived.total_steps == 2 * config.epochs
    assert config.lr == 1e-3  # the configuration itself is not rewritten


def test_batch_larger_than_dataset_rejected():
    config = build_config("digits", batch_size=2000)
    with pytest.raises(ConfigError, match="larger than the training split"):
        derive(config, train_size=1347, in_chans=1, num_classes=10)


def test_other_dataset_drops_sized_keys():
    config = build_config("digits", dataset="imagefolder", data_dir="images")
    assert config.dense_knn_size is None
    assert config.eval_every == 100
    assert config.epochs == 100  # not sized to the dataset, so kept from the preset


def test_other_dataset_keeps_explicit_key():
    config = build_config("digits", dataset="imagefolder", data_dir="images", eval_every=7)
    assert config.eval_every == 7


def test_own_dataset_keeps_sized_keys():
    assert build_config("digits", dataset="digits").dense_knn_size == 512


def test_knn_k_larger_than_bank_rejected():
    config = build_config("digits", knn_k=500, knn_max_bank=400)
    with pytest.raises(ConfigError, match="--knn-k 400 or less"):
        derive(config, train_size=1347, in_chans=1, num_classes=10)


def test_knn_k_equal_to_bank_accepted():
    config = build_config("digits", knn_k=400, knn_max_bank=400)
    assert derive(config, train_size=1347, in_chans=1, num_classes=10).train_size == 1347


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.0),  # warmup starts at 0
        (5, 0.5),  # half-way through a 10-step warmup
        (10, 1.0),  # peak at the end of warmup
        (60, 0.5),  # half-way through the 100-step cosine
        (110, 0.0),  # the end of the cosine
    ],
)
def test_lr_schedule(step, expected):
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1.0)
    schedule = build_lr_schedule(optimizer, total_steps=110, warmup_steps=10)
    schedule.step_update(num_updates=step)
    assert lr_at(optimizer) == pytest.approx(expected, abs=1e-9)


def test_overflowing_peak_lr_rejected():
    with pytest.raises(ConfigError, match="peak lr, lr x batch size / 256, overflows to inf"):
        build_config("digits", lr=1e308)


def test_dense_size_ignored_when_off():
    config = build_config("digits", knn_k=1000, dense_knn_every=0)
    assert config.dense_knn_every == 0


def test_unread_by_names_other_methods_keys():
    simclr = unread_by("simclr")
    assert "momentum" in simclr
    assert "predictor" in simclr
    assert "temperature" not in simclr
    assert unread_by("dino") == sorted(unread_by("dino"))
    assert "norm_last_layer" not in unread_by("dino")
    assert "norm_last_layer" in unread_by("mocov3")
