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
import math
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
# IDX magic numbers: two zero bytes, the type code 0x08 (unsigned bytes), then the number of
# dimensions, 3 for images (N, H, W) and 1 for labels (N,). Big-endian sizes follow.
IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}
IDX_DIMENSIONS = {"images": 3, "labels": 1}
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


def _check_idx(path: Path, kind: str) -> None:
    """Raise DataError unless ``path`` has the magic number and length of an MNIST IDX file."""
    dimensions = IDX_DIMENSIONS[kind]
    header_size = 4 * (1 + dimensions)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header = handle.read(header_size)
    except OSError as error:
        raise DataError(f"IDX file {path} cannot be read: {error.strerror or error}") from None
    fix = "fetch the data again with --download, or replace the file"
    if len(header) < header_size:
        raise DataError(
            f"IDX file {path} is {size} bytes, shorter than the {header_size}-byte header of an "
            f"IDX {kind} file, so it is truncated; {fix}"
        )
    magic = int.from_bytes(header[:4], "big")
    if magic != IDX_MAGIC[kind]:
        raise DataError(
            f"IDX file {path} starts with the magic number {magic:#010x}, but an MNIST {kind} "
            f"file (uint8 values in {dimensions} dimension{'s' if dimensions > 1 else ''}) "
            f"starts with {IDX_MAGIC[kind]:#010x}; {fix}"
        )
    shape = [int.from_bytes(header[4 * i : 4 * i + 4], "big") for i in range(1, dimensions + 1)]
    expected = header_size + math.prod(shape)
    if size != expected:
        state = "is truncated" if size < expected else "has bytes after its data"
        raise DataError(
            f"IDX file {path} {state}: its header declares {' x '.join(map(str, shape))} "
            f"values, {expected} bytes with the header, but the file has {size} bytes; {fix}"
        )


def _read_idx(path: Path, kind: str) -> torch.Tensor:
    _check_idx(path, kind)
    reader = read_image_file if kind == "images" else read_label_file
    try:
        return reader(str(path))
    except (AssertionError, KeyError, ValueError, TypeError, RuntimeError) as error:
        # Not expected after _check_idx, which checks what the reader asserts.
        raise DataError(
            f"IDX file {path} cannot be read as an IDX {kind} file ({type(error).__name__}: "
            f"{error}); fetch the data again with --download, or replace the file"
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
    check_splits(len(train_labels), len(val_labels), str(folder), splittable=False)
    size = config.resolved_img_size
    return in_memory_bundle(
        config,
        (resize_square(train_images, size), train_labels),
        (resize_square(val_images, size), val_labels),
        num_classes=10,
        flip=FLIP[config.dataset],
        description=f"{NAMES[config.dataset]} in {folder}",
    )
