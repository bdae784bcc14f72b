"""CIFAR, MNIST, Fashion-MNIST, image folders and npz files, built from tiny generated files.

Nothing here downloads: each test writes the files of the layout it reads into tmp_path.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import CIFAR10
from torchvision.transforms.v2 import functional as TF

from stabilitylab import cli
from stabilitylab.config import build_config
from stabilitylab.data import build_data, folder
from stabilitylab.data.augment import recipe_batch_two_view, shift_hue
from stabilitylab.data.cifar import LAYOUTS, CifarLayout
from stabilitylab.data.images import (
    UnreadableImagesError,
    UnsupportedImageError,
    decode_rgb,
    to_rgb,
)
from stabilitylab.data.skipped import read_skipped_images
from stabilitylab.errors import ConfigError, DataError
from stabilitylab.runs import SKIPPED_IMAGES_FILE, prepare_run_dir
from stabilitylab.train.loop import run_training

# -- writers of the on-disk layouts -------------------------------------------------------


def write_cifar(root: Path, variant: str = "cifar10", per_batch: int = 26, test: int = 30):
    """Write CIFAR python batches of random images; return the batches folder."""
    layout = LAYOUTS[variant]
    batches = root / layout.folder
    batches.mkdir(parents=True)
    rng = np.random.default_rng(0)
    classes = 10 if variant == "cifar10" else 100
    for name in layout.train_files + layout.test_files:
        count = test if name in layout.test_files else per_batch
        batch = {
            "batch_label": name,
            layout.label_key: [int(label) for label in rng.integers(0, classes, count)],
            "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            "filenames": [f"{index}.png" for index in range(count)],
        }
        (batches / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {layout.names_key: [f"class{index}" for index in range(classes)]}
    (batches / layout.meta_file).write_bytes(pickle.dumps(meta, protocol=2))
    return batches


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file: magic 0x0800 | ndim, big-endian sizes, then data."""
    header = bytes([0, 0, 0x08, array.ndim])
    sizes = b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    path.write_bytes(header + sizes + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder_name: str = "MNIST", train: int = 40, test: int = 20):
    raw = root / folder_name / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(count) % 10)
    return raw


def write_tree(root: Path, classes=("cat", "dog"), per_class: int = 6, size: int = 24):
    rng = np.random.default_rng(0)
    for name in classes:
        target = root / name
        target.mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(target / f"{index}.png")


def write_folder(root: Path, **kwargs) -> Path:
    write_tree(root / "train", **kwargs)
    write_tree(root / "val", **kwargs)
    return root


def folder_config(root: Path, **overrides):
    return build_config(
        "digits", dataset="imagefolder", data_dir=str(root), **{"img_size": 16, **overrides}
    )


def write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def npz_arrays(train: int = 24, val: int = 8, shape=(16, 16), dtype=np.uint8):
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 256, (train, *shape)).astype(dtype),
        "y_train": np.arange(train) % 3,
        "x_val": rng.integers(0, 256, (val, *shape)).astype(dtype),
        "y_val": np.arange(val) % 3,
    }


def npz_config(path: Path, **overrides):
    return build_config("digits", dataset="npz", data_dir=str(path), **overrides)


# -- CIFAR ----------------------------------------------------------------------------------


def test_cifar10_bundle(tmp_path):
    write_cifar(tmp_path)
    data = build_data(build_config("digits", dataset="cifar10", data_dir=str(tmp_path)))
    image, label = data.train[0]
    assert image.shape == (3, 32, 32)
    assert image.dtype == torch.uint8
    assert 0 <= label < 10
    assert len(data.train) == 130
    assert len(data.knn_query) == 30
    assert data.num_classes == 10
    assert data.in_chans == 3
    assert data.img_size == 32
    view1, view2 = data.batch_views(torch.stack([data.train[i][0] for i in range(4)]))
    assert view1.shape == view2.shape == (4, 3, 32, 32)
    query, _ = data.knn_query[0]
    assert query.dtype == torch.float32
    assert "differ from the published ones" in data.description


def test_cifar_first_pixel_red_plane(tmp_path):
    batches = write_cifar(tmp_path)
    first = pickle.loads((batches / "data_batch_1").read_bytes())["data"][0]
    data = build_data(build_config("digits", dataset="cifar10", data_dir=str(batches)))
    image, _ = data.train[0]
    # Row layout: 1024 red values, then green, then blue, each 32x32 in row-major order.
    assert int(image[0, 0, 1]) == int(first[1])
    assert int(image[1, 0, 0]) == int(first[1024])
    assert int(image[2, 31, 31]) == int(first[3071])


def test_cifar_numpy1_pickle_read(tmp_path):
    batches = write_cifar(tmp_path)
    path = batches / "data_batch_2"
    # NumPy 1 and the published batches name the array constructor numpy.core.multiarray.
    path.write_bytes(path.read_bytes().replace(b"numpy._core.", b"numpy.core."))
    assert b"numpy.core.multiarray" in path.read_bytes()
    data = build_data(build_config("digits", dataset="cifar10", data_dir=str(tmp_path)))
    assert len(data.train) == 130


