"""Open image files as 8-bit RGB, raising a DataError that names a file PIL cannot decode.

Every PIL mode becomes RGB the same way, in the order of :func:`to_rgb`:

- Transparent images (RGBA, LA, PA, and palette or grayscale images with a transparency key)
  are composited on white, so the result does not depend on the colour stored under fully
  transparent pixels.
- 16-bit grayscale (modes ``I;16*`` and ``I``) is scaled from 0..65535 to 0..255; PIL's own
  conversion would clip every value above 255 to white.
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
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


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
    """Convert ``image`` of any PIL mode to RGB, compositing transparency on white."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    elif image.mode in ("L", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA")
    elif image.mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        scaled = np.clip(np.rint(pixels / 257.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(scaled)  # mode L
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_rgb(path: str) -> DecodedImage:
    """Decode the image file at ``path`` to RGB; raise UnreadableImageError naming it.

    Raises for an empty file, a file in no format PIL reads (text saved as ``.jpg``, for
    one), a truncated file and any other decoding error.
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
    except Image.DecompressionBombError as error:
        reason = str(error)
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # Such as "image file is truncated (12 bytes not processed)".
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
    raise UnreadableImageError(
        f"image file {path} cannot be read ({reason}); remove or replace it, or pass "
        "--skip-bad-images to skip unreadable files",
        path=path,
        reason=reason,
    )


def load_rgb(path: str) -> Image.Image:
    """Open an image file as RGB, raising UnreadableImageError for a file PIL cannot read."""
    return decode_rgb(path).image


def format_mismatch(path: str, image_format: str | None) -> bool:
    """Tell whether a decoded file's content format differs from what its extension names."""
    expected = EXTENSION_FORMATS.get(os.path.splitext(path)[1].lower())
    return expected is not None and image_format is not None and image_format not in expected
