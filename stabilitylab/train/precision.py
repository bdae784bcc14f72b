"""Autocast and gradient scaling for fp32, bf16 and fp16 training."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from stabilitylab.errors import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_factory(
    precision: str, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager]:
    """Return a function that opens the autocast context for ``precision`` on ``device``."""
    if precision == "fp32":
        return contextlib.nullcontext
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            "--precision fp16 needs a CUDA device; on the CPU pass --precision bf16 or fp32"
        )
    dtype = _DTYPES[precision]
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def build_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Build a gradient scaler that is active only for fp16, where small gradients underflow."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def scale_tensor(scaler: torch.amp.GradScaler, device: torch.device) -> torch.Tensor | None:
    """Return the loss scale as a device tensor (no host sync), or None when not scaling."""
    if not scaler.is_enabled():
        return None
    # NOTE: _get_scale_async is private in torch 2.x; get_scale() would sync every step.
    return scaler._get_scale_async()