def test_torchvision_rejects_generated_cifar(tmp_path):
    write_cifar(tmp_path)
    with pytest.raises(RuntimeError, match="corrupted"):
        CIFAR10(str(tmp_path), train=True, download=False)


def test_cifar100_fine_labels(tmp_path):
    write_cifar(tmp_path, "cifar100", per_batch=120, test=20)
    data = build_data(build_config("digits", dataset="cifar100", data_dir=str(tmp_path)))
    assert data.num_classes == 100
    assert len(data.train) == 120


def test_cifar_missing_key(tmp_path):
    batches = write_cifar(tmp_path)
    batch = pickle.loads((batches / "data_batch_3").read_bytes())
    del batch["labels"]
    (batches / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=2))
    config = build_config("digits", dataset="cifar10", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="data_batch_3 has no 'labels' key"):
        build_data(config)


def test_cifar_truncated_batch(tmp_path):
    batches = write_cifar(tmp_path)
    content = (batches / "test_batch").read_bytes()
    (batches / "test_batch").write_bytes(content[: len(content) // 2])
    config = build_config("digits", dataset="cifar10", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="test_batch is truncated"):
        build_data(config)


def test_cifar_missing_meta(tmp_path):
    batches = write_cifar(tmp_path)
    (batches / "batches.meta").unlink()
    config = build_config("digits", dataset="cifar10", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="lacks batches.meta; pass --download"):
        build_data(config)


class Marker:
    """A pickled object that would create a folder if unpickling ran its code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


def test_cifar_pickle_code_not_run(tmp_path):
    batches = write_cifar(tmp_path / "data")
    marker = tmp_path / "marker"
    payload = {"labels": [0], "data": Marker(marker)}
    (batches / "data_batch_1").write_bytes(pickle.dumps(payload, protocol=2))
    config = build_config("digits", dataset="cifar10", data_dir=str(tmp_path / "data"))
    with pytest.raises(DataError, match=r"refers to \w+\.mkdir"):
        build_data(config)
    assert not marker.exists()


def rewrite_batch(batches: Path, name: str, protocol: int = 2, **changes) -> None:
    batch = pickle.loads((batches / name).read_bytes())
    batch.update(changes)
    (batches / name).write_bytes(pickle.dumps(batch, protocol=protocol))


@pytest.mark.parametrize(
    ("labels", "found"),
    [
        ([0.7] * 26, "the value 0.7 (float)"),
        (["3"] * 26, "the value '3' (str)"),
        ([True] * 26, "the value True (bool)"),
        (np.full(26, 1.5), "a float64 array of shape (26,)"),
        (np.ones(26, bool), "a bool array of shape (26,)"),
    ],
)
def test_cifar_non_integer_labels_rejected(tmp_path, labels, found):
    batches = write_cifar(tmp_path)
    rewrite_batch(batches, "data_batch_2", labels=labels)
    config = build_config("digits", dataset="cifar10", data_dir=str(tmp_path))
    with pytest.raises(DataError) as error:
        build_data(config)
    assert "data_batch_2: 'labels' is not a list of integers" in str(error.value)
    assert found in str(error.value)


def test_cifar_integer_label_array_read(tmp_path):
    batches = write_cifar(tmp_path)
    rewrite_batch(batches, "data_batch_2", labels=np.arange(26, dtype=np.int32) % 10)
    data = build_data(build_config("digits", dataset="cifar10", data_dir=str(tmp_path)))
    assert data.train[26 + 13][1] == 3


def test_cifar_protocol5_batch_read(tmp_path):
    batches = write_cifar(tmp_path)
    expected = pickle.loads((batches / "data_batch_4").read_bytes())["data"][0]
    rewrite_batch(batches, "data_batch_4", protocol=5)
    data = build_data(build_config("digits", dataset="cifar10", data_dir=str(tmp_path)))
    image, _ = data.train[3 * 26]
    assert torch.equal(image.flatten(), torch.from_numpy(expected))


def test_cifar_empty_batches(tmp_path):
    batches = write_cifar(tmp_path)
    empty = {"data": np.zeros((0, 3072), np.uint8), "labels": []}
    rewrite_batch(batches, "data_batch_5", **empty)
    data = build_data(build_config("digits", dataset="cifar10", data_dir=str(tmp_path)))
    assert len(data.train) == 4 * 26
    rewrite_batch(batches, "test_batch", **empty)
    with pytest.raises(DataError) as error:
        build_data(build_config("digits", dataset="cifar10", data_dir=str(tmp_path)))
    assert "the validation split of" in str(error.value)
    assert "is empty" in str(error.value)
    assert "--val-split" not in str(error.value)


def test_cifar_missing_dir_suggests_download(tmp_path):
    config = build_config("digits", dataset="cifar10", data_dir=str(tmp_path / "none"))
    with pytest.raises(DataError, match="does not exist; pass --download"):
        build_data(config)


class GeneratedCifar10(CIFAR10):
    """torchvision's CIFAR10 whose download writes generated batches instead of fetching."""

    calls: list[bool] = []

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        GeneratedCifar10.calls.append(download)
        if download and not (Path(root) / self.base_folder).exists():
            write_cifar(Path(root))


def test_download_only_with_flag(tmp_path, monkeypatch):
    source = CifarLayout("CIFAR-10", GeneratedCifar10, "labels", "label_names")
    monkeypatch.setitem(LAYOUTS, "cifar10", source)
    GeneratedCifar10.calls.clear()
    config = build_config("digits", dataset="cifar10", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="pass --download"):
        build_data(config)
    assert GeneratedCifar10.calls == []
    data = build_data(
        build_config("digits", dataset="cifar10", data_dir=str(tmp_path), download=True)
    )
    assert GeneratedCifar10.calls == [True]
    assert len(data.train) == 130


# -- MNIST and Fashion-MNIST -------------------------------------------------------------------


def test_mnist_bundle(tmp_path):
    write_mnist(tmp_path)
    data = build_data(build_config("digits", dataset="mnist", data_dir=str(tmp_path)))
    image, label = data.train[3]
    assert image.shape == (1, 28, 28)
    assert label == 3
    assert data.in_chans == 1
    assert data.img_size == 28
    assert data.num_classes == 10
    assert len(data.knn_query) == 20
    assert data.batch_views.flip is False
    assert data.batch_views.colour is False


def test_fashion_mnist_flips(tmp_path):
    raw = write_mnist(tmp_path, "FashionMNIST")
    data = build_data(build_config("digits", dataset="fashion-mnist", data_dir=str(raw)))
    assert data.batch_views.flip is True
    assert len(data.train) == 40


def test_mnist_truncated_idx(tmp_path):
    raw = write_mnist(tmp_path)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    config = build_config("digits", dataset="mnist", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="train-images-idx3-ubyte is truncated"):
        build_data(config)


def test_mnist_wrong_magic_named(tmp_path):
    raw = write_mnist(tmp_path)
    path = raw / "t10k-images-idx3-ubyte"
    path.write_bytes((1234).to_bytes(4, "big") + path.read_bytes()[4:])
    config = build_config("digits", dataset="mnist", data_dir=str(tmp_path))
    with pytest.raises(DataError) as error:
        build_data(config)
    assert "t10k-images-idx3-ubyte starts with the magic number 0x000004d2" in str(error.value)
    assert "starts with 0x00000803" in str(error.value)
    assert "AssertionError" not in str(error.value)


def test_mnist_header_truncated_named(tmp_path):
    raw = write_mnist(tmp_path)
    (raw / "train-labels-idx1-ubyte").write_bytes(b"\0\0\x08")
    config = build_config("digits", dataset="mnist", data_dir=str(tmp_path))
    with pytest.raises(DataError) as error:
        build_data(config)
    assert "is 3 bytes, shorter than the 8-byte header of an IDX labels file" in str(error.value)
    assert "AssertionError" not in str(error.value)


def test_mnist_extra_bytes_named(tmp_path):
    raw = write_mnist(tmp_path)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes() + b"\0" * 10)
    config = build_config("digits", dataset="mnist", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="has bytes after its data: its header declares 40 x 28"):
        build_data(config)


def test_mnist_gzip_only(tmp_path):
    raw = write_mnist(tmp_path)
    path = raw / "t10k-labels-idx1-ubyte"
    path.rename(raw / "t10k-labels-idx1-ubyte.gz")
    config = build_config("digits", dataset="mnist", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="extract t10k-labels-idx1-ubyte.gz with gunzip"):
        build_data(config)


def test_mnist_label_count_mismatch(tmp_path):
    raw = write_mnist(tmp_path)
    write_idx(raw / "train-labels-idx1-ubyte", np.zeros(39))
    config = build_config("digits", dataset="mnist", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="40 images but .* 39 labels"):
        build_data(config)


# -- NumPy .npz ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "dtype", "channels"),
    [
        ((16, 16), np.uint8, 1),  # (N, H, W)
        ((16, 16, 3), np.uint8, 3),  # NHWC
        ((3, 16, 16), np.uint8, 3),  # NCHW
        ((16, 16, 1), np.int64, 1),  # integers within 0..255
        ((1, 16, 16), np.float32, 1),  # floats in [0, 1]
    ],
)
def test_npz_layouts(tmp_path, shape, dtype, channels):
    arrays = npz_arrays(shape=shape, dtype=np.uint8)
    if dtype == np.float32:
        arrays["x_train"] = arrays["x_train"] / np.float32(255)
        arrays["x_val"] = arrays["x_val"] / np.float32(255)
    else:
        arrays["x_train"] = arrays["x_train"].astype(dtype)
        arrays["x_val"] = arrays["x_val"].astype(dtype)
    data = build_data(npz_config(write_npz(tmp_path / "d.npz", **arrays)))
    image, _ = data.train[0]
    assert image.shape == (channels, 16, 16)
    assert image.dtype == torch.uint8
    assert data.in_chans == channels
    assert data.num_classes == 3


