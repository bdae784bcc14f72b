"""ImageNet-style folders: ``DATA_DIR/train/<class>/*.jpg`` and ``DATA_DIR/val/<class>/*.jpg``.

Training uses the recipe's two-view augmentation at the model's image size. The kNN monitor
uses a fixed random subset of at most ``knn_max_bank`` training images and
``knn_max_query`` validation images, chosen by the run's seed.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torchvision.datasets import ImageFolder

from stabilitylab.config import RunConfig
from stabilitylab.data import DataBundle, limit_dataset
from stabilitylab.data.augment import imagenet_eval, imagenet_two_view
from stabilitylab.errors import DataError


def load_rgb(path: str) -> Image.Image:
    """Open an image file as RGB, raising DataError that names a file PIL cannot read."""
    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            return image.convert("RGB")
    except UnidentifiedImageError:
        reason = "not in an image format PIL can read"
    except OSError as error:
        reason = error.strerror or str(error)  # such as "image file is truncated"
    raise DataError(f"image file {path} cannot be read ({reason}); remove or replace it")


def _image_folder(root: Path, transform) -> ImageFolder:
    if not root.is_dir():
        raise DataError(
            f"image folder {root} does not exist; --data-dir needs train/ and val/ inside"
        )
    try:
        return ImageFolder(str(root), transform=transform, loader=load_rgb)
    except FileNotFoundError as error:
        # torchvision raises this for a folder without class sub-folders or without images.
        raise DataError(f"{root}: {error}") from None


def build_imagefolder(config: RunConfig) -> DataBundle:
    root = Path(config.data_dir or "")
    if not root.is_dir():
        raise DataError(f"--data-dir {root} does not exist or is not a folder")
    size = config.resolved_img_size
    train = _image_folder(root / "train", imagenet_two_view(size, config.crop_min_scale))
    bank = _image_folder(root / "train", imagenet_eval(size))
    query = _image_folder(root / "val", imagenet_eval(size))
    if len(train.classes) < 2:
        raise DataError(
            f"{root / 'train'} has {len(train.classes)} class folder; the kNN monitor needs at "
            "least 2 classes to measure anything"
        )
    if query.classes != train.classes:
        raise DataError(
            f"{root / 'val'} has classes {query.classes[:5]}... that differ from "
            f"{root / 'train'}'s {train.classes[:5]}...; both need the same class folders"
        )
    return DataBundle(
        train=train,
        knn_bank=limit_dataset(bank, config.knn_max_bank, config.seed),
        knn_query=limit_dataset(query, config.knn_max_query, config.seed + 1),
        num_classes=len(train.classes),
        in_chans=3,
        description=(
            f"image folder {root}: {len(train)} train / {len(query)} validation images, "
            f"{len(train.classes)} classes, {size} px"
        ),
    )
