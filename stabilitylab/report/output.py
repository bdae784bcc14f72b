"""Atomic writes of report files: each file appears complete or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

REPORT_FILE_MODE = 0o644


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file in the same folder, then rename it over ``path``."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file as 0600, and a report is meant to be read by others.
        os.fchmod(fd, REPORT_FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8 with :func:`write_bytes_atomic`."""
    write_bytes_atomic(path, text.encode("utf-8"))