def test_npz_nhwc_pixel_order(tmp_path):
    arrays = npz_arrays(shape=(16, 16, 3))
    data = build_data(npz_config(write_npz(tmp_path / "d.npz", **arrays)))
    image, _ = data.train[5]
    assert int(image[2, 3, 4]) == int(arrays["x_train"][5, 3, 4, 2])


def test_npz_val_split_stratified(tmp_path):
    arrays = npz_arrays(train=40)
    del arrays["x_val"], arrays["y_val"]
    data = build_data(npz_config(write_npz(tmp_path / "d.npz", **arrays), val_split=0.25))
    assert len(data.train) == 30
    labels = [label for _, label in data.knn_query]
    assert sorted(np.bincount(labels).tolist()) == [3, 3, 4]


def test_npz_needs_val_or_split(tmp_path):
    arrays = npz_arrays()
    del arrays["x_val"], arrays["y_val"]
    with pytest.raises(DataError, match="no x_val and y_val; add them, or pass --val-split"):
        build_data(npz_config(write_npz(tmp_path / "d.npz", **arrays)))


def test_npz_empty_validation(tmp_path):
    arrays = npz_arrays(val=0)
    with pytest.raises(DataError, match="validation split of .* is empty"):
        build_data(npz_config(write_npz(tmp_path / "d.npz", **arrays)))


