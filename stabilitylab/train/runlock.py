"""The lock that keeps two processes from training into one run directory at once.

The training process holds an exclusive ``fcntl.flock`` on ``RUN_DIR/run.lock`` for as
long as it writes there. The operating system releases the lock when the process ends,
``kill -9`` included, so a killed run never leaves a stale lock behind. ``--resume`` and
``--overwrite`` raise RunDirError while another process holds it.

NOTE: ``fcntl`` exists on Linux and macOS only. Elsewhere no lock is taken, and nothing
stops a second process from writing into a run directory that is in use.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import TracebackType

from stabilitylab.errors import RunDirError
from stabilitylab.runs import LOCK_FILE

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


def _in_use_error(run_dir: Path) -> RunDirError:
    return RunDirError(
        f"{run_dir} is in use: another stabilitylab process is training into it and has "
        f"locked {LOCK_FILE}; wait for that run to end or stop it first"
    )


class RunLock:
    """Context manager holding the lock of one run directory, created if missing."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        if fcntl is None:
            return self
        fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _in_use_error(self.run_dir) from None
        self._fd = fd
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


def check_not_in_use(run_dir: Path) -> None:
    """Raise RunDirError when a process holds the lock of ``run_dir``; create no file."""
    path = Path(run_dir) / LOCK_FILE
    if fcntl is None or not path.is_file():
        return
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use_error(Path(run_dir)) from None
    finally:
        os.close(fd)
