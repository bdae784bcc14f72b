"""Images and labels from one NumPy ``.npz`` file, named by ``--data-dir``.

Keys:

- ``x_train``: images, (N, H, W) for one channel, (N, H, W, C) (NHWC) or (N, C, H, W) (NCHW)
  with C 1 or 3. The layout is the one whose channel axis has 1 or 3 entries. A shape that
  reads both ways, such as (N, 3, 32, 3), is rejected as ambiguous.
  Values are uint8 0..255, other integers within 0..255, or floats in [0, 1].
- ``y_train``: integer labels 0..K-1, shape (N,).
- ``x_val``, ``y_val``: the validation split, in the same form; without them pass
  ``--val-split FRACTION`` to take a stratified validation split out of ``x_train``.
- ``hflip`` (optional): a boolean scalar, whether the training views include the random
  horizontal flip; default true. Store false for data with a handedness, such as digits.

The file is read with ``allow_pickle=False``, so it cannot run code; object arrays are
rejected. Float images are rounded to uint8 for the in-memory store. The image size is the
arrays' own unless ``--img-size`` is given, and must then be divisible by the patch size.
"""

from __future__ import annotations

import logging
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from stabilitylab.config import RunConfig
from stabilitylab.data import DataBundle
from stabilitylab.data.memory import check_splits, in_memory_bundle, resize_square
from stabilitylab.data.splits import stratified_split
from stabilitylab.errors import DataError

log = logging.getLogger(__name__)

IMAGE_KEYS = ("x_train", "y_train", "x_val", "y_val")
# The first bytes of a zip archive (an empty one has only its end record), and of a .npy file.
ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
NPY_SIGNATURE = b"\x93NUMPY"
FLIP_KEY = "hflip"
CHANNEL_COUNTS = (1, 3)
NAMED_LABELS = 10  # labels listed in one message


