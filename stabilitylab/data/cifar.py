"""CIFAR-10 and CIFAR-100 in the python-pickle layout that torchvision's CIFAR10 and CIFAR100 use.

``DATA_DIR/cifar-10-batches-py/`` contains ``data_batch_1`` to ``data_batch_5``,
``test_batch`` and ``batches.meta``, and ``DATA_DIR/cifar-100-python/`` contains ``train``,
``test`` and ``meta``.
``--data-dir`` may also name that folder itself.

torchvision's ``CIFAR10(download=False)`` compares the MD5 of every batch with the published
one and raises "Dataset not found or corrupted" for any other file, so it rejects a subset,
a re-encoded copy or generated test batches. The batches are therefore read here, from the
layout documented with the dataset: each is a pickled dict whose ``data`` is a (N, 3072)
uint8 array, each row 1024 red, then 1024 green, then 1024 blue values of a 32x32 image in
row-major order, and whose ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100) are the
classes. The MD5s are still compared with torchvision's list and the result is logged and
named in the dataset description. The unpickler builds only the NumPy arrays, lists, dicts
and strings of that layout, so a batch file cannot run code.

``--download`` calls torchvision's ``CIFAR10``/``CIFAR100`` with ``download=True``, which
fetches the archive, checks its MD5 and extracts it into ``--data-dir``.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity

from stabilitylab.config import RunConfig
from stabilitylab.data import DataBundle
from stabilitylab.data.memory import check_splits, in_memory_bundle, resize_square
from stabilitylab.errors import DataError

log = logging.getLogger(__name__)

CIFAR_SIDE = 32
ROW_LENGTH = 3 * CIFAR_SIDE * CIFAR_SIDE


@dataclass(frozen=True)
class CifarLayout:
    """File names and keys of one CIFAR variant, from torchvision's class of the same data."""

    name: str
    source: type[CIFAR10]
    label_key: str
    names_key: str

    @property
    def folder(self) -> str:
        return self.source.base_folder

    @property
    def train_files(self) -> list[str]:
        return [name for name, _ in self.source.train_list]

    @property
    def test_files(self) -> list[str]:
        return [name for name, _ in self.source.test_list]

    @property
    def meta_file(self) -> str:
        return self.source.meta["filename"]

    def checksums(self) -> dict[str, str]:
        files = self.source.train_list + self.source.test_list
        return {**dict(files), self.meta_file: self.source.meta["md5"]}


LAYOUTS = {
    "cifar10": CifarLayout("CIFAR-10", CIFAR10, "labels", "label_names"),
    "cifar100": CifarLayout("CIFAR-100", CIFAR100, "fine_labels", "fine_label_names"),
}

# The globals a CIFAR batch pickle refers to: NumPy's array reconstruction, from NumPy 1
# ("numpy.core") or NumPy 2 ("numpy._core"), with ``_frombuffer`` for pickle protocol 5,
# and the latin-1 encoding of protocol-2 bytes.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}
# Protocol 2 pickles empty bytes, such as the data of an array without images, as a call
# of bytes() without arguments.
BYTES_GLOBALS = {("__builtin__", "bytes"), ("builtins", "bytes")}


def _empty_bytes(*args: Any) -> bytes:
    """Build the empty bytes of a protocol-2 pickle; reject every other call of bytes()."""
    if args:
        raise pickle.UnpicklingError("it calls bytes() with arguments, which a batch never does")
    return b""


class BatchUnpickler(pickle.Unpickler):
    """An unpickler that builds only what a CIFAR batch contains."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in BYTES_GLOBALS:
            return _empty_bytes
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a batch never does")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    """Read one pickled dict of the CIFAR layout, keys as str; raise DataError naming ``path``."""
    try:
        with open(path, "rb") as handle:
            # latin1, as torchvision reads them: the batches were pickled by Python 2.
            payload = BatchUnpickler(handle, encoding="latin1").load()
    except OSError as error:
        raise DataError(f"CIFAR file {path} cannot be read: {error.strerror or error}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        reason = str(error) or type(error).__name__
        raise DataError(
            f"CIFAR file {path} is truncated or not a CIFAR python batch ({reason}); fetch the "
            "data again with --download, or replace the file"
        ) from None
    if not isinstance(payload, dict):
        raise DataError(
            f"CIFAR file {path} contains a {type(payload).__name__}, not the dict of a CIFAR "
            "python batch; fetch the data again with --download, or replace the file"
        )
    return {
        key.decode("latin1") if isinstance(key, bytes) else key: v for key, v in payload.items()
    }


def _required(payload: dict[str, Any], key: str, path: Path) -> Any:
    if key not in payload:
        found = ", ".join(repr(name) for name in sorted(map(str, payload))) or "none"
        raise DataError(
            f"CIFAR file {path} has no {key!r} key (it has {found}); it is not a complete "
            "batch of this dataset, so fetch the data again with --download or replace it"
        )
    return payload[key]


def read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the images (N, 3, 32, 32) uint8 and labels (N,) int64 of one CIFAR batch file."""
    payload = _unpickle(path)
    data = _required(payload, "data", path)
    labels = _required(payload, label_key, path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        kind = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else (type(data).__name__)
        )
        raise DataError(
            f"CIFAR file {path}: 'data' is a {kind}, expected a uint8 array (N, {ROW_LENGTH}); "
            "replace the file"
        )
    if data.shape[1] != ROW_LENGTH:
        raise DataError(
            f"CIFAR file {path}: 'data' rows have {data.shape[1]} values, expected "
            f"{ROW_LENGTH} (3 x 32 x 32); replace the file"
        )
    label_array = _label_array(labels, label_key, path)
    if label_array.shape != (len(data),):
        raise DataError(
            f"CIFAR file {path} has {len(data)} images but {label_array.size} {label_key!r}; "
            "the file is damaged, replace it"
        )
    if len(label_array) and (label_array.min() < 0 or label_array.max() >= num_classes):
        raise DataError(
            f"CIFAR file {path} has labels from {label_array.min()} to {label_array.max()}, "
            f"outside 0 to {num_classes - 1} for the {num_classes} classes of its meta file"
        )
    return data.reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE), label_array


