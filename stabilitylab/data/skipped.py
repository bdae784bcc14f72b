"""The unreadable image files a run skips, listed in ``RUN_DIR/skipped_images.json``.

With ``--skip-bad-images`` the file is written, atomically, as soon as the run directory
exists, with the files found while the data was built. Files found later, when a data
loader first reads them, are merged into it under an exclusive ``flock`` on the run
directory, so DataLoader worker processes can add entries at the same time without losing
any.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stabilitylab.atomic import write_text_atomic
from stabilitylab.runs import SKIPPED_IMAGES_FILE

log = logging.getLogger(__name__)

EXAMPLES_KEPT = 20  # non-image file names listed in the JSON file; the count covers all


@dataclass(frozen=True)
class SkippedImage:
    """One image file left out of the data, and why."""

    path: str
    split: str  # "train" or "val"
    reason: str
    found: str  # "build" (while the data was built) or "loading" (by a data loader)


class SkippedImages:
    """The record of the image files a run skips, shared by its datasets.

    The object travels to DataLoader worker processes with the datasets. Each process keeps
    its own copy of the entries, and the JSON file in the run directory merges them all.
    """

    def __init__(self, data_dir: str, non_image_files: list[str]) -> None:
        self.data_dir = data_dir
        self.non_image_files = non_image_files
        self.entries: list[SkippedImage] = []
        self.run_dir: Path | None = None

    def add(self, path: str, split: str, reason: str, found: str) -> None:
        """Record that ``path`` is skipped; with a run directory attached, also in its file."""
        if any(entry.path == path for entry in self.entries):
            return
        entry = SkippedImage(path, split, reason, found)
        self.entries.append(entry)
        # Worker processes start from the main process's entries at every epoch, so the
        # file, not this copy, shows whether the skip is new and worth a warning.
        new = self._merge(entry) if self.run_dir is not None else True
        if found == "loading" and new:
            log.warning("skipped unreadable image file %s (%s)", path, reason)

    def attach(self, run_dir: Path) -> None:
        """Write the entries so far into ``run_dir``; later entries are merged into the file.

        Entries that the file lists already, from before a resume, are kept.
        """
        self.run_dir = Path(run_dir)
        with self._locked():
            listed = [SkippedImage(**item) for item in read_skipped_images(self.run_dir)]
            paths = {entry.path for entry in listed}
            merged = listed + [entry for entry in self.entries if entry.path not in paths]
            write_text_atomic(self.run_dir / SKIPPED_IMAGES_FILE, self._render(merged))

    def _merge(self, entry: SkippedImage) -> bool:
        """Add ``entry`` to the run directory's file; return False when it was listed already."""
        assert self.run_dir is not None
        with self._locked():
            listed = read_skipped_images(self.run_dir)
            if any(item["path"] == entry.path for item in listed):
                return False
            merged = [SkippedImage(**item) for item in listed] + [entry]
            write_text_atomic(self.run_dir / SKIPPED_IMAGES_FILE, self._render(merged))
            return True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive flock on the run directory, which every writer of the file takes."""
        assert self.run_dir is not None
        descriptor = os.open(self.run_dir, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # closing the descriptor releases the lock

    def _render(self, entries: list[SkippedImage]) -> str:
        payload: dict[str, Any] = {
            "data_dir": self.data_dir,
            "skipped_count": len(entries),
            "skipped": [asdict(entry) for entry in entries],
            "non_image_files_count": len(self.non_image_files),
            "non_image_files_examples": self.non_image_files[:EXAMPLES_KEPT],
        }
        return json.dumps(payload, indent=2) + "\n"


def read_skipped_images(run_dir: Path) -> list[dict[str, str]]:
    """Return the ``skipped`` entries of ``run_dir/skipped_images.json``, [] without the file."""
    try:
        payload = json.loads((Path(run_dir) / SKIPPED_IMAGES_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    return list(payload.get("skipped", []))