def test_npz_patch_must_divide(tmp_path):
    path = write_npz(tmp_path / "d.npz", **npz_arrays(shape=(30, 30)))
    with pytest.raises(DataError, match="30x30 px, which --patch-size 4 does not divide"):
        build_data(npz_config(path))
    data = build_data(npz_config(path, img_size=32))
    assert data.train[0][0].shape == (1, 32, 32)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x_train": np.full((24, 16, 16), 2.0)}, "float values from 2 to 2"),
        ({"x_train": np.zeros((24, 3, 16, 3), np.uint8)}, "reads as NHWC and as NCHW"),
        ({"x_train": np.zeros((24, 16, 16, 4), np.uint8)}, "no channel axis of 1 or 3"),
        ({"y_train": np.zeros(24, np.float32)}, "y_train has dtype float32"),
        ({"y_train": np.zeros(23, np.int64)}, r"expected \(24,\), one label per image"),
        ({"y_train": np.zeros(24, np.int64)}, "y_train has 1 class"),
    ],
)
def test_npz_bad_arrays(tmp_path, change, message):
    arrays = {**npz_arrays(), **change}
    with pytest.raises(DataError, match=message):
        build_data(npz_config(write_npz(tmp_path / "d.npz", **arrays)))


def test_npz_object_array_rejected(tmp_path):
    arrays = {**npz_arrays(), "x_train": np.array([None] * 24, dtype=object)}
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as error:
        build_data(npz_config(path))
    assert "x_train is an object array, which only pickle can load" in str(error.value)
    assert "allow_pickle" not in str(error.value)


@pytest.mark.parametrize(
    ("content", "found"),
    [
        (b"", "it is empty"),
        (b"x_train,y_train\n1,2\n", "it starts with the bytes b'x_trai'"),
        (pickle.dumps({"x_train": [1]}), "it starts with the bytes"),
    ],
)
def test_npz_not_a_zip_named(tmp_path, content, found):
    path = tmp_path / "d.npz"
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        build_data(npz_config(path))
    assert f"{path} is not a NumPy .npz file: {found}" in str(error.value)
    assert "allow_pickle" not in str(error.value)
    assert "pickled" not in str(error.value)


def test_npz_single_array_named(tmp_path):
    path = tmp_path / "d.npz"
    with open(path, "wb") as handle:
        np.save(handle, np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"contains one array \(a .npy file\)"):
        build_data(npz_config(path))


def test_npz_val_labels_unknown_rejected(tmp_path):
    arrays = {**npz_arrays(), "y_val": np.array([0, 1, 2, 5, 7, 7, 0, 1])}
    with pytest.raises(DataError) as error:
        build_data(npz_config(write_npz(tmp_path / "d.npz", **arrays)))
    assert "y_val has 2 labels that no training image has (5, 7)" in str(error.value)


def test_npz_label_gaps_logged(tmp_path, caplog):
    arrays = npz_arrays()
    arrays["y_train"] = arrays["y_train"] * 10  # 0, 10, 20
    arrays["y_val"] = arrays["y_val"] * 10
    with caplog.at_level(logging.WARNING, logger="stabilitylab.data.npz"):
        data = build_data(npz_config(write_npz(tmp_path / "d.npz", **arrays)))
    assert data.num_classes == 21
    assert "the labels run from 0 to 20, so the run has 21 classes" in caplog.text
    assert "18 of them have no training image" in caplog.text


def test_npz_contiguous_labels_not_logged(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="stabilitylab.data.npz"):
        build_data(npz_config(write_npz(tmp_path / "d.npz", **npz_arrays())))
    assert caplog.text == ""


