"""Decoding and paired augmentation of one edit pair: both images get the same resize, the
same random crop and the same flip, or the edit the pair teaches would be corrupted; and
word dropout on its instruction."""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ip2p_jax.pipelines.images import to_rgb


class BadExample(ValueError):
    """An example the input pipeline skips; `reason` is a short tag counted per epoch."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Augmentation:
    """The original training's augmentation: resize the short side to a random size in
    [min_resize, max_resize], take a random crop x crop square, flip left-right with
    probability flip_prob (the paper's recipe: 256, 256, 256, 0.5)."""

    crop: int = 256
    min_resize: int = 256
    max_resize: int = 256
    flip_prob: float = 0.5

    def __post_init__(self):
        if not 0 < self.crop <= self.min_resize <= self.max_resize:
            raise ValueError(
                f"need 0 < crop <= min_resize <= max_resize, got crop={self.crop}, "
                f"min_resize={self.min_resize}, max_resize={self.max_resize}"
            )
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")


def check_instruction(example: Mapping[str, Any]) -> None:
    """BadExample('empty_instruction') when the example says nothing to change."""
    if not example["instruction"].strip():
        raise BadExample("empty_instruction", "instruction is empty")


def decode_image(data: bytes, field: str) -> Image.Image:
    """PIL RGB image from encoded bytes; BadExample('corrupt_image') when unreadable."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadExample("corrupt_image", f"{field}: {err}") from err
    if image.width == 0 or image.height == 0:
        raise BadExample("corrupt_image", f"{field}: zero size")
    return to_rgb(image)


def decode_pair(example: Mapping[str, Any]) -> tuple[Image.Image, Image.Image]:
    """The (input, edited) images of an example; they must have the same size."""
    before = decode_image(example["input_image"], "input_image")
    after = decode_image(example["edited_image"], "edited_image")
    if before.size != after.size:
        raise BadExample(
            "size_mismatch", f"input {before.size} vs edited {after.size} (width, height)"
        )
    return before, after


def augment_pair(
    before: Image.Image,
    after: Image.Image,
    augmentation: Augmentation,
    rng: np.random.Generator,
    size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The same random resize, crop and flip on both images; uint8 (crop, crop, 3) arrays,
    or (height, width, 3) for a `size` (width, height): an aspect-ratio bucket's.

    The images are resized to cover the crop scaled by short / crop, for `short` drawn from
    [min_resize, max_resize]: for a square crop, the short side resized to `short` (the
    paper's recipe); for a bucket, the same scale, so a bucket sees the zoom a square does."""
    crop_width, crop_height = size or (augmentation.crop, augmentation.crop)
    short = int(rng.integers(augmentation.min_resize, augmentation.max_resize + 1))
    cover = (crop_width * short // augmentation.crop, crop_height * short // augmentation.crop)
    arrays = [_resize_to_cover(image, *cover) for image in (before, after)]
    height, width = arrays[0].shape[:2]
    top = int(rng.integers(0, height - crop_height + 1))
    left = int(rng.integers(0, width - crop_width + 1))
    flip = bool(rng.random() < augmentation.flip_prob)
    out = []
    for array in arrays:
        array = array[top : top + crop_height, left : left + crop_width]
        out.append(np.ascontiguousarray(array[:, ::-1] if flip else array))
    return out[0], out[1]


def _resize_to_cover(image: Image.Image, cover_width: int, cover_height: int) -> np.ndarray:
    """The image scaled (aspect kept) to the smallest size that covers cover_width x
    cover_height; for a square cover, its short side resized to the square's side."""
    width, height = image.size
    scale = max(cover_width / width, cover_height / height)
    size = (max(cover_width, round(width * scale)), max(cover_height, round(height * scale)))
    if size != image.size:  # already the right size: keep the exact pixels
        image = image.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def drop_words(instruction: str, probability: float, rng: np.random.Generator) -> str:
    """The instruction with each (whitespace-separated) word left out with `probability`;
    the whole instruction where every word would go, so the text never becomes empty (the
    empty text is the null condition that dropout of the text trains)."""
    words = instruction.split()
    dropped = rng.random(len(words)) < probability
    kept = [word for word, drop in zip(words, dropped, strict=True) if not drop]
    return " ".join(kept) if kept else instruction
