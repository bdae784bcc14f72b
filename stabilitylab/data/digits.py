"""The bundled default: scikit-learn's handwritten digits, shipped inside scikit-learn.

1,797 real 8x8 grayscale scans of 10 classes (the UCI optical-recognition test set), values
0 to 16. Nothing is downloaded. The train/validation split is stratified and fixed, the same
for every run whatever its seed, so that runs with different seeds are evaluated on the same
images.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from stabilitylab.config import RunConfig
from stabilitylab.data import DataBundle, limit_dataset
from stabilitylab.data.augment import DigitsBatchTwoView, local_crops_of
from stabilitylab.data.memory import TensorImages

VAL_FRACTION = 0.25
SPLIT_SEED = 0  # fixed on purpose: the split does not follow the run's seed
PIXEL_MAX = 16.0


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (train images, val images, train labels, val labels); images in [0, 1], (N, 8, 8)."""
    digits = load_digits()
    images = (digits.images / PIXEL_MAX).astype(np.float32)
    return tuple(
        train_test_split(
            images,
            digits.target.astype(np.int64),
            test_size=VAL_FRACTION,
            stratify=digits.target,
            random_state=SPLIT_SEED,
        )
    )  # type: ignore[return-value]


def _upsample(images: np.ndarray, size: int) -> torch.Tensor:
    # (N, 8, 8) -> (N, 1, size, size), bilinear, once up front instead of per sample.
    tensor = torch.from_numpy(images).unsqueeze(1)
    if tensor.shape[-1] == size:
        return tensor.contiguous()
    return F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False).clamp_(
        0, 1
    )


def build_digits(config: RunConfig) -> DataBundle:
    train_x, val_x, train_y, val_y = digits_split()
    size = config.resolved_img_size
    train_images = _upsample(train_x, size)
    val_images = _upsample(val_x, size)

    # Normalisation statistics come from the training split only.
    mean = float(train_images.mean())
    std = float(train_images.std())

    def normalise(image: torch.Tensor) -> torch.Tensor:
        return (image - mean) / std

    train_labels = torch.from_numpy(train_y)
    val_labels = torch.from_numpy(val_y)
    return DataBundle(
        train=TensorImages(train_images, train_labels),
        batch_views=DigitsBatchTwoView(
            size, config.crop_min_scale, mean, std, local_crops_of(config, size)
        ),
        knn_bank=limit_dataset(
            TensorImages(normalise(train_images), train_labels), config.knn_max_bank, config.seed
        ),
        knn_query=limit_dataset(
            TensorImages(normalise(val_images), val_labels), config.knn_max_query, config.seed + 1
        ),
        num_classes=10,
        in_chans=1,
        img_size=size,
        description=(
            f"scikit-learn digits: {len(train_labels)} train / {len(val_labels)} validation "
            f"images, 8x8 upsampled to {size}x{size}, 1 channel, 10 classes"
        ),
    )
