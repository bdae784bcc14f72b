"""Open image files as 8-bit RGB, raising a DataError that names a file PIL cannot decode.

Every PIL mode becomes RGB the same way, in the order of :func:`to_rgb`:

- Transparent images (RGBA, LA, PA, and palette or grayscale images with a transparency key)
  are composited on white, so the result does not depend on the colour stored under fully
  transparent pixels.
- 16-bit grayscale is scaled from 0..65535 to 0..255; PIL's own conversion would clip every
  value above 255 to white. That is mode ``I;16*``, and mode ``I`` of a PGM file, which PIL
  stores that way for a maximum value above 255.
- 32-bit float grayscale (mode ``F``) is scaled from [0, 1] to 0..255, the range of float
  images in torchvision; PIL's own conversion would clip it to black. Values outside [0, 1]
  raise :class:`UnsupportedImageError`, and so does 32-bit integer grayscale (mode ``I`` of
  a TIFF file), whose range has no fixed 8-bit scale: 8-bit values stored in 32 bits and
  full-range data need different ones.
- Grayscale, bilevel, palette, CMYK and the other modes use PIL's ``convert("RGB")``.

A file that PIL reads in another format than its extension names (a PNG saved as ``.jpg``)
is decoded by its content, and :func:`format_mismatch` returns whether that happened.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from stabilitylab.errors import DataError

# The formats each image extension of torchvision's IMG_EXTENSIONS normally contains.
EXTENSION_FORMATS = {
    ".jpg": {"JPEG", "MPO"},
    ".jpeg": {"JPEG", "MPO"},
    ".png": {"PNG"},
    ".ppm": {"PPM"},
    ".pgm": {"PPM"},
    ".bmp": {"BMP"},
    ".tif": {"TIFF"},
    ".tiff": {"TIFF"},
    ".webp": {"WEBP"},
}
WHITE = (255, 255, 255, 255)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
NAMED_FILES = 5  # unreadable files of each split named in one message
# The fix that an unreadable file's error gives, for a new run and for a resumed one. A
# resume rejects --skip-bad-images when the run was started without it, and rejects a
# training split of another size, so there the file can only be replaced.
NEW_RUN_FIX = "remove or replace {it}, or pass --skip-bad-images to skip unreadable files"
RESUME_FIX = (
    "replace {it} with {readable} and resume again. A resumed run cannot add "
    "--skip-bad-images, and removing {files} changes the data it trains on, so skipping "
    "{it} takes a new run with --skip-bad-images"
)


def unreadable_fix(count: int, resumed: bool) -> str:
    """Return what to do about ``count`` unreadable image files, for a new or resumed run."""
    if count == 1:
        words = {"it": "it", "readable": "a readable image", "files": "the file"}
    else:
        words = {"it": "them", "readable": "readable images", "files": "the files"}
    return (RESUME_FIX if resumed else NEW_RUN_FIX).format(**words)


def unreadable_message(path: str, reason: str, resumed: bool = False) -> str:
    """Return the error message for one unreadable image file, for a new or resumed run."""
    return f"image file {path} cannot be read ({reason}); {unreadable_fix(1, resumed)}"


class UnreadableImagesError(DataError):
    """The unreadable files that decoding a whole folder found, as (split, path, reason).

    Up to ``NAMED_FILES`` files of each split are named in the message.
    """

    def __init__(self, files: list[tuple[str, str, str]], resumed: bool = False) -> None:
        super().__init__(_unreadable_files_message(files, resumed))
        self.files = files

    def for_resume(self) -> UnreadableImagesError:
        """Return the same error with the fixes that a resumed run allows."""
        return UnreadableImagesError(self.files, resumed=True)


def _unreadable_files_message(files: list[tuple[str, str, str]], resumed: bool) -> str:
    splits = list(dict.fromkeys(split for split, _, _ in files))
    counts = []
    named = []
    for split in splits:
        members = [(path, reason) for name, path, reason in files if name == split]
        counts.append(f"{len(members)} of the {split} split")
        named += [f"{path} ({reason})" for path, reason in members[:NAMED_FILES]]
        if len(members) > NAMED_FILES:
            named.append(f"{len(members) - NAMED_FILES} more of the {split} split")
    noun = "image file" if len(files) == 1 else "image files"
    if len(splits) == 1:
        head = f"{len(files)} {noun} of the {splits[0]} split cannot be read"
    else:
        head = f"{len(files)} {noun} cannot be read, {' and '.join(counts)}"
    return f"{head}: {'; '.join(named)}; {unreadable_fix(len(files), resumed)}"


class UnsupportedImageError(DataError):
    """An image whose pixel mode or values have no conversion to 8-bit RGB."""


class UnreadableImageError(DataError):
    """An image file that PIL cannot decode, with its ``path`` and the ``reason``.

    The message is the only required argument, so that a DataLoader worker can re-raise the
    error in the main process.
    """

    def __init__(self, message: str, path: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class DecodedImage:
    """An image file decoded to RGB, with the format PIL found in its content."""

    image: Image.Image
    format: str | None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert ``image`` of any PIL mode to RGB, compositing transparency on white.

    Raises UnsupportedImageError for 32-bit integer pixels and for float pixels outside
    [0, 1], which have no 8-bit scale that keeps their content.
    """
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    elif image.mode in ("L", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA")
    elif image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PPM"):
        pixels = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(_to_uint8(pixels / 257.0))  # mode L
    elif image.mode == "I":
        raise UnsupportedImageError(
            "it has 32-bit integer pixels in PIL mode I, which have no fixed scale to 8 bits; "
            "save it as an 8- or 16-bit image"
        )
    elif image.mode == "F":
        image = Image.fromarray(_to_uint8(_unit_floats(np.asarray(image)) * 255.0))  # mode L
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _unit_floats(pixels: np.ndarray) -> np.ndarray:
    """Return float pixels as float64; raise UnsupportedImageError unless all are in [0, 1]."""
    pixels = pixels.astype(np.float64)
    if not np.isfinite(pixels).all():
        raise UnsupportedImageError(
            "it has 32-bit float pixels in PIL mode F that are NaN or infinite; replace them"
        )
    low, high = float(pixels.min()), float(pixels.max())
    if low < 0 or high > 1:
        raise UnsupportedImageError(
            f"it has 32-bit float pixels in PIL mode F from {low:g} to {high:g}, but float "
            "images must be in [0, 1]; rescale it to [0, 1], or save it as an 8- or 16-bit "
            "image"
        )
    return pixels


def decode_rgb(path: str) -> DecodedImage:
    """Decode the image file at ``path`` to RGB; raise UnreadableImageError naming it.

    Raises for an empty file, a file in no format PIL reads (text saved as ``.jpg``, for
    one), a truncated file, any other decoding error, and pixels that :func:`to_rgb`
    cannot convert.
    """
    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                reason = "the file is empty (0 bytes)"
            else:
                # NOTE: PIL decodes truncated files without an error when some other code has
                # set PIL.ImageFile.LOAD_TRUNCATED_IMAGES to True; its default is False.
                image = Image.open(handle)
                image.load()  # decode now, while the file is open
                return DecodedImage(to_rgb(image), image.format)
    except UnidentifiedImageError:
        reason = "not in an image format PIL can read"
    except UnsupportedImageError as error:
        reason = str(error)
    except Image.DecompressionBombError as error:
        reason = str(error)
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # Such as "image file is truncated (12 bytes not processed)".
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
    raise UnreadableImageError(unreadable_message(path, reason), path=path, reason=reason)


def load_rgb(path: str) -> Image.Image:
    """Open an image file as RGB, raising UnreadableImageError for a file PIL cannot read."""
    return decode_rgb(path).image


def format_mismatch(path: str, image_format: str | None) -> bool:
    """Tell whether a decoded file's content format differs from what its extension names."""
    expected = EXTENSION_FORMATS.get(os.path.splitext(path)[1].lower())
    return expected is not None and image_format is not None and image_format not in expected
