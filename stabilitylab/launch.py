"""The torchrun environment variables of a process, read without importing torch.

The command line reads it for every command, and ``stabilitylab report`` should not pay
for importing torch.
"""

from __future__ import annotations

import os


def launched_by_torchrun() -> bool:
    """Tell whether the environment of this process was set by torchrun (or a launcher like it)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def launched_rank_and_size() -> tuple[int, int]:
    """Return the RANK and WORLD_SIZE torchrun set, (0, 1) without them or when unreadable."""
    if not launched_by_torchrun():
        return 0, 1
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        return 0, 1  # init_from_environment names the bad value
