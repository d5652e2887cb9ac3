"""Shared samples and pixel regions for the shapes-world tests."""

from __future__ import annotations

from functools import cache

import numpy as np

from ip2p_jax.worlds import shapes as S


@cache
def records(split: str, num: int) -> tuple[S.EditRecord, ...]:
    """Shared samples (records are cheap; no rendering)."""
    return tuple(S.generate_records(num, split=split, seed=0))


def region(shape: S.Shape, size: int) -> np.ndarray:
    """Pixels whose centre lies within the shape's circle grown by 0.75 px: every pixel the
    shape touches, and (by the GAP between shapes) none another shape touches."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    return np.hypot(xs - shape.x * size, ys - shape.y * size) <= shape.radius * size + 0.75
