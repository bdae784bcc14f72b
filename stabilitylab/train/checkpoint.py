"""Checkpoints, written atomically and loaded with ``weights_only=True``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stabilitylab.atomic import atomic_target


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_target(path) as tmp_path:
        torch.save(state, tmp_path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only."""
    return torch.load(path, map_location=map_location, weights_only=True)
