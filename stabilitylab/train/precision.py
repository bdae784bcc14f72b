"""Autocast and gradient scaling for fp32, bf16 and fp16 training.

bf16 autocast runs on the CPU and on CUDA, and needs no gradient scaling because bf16 has
the exponent range of fp32. fp16 autocast runs on CUDA only, with a ``torch.amp.GradScaler``
that multiplies the loss before backward so that small gradients do not underflow. The
scaler skips every step whose scaled gradients contain inf or NaN, halves its scale there,
and doubles it after ``growth_interval`` (2000) steps without one. The monitor records the
scale of every step (the ``loss_scale`` column) and the steps the scaler skipped.
"""

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


def scaler_overflow(
    scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer
) -> torch.Tensor | None:
    """Return the scaler's flag that the gradients of ``optimizer`` contain inf or NaN.

    Call it after ``scaler.unscale_(optimizer)`` and before ``scaler.update()``. The flag is
    a 0-dim float32 tensor on the scale's device (1.0 where the scaler skips the step), read
    without a host sync. Returns None when the scaler is disabled.
    """
    if not scaler.is_enabled():
        return None
    # NOTE: _found_inf_per_device is private in torch 2.x. It returns the flags that
    # unscale_ computed, one per device, which scaler.step and scaler.update read as well.
    per_device = scaler._found_inf_per_device(optimizer)
    if not per_device:
        raise RuntimeError("scaler_overflow() needs scaler.unscale_(optimizer) to run first")
    flags = [flag.to(scaler._scale.device, non_blocking=True) for flag in per_device.values()]
    return torch.stack(flags).amax().float()


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    skip: torch.Tensor | None = None,
) -> None:
    """Apply the optimiser step through ``scaler``, or leave it out where ``skip`` is set.

    With ``skip`` None the scaler decides, as ``scaler.step(optimizer)`` does. Otherwise
    ``skip`` is a 0-dim float32 device tensor, 1.0 to leave the weights and the optimiser
    state untouched. It must already include the scaler's own flag (:func:`scaler_overflow`),
    because the step is then taken directly, without ``scaler.step``. This needs an
    optimiser that reads a ``found_inf`` attribute in its step, such as ``AdamW`` built with
    ``fused=True``, so that no host sync decides whether to step.
    """
    if skip is None:
        scaler.step(optimizer)
        return
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        raise TypeError(
            f"{type(optimizer).__name__} ignores found_inf in its step; build it with fused=True "
            "to skip non-finite steps without a host sync"
        )
    # The fused AdamW kernel returns early where found_inf is 1, weight decay included, and
    # takes back its step-count increment, as it does for a GradScaler (torch 2.x).
    optimizer.found_inf = skip
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
