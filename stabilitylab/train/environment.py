"""Facts about the software and hardware a run used, stored in ``config.json``."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy
import timm
import torch
import torchvision

import stabilitylab

if TYPE_CHECKING:
    from stabilitylab.train.distributed import ProcessGroup


def _git_revision() -> str | None:
    source = Path(stabilitylab.__file__).resolve().parent.parent
    try:
        result = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def describe_environment(
    device: torch.device, seed: int, group: ProcessGroup | None = None
) -> dict[str, Any]:
    info: dict[str, Any] = {
        "stabilitylab": stabilitylab.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "world_size": group.world_size if group is not None else 1,
        "seed": seed,
        "git_revision": _git_revision(),
        "command": sys.argv,
    }
    if group is not None and group.world_size > 1:
        info["distributed"] = group.to_dict()
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; an unavailable GPU is an error."""
    from stabilitylab.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {name} requested but no CUDA GPU is available; pass --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {name} requested but only {torch.cuda.device_count()} GPUs are visible"
            )
    return device