def test_npz_val_size_difference_logged(tmp_path, caplog):
    arrays = npz_arrays()
    arrays["x_val"] = np.zeros((8, 24, 24), np.uint8)
    with caplog.at_level(logging.WARNING, logger="stabilitylab.data.npz"):
        data = build_data(npz_config(write_npz(tmp_path / "d.npz", **arrays)))
    assert data.knn_query[0][0].shape == (1, 16, 16)
    assert "the x_val images are 24x24 px and the x_train images 16x16 px" in caplog.text
    assert "centre-cropped to 16 px" in caplog.text


# -- image folders -----------------------------------------------------------------------------


def test_folder_in_memory(tmp_path):
    data = build_data(folder_config(write_folder(tmp_path)))
    image, label = data.train[0]
    assert image.shape == (3, 16, 16)
    assert image.dtype == torch.uint8
    assert label == 0
    assert data.batch_views is not None
    assert data.num_classes == 2
    assert data.in_chans == 3
    assert "in memory" in data.description


def test_folder_streamed_past_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(folder, "IN_MEMORY_MAX_BYTES", 0)
    data = build_data(folder_config(write_folder(tmp_path)))
    (view1, view2), _ = data.train[0]
    assert view1.shape == view2.shape == (3, 16, 16)
    assert data.batch_views is None
    assert "streamed from disk" in data.description


def test_folder_hidden_entries_ignored(tmp_path):
    root = write_folder(tmp_path)
    write_tree(root / "train" / ".ipynb_checkpoints", classes=("cat",), per_class=2)
    write_tree(root / "train" / "cat", classes=(".ipynb_checkpoints",), per_class=2)
    (root / "train" / "dog" / ".DS_Store").write_bytes(b"\0\0")
    data = build_data(folder_config(root))
    assert data.num_classes == 2
    assert len(data.train) == 12


def test_folder_non_image_files_counted(tmp_path, caplog):
    root = write_folder(tmp_path)
    (root / "train" / "cat" / "notes.txt").write_text("labels checked")
    (root / "val" / "dog" / "list.csv").write_text("a,b")
    with caplog.at_level(logging.WARNING, logger="stabilitylab.data.folder"):
        data = build_data(folder_config(root))
    assert len(data.train) == 12
    assert "2 non-image files ignored" in data.description
    assert "notes.txt" in caplog.text


def test_folder_empty_class_named(tmp_path):
    root = write_folder(tmp_path)
    (root / "train" / "bird").mkdir()
    (root / "val" / "bird").mkdir()
    (root / "val" / "bird" / "readme.txt").write_text("none yet")
    with pytest.raises(DataError, match=r"class folder \S*train/bird contains no image files"):
        build_data(folder_config(root))


def write_bad_images(class_dir: Path) -> list[Path]:
    """Write an empty, a truncated and a text file with image names into ``class_dir``."""
    empty = class_dir / "empty.png"
    empty.write_bytes(b"")
    truncated = class_dir / "truncated.png"
    buffer = class_dir / "whole.tmp.png"
    Image.fromarray(np.full((24, 24, 3), 7, np.uint8)).save(buffer)
    truncated.write_bytes(buffer.read_bytes()[:60])
    buffer.unlink()
    text = class_dir / "notes.jpg"
    text.write_text("this is not a picture")
    return [empty, truncated, text]


def test_folder_bad_images_named(tmp_path):
    root = write_folder(tmp_path)
    bad = write_bad_images(root / "train" / "cat")
    with pytest.raises(DataError) as error:
        build_data(folder_config(root))
    message = str(error.value)
    assert "3 image files of the train split cannot be read" in message
    for path in bad:
        assert path.name in message
    assert "the file is empty (0 bytes)" in message
    assert "truncated" in message
    assert "not in an image format PIL can read" in message
    assert "--skip-bad-images" in message


def test_folder_bad_images_of_both_splits_named(tmp_path):
    root = write_folder(tmp_path)
    bad = write_bad_images(root / "train" / "cat")
    (root / "val" / "dog" / "text.jpg").write_text("not an image either")
    with pytest.raises(UnreadableImagesError) as error:
        build_data(folder_config(root))
    message = str(error.value)
    assert "4 image files cannot be read, 3 of the train split and 1 of the val split" in message
    for path in [*bad, root / "val" / "dog" / "text.jpg"]:
        assert str(path) in message
    assert len(error.value.files) == 4


def test_folder_bad_images_on_resume(tmp_path):
    root = write_folder(tmp_path)
    write_bad_images(root / "train" / "cat")
    with pytest.raises(UnreadableImagesError) as error:
        build_data(folder_config(root))
    message = str(error.value.for_resume())
    assert "replace them with readable images and resume again" in message
    assert "A resumed run cannot add --skip-bad-images" in message
    assert "or pass --skip-bad-images" not in message


