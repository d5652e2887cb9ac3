"""Aspect-ratio buckets: a fixed list of image sizes of about one pixel budget, and which of
them an image of a given size goes to.

Training on squares only crops every wide or tall image to its middle; editing such an image
at its own size compiles a program for each new shape. Buckets (as SDXL and kohya's scripts
train) take the middle road: a short list of sizes of about `area` pixels, sides multiples of
`step` (the model's size factor: 64 for SD-1.x, whose VAE halves three times and UNet three
times), aspect ratios from 1:`max_ratio` to `max_ratio`:1. For 256 x 256 and step 64:

    128x512 128x448 128x384 192x320 256x256 320x192 384x128 448x128 512x128   (width x height)

An image goes to the bucket whose aspect ratio is nearest its own in log scale (ties: the
larger bucket, then the wider). The comparison is exact (fractions, no floats), so every
process and machine assigns the same bucket. Everything here is a pure function.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, NamedTuple

from PIL import Image


class Bucket(NamedTuple):
    """One training or editing size, in pixels (PIL's order: width, height)."""

    width: int
    height: int

    @property
    def aspect(self) -> Fraction:
        """width / height, exactly."""
        return Fraction(self.width, self.height)

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def bucket_list(area: int, step: int = 64, max_ratio: float = 4.0) -> tuple[Bucket, ...]:
    """The buckets of a pixel budget, narrowest (tallest) first.

    For each width w that is a multiple of `step`, the tallest height h, a multiple of `step`
    too, with w * h <= `area`; the landscape sizes (w >= h) with w / h <= `max_ratio`, and
    each one turned upright. The largest square of the budget is always one of them."""
    if step < 1 or area < step * step:
        raise ValueError(
            f"a bucket area of {area} pixels holds no {step}x{step} square: "
            f"the area must be at least step**2 = {step * step}"
        )
    if max_ratio < 1:
        raise ValueError(f"max_ratio is the longer side over the shorter: >= 1, got {max_ratio}")
    landscape = []
    for width in range(step, area // step + 1, step):
        height = area // width // step * step
        if height and height <= width and width <= max_ratio * height:
            landscape.append(Bucket(width, height))
    both = {*landscape, *(Bucket(b.height, b.width) for b in landscape)}
    return tuple(sorted(both, key=lambda b: (b.aspect, b.width)))


def nearest_bucket(width: int, height: int, buckets: tuple[Bucket, ...]) -> Bucket:
    """The bucket whose aspect ratio is nearest `width` / `height` in log scale: the one with
    the smallest max(r, 1/r), r = aspect / bucket's aspect. Ties go to the larger bucket,
    then to the wider."""
    if width < 1 or height < 1:
        raise ValueError(f"an image of {width}x{height} pixels has no aspect ratio")
    if not buckets:
        raise ValueError("no buckets to choose from")
    aspect = Fraction(width, height)

    def distance(bucket: Bucket) -> tuple[Fraction, int, int]:
        ratio = aspect / bucket.aspect
        return max(ratio, 1 / ratio), -bucket.width * bucket.height, -bucket.width

    return min(buckets, key=distance)


def size_multiple(unet_config: Any, vae_config: Any) -> int:
    """The factor a model's image sides should be a multiple of: the VAE's downsampling times
    the UNet's (2 ** (blocks - 1) each; 8 * 8 = 64 for SD-1.x and 2.x, 8 * 4 = 32 for SDXL),
    so that every UNet level has whole latent pixels."""
    return 2 ** (len(vae_config.block_out_channels) - 1) * 2 ** (
        len(unet_config.block_out_channels) - 1
    )


def resize_to_bucket(image: Image.Image, bucket: Bucket) -> Image.Image:
    """`image` resized to the bucket's size (Lanczos), its aspect ratio changed by the small
    gap between its own and the bucket's: for editing, where the output is resized back to
    the input's size (:func:`restore_size`), so nothing is cropped away and the edit lines
    up with the input pixel for pixel."""
    return image if image.size == tuple(bucket) else image.resize(bucket, Image.LANCZOS)


def restore_size(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """An output made at a bucket's size back at its input's (width, height)."""
    return image if image.size == tuple(size) else image.resize(size, Image.LANCZOS)


def describe(buckets: tuple[Bucket, ...]) -> str:
    """'128x512 192x320 ...': the list as the logs and docs write it."""
    return " ".join(map(str, buckets))
