"""ImageNet-style folders: ``DATA_DIR/train/<class>/*.jpg`` and ``DATA_DIR/val/<class>/*.jpg``.

Training uses the recipe's two-view augmentation at the model's image size. The kNN monitor
uses a fixed random subset of at most ``knn_max_bank`` training images and
``knn_max_query`` validation images, chosen by the run's seed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Subset
from torchvision.datasets import ImageFolder

from stabilitylab.config import RunConfig
from stabilitylab.data import DataBundle
from stabilitylab.data.augment import imagenet_eval, imagenet_two_view
from stabilitylab.errors import DataError


def _image_folder(root: Path, transform) -> ImageFolder:
    if not root.is_dir():
        raise DataError(
            f"image folder {root} does not exist; --data-dir needs train/ and val/ inside"
        )
    try:
        return ImageFolder(str(root), transform=transform)
    except FileNotFoundError as error:
        # torchvision raises this for a folder without class sub-folders or without images.
        raise DataError(f"{root}: {error}") from None


def _subset(dataset: ImageFolder, limit: int, seed: int) -> ImageFolder | Subset:
    if len(dataset) <= limit:
        return dataset
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(dataset), generator=generator)[:limit].sort().values
    return Subset(dataset, indices.tolist())


def build_imagefolder(config: RunConfig) -> DataBundle:
    root = Path(config.data_dir or "")
    if not root.is_dir():
        raise DataError(f"--data-dir {root} does not exist or is not a folder")
    size = config.resolved_img_size
    train = _image_folder(root / "train", imagenet_two_view(size, config.crop_min_scale))
    bank = _image_folder(root / "train", imagenet_eval(size))
    query = _image_folder(root / "val", imagenet_eval(size))
    if query.classes != train.classes:
        raise DataError(
            f"{root / 'val'} has classes {query.classes[:5]}... that differ from "
            f"{root / 'train'}'s {train.classes[:5]}...; both need the same class folders"
        )
    return DataBundle(
        train=train,
        knn_bank=_subset(bank, config.knn_max_bank, config.seed),
        knn_query=_subset(query, config.knn_max_query, config.seed + 1),
        num_classes=len(train.classes),
        in_chans=3,
        description=(
            f"image folder {root}: {len(train)} train / {len(query)} validation images, "
            f"{len(train.classes)} classes, {size} px"
        ),
    )