def test_streamed_bad_image_on_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(folder, "IN_MEMORY_MAX_BYTES", 0)
    root = write_folder(tmp_path)
    broken = root / "train" / "dog" / "broken.png"
    broken.write_bytes(b"not a png")
    data = build_data(folder_config(root))
    data.mark_resumed()
    index = [path for path, _ in data.train.samples].index(str(broken))
    with pytest.raises(DataError) as error:
        next(iter(DataLoader(Subset(data.train, [index]), batch_size=1, num_workers=1)))
    message = str(error.value).strip().splitlines()[-1]
    assert "broken.png cannot be read" in message
    assert "replace it with a readable image and resume again" in message
    assert "or pass --skip-bad-images" not in message


def test_folder_entries_outside_classes_logged(tmp_path, caplog):
    root = write_folder(tmp_path)
    Image.new("RGB", (24, 24)).save(root / "train" / "loose.png")
    (root / "train" / "README").write_text("class folders below")
    Image.new("RGB", (24, 24)).save(root / "loose_root.png")
    write_tree(root / "test", classes=("cat",), per_class=1)
    (root / ".cache").mkdir()
    with caplog.at_level(logging.WARNING, logger="stabilitylab.data.folder"):
        data = build_data(folder_config(root))
    assert len(data.train) == 12
    lines = [record.getMessage() for record in caplog.records]
    outside = [line for line in lines if "outside the class folders" in line]
    assert len(outside) == 1
    assert "ignored 4 entries outside the class folders" in outside[0]
    assert str(root / "loose_root.png") in outside[0]
    assert str(root / "test") in outside[0]
    assert ".cache" not in outside[0]
    assert "4 entries outside class folders ignored" in data.description


def test_val_split_tree_loose_files_logged(tmp_path, caplog):
    write_tree(tmp_path, classes=("a", "b"), per_class=4)
    Image.new("RGB", (24, 24)).save(tmp_path / "loose.png")
    with caplog.at_level(logging.WARNING, logger="stabilitylab.data.folder"):
        build_data(folder_config(tmp_path, val_split=0.25))
    assert (
        f"ignored 1 entry outside the class folders, such as {tmp_path / 'loose.png'}"
        in caplog.text
    )


def test_folder_skip_bad_images_listed(tmp_path):
    root = write_folder(tmp_path)
    bad = write_bad_images(root / "val" / "dog")
    (root / "val" / "dog" / "notes.txt").write_text("x")
    data = build_data(folder_config(root, skip_bad_images=True))
    assert len(data.knn_query) == 12
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    data.attach_run_dir(run_dir)
    payload = json.loads((run_dir / SKIPPED_IMAGES_FILE).read_text())
    assert payload["skipped_count"] == 3
    assert sorted(entry["path"] for entry in payload["skipped"]) == sorted(map(str, bad))
    assert {entry["split"] for entry in payload["skipped"]} == {"val"}
    assert {entry["found"] for entry in payload["skipped"]} == {"build"}
    assert payload["non_image_files_count"] == 1


def test_streamed_bad_image_raises_on_read(tmp_path, monkeypatch):
    monkeypatch.setattr(folder, "IN_MEMORY_MAX_BYTES", 0)
    root = write_folder(tmp_path)
    broken = root / "val" / "cat" / "broken.png"
    broken.write_bytes(b"not a png")
    data = build_data(folder_config(root))
    index = [path for path, _ in data.knn_query.samples].index(str(broken))
    with pytest.raises(DataError, match="broken.png cannot be read"):
        data.knn_query[index]


def test_streamed_bad_image_skipped_on_read(tmp_path, monkeypatch):
    monkeypatch.setattr(folder, "IN_MEMORY_MAX_BYTES", 0)
    root = write_folder(tmp_path)
    broken = root / "train" / "cat" / "3b.png"  # sorts between 3.png and 4.png
    broken.write_bytes(b"")
    data = build_data(folder_config(root, skip_bad_images=True))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    data.attach_run_dir(run_dir)
    assert read_skipped_images(run_dir) == []
    index = [path for path, _ in data.train.samples].index(str(broken))
    _, label = data.train[index]
    assert label == 0  # the next readable file, 4.png, of the same class
    listed = read_skipped_images(run_dir)
    assert [entry["path"] for entry in listed] == [str(broken)]
    assert listed[0]["found"] == "loading"
    data.train[index]
    assert len(read_skipped_images(run_dir)) == 1


def test_attach_keeps_listed_skips(tmp_path, monkeypatch):
    monkeypatch.setattr(folder, "IN_MEMORY_MAX_BYTES", 0)
    root = write_folder(tmp_path / "data")
    broken = root / "val" / "dog" / "0b.png"
    broken.write_bytes(b"")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = build_data(folder_config(root, skip_bad_images=True))
    first.attach_run_dir(run_dir)
    first.knn_query[7]
    # A resumed run builds its data again and attaches it to the same run directory.
    build_data(folder_config(root, skip_bad_images=True)).attach_run_dir(run_dir)
    assert [entry["path"] for entry in read_skipped_images(run_dir)] == [str(broken)]


