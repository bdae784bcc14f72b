"""Check and convert the ``config`` of a :class:`stabilitylab.Monitor` for ``config.json``.

``config.json`` is strict JSON, so that any JSON reader can load it and the values keep
their types: an lr stays a number, which ``compare_runs`` sorts and the report prints.
:func:`json_config` converts the scalar types that training code commonly passes and
rejects everything else before the run directory is created:

- numpy scalars (``np.float32(1e-3)``, ``np.int64(3)``, ``np.bool_``) become Python numbers
  and booleans;
- a tensor with one element (``torch.tensor(1e-3)``) becomes its Python number;
- tuples become lists, and nested dicts and lists are converted item by item;
- NaN and infinite floats, sets, arrays, modules and other objects raise ConfigError naming
  the key, because JSON has no value for them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from stabilitylab.errors import ConfigError


def json_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``config`` with every value converted to a JSON type; see the module docs.

    Raises ConfigError naming the key (``config['a']['b']`` for a nested one) of the first
    value that has no JSON form, or of a key that is not a str.
    """
    return _convert_mapping(config, "config")


def _convert(value: Any, where: str) -> Any:
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _finite(float(value), where)
    if isinstance(value, np.generic):
        return _convert_numpy(value, where)
    if isinstance(value, torch.Tensor):
        return _convert_tensor(value, where)
    if isinstance(value, Mapping):
        return _convert_mapping(value, where)
    if isinstance(value, list | tuple):
        return [_convert(item, f"{where}[{index}]") for index, item in enumerate(value)]
    raise ConfigError(
        f"{where} is a {type(value).__name__} ({_short_repr(value)}), which config.json cannot "
        "store; pass a number, str, bool, None, or a list or dict of them (str(value) for a "
        "path, a list for a set)"
    )


def _convert_mapping(mapping: Mapping[Any, Any], where: str) -> dict[str, Any]:
    converted = {}
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise ConfigError(
                f"{where} key {key!r} is a {type(key).__name__}; config.json needs str keys"
            )
        converted[key] = _convert(value, f"{where}[{key!r}]")
    return converted


def _convert_numpy(value: np.generic, where: str) -> Any:
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return _finite(float(value), where)
    if isinstance(value, np.str_):
        return str(value)
    raise ConfigError(
        f"{where} is a numpy {type(value).__name__} ({_short_repr(value)}), which config.json "
        "cannot store; pass a Python number or str"
    )


def _convert_tensor(value: torch.Tensor, where: str) -> Any:
    if value.numel() != 1:
        raise ConfigError(
            f"{where} is a tensor of shape {tuple(value.shape)}, which config.json cannot "
            "store; pass a number, or value.tolist() for a short list"
        )
    number = value.detach().cpu().reshape(()).item()
    if isinstance(number, bool):
        return number
    if isinstance(number, int):
        return number
    if isinstance(number, float):
        return _finite(number, where)
    raise ConfigError(
        f"{where} is a {value.dtype} tensor, which config.json cannot store; pass a real number"
    )


def _finite(number: float, where: str) -> float:
    if not math.isfinite(number):
        raise ConfigError(
            f"{where} is {number}, which strict JSON cannot store; pass a finite number, None, "
            f"or a str such as {str(number)!r}"
        )
    return number


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
