"""The bundled digits split, the batched two-view augmentation and ImageFolder data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stabilitylab.config import build_config
from stabilitylab.data import build_data
from stabilitylab.data.augment import DigitsBatchTwoView
from stabilitylab.data.digits import digits_split
from stabilitylab.errors import DataError


def test_digits_split_fixed_and_stratified():
    train_x, val_x, train_y, val_y = digits_split()
    assert (len(train_y), len(val_y)) == (1347, 450)
    assert train_x.shape[1:] == (8, 8)
    assert train_x.min() >= 0.0
    assert train_x.max() <= 1.0
    train_share = np.bincount(train_y) / len(train_y)
    val_share = np.bincount(val_y) / len(val_y)
    assert np.abs(train_share - val_share).max() < 0.01
    again = digits_split()
    assert np.array_equal(again[3], val_y)


def test_digits_bundle_shapes(tiny_config):
    data = build_data(tiny_config())
    image, label = data.train[0]
    assert image.shape == (1, 16, 16)
    assert 0 <= label < 10
    assert data.batch_views is not None
    bank_image, _ = data.knn_bank[0]
    assert abs(float(data.knn_bank.images.mean())) < 1e-4  # normalised with train statistics


def test_batch_views_differ_per_image_and_view():
    torch.manual_seed(0)
    views = DigitsBatchTwoView(img_size=16, crop_min_scale=0.3, mean=0.0, std=1.0)
    images = torch.rand(1, 1, 16, 16).repeat(64, 1, 1, 1)  # one image, 64 times
    view1, view2 = views(images)
    assert view1.shape == view2.shape == (64, 1, 16, 16)
    assert torch.isfinite(view1).all()
    assert torch.isfinite(view2).all()
    # Each copy gets its own crop and jitter, and the two views differ.
    assert (view1[0] - view1[1]).abs().max() > 1e-3
    assert (view1 - view2).abs().mean() > 1e-3
    # Values stay in [0, 1] before normalisation.
    assert view1.min() >= 0
    assert view1.max() <= 1


def _write_folder(root, classes=("cat", "dog"), per_class=6, size=40):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(per_class):
                pixels = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")


def test_imagefolder_bundle(tmp_path):
    _write_folder(tmp_path)
    config = build_config(
        "digits",
        dataset="imagefolder",
        data_dir=str(tmp_path),
        model="vit_tiny",
        img_size=80,  # above 64 px a folder is streamed with per-image views
        patch_size=16,
    )
    data = build_data(config)
    (view1, view2), label = data.train[0]
    assert view1.shape == view2.shape == (3, 80, 80)
    assert data.num_classes == 2
    assert data.in_chans == 3
    image, _ = data.knn_query[0]
    assert image.shape == (3, 80, 80)


def test_imagefolder_missing_split(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a" / "0.png")
    config = build_config("digits", dataset="imagefolder", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        build_data(config)


def test_imagefolder_class_without_images(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "train" / "empty").mkdir()
    config = build_config("digits", dataset="imagefolder", data_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"class folder \S*train/empty contains no image files"):
        build_data(config)


def test_imagefolder_missing_dir(tmp_path):
    config = build_config("digits", dataset="imagefolder", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="does not exist"):
        build_data(config)


def test_imagefolder_corrupt_image_named(tmp_path):
    _write_folder(tmp_path)
    broken = tmp_path / "val" / "cat" / "broken.png"
    broken.write_bytes(b"not a png")
    config = build_config("digits", dataset="imagefolder", data_dir=str(tmp_path))
    # A folder held in memory is decoded when the data is built.
    with pytest.raises(DataError, match=r"cannot be read: \S*broken.png"):
        build_data(config)


def test_imagefolder_single_class_rejected(tmp_path):
    _write_folder(tmp_path, classes=("only",))
    config = build_config("digits", dataset="imagefolder", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="at least 2 classes"):
        build_data(config)


def test_knn_limits_apply_to_digits(tiny_config):
    data = build_data(tiny_config(knn_max_bank=100, knn_max_query=30))
    assert len(data.knn_bank) == 100
    assert len(data.knn_query) == 30
    again = build_data(tiny_config(knn_max_bank=100, knn_max_query=30))
    assert data.knn_bank.indices == again.knn_bank.indices
