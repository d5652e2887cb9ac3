"""Each shape kind's outline in the unit circle, centroid at the origin, y pointing down:
which points lie inside, and the exact area."""

from __future__ import annotations

import math

import numpy as np

from ip2p_jax.worlds.shapes.palette import SHAPE_KINDS

_SQRT3 = math.sqrt(3.0)
_HALF_SQUARE = 1 / math.sqrt(2.0)
_DIAMOND_WIDTH = 0.65  # half-width; half-height is 1
_CROSS_HALF_THICKNESS = 0.35
_CROSS_HALF_LENGTH = 0.93  # corners at radius < 1
_STAR_INNER = 0.5  # inner vertices' radius; five points, one pointing up
_STAR_SECTOR = 2 * math.pi / 5
_STAR_B = (_STAR_INNER * math.cos(_STAR_SECTOR / 2), _STAR_INNER * math.sin(_STAR_SECTOR / 2))

UNIT_AREAS: dict[str, float] = {  # area of each kind at radius 1
    "circle": math.pi,
    "square": 2.0,
    "triangle": 3 * _SQRT3 / 4,
    "star": 5 * _STAR_INNER * math.sin(_STAR_SECTOR / 2),
    "diamond": 2 * _DIAMOND_WIDTH,
    "hexagon": 3 * _SQRT3 / 2,
    "cross": 8 * _CROSS_HALF_LENGTH * _CROSS_HALF_THICKNESS - 4 * _CROSS_HALF_THICKNESS**2,
}


def inside_unit(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Which points of the grid u (1, W) x v (H, 1) lie inside `kind` at radius 1."""
    au, av = np.abs(u), np.abs(v)
    if kind == "circle":
        return u * u + v * v <= 1.0
    if kind == "square":
        return (au <= _HALF_SQUARE) & (av <= _HALF_SQUARE)
    if kind == "diamond":
        return au / _DIAMOND_WIDTH + av <= 1.0
    if kind == "hexagon":  # pointy top and bottom
        return (au <= _SQRT3 / 2) & (av + au / _SQRT3 <= 1.0)
    if kind == "triangle":  # equilateral, apex up: its centroid is the circle's centre
        return (v <= 0.5) & (v >= _SQRT3 * au - 1.0)
    if kind == "cross":
        t, length = _CROSS_HALF_THICKNESS, _CROSS_HALF_LENGTH
        return ((au <= t) & (av <= length)) | ((av <= t) & (au <= length))
    if kind == "star":
        uu, vv = np.broadcast_arrays(u, v)
        # Fold the angle from "up" into one half-sector, then test against the edge from the
        # outer vertex (1, 0) to the inner vertex _STAR_B.
        angle = np.arctan2(uu, -vv) % _STAR_SECTOR
        fold = np.minimum(angle, _STAR_SECTOR - angle)
        radius = np.hypot(uu, vv)
        px, py = radius * np.cos(fold), radius * np.sin(fold)
        bx, by = _STAR_B
        return (bx - 1.0) * py - by * (px - 1.0) >= 0.0
    raise ValueError(f"unknown shape kind {kind!r}; expected one of {SHAPE_KINDS}")
