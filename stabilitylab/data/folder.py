"""ImageNet-style folders: ``DATA_DIR/train/<class>/*.jpg`` and ``DATA_DIR/val/<class>/*.jpg``.

With ``--val-split FRACTION``, ``DATA_DIR/<class>/*.jpg`` is one tree, split per class with
a fixed seed. Every image becomes RGB (:mod:`stabilitylab.data.images`).

A folder is held in memory when the run's image side is at most ``IN_MEMORY_MAX_SIDE`` and
its decoded uint8 images take at most ``IN_MEMORY_MAX_BYTES``. Every image is then decoded
once at the start, resized so its shorter side is the image size and centre-cropped, and
the views are computed per batch on the training device, with the training split's
per-channel normalisation. Any other folder is streamed from disk with the recipe's
per-image torchvision views at the image size and ImageNet normalisation, and the kNN
monitor uses a fixed random subset of at most ``knn_max_bank`` training and
``knn_max_query`` validation images, chosen by the run's seed.

Unreadable files (empty, truncated, or not an image, such as text saved as ``.jpg``) are
found where the images are decoded: all of them at the start for a folder held in memory,
and for a streamed folder when a data loader first reads each one, so that the start does
not decode every image of a large folder. Either raises a DataError naming the file, or,
with ``--skip-bad-images``, skips it and lists it in ``RUN_DIR/skipped_images.json``. A
streamed dataset then returns the next readable image in its list in place of the skipped
one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from stabilitylab.config import RunConfig
from stabilitylab.data import DataBundle, limit_dataset
from stabilitylab.data.augment import imagenet_eval, imagenet_two_view, local_crops_of
from stabilitylab.data.classfolder import ClassFolder, is_hidden
from stabilitylab.data.images import (
    UnreadableImageError,
    UnreadableImagesError,
    decode_rgb,
    format_mismatch,
    unreadable_message,
)
from stabilitylab.data.memory import check_splits, in_memory_bundle
from stabilitylab.data.skipped import SkippedImages
from stabilitylab.data.splits import stratified_split
from stabilitylab.errors import DataError

log = logging.getLogger(__name__)

IN_MEMORY_MAX_SIDE = 64  # px; larger images are streamed with the per-image recipe
IN_MEMORY_MAX_BYTES = 2 * 1024**3  # decoded uint8 images of both splits
DECODE_THREADS = 8  # PIL releases the GIL while decoding
NAMED_FILES = 5  # mislabelled or non-image files named in one message

Sample = tuple[str, int]


@dataclasses.dataclass(frozen=True)
class FolderSplits:
    """The scanned image files of a folder dataset, split into training and validation."""

    root: Path
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    non_image_files: list[str]
    # Files and folders that are neither class folders nor inside one, such as an image
    # next to the class folders or a test/ folder next to train/ and val/.
    outside_class_folders: list[str] = dataclasses.field(default_factory=list)


class StreamedImages(Dataset):
    """Image files decoded when read, with a transform; unreadable files raise or are skipped.

    With ``skipped`` set, an unreadable file is recorded there and the next readable file in
    ``samples`` takes its place, with that file's own label. Without it an unreadable file
    raises UnreadableImageError, whose fixes suit a resumed run when ``resumed`` is set.
    """

    def __init__(
        self,
        samples: list[Sample],
        transform: Callable[[Any], Any],
        split: str,
        skipped: SkippedImages | None,
    ) -> None:
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.transform = transform
        self.split = split
        self.skipped = skipped
        self.resumed = False
        self._unreadable: set[int] = set()
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for offset in range(len(self.samples)):
            position = (index + offset) % len(self.samples)
            if position in self._unreadable:
                continue
            path, label = self.samples[position]
            try:
                decoded = decode_rgb(path)
            except UnreadableImageError as error:
                if self.skipped is None and self.resumed:
                    message = unreadable_message(path, error.reason, resumed=True)
                    raise UnreadableImageError(message, path, error.reason) from None
                if self.skipped is None:
                    raise
                self._unreadable.add(position)
                self.skipped.add(path, self.split, error.reason, found="loading")
                continue
            if format_mismatch(path, decoded.format) and path not in self._warned:
                self._warned.add(path)
                log.warning(
                    "%s is a %s file despite its extension; read it as one", path, decoded.format
                )
            return self.transform(decoded.image), label
        raise DataError(
            f"none of the {len(self.samples)} images of the {self.split} split can be read; "
            "see the skipped files in skipped_images.json"
        )


def _scan(root: Path, val_split: float | None) -> FolderSplits:
    if val_split is None:
        if not (root / "train").is_dir():
            raise DataError(
                f"image folder {root / 'train'} does not exist; --data-dir needs train/ and "
                "val/ class folders inside, or pass --val-split FRACTION to split one tree of "
                "class folders"
            )
        if not (root / "val").is_dir():
            raise DataError(
                f"image folder {root / 'val'} does not exist; add val/ class folders next to "
                "train/, or pass --val-split FRACTION and point --data-dir at train/"
            )
        train, val = ClassFolder(root / "train"), ClassFolder(root / "val")
        if val.classes != train.classes:
            only_train = sorted(set(train.classes) - set(val.classes))
            only_val = sorted(set(val.classes) - set(train.classes))
            raise DataError(
                f"{root / 'train'} and {root / 'val'} need the same class folders; only in "
                f"train/: {only_train[:5] or 'none'}, only in val/: {only_val[:5] or 'none'}"
            )
        return FolderSplits(
            root,
            train.classes,
            train.samples,
            val.samples,
            train.non_image_files + val.non_image_files,
            _beside_splits(root) + train.loose_files + val.loose_files,
        )
    if (root / "train").is_dir() and (root / "val").is_dir():
        raise DataError(
            f"--data-dir {root} has train/ and val/ folders, so --val-split {val_split} would "
            "treat them as two classes; drop --val-split to use them as the two splits"
        )
    tree = ClassFolder(root)
    train_index, val_index = stratified_split(np.asarray(tree.targets), val_split)
    return FolderSplits(
        root,
        tree.classes,
        [tree.samples[i] for i in train_index],
        [tree.samples[i] for i in val_index],
        tree.non_image_files,
        tree.loose_files,
    )


def _beside_splits(root: Path) -> list[str]:
    """List the entries of ``root`` other than train/, val/ and hidden ones."""
    return sorted(
        str(entry)
        for entry in root.iterdir()
        if not is_hidden(entry.name) and not (entry.name in ("train", "val") and entry.is_dir())
    )


def fits_in_memory(image_count: int, size: int) -> bool:
    """Tell whether ``image_count`` RGB images of ``size`` px are held in memory."""
    return size <= IN_MEMORY_MAX_SIDE and image_count * 3 * size * size <= IN_MEMORY_MAX_BYTES


def _decode_all(
    samples: list[Sample], size: int, split: str, skipped: SkippedImages | None
) -> tuple[torch.Tensor, torch.Tensor, list[UnreadableImageError]]:
    """Decode, resize and centre-crop every image to uint8 (N, 3, size, size).

    Returns the images and labels of the readable files and the errors of the others. With
    ``skipped`` set, the unreadable files are recorded there, else the caller raises.
    """
    resize = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size), v2.PILToTensor()])
    images = torch.empty((len(samples), 3, size, size), dtype=torch.uint8)

    def decode(index: int) -> tuple[str | None, UnreadableImageError | None]:
        try:
            decoded = decode_rgb(samples[index][0])
        except UnreadableImageError as error:
            return None, error
        images[index] = resize(decoded.image)
        return decoded.format, None

    with ThreadPoolExecutor(max_workers=min(DECODE_THREADS, os.cpu_count() or 1)) as pool:
        results = list(pool.map(decode, range(len(samples))))
    errors = [error for _, error in results if error is not None]
    if skipped is not None and errors:
        for error in errors:
            skipped.add(error.path, split, error.reason, found="build")
        log.warning("%s split: skipped %d unreadable image files", split, len(errors))
    _warn_mismatched(samples, [image_format for image_format, _ in results], split)
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    if not errors:
        return images, labels, errors
    readable = torch.tensor([error is None for _, error in results])
    return images[readable], labels[readable], errors


def _warn_mismatched(samples: list[Sample], formats: list[str | None], split: str) -> None:
    mismatched = [
        f"{path} ({image_format})"
        for (path, _), image_format in zip(samples, formats, strict=True)
        if format_mismatch(path, image_format)
    ]
    if mismatched:
        log.warning(
            "%s split: %d image files are in another format than their extension names and "
            "were read by their content: %s",
            split,
            len(mismatched),
            ", ".join(mismatched[:NAMED_FILES]),
        )


def _summary(splits: FolderSplits, skipped: SkippedImages | None) -> str:
    parts = [f"image folder {splits.root}"]
    if skipped is not None and skipped.entries:
        parts.append(f"{len(skipped.entries)} unreadable files skipped")
    if splits.non_image_files:
        parts.append(f"{len(splits.non_image_files)} non-image files ignored")
    outside = len(splits.outside_class_folders)
    if outside:
        parts.append(
            f"{outside} {'entry' if outside == 1 else 'entries'} outside class folders ignored"
        )
    return ", ".join(parts)


def _in_memory(
    config: RunConfig, splits: FolderSplits, skipped: SkippedImages | None
) -> DataBundle:
    size = config.resolved_img_size
    log.info("decoding %d images into memory at %d px", len(splits.train) + len(splits.val), size)
    train_images, train_labels, train_errors = _decode_all(splits.train, size, "train", skipped)
    val_images, val_labels, val_errors = _decode_all(splits.val, size, "val", skipped)
    if skipped is None and (train_errors or val_errors):
        # Both splits are decoded first, so that one error names the bad files of each.
        raise UnreadableImagesError(
            [("train", error.path, error.reason) for error in train_errors]
            + [("val", error.path, error.reason) for error in val_errors]
        )
    check_splits(len(train_labels), len(val_labels), str(splits.root))
    bundle = in_memory_bundle(
        config,
        (train_images, train_labels),
        (val_images, val_labels),
        num_classes=len(splits.classes),
        flip=True,
        description=_summary(splits, skipped),
    )
    return dataclasses.replace(bundle, skipped=skipped)


def _streamed(config: RunConfig, splits: FolderSplits, skipped: SkippedImages | None) -> DataBundle:
    size = config.resolved_img_size
    views = imagenet_two_view(size, config.crop_min_scale, local_crops_of(config, size))
    train = StreamedImages(splits.train, views, "train", skipped)
    bank = StreamedImages(splits.train, imagenet_eval(size), "train", skipped)
    query = StreamedImages(splits.val, imagenet_eval(size), "val", skipped)
    return DataBundle(
        train=train,
        knn_bank=limit_dataset(bank, config.knn_max_bank, config.seed),
        knn_query=limit_dataset(query, config.knn_max_query, config.seed + 1),
        num_classes=len(splits.classes),
        in_chans=3,
        img_size=size,
        skipped=skipped,
        description=(
            f"{_summary(splits, skipped)}: {len(train)} train / {len(query)} validation images, "
            f"{len(splits.classes)} classes, {size} px, streamed from disk"
        ),
    )


def build_imagefolder(config: RunConfig) -> DataBundle:
    root = Path(config.data_dir or "")
    if not root.is_dir():
        raise DataError(f"--data-dir {root} does not exist or is not a folder")
    splits = _scan(root, config.val_split)
    if len(splits.classes) < 2:
        raise DataError(
            f"{root} has {len(splits.classes)} class folder; the kNN monitor needs at least 2 "
            "classes to measure anything"
        )
    if splits.non_image_files:
        log.warning(
            "%s: skipped %d files without an image extension, such as %s",
            root,
            len(splits.non_image_files),
            ", ".join(splits.non_image_files[:NAMED_FILES]),
        )
    outside = splits.outside_class_folders
    if outside:
        log.warning(
            "%s: ignored %d %s outside the class folders, such as %s; only images inside a "
            "class folder are used",
            root,
            len(outside),
            "entry" if len(outside) == 1 else "entries",
            ", ".join(outside[:NAMED_FILES]),
        )
    check_splits(len(splits.train), len(splits.val), str(root))
    skipped = SkippedImages(str(root), splits.non_image_files) if config.skip_bad_images else None
    size = config.resolved_img_size
    if fits_in_memory(len(splits.train) + len(splits.val), size):
        return _in_memory(config, splits, skipped)
    return _streamed(config, splits, skipped)
