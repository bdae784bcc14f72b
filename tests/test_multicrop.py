"""Multi-crop views: local crop counts, sizes and draws on every data path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_datasets import folder_config, npz_arrays, npz_config, write_folder, write_npz
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from stabilitylab.config import build_config
from stabilitylab.data import build_data, folder
from stabilitylab.data.augment import (
    DigitsBatchTwoView,
    LocalCrops,
    default_local_crop_size,
    imagenet_two_view,
    local_crops_of,
    recipe_batch_two_view,
)
from stabilitylab.errors import ConfigError

CROPS = LocalCrops(count=3, size=8, scale=(0.05, 0.4))


def _digits_views(local_crops: LocalCrops | None) -> DigitsBatchTwoView:
    return DigitsBatchTwoView(16, 0.3, 0.5, 0.25, local_crops)


def _rgb_views(local_crops: LocalCrops | None):
    return recipe_batch_two_view(
        32, 0.08, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), flip=True, local_crops=local_crops
    )


def _pil_image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# -- local crop size -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("img_size", "patch_size", "expected"),
    [
        (224, 16, 96),  # DINO's 96 px beside 224 px
        (224, 8, 96),
        (16, 4, 8),  # 6.9 px rounds to 2 patches
        (32, 4, 12),  # 13.7 px: 12 is the nearest multiple of 4
        (28, 4, 12),
        (8, 4, 4),  # 3.4 px rounds to one patch
        (96, 16, 48),  # 41.1 px: 3 patches
    ],
)
def test_default_local_crop_size(img_size, patch_size, expected):
    assert default_local_crop_size(img_size, patch_size) == expected


def test_local_crops_of_config():
    config = build_config(
        "digits", method="dino", local_crops=4, local_crop_min_scale=0.1, local_crop_max_scale=0.3
    )
    crops = local_crops_of(config, 16)
    assert crops == LocalCrops(count=4, size=8, scale=(0.1, 0.3))
    explicit = build_config("digits", method="swav", local_crops=2, local_crop_size=12)
    assert local_crops_of(explicit, 16).size == 12
    assert local_crops_of(build_config("digits", method="dino"), 16) is None


def test_local_crop_larger_than_image_rejected():
    config = build_config("digits", method="dino", local_crops=2, local_crop_size=20)
    with pytest.raises(ConfigError, match=r"--local-crop-size 20 is larger than the 16 px"):
        build_data(config)


def test_npz_local_crop_larger_than_arrays(tmp_path):
    path = write_npz(tmp_path / "data.npz", **npz_arrays(shape=(8, 8)))
    config = npz_config(path, method="dino", local_crops=2, local_crop_size=12)
    with pytest.raises(ConfigError, match=r"--local-crop-size 12 is larger than the 8 px"):
        build_data(config)


def test_npz_local_crop_not_whole_patches(tmp_path):
    # A crop side the patch size does not divide is rejected with the configuration, before
    # the arrays are read.
    path = write_npz(tmp_path / "data.npz", **npz_arrays(shape=(16, 16)))
    with pytest.raises(ConfigError, match=r"--local-crop-size 6 is invalid: it must be a mult"):
        npz_config(path, method="dino", local_crops=2, local_crop_size=6)


# -- batched views -------------------------------------------------------------------------


def test_digits_local_crop_shapes():
    torch.manual_seed(0)
    images = torch.rand(6, 1, 16, 16)
    views = _digits_views(CROPS)(images)
    assert len(views) == 5
    assert [tuple(v.shape) for v in views] == [(6, 1, 16, 16)] * 2 + [(6, 1, 8, 8)] * 3
    for view in views:
        assert torch.isfinite(view).all()
    # Each local crop gets its own draws.
    assert (views[2] - views[3]).abs().max() > 1e-3
    assert (views[3] - views[4]).abs().max() > 1e-3


def test_rgb_local_crop_shapes():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    views = _rgb_views(LocalCrops(count=2, size=12, scale=(0.05, 0.4)))(images)
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 12, 12)] * 2


@pytest.mark.parametrize(
    ("build", "shape", "crops"),
    [
        (_digits_views, (8, 1, 16, 16), CROPS),
        (_rgb_views, (8, 3, 32, 32), LocalCrops(2, 12, (0.05, 0.4))),
    ],
)
def test_global_views_unchanged_by_local_crops(build, shape, crops):
    images = torch.rand(shape)
    torch.manual_seed(5)
    two = build(None)(images)
    torch.manual_seed(5)
    many = build(crops)(images)
    assert len(two) == 2
    assert torch.equal(many[0], two[0])
    assert torch.equal(many[1], two[1])


def test_batch_views_deterministic():
    images = torch.rand(4, 1, 16, 16)
    torch.manual_seed(3)
    first = _digits_views(CROPS)(images)
    torch.manual_seed(3)
    second = _digits_views(CROPS)(images)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_local_crop_scale_zooms_in():
    # Half the image black, half white: a global view keeps both halves more often than a
    # local crop, whose box covers at most 40% of the image.
    images = torch.zeros(256, 1, 16, 16)
    images[..., 8:] = 1.0
    torch.manual_seed(0)
    views = DigitsBatchTwoView(16, 1.0, 0.0, 1.0, LocalCrops(1, 8, (0.05, 0.4)))(images)
    # At crop_min_scale 1.0 a global crop spans at least 87% of each side: both halves.
    global_spread = views[0].amax(dim=(1, 2, 3)) - views[0].amin(dim=(1, 2, 3))
    local_spread = views[2].amax(dim=(1, 2, 3)) - views[2].amin(dim=(1, 2, 3))
    assert (global_spread > 0.3).float().mean() > 0.95
    assert (local_spread < 0.3).float().mean() > 0.1


def test_small_local_crop_blur_fits():
    # The recipe's blur kernel is 23 px at 224 px. A 4 px crop cuts it to 7 px, the largest
    # kernel whose reflect padding fits inside the crop.
    views = recipe_batch_two_view(
        224, 0.08, (0.5,) * 3, (0.25,) * 3, flip=True, local_crops=LocalCrops(1, 4, (0.05, 0.4))
    )
    local = views(torch.rand(2, 3, 224, 224))[2]
    assert local.shape == (2, 3, 4, 4)
    assert torch.isfinite(local).all()


# -- per-image views -----------------------------------------------------------------------


def test_imagenet_local_crop_shapes():
    transform = imagenet_two_view(32, 0.08, LocalCrops(count=4, size=12, scale=(0.05, 0.4)))
    views = transform(_pil_image())
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 12, 12)] * 4
    local_ops = transform.local.transforms
    crop = next(op for op in local_ops if isinstance(op, v2.RandomResizedCrop))
    assert crop.size == (12, 12)
    assert crop.scale == (0.05, 0.4)
    blur = next(op for op in local_ops if isinstance(op, v2.RandomApply) and op.p == 0.5)
    assert isinstance(blur.transforms[0], v2.GaussianBlur)
    assert any(isinstance(op, v2.RandomHorizontalFlip) for op in local_ops)


def test_imagenet_global_views_unchanged_by_local_crops():
    image = _pil_image()
    torch.manual_seed(7)
    two = imagenet_two_view(32, 0.08)(image)
    torch.manual_seed(7)
    many = imagenet_two_view(32, 0.08, LocalCrops(2, 12, (0.05, 0.4)))(image)
    assert len(two) == 2
    assert len(many) == 4
    assert torch.equal(many[0], two[0])
    assert torch.equal(many[1], two[1])


# -- data bundles --------------------------------------------------------------------------


def test_digits_bundle_local_crops(tiny_config):
    data = build_data(tiny_config(method="dino", local_crops=3))
    images = torch.stack([data.train[i][0] for i in range(4)])
    views = data.batch_views(images)
    assert [tuple(v.shape) for v in views] == [(4, 1, 16, 16)] * 2 + [(4, 1, 8, 8)] * 3


def test_digits_bundle_two_views_without_local_crops(tiny_config):
    data = build_data(tiny_config(method="dino"))
    views = data.batch_views(torch.stack([data.train[i][0] for i in range(4)]))
    assert len(views) == 2


def test_in_memory_folder_local_crops(tmp_path):
    config = folder_config(write_folder(tmp_path), method="swav", local_crops=2)
    data = build_data(config)
    assert data.batch_views.flip is True
    images = torch.stack([data.train[i][0] for i in range(4)])
    views = data.batch_views(images)
    assert [tuple(v.shape) for v in views] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 2


def test_npz_local_crops(tmp_path):
    path = write_npz(tmp_path / "data.npz", **npz_arrays(shape=(16, 16)))
    data = build_data(npz_config(path, method="dino", local_crops=2, local_crop_size=4))
    views = data.batch_views(torch.stack([data.train[i][0] for i in range(3)]))
    assert [tuple(v.shape) for v in views] == [(3, 1, 16, 16)] * 2 + [(3, 1, 4, 4)] * 2


def test_streamed_folder_local_crops(tmp_path, monkeypatch):
    monkeypatch.setattr(folder, "IN_MEMORY_MAX_BYTES", 0)
    config = folder_config(write_folder(tmp_path), method="dino", local_crops=3)
    data = build_data(config)
    assert data.batch_views is None
    views, _ = data.train[0]
    assert [tuple(v.shape) for v in views] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 3
    # The loader collates each view position into one batch tensor, as Trainer.views reads.
    batch = next(iter(DataLoader(data.train, batch_size=2)))
    assert [tuple(v.shape) for v in batch[0]] == [(2, 3, 16, 16)] * 2 + [(2, 3, 8, 8)] * 3


def test_streamed_folder_views_deterministic(tmp_path, monkeypatch):
    monkeypatch.setattr(folder, "IN_MEMORY_MAX_BYTES", 0)
    data = build_data(folder_config(write_folder(tmp_path), method="dino", local_crops=2))
    torch.manual_seed(11)
    first, _ = data.train[0]
    torch.manual_seed(11)
    second, _ = data.train[0]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
