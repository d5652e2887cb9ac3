"""Images in and out: reading with clear errors, orientation and mode fixes, resizing to a
model-friendly size, and the [-1, 1] arrays the VAE takes."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_RESOLUTION = 2048  # the long side we sample at, at most; larger requests are capped
MAX_INPUT_PIXELS = 16384 * 16384  # refuse to decode anything larger (decompression bombs)
ORIENTATION_TAG = 0x0112  # EXIF's


class ImageError(ValueError):
    """An input image that cannot be used, with the reason and the file when known."""


def load_image(source: str | os.PathLike | Image.Image) -> Image.Image:
    """Opens an image file (or passes a PIL image through), fully decoded, with EXIF
    orientation applied. Unreadable, corrupt, empty or enormous files are an ImageError."""
    if isinstance(source, Image.Image):
        image = source
    else:
        with _opened(Path(source), decode=True) as image:
            pass
    _check_not_empty(image, "the given image" if isinstance(source, Image.Image) else source)
    return to_rgb(ImageOps.exif_transpose(image))


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """The (width, height) :func:`load_image` gives the file, read from its header alone
    (EXIF orientation applied): for planning a batch before decoding it. The same errors."""
    with _opened(Path(path), decode=False) as image:
        _check_not_empty(image, path)
        width, height = image.size
        # EXIF orientations 5 to 8 turn the image a quarter: load_image swaps the sides.
        turned = image.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8)
    return (height, width) if turned else (width, height)


@contextlib.contextmanager
def _opened(path: Path, decode: bool) -> Iterator[Image.Image]:
    """The opened image (decoded when `decode`, else closed after use), errors turned into
    ImageError."""
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            if image.width * image.height > MAX_INPUT_PIXELS:
                raise ImageError(
                    f"{path}: {image.width}x{image.height} is too large to edit "
                    f"(at most {MAX_INPUT_PIXELS} pixels); downscale it first"
                )
            if decode:
                image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageError(f"{path}: not a readable image ({err})") from err
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ImageError(f"{path}: too large to decode safely ({err})") from err
    try:
        yield image
    finally:
        if not decode:  # the header read leaves the file open
            image.close()


def _check_not_empty(image: Image.Image, name: object) -> None:
    if image.width == 0 or image.height == 0:
        raise ImageError(f"{name} has zero size ({image.width}x{image.height})")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparent areas (RGBA, LA, P with transparency) laid on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, P, CMYK, I;16, ...


def target_size(width: int, height: int, resolution: int, multiple: int) -> tuple[int, int]:
    """(width, height) with the long side near ``resolution`` and both sides multiples of
    ``multiple`` (8 for the VAE; 64 as the original's option), aspect ratio kept."""
    if resolution > MAX_RESOLUTION:
        warnings.warn(f"resolution {resolution} capped at {MAX_RESOLUTION}", stacklevel=3)
        resolution = MAX_RESOLUTION
    if resolution < multiple:
        raise ValueError(f"resolution {resolution} is below the size multiple {multiple}")
    scale = resolution / max(width, height)
    fit = lambda side: max(multiple, int(round(side * scale / multiple)) * multiple)
    return fit(width), fit(height)


def to_model_array(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """[H, W, 3] float32 in [-1, 1] at ``size`` (Lanczos; untouched if already that size)."""
    if image.size != size:
        image = image.resize(size, Image.LANCZOS)
    return np.asarray(image, np.float32) / 127.5 - 1.0


def to_pil(array: np.ndarray, size: tuple[int, int] | None = None) -> Image.Image:
    """A decoded [H, W, 3] array in [-1, 1] -> uint8 image as diffusers rounds it, optionally
    resized back to ``size``."""
    pixels = np.clip(array / 2 + 0.5, 0, 1)
    image = Image.fromarray((pixels * 255).round().astype(np.uint8))
    if size is not None and image.size != tuple(size):
        image = image.resize(tuple(size), Image.LANCZOS)
    return image


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 RGB array (lossless, so decoding gives the same pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Inverse of encode_png (any encoded image, in fact): (H, W, 3) uint8."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))
