"""The torchrun environment variables of a process, read without importing torch.

The command line reads it for every command, and ``stabilitylab report`` should not pay
for importing torch.
"""

from __future__ import annotations

import os

# Appended to a line from torchrun_command: torchrun passes its other options to no process.
TORCHRUN_OPTIONS_HINT = " (with the first launch's other torchrun options, such as --master_port)"


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


def torchrun_command(arguments: str) -> str:
    """Return the torchrun line that starts ``stabilitylab ARGUMENTS`` on this launch's processes.

    It names the node and per-node process counts that torchrun set (``GROUP_WORLD_SIZE``
    and ``LOCAL_WORLD_SIZE``), else ``WORLD_SIZE`` processes on one node. torchrun passes
    its other options, such as ``--master_port``, to no process, so they are left out.
    """
    world_size = launched_rank_and_size()[1]
    nodes = _environment_count("GROUP_WORLD_SIZE")
    per_node = _environment_count("LOCAL_WORLD_SIZE")
    if nodes > 1 and per_node:
        launch = f"torchrun --nnodes {nodes} --nproc_per_node {per_node}"
    else:
        launch = f"torchrun --nproc_per_node {per_node or world_size}"
    return f"{launch} -m stabilitylab {arguments}"


def _environment_count(name: str) -> int:
    try:
        return max(int(os.environ.get(name, "0")), 0)
    except ValueError:
        return 0