def _load(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise DataError(f"--data-dir {path} does not exist; pass the path of a .npz file")
    if path.is_dir():
        raise DataError(f"--data-dir {path} is a folder; with --dataset npz pass a .npz file")
    _check_signature(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: _member(archive, key, path) for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise DataError(
            f"{path} cannot be read as a NumPy .npz file ({error}); write it with "
            "numpy.savez from numeric arrays"
        ) from None


def _check_signature(path: Path) -> None:
    """Raise DataError unless ``path`` starts like the zip archive that numpy.savez writes.

    np.load reads any other file as a pickle, which allow_pickle=False then rejects with
    advice to load it unsafely, so the file type is checked here first.
    """
    try:
        with open(path, "rb") as handle:
            start = handle.read(len(NPY_SIGNATURE))
    except OSError as error:
        raise DataError(f"--data-dir {path} cannot be read: {error.strerror or error}") from None
    if start.startswith(NPY_SIGNATURE):
        raise DataError(
            f"{path} contains one array (a .npy file), not an .npz archive of arrays; write it "
            f"with numpy.savez and the keys {', '.join(IMAGE_KEYS)}"
        )
    if not start.startswith(ZIP_SIGNATURES):
        found = "it is empty" if not start else f"it starts with the bytes {start!r}"
        raise DataError(
            f"{path} is not a NumPy .npz file: {found}, not the zip archive signature that "
            f"numpy.savez writes; write it with numpy.savez and the keys {', '.join(IMAGE_KEYS)}"
        )


def _member(archive: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        value = archive[key]
    except ValueError as error:
        if "allow_pickle" not in str(error):
            raise
        # NumPy's message for an object array; allow_pickle=True would run its pickle.
        raise DataError(
            f"{path}: {key} is an object array, which only pickle can load, so it is "
            "rejected; store it as a numeric array"
        ) from None
    if not isinstance(value, np.ndarray):
        # NpzFile returns the raw bytes of a member that is not a .npy file.
        raise DataError(
            f"{path}: the member {key} is not a NumPy array, so the file is a zip archive but "
            "not one that numpy.savez wrote; write it with numpy.savez"
        )
    return value


def to_nchw_uint8(array: np.ndarray, key: str, path: Path) -> np.ndarray:
    """Return ``array`` of images as (N, C, H, W) uint8; raise DataError for other shapes."""
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4:
        channels_last = array.shape[3] in CHANNEL_COUNTS
        channels_first = array.shape[1] in CHANNEL_COUNTS
        if channels_last and channels_first:
            raise DataError(
                f"{path}: {key} has shape {array.shape}, which reads as NHWC and as NCHW; "
                "store it with the channel axis of 1 or 3 entries and larger image sides"
            )
        if not channels_last and not channels_first:
            raise DataError(
                f"{path}: {key} has shape {array.shape} with no channel axis of 1 or 3 "
                "entries; store grayscale as (N, H, W) and colour as NHWC or NCHW with 3 "
                "channels"
            )
        if channels_last:
            array = array.transpose(0, 3, 1, 2)
    else:
        raise DataError(
            f"{path}: {key} has shape {array.shape}; images are (N, H, W), (N, H, W, C) or "
            "(N, C, H, W)"
        )
    return _to_uint8(np.ascontiguousarray(array), key, path)


def _to_uint8(array: np.ndarray, key: str, path: Path) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_ or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise DataError(f"{path}: {key} has dtype {array.dtype}; store uint8 or float images")
    if array.size == 0:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise DataError(f"{path}: {key} contains NaN or infinite values; replace them")
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 1:
            raise DataError(
                f"{path}: {key} has float values from {low:g} to {high:g}, but float images "
                "must be in [0, 1]; divide 0..255 data by 255, or store it as uint8"
            )
        return np.rint(array * 255).astype(np.uint8)
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 255:
        raise DataError(
            f"{path}: {key} has integer values from {low} to {high}, outside 0..255; "
            "rescale it to uint8, or store floats in [0, 1]"
        )
    return array.astype(np.uint8)


def to_labels(array: np.ndarray, key: str, count: int, path: Path) -> np.ndarray:
    """Return ``array`` as (N,) int64 labels; raise DataError for other shapes or values."""
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{path}: {key} has dtype {array.dtype}; labels must be integers")
    if array.shape != (count,):
        raise DataError(
            f"{path}: {key} has shape {array.shape}, expected ({count},), one label per image"
        )
    if count and int(array.min()) < 0:
        raise DataError(f"{path}: {key} has negative labels; labels must be 0..K-1")
    return array.astype(np.int64)


def _arrays(
    values: dict[str, np.ndarray], path: Path, val_split: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    missing = [key for key in ("x_train", "y_train") if key not in values]
    if missing:
        raise DataError(
            f"{path} has no {' or '.join(missing)} (its keys: {', '.join(values) or 'none'}); "
            f"store the arrays under the keys {', '.join(IMAGE_KEYS)}"
        )
    x_train = to_nchw_uint8(values["x_train"], "x_train", path)
    y_train = to_labels(values["y_train"], "y_train", len(x_train), path)
    has_val = [key in values for key in ("x_val", "y_val")]
    if any(has_val) and not all(has_val):
        present = "x_val" if has_val[0] else "y_val"
        raise DataError(f"{path} has {present} without its partner; store both x_val and y_val")
    if all(has_val):
        if val_split is not None:
            raise DataError(
                f"{path} has its own x_val and y_val, so --val-split {val_split} would be "
                "ignored; drop --val-split, or remove x_val and y_val from the file"
            )
        x_val = to_nchw_uint8(values["x_val"], "x_val", path)
        return x_train, y_train, x_val, to_labels(values["y_val"], "y_val", len(x_val), path)
    if val_split is None:
        raise DataError(
            f"{path} has no x_val and y_val; add them, or pass --val-split FRACTION to take a "
            "stratified validation split out of x_train"
        )
    train_index, val_index = stratified_split(y_train, val_split)
    return x_train[train_index], y_train[train_index], x_train[val_index], y_train[val_index]


def _image_size(config: RunConfig, images: np.ndarray, path: Path) -> int:
    """Return the run's image side: ``--img-size``, or the arrays' own when they are square."""
    height, width = images.shape[-2:]
    if config.img_size is not None:
        return config.img_size
    patch = config.resolved_patch_size
    if height != width:
        raise DataError(
            f"{path}: the images are {height}x{width} px, not square; pass --img-size, such "
            f"as {min(height, width) // patch * patch or patch}, to resize and centre-crop them"
        )
    if height % patch:
        larger = -(-height // patch) * patch
        raise DataError(
            f"{path}: the images are {height}x{height} px, which --patch-size {patch} does not "
            f"divide; pass --img-size {larger} to resize them, or a --patch-size that divides "
            f"{height}"
        )
    return height


def _flip(values: dict[str, np.ndarray], path: Path) -> bool:
    if FLIP_KEY not in values:
        return True
    flag = values[FLIP_KEY]
    if flag.shape != () or flag.dtype != np.bool_:
        raise DataError(
            f"{path}: {FLIP_KEY} has shape {flag.shape} and dtype {flag.dtype}; store it as a "
            "boolean scalar, numpy.array(False)"
        )
    return bool(flag)


def _check_val_classes(classes: np.ndarray, y_val: np.ndarray, path: Path) -> None:
    """Raise DataError for validation labels that no training image has.

    The kNN monitor predicts the classes of the training images, so a query of any other
    class would count as wrong at every evaluation.
    """
    unknown = np.setdiff1d(np.unique(y_val), classes)
    if len(unknown):
        listed = ", ".join(str(label) for label in unknown[:NAMED_LABELS])
        more = f" and {len(unknown) - NAMED_LABELS} more" if len(unknown) > NAMED_LABELS else ""
        raise DataError(
            f"{path}: y_val has {len(unknown)} label{'s' if len(unknown) > 1 else ''} that no "
            f"training image has ({listed}{more}); the kNN monitor can only predict the "
            "classes of y_train, so remove those validation images or add training images of "
            "their classes"
        )


def _warn_empty_classes(classes: np.ndarray, path: Path) -> None:
    """Log the classes in 0..max(label) without a training image, when there are any."""
    count = int(classes.max()) + 1
    empty = np.setdiff1d(np.arange(count), classes)
    if len(empty):
        log.warning(
            "%s: the labels run from 0 to %d, so the run has %d classes, but %d of them have "
            "no training image (such as %s); relabel the data as 0..%d if those are not meant "
            "as classes",
            path,
            count - 1,
            count,
            len(empty),
            ", ".join(str(label) for label in empty[:NAMED_LABELS]),
            len(classes) - 1,
        )


def _warn_val_size(x_train: np.ndarray, x_val: np.ndarray, size: int, path: Path) -> None:
    train_shape, val_shape = x_train.shape[-2:], x_val.shape[-2:]
    if train_shape != val_shape:
        log.warning(
            "%s: the x_val images are %dx%d px and the x_train images %dx%d px; both are "
            "resized (shorter side) and centre-cropped to %d px",
            path,
            *val_shape,
            *train_shape,
            size,
        )


def build_npz(config: RunConfig) -> DataBundle:
    path = Path(config.data_dir or "")
    values = _load(path)
    ignored = sorted(set(values) - {*IMAGE_KEYS, FLIP_KEY})
    if ignored:
        log.info("%s: ignoring the arrays %s", path, ", ".join(ignored))
    x_train, y_train, x_val, y_val = _arrays(values, path, config.val_split)
    check_splits(len(y_train), len(y_val), str(path))
    if x_val.shape[1] != x_train.shape[1]:
        raise DataError(
            f"{path}: x_train has {x_train.shape[1]} channels but x_val {x_val.shape[1]}; "
            "both splits need the same"
        )
    classes = np.unique(y_train)
    if len(classes) < 2:
        raise DataError(
            f"{path}: y_train has {len(classes)} class; the kNN monitor needs at least 2 "
            "classes to measure anything"
        )
    _check_val_classes(classes, y_val, path)
    _warn_empty_classes(classes, path)
    size = _image_size(config, x_train, path)
    _warn_val_size(x_train, x_val, size, path)
    return in_memory_bundle(
        config,
        (resize_square(torch.from_numpy(x_train), size), torch.from_numpy(y_train)),
        (resize_square(torch.from_numpy(x_val), size), torch.from_numpy(y_val)),
        num_classes=int(classes.max()) + 1,
        flip=_flip(values, path),
        description=f"NumPy arrays {path}",
    )
