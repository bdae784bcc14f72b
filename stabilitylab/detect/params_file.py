"""Detector-parameter files: JSON that ``stabilitylab calibrate`` writes and ``report`` reads.

A file is a JSON object with a ``detector_params`` object shaped as
:meth:`DetectorParams.to_dict`, for example::

    {"format_version": 1,
     "detector_params": {"grad_spikes": {"z_threshold": 7.5}, "loss_spikes": {...}},
     "calibration": {...}}

Keys left out keep their defaults, so a hand-written file may name only what it changes,
and unknown keys are rejected so that a misspelt name cannot pass unnoticed. The
``events.json`` of a report has the same ``detector_params`` key, so it can be read back to
repeat that report's detection. ``calibration`` is informational and not read back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stabilitylab.atomic import write_text_atomic
from stabilitylab.detect import DetectorParams
from stabilitylab.errors import ConfigError

DETECTORS_FORMAT_VERSION = 1
PARAMS_KEY = "detector_params"


def write_detector_file(
    path: str | os.PathLike[str],
    params: DetectorParams,
    calibration: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``params`` (and an optional calibration record) to ``path`` atomically."""
    target = check_detector_output(path)
    payload: dict[str, Any] = {
        "format_version": DETECTORS_FORMAT_VERSION,
        PARAMS_KEY: params.to_dict(),
    }
    if calibration is not None:
        payload["calibration"] = dict(calibration)
    write_text_atomic(target, json.dumps(payload, indent=2, allow_nan=False) + "\n")
    return target


def check_detector_output(path: str | os.PathLike[str]) -> Path:
    """Return ``path`` as a Path, raising ConfigError unless a detector file may be written there.

    The path must be new or an earlier detector file, in an existing folder, so that no other
    file is overwritten.
    """
    target = Path(path)
    if target.is_dir():
        raise ConfigError(
            f"detector file {target} is a folder; pass a file name such as "
            f"{target / 'detectors.json'}"
        )
    if not target.parent.is_dir():
        raise ConfigError(
            f"the folder of detector file {target} does not exist; create it or pass another path"
        )
    if target.exists() and not _is_detector_file(target):
        raise ConfigError(
            f"{target} already exists and is not a detector file, so it is left alone; pass "
            "another --out"
        )
    return target


def _is_detector_file(path: Path) -> bool:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(payload, dict) and PARAMS_KEY in payload and "runs" not in payload


def read_detector_file(path: str | os.PathLike[str]) -> DetectorParams:
    """Read the detector parameters of a file written by ``calibrate`` (or an events.json).

    Raises ConfigError naming the file and the problem: missing, not JSON, without a
    ``detector_params`` object, an unknown key, a value of the wrong type or out of range.
    """
    source = Path(path)
    if not source.is_file():
        problem = "is a folder" if source.is_dir() else "does not exist"
        raise ConfigError(
            f"detector file {source} {problem}; pass a JSON file written by stabilitylab calibrate"
        )
    try:
        payload = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"detector file {source} is not valid JSON ({error})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get(PARAMS_KEY), dict):
        raise ConfigError(
            f"detector file {source} has no {PARAMS_KEY!r} object; pass a JSON file written by "
            "stabilitylab calibrate"
        )
    # An events.json (it lists "runs") has its own format version, and only its
    # detector_params object is read.
    version = payload.get("format_version", DETECTORS_FORMAT_VERSION)
    if "runs" not in payload and version != DETECTORS_FORMAT_VERSION:
        raise ConfigError(
            f"detector file {source} has format_version {version!r}; this stabilitylab reads "
            f"version {DETECTORS_FORMAT_VERSION}"
        )
    try:
        return detector_params_from_dict(payload[PARAMS_KEY])
    except ConfigError as error:
        raise ConfigError(f"detector file {source}: {error}") from None


def detector_params_from_dict(values: Mapping[str, Any]) -> DetectorParams:
    """Build DetectorParams from a mapping shaped as :meth:`DetectorParams.to_dict`.

    Raises ConfigError for an unknown key, a wrongly typed value or an invalid parameter.
    """
    return _build(DetectorParams, values, PARAMS_KEY)


def _build(cls: type, values: Any, where: str) -> Any:
    """Build the dataclass ``cls`` from ``values``, recursing into dataclass-valued fields."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} is {values!r}, expected a JSON object")
    fields = {item.name: item for item in dataclasses.fields(cls) if item.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where} has unknown keys {unknown}; known keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    defaults = cls()
    arguments = {}
    for name, value in values.items():
        key = f"{where}.{name}"
        default = getattr(defaults, name)
        hint = hints.get(name)
        if dataclasses.is_dataclass(hint):
            arguments[name] = _build(hint, value, key)
        else:
            arguments[name] = _convert(value, default, key)
    try:
        return cls(**arguments)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def _convert(value: Any, default: Any, where: str) -> Any:
    """Check ``value`` against the type of the field's default and convert JSON lists."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} is {value!r}, expected true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} is {value!r}, expected a whole number")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} is {value!r}, expected a number")
        if not math.isfinite(value):
            raise ConfigError(f"{where} is {value!r}, expected a finite number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where} is {value!r}, expected a string")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{where} is {value!r}, expected a list")
        return tuple(value)
    return value
