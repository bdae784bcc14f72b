"""Read the scalars of TensorBoard event files with tensorboard's ``EventAccumulator``.

The source is one ``events.out.tfevents.*`` file or a folder searched for them. Event files
of one folder belong to one run (a resumed run adds a file) and are read together, with
the events that a restart made orphaned purged as TensorBoard does. Event files in several
folders are several runs, and only one may contain scalars.

Both scalar encodings are read: ``simple_value`` summaries, which ``torch.utils.tensorboard``
and tensorboardX write, and scalar tensors of the ``scalars`` plugin, which ``tf.summary``
writes. Histograms, images and other data are listed as ignored.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from stabilitylab.errors import ConfigError, DataError
from stabilitylab.importers.source import SourceData, logged_series
from stabilitylab.runs import EVENT_FILE_PREFIX

log = logging.getLogger(__name__)

FORMAT = "tensorboard"
PIP_EXTRA = "stabilitylab[tensorboard]"
# Kinds of event data that are not scalars, as EventAccumulator.Tags() names them.
_OTHER_KINDS = ("images", "audio", "histograms", "distributions")


def is_event_file(path: Path) -> bool:
    return path.is_file() and path.name.startswith(EVENT_FILE_PREFIX)


def find_event_folders(path: Path) -> list[Path]:
    """Return the folders under ``path`` (itself included) that contain event files."""
    if path.is_file():
        return [path.parent] if is_event_file(path) else []
    folders = {file.parent for file in path.rglob(EVENT_FILE_PREFIX + "*") if is_event_file(file)}
    return sorted(folders)


def _event_accumulator() -> Any:
    try:
        from tensorboard.backend.event_processing import event_accumulator
    except ImportError:
        raise ConfigError(
            f"reading TensorBoard event files needs the tensorboard package, which is not "
            f"installed; install it with pip install '{PIP_EXTRA}' (or pip install tensorboard)"
        ) from None
    return event_accumulator


def read_tensorboard(path: Path) -> SourceData:
    """Read every scalar tag of the event files at ``path``; see the module documentation."""
    module = _event_accumulator()
    target = _event_target(path)
    folder, accumulator = _single_run(module, path, target)

    series, ignored = _read_scalars(module, accumulator, str(target or folder))
    files = [target] if target else sorted(f for f in folder.iterdir() if is_event_file(f))
    return SourceData(FORMAT, path, files, series, ignored=ignored)


def _event_target(path: Path) -> Path | None:
    """Return ``path`` when it is an event file, None for a folder; raise for another file."""
    if not path.is_file():
        return None
    if not is_event_file(path):
        raise DataError(
            f"{path} is not a TensorBoard event file: its name does not start with "
            f"{EVENT_FILE_PREFIX}; pass an event file, the folder that contains it, or --format "
            "for a CSV file"
        )
    return path


def _single_run(module: Any, path: Path, target: Path | None) -> tuple[Path, Any]:
    """Load the event folders under ``path`` and return the one that contains scalars."""
    folders = find_event_folders(path)
    if not folders:
        raise DataError(
            f"{path} contains no TensorBoard event files ({EVENT_FILE_PREFIX}*); pass an event "
            "file or the folder that contains them"
        )
    loaded = [(folder, _load(module, target or folder)) for folder in folders]
    with_scalars = [(folder, found) for folder, found in loaded if _scalar_tags(module, found)]
    if not with_scalars:
        if not any(_has_events(found) for _, found in loaded):
            raise DataError(
                f"no event could be read from the event files in {path}, so they are damaged "
                "or are not TensorBoard event files; pass the event files that the run wrote"
            )
        raise DataError(f"the event files in {path} contain no scalars")
    if len(with_scalars) > 1:
        names = ", ".join(str(folder) for folder, _ in with_scalars)
        raise DataError(
            f"{path} contains the event files of {len(with_scalars)} runs ({names}); pass one "
            "of those folders"
        )
    return with_scalars[0]


def _has_events(accumulator: Any) -> bool:
    """Tell whether the accumulator read any event, which every valid event file starts with."""
    try:
        accumulator.FirstEventTimestamp()
    except ValueError:  # raised when no event was read
        return False
    return True


def _load(module: Any, path: Path) -> Any:
    guidance = {module.SCALARS: 0, module.TENSORS: 0}  # 0 keeps every event
    guidance.update({kind: 1 for kind in _OTHER_KINDS})
    accumulator = module.EventAccumulator(str(path), size_guidance=guidance)
    # tensorboard logs an INFO line per file it has finished reading.
    tensorboard_log = logging.getLogger("tensorboard")
    level = tensorboard_log.level
    tensorboard_log.setLevel(max(level, logging.WARNING))
    try:
        accumulator.Reload()
    except Exception as error:  # a damaged record raises protobuf's or tensorboard's errors
        raise DataError(f"{path}: the event file cannot be read ({error})") from None
    finally:
        tensorboard_log.setLevel(level)
    return accumulator


def _scalar_tags(module: Any, accumulator: Any) -> tuple[list[str], list[str]] | None:
    """Return the simple-value tags and the scalar-tensor tags, or None when there are none."""
    tags = accumulator.Tags()
    simple = list(tags.get(module.SCALARS, []))
    tensors = [
        tag
        for tag in tags.get(module.TENSORS, [])
        if accumulator.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"
    ]
    return (simple, tensors) if simple or tensors else None


def _read_scalars(module: Any, accumulator: Any, where: str) -> tuple[dict, dict[str, str]]:
    from tensorboard.util import tensor_util

    simple, tensors = _scalar_tags(module, accumulator)
    series = {}
    repeats = {}
    for tag in simple:
        events = accumulator.Scalars(tag)
        steps = np.array([event.step for event in events], dtype="int64")
        values = np.array([event.value for event in events], dtype="float64")
        series[tag], repeats[tag] = logged_series(steps, values, tag)
    for tag in tensors:
        if tag in series:
            continue
        events = accumulator.Tensors(tag)
        arrays = [tensor_util.make_ndarray(event.tensor_proto) for event in events]
        if any(array.size != 1 for array in arrays):
            continue
        steps = np.array([event.step for event in events], dtype="int64")
        values = np.array([float(array.reshape(())) for array in arrays], dtype="float64")
        series[tag], repeats[tag] = logged_series(steps, values, tag)
    repeated = sum(1 for count in repeats.values() if count)
    if repeated:
        log.info(
            "%s: %d tags log some steps more than once; the last value is kept", where, repeated
        )
    ignored = _other_tags(module, accumulator, set(series))
    return series, ignored


def _other_tags(module: Any, accumulator: Any, scalars: set[str]) -> dict[str, str]:
    tags = accumulator.Tags()
    ignored = {}
    for kind in (*_OTHER_KINDS, module.TENSORS):
        for tag in tags.get(kind, []):
            if tag not in scalars:
                reason = "not a scalar" if kind == module.TENSORS else f"{kind}, not scalars"
                ignored.setdefault(tag, reason)
    return ignored