def test_streamed_skips_merged_across_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(folder, "IN_MEMORY_MAX_BYTES", 0)
    root = write_folder(tmp_path)
    bad = [root / "train" / "cat" / "0b.png", root / "train" / "dog" / "0b.png"]
    for path in bad:
        path.write_text("not an image")
    data = build_data(folder_config(root, skip_bad_images=True))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    data.attach_run_dir(run_dir)
    # Items go to the workers in turn, so the bad files 1 and 8 are read by different ones.
    loader = DataLoader(data.knn_bank, batch_size=1, num_workers=2)
    labels = torch.cat([batch_labels for _, batch_labels in loader])
    assert len(labels) == 14
    listed = sorted(entry["path"] for entry in read_skipped_images(run_dir))
    assert listed == sorted(map(str, bad))


def test_overwrite_removes_skipped_list(tmp_path):
    root = write_folder(tmp_path / "data")
    data = build_data(folder_config(root, skip_bad_images=True))
    run_dir = prepare_run_dir(tmp_path / "run")
    (run_dir / "config.json").write_text(json.dumps({"format_version": 1, "config": {}}))
    data.attach_run_dir(run_dir)
    prepare_run_dir(run_dir, overwrite=True)
    assert list(run_dir.iterdir()) == []


def test_png_named_jpg_read_by_content(tmp_path, caplog):
    root = write_folder(tmp_path)
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(root / "train" / "dog" / "x.jpg", "PNG")
    with caplog.at_level(logging.WARNING, logger="stabilitylab.data.folder"):
        data = build_data(folder_config(root))
    assert len(data.train) == 13
    assert "x.jpg (PNG)" in caplog.text


def test_folder_val_split_stratified(tmp_path):
    write_tree(tmp_path, classes=("a", "b", "c"), per_class=8)
    data = build_data(folder_config(tmp_path, val_split=0.25))
    assert len(data.train) == 18
    labels = [label for _, label in data.knn_query]
    assert np.bincount(labels).tolist() == [2, 2, 2]
    again = build_data(folder_config(tmp_path, val_split=0.25, seed=5))
    assert torch.equal(data.knn_query.images, again.knn_query.images)


def test_folder_val_split_empty(tmp_path):
    write_tree(tmp_path, classes=("a", "b"), per_class=4)
    with pytest.raises(DataError, match="validation split of .* is empty"):
        build_data(folder_config(tmp_path, val_split=0.05))


def test_folder_val_split_with_splits_rejected(tmp_path):
    root = write_folder(tmp_path)
    with pytest.raises(DataError, match="has train/ and val/ folders"):
        build_data(folder_config(root, val_split=0.2))


def test_folder_val_classes_differ(tmp_path):
    root = write_folder(tmp_path)
    write_tree(root / "val", classes=("fox",), per_class=1)
    with pytest.raises(DataError, match=r"only in val/: \['fox'\]"):
        build_data(folder_config(root))


def test_folder_missing_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_data(folder_config(tmp_path / "nowhere"))


# -- image modes -------------------------------------------------------------------------------


def test_modes_become_rgb():
    gray = Image.new("L", (2, 2), 100)
    assert to_rgb(gray).getpixel((0, 0)) == (100, 100, 100)
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent: white
    half = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    assert to_rgb(half).getpixel((0, 0)) == (127, 127, 127)
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    assert to_rgb(palette).getpixel((0, 0)) == (200, 10, 10)
    palette.info["transparency"] = 1
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)
    sixteen = Image.fromarray(np.full((2, 2), 65535, np.uint16))
    assert to_rgb(sixteen).getpixel((0, 0)) == (255, 255, 255)
    sixteen = Image.fromarray(np.full((2, 2), 257 * 40, np.uint16))
    assert to_rgb(sixteen).getpixel((0, 0)) == (40, 40, 40)


def test_float_image_scaled_from_unit_range():
    pixels = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    rgb = np.asarray(to_rgb(Image.fromarray(pixels)))
    assert rgb.shape == (4, 4, 3)
    assert rgb[0, 0, 0] == 0
    assert rgb[3, 3, 0] == 255
    assert rgb[1, 3, 0] == round(7 / 15 * 255)


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (np.full((4, 4), 200, np.int32), "32-bit integer pixels in PIL mode I"),
        (np.full((4, 4), 2.5, np.float32), "float pixels in PIL mode F from 2.5 to 2.5"),
        (np.full((4, 4), np.nan, np.float32), "NaN or infinite"),
    ],
)
def test_wide_images_without_scale_rejected(pixels, message):
    with pytest.raises(UnsupportedImageError, match=message):
        to_rgb(Image.fromarray(pixels))


def test_pgm_sixteen_bit_scaled(tmp_path):
    path = tmp_path / "deep.pgm"
    values = np.array([[0, 4095], [2048, 1024]], dtype=">u2")
    path.write_bytes(b"P5\n2 2\n4095\n" + values.tobytes())
    decoded = decode_rgb(str(path))
    assert Image.open(path).mode == "I"  # how PIL 13 opens a PGM file deeper than 8 bits
    assert np.asarray(decoded.image)[:, :, 0].tolist() == [[0, 255], [128, 64]]


