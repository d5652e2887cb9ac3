"""Rasterising scenes: each pixel averages SUPERSAMPLE**2 point samples, so fully covered
pixels keep exact palette colours and only edge pixels blend."""

from __future__ import annotations

import math

import numpy as np

from ip2p_jax.worlds.shapes.outlines import inside_unit
from ip2p_jax.worlds.shapes.palette import COLOURS
from ip2p_jax.worlds.shapes.scene import Scene, Shape

SUPERSAMPLE = 4  # point samples per pixel side


def shape_bbox(shape: Shape, size: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1), half-open, that holds every pixel the shape touches."""
    r = shape.radius
    x0 = max(0, math.floor((shape.x - r) * size))
    y0 = max(0, math.floor((shape.y - r) * size))
    x1 = min(size, math.ceil((shape.x + r) * size))
    y1 = min(size, math.ceil((shape.y + r) * size))
    return x0, y0, x1, y1


def _box_coverage(
    shape: Shape, size: int, box: tuple[int, int, int, int], supersample: int
) -> np.ndarray:
    x0, y0, x1, y1 = box
    step = size * supersample
    u = ((np.arange(x0 * supersample, x1 * supersample) + 0.5) / step - shape.x) / shape.radius
    v = ((np.arange(y0 * supersample, y1 * supersample) + 0.5) / step - shape.y) / shape.radius
    inside = inside_unit(shape.kind, u[None, :], v[:, None])
    counts = inside.reshape(y1 - y0, supersample, x1 - x0, supersample).sum(axis=(1, 3))
    return counts / float(supersample * supersample)  # exact multiples of 1/supersample**2


def shape_coverage(shape: Shape, size: int = 64, *, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """(size, size) float array: the fraction of each pixel the shape covers, as rendered;
    1.0 exactly where the rendered pixel has exactly the shape's colour."""
    out = np.zeros((size, size))
    box = shape_bbox(shape, size)
    x0, y0, x1, y1 = box
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = _box_coverage(shape, size, box, supersample)
    return out


def _background(scene: Scene, size: int, supersample: int) -> np.ndarray:
    top = np.asarray(COLOURS[scene.background], dtype=np.float64)
    out = np.empty((size, size, 3))
    if scene.background_bottom is None:
        out[:] = top
        return out
    bottom = np.asarray(COLOURS[scene.background_bottom], dtype=np.float64)
    # Share of each row above y = 0.5: 1 or 0, except the middle row of an odd size.
    samples = (np.arange(size * supersample) + 0.5) / (size * supersample) < 0.5
    top_share = samples.reshape(size, supersample).mean(axis=1)
    out[:] = (bottom + (top - bottom) * top_share[:, None])[:, None, :]
    return out


def render(scene: Scene, size: int = 64, *, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """The scene as a (size, size, 3) uint8 array, deterministic; anti-aliased by averaging
    supersample**2 point samples per pixel (fully covered pixels keep exact colours)."""
    if size < 8:
        raise ValueError(f"image size {size} is too small; use 8 or more (64 and up is typical)")
    image = _background(scene, size, supersample)
    for shape in scene.shapes:
        box = shape_bbox(shape, size)
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            continue
        coverage = _box_coverage(shape, size, box, supersample)[..., None]
        patch = image[y0:y1, x0:x1]  # a view: blended in place
        patch += (np.asarray(COLOURS[shape.colour], dtype=np.float64) - patch) * coverage
    return np.rint(image).astype(np.uint8)
