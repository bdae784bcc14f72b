"""MNIST and Fashion-MNIST in torchvision's layout: ``DATA_DIR/MNIST/raw/*-ubyte``.

The four IDX files, uncompressed as torchvision leaves them, are ``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, in
``DATA_DIR/MNIST/raw/`` or ``DATA_DIR/FashionMNIST/raw/``. ``--data-dir`` may also name the
folder with the files. They are parsed by torchvision's IDX reader, which checks no
checksum, so subsets and generated files load too. The 10,000 test images are the
validation split. ``--download`` calls torchvision's ``MNIST``/``FashionMNIST`` with
``download=True``, which fetches, checks and extracts the files.

MNIST views have no horizontal flip, as digits have a handedness; Fashion-MNIST views have
one, as a mirrored shoe is still a shoe.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torchvision.datasets import MNIST, FashionMNIST
from torchvision.datasets.mnist import read_image_file, read_label_file

from stabilitylab.config import RunConfig
from stabilitylab.data import DataBundle
from stabilitylab.data.memory import check_splits, in_memory_bundle, resize_square
from stabilitylab.errors import DataError

log = logging.getLogger(__name__)

SOURCES: dict[str, type[MNIST]] = {"mnist": MNIST, "fashion-mnist": FashionMNIST}
NAMES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
FLIP = {"mnist": False, "fashion-mnist": True}
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _download(data_dir: Path, dataset: str) -> None:
    source = SOURCES[dataset]
    log.info("fetching %s into %s unless it is there already", NAMES[dataset], data_dir)
    try:
        source(str(data_dir), train=True, download=True)
    except (OSError, RuntimeError) as error:  # URLError is an OSError
        raise DataError(
            f"--download of {NAMES[dataset]} into {data_dir} failed ({error}); check the "
            f"network connection, or fetch the four files from {source.mirrors[0]} yourself "
            f"and extract them into {data_dir / source.__name__ / 'raw'}"
        ) from None


def find_raw_folder(data_dir: Path, dataset: str, download: bool) -> Path:
    """Return the folder with the IDX files: ``data_dir/<class>/raw`` or ``data_dir`` itself."""
    if download:
        _download(data_dir, dataset)
    nested = data_dir / SOURCES[dataset].__name__ / "raw"
    folder = data_dir if (data_dir / SPLIT_FILES["train"][0]).is_file() else nested
    if not data_dir.is_dir():
        raise DataError(
            f"--data-dir {data_dir} does not exist; pass --download to fetch "
            f"{NAMES[dataset]} into it, or point --data-dir at the folder that contains "
            f"{SOURCES[dataset].__name__}/raw/"
        )
    names = [name for pair in SPLIT_FILES.values() for name in pair]
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        compressed = [name for name in missing if (folder / f"{name}.gz").is_file()]
        hint = (
            f"extract {', '.join(f'{name}.gz' for name in compressed)} with gunzip, or pass "
            "--download, which extracts them"
            if compressed
            else f"pass --download to fetch {NAMES[dataset]} into {data_dir}"
        )
        raise DataError(f"{NAMES[dataset]} folder {folder} lacks {', '.join(missing)}; {hint}")
    return folder


def _read_idx(path: Path, kind: str) -> torch.Tensor:
    reader = read_image_file if kind == "images" else read_label_file
    try:
        return reader(str(path))
    except (AssertionError, KeyError, ValueError, TypeError, RuntimeError) as error:
        # A short file fails the reshape to the sizes in its header; a text file fails the
        # magic number check.
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(
            f"IDX file {path} is truncated or not an IDX {kind} file ({reason}); fetch the "
            "data again with --download, or replace the file"
        ) from None


def read_split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the images (N, 1, H, W) uint8 and labels (N,) int64 of one split."""
    image_name, label_name = SPLIT_FILES[split]
    images = _read_idx(folder / image_name, "images")
    labels = _read_idx(folder / label_name, "labels")
    if len(images) != len(labels):
        raise DataError(
            f"{folder / image_name} has {len(images)} images but {folder / label_name} has "
            f"{len(labels)} labels; the two files belong together, so replace both"
        )
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) > 9):
        raise DataError(
            f"{folder / label_name} has labels from {int(labels.min())} to "
            f"{int(labels.max())}, outside the 10 classes 0 to 9; replace the file"
        )
    return images.unsqueeze(1), labels


def build_mnist(config: RunConfig) -> DataBundle:
    folder = find_raw_folder(Path(config.data_dir or ""), config.dataset, config.download)
    train_images, train_labels = read_split(folder, "train")
    val_images, val_labels = read_split(folder, "val")
    check_splits(len(train_labels), len(val_labels), str(folder))
    size = config.resolved_img_size
    return in_memory_bundle(
        config,
        (resize_square(train_images, size), train_labels),
        (resize_square(val_images, size), val_labels),
        num_classes=10,
        flip=FLIP[config.dataset],
        description=f"{NAMES[config.dataset]} in {folder}",
    )
