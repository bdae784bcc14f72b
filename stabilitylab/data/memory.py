"""Datasets held in memory as one uint8 tensor, with the batched two-view augmentation.

CIFAR, MNIST, Fashion-MNIST, NumPy arrays and small image folders are decoded once, resized
to the run's image size and kept as a (N, C, S, S) uint8 tensor: the 50,000 CIFAR training
images take 147 MiB. The training set yields clean images and the views are computed per
batch on the training device (:class:`~stabilitylab.data.augment.BatchTwoView`).
Normalisation uses the per-channel mean and standard deviation of the training split.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from stabilitylab.config import RunConfig
from stabilitylab.data import DataBundle, limit_dataset
from stabilitylab.data.augment import local_crops_of, recipe_batch_two_view
from stabilitylab.errors import DataError

log = logging.getLogger(__name__)

CHUNK = 1024  # images resized or summed at once, to bound the float copies


class TensorImages(Dataset):
    """Images held as one (N, C, H, W) tensor, with an optional per-image transform."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


class NormaliseUInt8:
    """Turn a uint8 image (C, H, W) into floats normalised with per-channel statistics."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return (image.float() / 255 - self.mean) / self.std


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the per-channel mean and standard deviation of uint8 ``images`` in [0, 1] units."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, len(images), CHUNK):
        chunk = images[start : start + CHUNK].to(torch.float64) / 255
        total += chunk.sum(dim=(0, 2, 3))
        squares += (chunk**2).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean**2).clamp(min=0).sqrt()
    if bool((std == 0).any()):
        raise DataError(
            "the training images have a channel with a single value everywhere (standard "
            "deviation 0), so they cannot be normalised; check that the images are not blank"
        )
    return tuple(mean.tolist()), tuple(std.tolist())


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 ``images`` (N, C, H, W) so the shorter side is ``size``, then centre-crop."""
    height, width = images.shape[-2:]
    if height == width == size:
        return images.contiguous()
    scale = size / min(height, width)
    resized_shape = (max(size, round(height * scale)), max(size, round(width * scale)))
    top = (resized_shape[0] - size) // 2
    left = (resized_shape[1] - size) // 2
    out = torch.empty((len(images), images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, len(images), CHUNK):
        chunk = images[start : start + CHUNK].float()
        chunk = F.interpolate(
            chunk, size=resized_shape, mode="bilinear", align_corners=False, antialias=True
        )
        chunk = chunk[..., top : top + size, left : left + size]
        out[start : start + CHUNK] = chunk.round().clamp(0, 255).to(torch.uint8)
    return out


def check_splits(train_size: int, val_size: int, where: str, splittable: bool = True) -> None:
    """Raise DataError for an empty training or validation split of the data at ``where``.

    ``splittable`` data can take its validation split out of the training images with
    --val-split, so the error mentions that option.
    """
    if train_size == 0:
        raise DataError(f"the training split of {where} is empty; it needs at least 2 images")
    if val_size == 0:
        fix = (
            "add them, or raise --val-split where the data has no validation split"
            if splittable
            else "add them"
        )
        raise DataError(
            f"the validation split of {where} is empty, and the kNN monitor needs validation "
            f"images; {fix}"
        )


def in_memory_bundle(
    config: RunConfig,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    *,
    num_classes: int,
    flip: bool,
    description: str,
) -> DataBundle:
    """Build the datasets of a run from uint8 image tensors (N, C, S, S) and their labels.

    ``flip`` adds the recipe's random horizontal flip to the training views; data whose
    mirror image is another thing, such as digits, goes without it.
    """
    train_images, train_labels = train
    val_images, val_labels = val
    size = train_images.shape[-1]
    mean, std = channel_stats(train_images)
    normalise = NormaliseUInt8(mean, std)
    log.info(
        "normalising with the training split's per-channel mean %s and std %s",
        ", ".join(f"{value:.4f}" for value in mean),
        ", ".join(f"{value:.4f}" for value in std),
    )
    return DataBundle(
        train=TensorImages(train_images, train_labels),
        batch_views=recipe_batch_two_view(
            size,
            config.crop_min_scale,
            mean,
            std,
            flip=flip,
            local_crops=local_crops_of(config, size),
        ),
        knn_bank=limit_dataset(
            TensorImages(train_images, train_labels, normalise), config.knn_max_bank, config.seed
        ),
        knn_query=limit_dataset(
            TensorImages(val_images, val_labels, normalise), config.knn_max_query, config.seed + 1
        ),
        num_classes=num_classes,
        in_chans=train_images.shape[1],
        img_size=size,
        description=(
            f"{description}: {len(train_labels)} train / {len(val_labels)} validation images, "
            f"{size}x{size}, {train_images.shape[1]} channel"
            f"{'s' if train_images.shape[1] > 1 else ''}, {num_classes} classes, in memory"
        ),
    )
