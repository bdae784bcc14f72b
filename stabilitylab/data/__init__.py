"""Datasets for training (augmented views) and for the kNN monitor (one clean view).

A training image yields two global views, then, with multi-crop, ``local_crops`` local
crops of one smaller side: ``[global1, global2, *local_crops]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset, Subset

from stabilitylab.config import RunConfig

if TYPE_CHECKING:
    from stabilitylab.data.skipped import SkippedImages


@dataclass
class DataBundle:
    """The three datasets a run uses, with the facts the model needs about them."""

    train: Dataset  # yields (views, label), or (image, label) with batch_views
    knn_bank: Dataset  # training images, one clean view, yields (image, label)
    knn_query: Dataset  # validation images, one clean view
    num_classes: int
    in_chans: int
    description: str
    # Makes the views (two global, then any local crops) from a whole batch on the training
    # device, when the dataset yields clean images instead of views.
    batch_views: Callable[[torch.Tensor], Sequence[torch.Tensor]] | None = None
    # Side of the square model input in pixels; None: the configuration's resolved size.
    img_size: int | None = None
    # The unreadable images skipped with --skip-bad-images, or None when none are skipped.
    skipped: SkippedImages | None = None

    def attach_run_dir(self, run_dir: Path) -> None:
        """Write ``skipped_images.json`` into ``run_dir`` when the run skips bad images."""
        if self.skipped is not None:
            self.skipped.attach(run_dir)

    def mark_resumed(self) -> None:
        """Make the errors of unreadable streamed images give the fix a resumed run allows.

        A resumed run cannot add --skip-bad-images, so the errors ask for a readable file.
        """
        from stabilitylab.data.folder import StreamedImages

        for dataset in (self.train, self.knn_bank, self.knn_query):
            while isinstance(dataset, Subset):
                dataset = dataset.dataset
            if isinstance(dataset, StreamedImages):
                dataset.resumed = True


def limit_dataset(dataset: Dataset, limit: int, seed: int) -> Dataset:
    """Return ``dataset`` or, when it is larger than ``limit``, a fixed random subset of it."""
    if len(dataset) <= limit:
        return dataset
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(dataset), generator=generator)[:limit].sort().values
    return Subset(dataset, indices.tolist())


def build_data(config: RunConfig) -> DataBundle:
    """Build the datasets that ``config.dataset`` names; raise DataError for unusable data."""
    if config.dataset == "digits":
        from stabilitylab.data.digits import build_digits

        return build_digits(config)
    if config.dataset in ("cifar10", "cifar100"):
        from stabilitylab.data.cifar import build_cifar

        return build_cifar(config)
    if config.dataset in ("mnist", "fashion-mnist"):
        from stabilitylab.data.mnist import build_mnist

        return build_mnist(config)
    if config.dataset == "npz":
        from stabilitylab.data.npz import build_npz

        return build_npz(config)
    if config.dataset == "imagefolder":
        from stabilitylab.data.folder import build_imagefolder

        return build_imagefolder(config)
    raise AssertionError(f"dataset {config.dataset!r} passed validation but has no builder")