def test_folder_wide_modes(tmp_path):
    root = write_folder(tmp_path)
    target = root / "train" / "cat"
    Image.fromarray(np.full((24, 24), 0.5, np.float32)).save(target / "float.tif")
    Image.fromarray(np.full((24, 24), 200, np.int32)).save(target / "int32.tif")
    with pytest.raises(UnreadableImagesError) as error:
        build_data(folder_config(root))
    assert [path for _, path, _ in error.value.files] == [str(target / "int32.tif")]
    data = build_data(folder_config(root, skip_bad_images=True))
    paths = sorted(str(path) for path in target.iterdir() if path.name != "int32.tif")
    image = data.train.images[paths.index(str(target / "float.tif"))]
    assert image.unique().tolist() == [128]


def test_folder_mixed_modes_decoded(tmp_path):
    root = write_folder(tmp_path)
    target = root / "train" / "cat"
    Image.new("L", (20, 30), 50).save(target / "gray.png")
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(target / "clear.png")
    Image.new("CMYK", (20, 20), (0, 0, 0, 0)).save(target / "cmyk.jpg")
    data = build_data(folder_config(root))
    assert len(data.train) == 15
    assert data.train.images.shape[1:] == (3, 16, 16)
    paths = sorted(str(path) for path in (root / "train" / "cat").iterdir())
    clear = data.train.images[paths.index(str(target / "clear.png"))]
    assert int(clear.min()) == 255


# -- batched RGB views ---------------------------------------------------------------------------


def test_shift_hue_matches_torchvision():
    torch.manual_seed(0)
    images = torch.rand(4, 3, 8, 8)
    shifts = torch.tensor([0.0, 0.05, -0.1, 0.1])
    expected = torch.stack(
        [TF.adjust_hue(image, float(shift)) for image, shift in zip(images, shifts, strict=True)]
    )
    assert (shift_hue(images, shifts) - expected).abs().max() < 1e-5


def test_rgb_batch_views_per_image():
    torch.manual_seed(0)
    views = recipe_batch_two_view(32, 0.08, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), flip=True)
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).repeat(64, 1, 1, 1)
    view1, view2 = views(image)
    assert view1.shape == view2.shape == (64, 3, 32, 32)
    assert torch.isfinite(view1).all()
    assert (view1[0] - view1[1]).abs().max() > 1e-3
    assert (view1 - view2).abs().mean() > 1e-3
    # Random grayscale: some views have three equal channels, most do not.
    equal = [(v[0] - v[1]).abs().max() < 1e-5 for v in view1 * 0.25]
    assert 0 < sum(equal) < 64


# -- configuration, sizes and runs -------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"download": True}, "--download fetches only cifar10"),
        ({"dataset": "cifar10", "data_dir": "d", "val_split": 0.1}, "--val-split is only read"),
        ({"dataset": "npz", "data_dir": "d.npz", "val_split": 1.5}, "--val-split 1.5 is invalid"),
        ({"dataset": "mnist", "data_dir": "d", "skip_bad_images": True}, "--skip-bad-images is"),
        ({"dataset": "cifar100"}, "--dataset cifar100 needs --data-dir"),
        ({"dataset": "mnist", "data_dir": "d", "model": "vit_tiny"}, "mnist images are 28 px"),
    ],
)
def test_data_options_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config("digits", **overrides)


def test_default_image_sizes():
    assert build_config("digits", dataset="cifar10", data_dir="d").resolved_img_size == 32
    assert build_config("digits", dataset="mnist", data_dir="d").resolved_img_size == 28
    config = build_config("digits", dataset="cifar10", data_dir="d", img_size=16)
    assert config.resolved_img_size == 16


def test_batch_larger_than_dataset(tmp_path):
    write_cifar(tmp_path / "data", per_batch=8, test=8)
    config = build_config("digits", dataset="cifar10", data_dir=str(tmp_path / "data"))
    with pytest.raises(ConfigError, match="--batch-size 256 is larger than the training split"):
        run_training(config, tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run").exists()


def test_cifar_tiny_run(tmp_path, tiny_config):
    write_cifar(tmp_path / "data")
    config = tiny_config(dataset="cifar10", data_dir=str(tmp_path / "data"), img_size=16)
    result = run_training(config, tmp_path / "run", show_progress=False)
    assert result.steps == 4
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert saved["config"]["dataset"] == "cifar10"
    assert saved["config"]["download"] is False
    assert saved["derived"]["in_chans"] == 3
    assert saved["derived"]["img_size"] == 16
    assert saved["derived"]["train_size"] == 130
    assert not (result.run_dir / SKIPPED_IMAGES_FILE).exists()


def test_cli_bad_data_one_line(tmp_path, capsys):
    argv = ["run", "--out", str(tmp_path / "run"), "--dataset", "cifar10", "--quiet"]
    status = cli.main([*argv, "--data-dir", str(tmp_path / "missing")])
    error = capsys.readouterr().err
    assert status == 2
    assert error.count("\n") == 1
    assert "missing does not exist; pass --download" in error
    assert not (tmp_path / "run").exists()
