"""Scan a class-folder tree (``ROOT/<class>/**/*.jpg``) as torchvision's ImageFolder does.

Three differences from torchvision's ImageFolder, which would otherwise turn notebook and
editor leftovers into classes or crash on them:

- Hidden entries (names starting with ``.``, such as ``.ipynb_checkpoints`` or
  ``.DS_Store``) are ignored, at the class level and inside class folders.
- Files without an image extension (torchvision's ``IMG_EXTENSIONS``) are skipped and
  counted, instead of silently dropped, and so are files next to the class folders.
- A class folder without images raises a DataError that names the folder.

Nothing is decoded here: the scan lists file names only, so it costs one directory walk.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from stabilitylab.data.images import load_rgb
from stabilitylab.errors import DataError


def is_hidden(name: str) -> bool:
    return name.startswith(".")


class ClassFolder(ImageFolder):
    """The image files of a class-folder tree, with hidden entries and non-image files left out.

    ``samples``, ``targets``, ``classes`` and ``class_to_idx`` are ImageFolder's;
    ``non_image_files`` lists the skipped files inside class folders, ``loose_files`` the
    files next to the class folders, and ``hidden_entries`` counts the hidden entries ignored.
    """

    def __init__(self, root: str | Path) -> None:
        self.non_image_files: list[str] = []
        self.loose_files: list[str] = []
        self.hidden_entries = 0
        if not Path(root).is_dir():
            raise DataError(f"image folder {root} does not exist or is not a folder")
        super().__init__(str(root), loader=load_rgb, is_valid_file=self.is_valid_file)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        """Return the sorted class folder names, hidden folders excluded, and their indices."""
        classes = []
        with os.scandir(directory) as entries:
            for entry in entries:
                if is_hidden(entry.name):
                    self.hidden_entries += 1
                elif entry.is_dir():
                    classes.append(entry.name)
                else:
                    self.loose_files.append(os.path.join(directory, entry.name))
        if not classes:
            raise DataError(
                f"image folder {directory} has no class folders; put the images of each class "
                f"in a folder of its own, {directory}/<class>/*.jpg"
            )
        classes.sort()
        self.loose_files.sort()
        return classes, {name: index for index, name in enumerate(classes)}

    def is_valid_file(self, path: str) -> bool:
        """Tell whether ``path`` is an image file to use, counting the files left out."""
        name = os.path.basename(path)
        if is_hidden(name):
            self.hidden_entries += 1
            return False
        if has_file_allowed_extension(name, IMG_EXTENSIONS):
            return True
        self.non_image_files.append(path)
        return False

    def make_dataset(  # type: ignore[override]
        self,
        directory: str | Path,
        class_to_idx: dict[str, int],
        extensions: Any = None,
        is_valid_file: Callable[[str], bool] | None = None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        """List (path, class index) of every image file, raising DataError for an empty class.

        ``extensions`` and ``allow_empty`` come from ImageFolder's call and are not used: the
        file test is :meth:`is_valid_file` and an empty class folder is always an error.
        """
        samples = []
        empty = []
        for name in sorted(class_to_idx):
            class_dir = os.path.join(directory, name)
            found = 0
            for folder, subfolders, files in os.walk(class_dir, followlinks=True):
                self.hidden_entries += sum(is_hidden(sub) for sub in subfolders)
                subfolders[:] = sorted(sub for sub in subfolders if not is_hidden(sub))
                for file_name in sorted(files):
                    path = os.path.join(folder, file_name)
                    if self.is_valid_file(path):
                        samples.append((path, class_to_idx[name]))
                        found += 1
            if found == 0:
                empty.append(class_dir)
        if empty:
            listed = ", ".join(empty[:5]) + (
                f" and {len(empty) - 5} more" if len(empty) > 5 else ""
            )
            subject = "class folder" if len(empty) == 1 else "class folders"
            verb = "contains" if len(empty) == 1 else "contain"
            raise DataError(
                f"{subject} {listed} {verb} no image files ({', '.join(IMG_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        return samples