def _label_array(labels: Any, label_key: str, path: Path) -> np.ndarray:
    """Return ``labels`` as int64; raise DataError unless they are integers.

    Floats, strings and booleans are rejected rather than cast, because a cast would turn
    1.7 into 1, "3" into 3 and True into 1 silently.
    """
    if isinstance(labels, np.ndarray):
        if labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer):
            return labels.astype(np.int64)
        kind = f"a {labels.dtype} array of shape {labels.shape}"
    elif isinstance(labels, list):
        bad = [value for value in labels if not _is_integer(value)]
        if not bad:
            try:
                return np.asarray(labels, dtype=np.int64)
            except OverflowError:
                kind = "a list with integers beyond the int64 range"
        else:
            kind = f"a list with the value {bad[0]!r} ({type(bad[0]).__name__})"
    else:
        kind = "None" if labels is None else f"a {type(labels).__name__}"
    raise DataError(
        f"CIFAR file {path}: {label_key!r} is not a list of integers, but {kind}; replace the "
        "file with one whose labels are integer class indices"
    )


def _is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def read_class_names(folder: Path, layout: CifarLayout) -> list[str]:
    path = folder / layout.meta_file
    names = _required(_unpickle(path), layout.names_key, path)
    if not isinstance(names, list) or len(names) < 2:
        raise DataError(
            f"CIFAR meta file {path}: {layout.names_key!r} should list the class names, but "
            f"it is {names!r:.80}; replace the file"
        )
    return [str(name) for name in names]


def find_batch_folder(data_dir: Path, layout: CifarLayout, download: bool) -> Path:
    """Return the folder of the batch files: ``data_dir/<torchvision folder>`` or ``data_dir``."""
    if download:
        _download(data_dir, layout)
    if (data_dir / layout.folder).is_dir():
        return data_dir / layout.folder
    if (data_dir / layout.meta_file).is_file():
        return data_dir
    if not data_dir.is_dir():
        raise DataError(
            f"--data-dir {data_dir} does not exist; pass --download to fetch {layout.name} "
            "into it, or point --data-dir at the folder that contains "
            f"{layout.folder}/"
        )
    raise DataError(
        f"--data-dir {data_dir} has no {layout.folder}/ folder; pass --download to fetch "
        f"{layout.name} into it, or point --data-dir at the folder that contains "
        f"{layout.folder}/"
    )


def _download(data_dir: Path, layout: CifarLayout) -> None:
    log.info("fetching %s into %s unless it is there already", layout.name, data_dir)
    try:
        layout.source(str(data_dir), train=True, download=True)
    except (OSError, RuntimeError) as error:  # URLError is an OSError
        raise DataError(
            f"--download of {layout.name} into {data_dir} failed ({error}); check the network "
            f"connection, or fetch {layout.source.url} yourself and extract it into {data_dir}"
        ) from None


def _check_files(folder: Path, layout: CifarLayout) -> bool:
    """Raise DataError for missing files; return whether all match torchvision's MD5s."""
    missing = [name for name in layout.checksums() if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"{layout.name} folder {folder} lacks {', '.join(missing)}; pass --download to "
            "fetch the complete dataset, or copy the missing files there"
        )
    mismatched = [
        name for name, md5 in layout.checksums().items() if not check_integrity(folder / name, md5)
    ]
    if mismatched:
        log.warning(
            "%s files in %s differ from the published ones (%s), so torchvision's CIFAR "
            "class would reject them; reading them as they are",
            layout.name,
            folder,
            ", ".join(mismatched),
        )
    return not mismatched


def _read_split(
    folder: Path, names: list[str], layout: CifarLayout, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [read_batch(folder / name, layout.label_key, num_classes) for name in names]
    images = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


def build_cifar(config: RunConfig) -> DataBundle:
    layout = LAYOUTS[config.dataset]
    folder = find_batch_folder(Path(config.data_dir or ""), layout, config.download)
    published = _check_files(folder, layout)
    class_names = read_class_names(folder, layout)
    train_images, train_labels = _read_split(folder, layout.train_files, layout, len(class_names))
    val_images, val_labels = _read_split(folder, layout.test_files, layout, len(class_names))
    check_splits(len(train_labels), len(val_labels), str(folder), splittable=False)
    size = config.resolved_img_size
    checksums = "the published files" if published else "files that differ from the published ones"
    return in_memory_bundle(
        config,
        (resize_square(train_images, size), train_labels),
        (resize_square(val_images, size), val_labels),
        num_classes=len(class_names),
        flip=True,
        description=f"{layout.name} in {folder} ({checksums})",
    )
