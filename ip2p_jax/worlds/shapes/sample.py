"""Random scenes and the valid edits of a scene, drawn from a numpy Generator."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ip2p_jax.worlds.shapes.edits import DIRECTIONS, RESIZE_DIRECTIONS, Edit, is_valid_edit
from ip2p_jax.worlds.shapes.palette import COLOURS, SHAPE_KINDS, SIZE_ORDER, SIZES
from ip2p_jax.worlds.shapes.referring import Ref
from ip2p_jax.worlds.shapes.scene import EDGE, MAX_SHAPES, Scene, Shape, apart, fits
from ip2p_jax.worlds.shapes.splits import HELDOUT_COMBOS

GRID = 256  # centres lie on multiples of 1/GRID: exact in binary, so JSON round trips exactly
SPLIT_BACKGROUND_P = 0.25
SHAPE_COUNT_P = (0.2, 0.3, 0.3, 0.2)  # 1, 2, 3, 4 shapes
_PLACE_TRIES = 40
_COLOUR_NAMES = tuple(COLOURS)


def pick(rng: np.random.Generator, items: Any) -> Any:
    """One of `items`, uniformly."""
    items = tuple(items)
    return items[int(rng.integers(len(items)))]


def sample_shape(
    rng: np.random.Generator,
    shapes: tuple[Shape, ...] | list[Shape],
    background: tuple[str, ...],
    allowed: Callable[[tuple[str, str]], bool],
    combo: tuple[str, str] | None = None,
) -> Shape | None:
    """A shape (of `combo` if given) placed clear of `shapes`, or None if none fits."""
    if combo is None:
        kind = pick(rng, SHAPE_KINDS)
        colour = pick(rng, [c for c in COLOURS if c not in background and allowed((c, kind))])
    else:
        colour, kind = combo
    size = pick(rng, SIZE_ORDER)
    low = math.ceil((SIZES[size] + EDGE) * GRID)
    high = math.floor((1 - SIZES[size] - EDGE) * GRID)
    for _ in range(_PLACE_TRIES):
        x, y = (int(value) / GRID for value in rng.integers(low, high + 1, size=2))
        shape = Shape(kind, colour, size, x, y)
        if fits(shape) and all(apart(shape, other) for other in shapes):
            return shape
    return None


def sample_scene(
    rng: np.random.Generator, allowed: Callable[[tuple[str, str]], bool], heldout: bool
) -> Scene:
    """A valid scene of allowed pairs; a heldout one shows at least one held-out pair."""
    if rng.random() < SPLIT_BACKGROUND_P:
        top, bottom = (_COLOUR_NAMES[i] for i in rng.choice(len(COLOURS), 2, replace=False))
    else:
        top, bottom = pick(rng, COLOURS), None
    background = (top,) if bottom is None else (top, bottom)
    count = int(rng.choice(MAX_SHAPES, p=SHAPE_COUNT_P)) + 1
    shapes: list[Shape] = []
    if heldout:  # every heldout scene shows at least one held-out pair
        combos = [combo for combo in HELDOUT_COMBOS if combo[0] not in background]
        first = sample_shape(rng, shapes, background, allowed, pick(rng, combos))
        assert first is not None  # an empty image always has room
        shapes.append(first)
    while len(shapes) < count:
        shape = sample_shape(rng, shapes, background, allowed)
        if shape is None:
            break
        shapes.append(shape)
    return Scene(tuple(shapes), top, bottom)


def edit_options(
    scene: Scene,
    kind: str,
    refs: list[Ref | None],
    rng: np.random.Generator,
    allowed: Callable[[tuple[str, str]], bool],
) -> list[Edit]:
    """All valid edits of `kind` (one random candidate for add)."""
    background = scene.background_colours
    referable = [(i, ref) for i, ref in enumerate(refs) if ref is not None]
    options: list[Edit] = []
    if kind == "recolour":
        for i, ref in referable:
            shape = scene.shapes[i]
            options += [
                Edit(kind, target=i, ref=ref, colour=colour)
                for colour in COLOURS
                if colour != shape.colour
                and colour not in background
                and allowed((colour, shape.kind))
            ]
    elif kind == "add":
        if len(scene.shapes) < MAX_SHAPES:
            shape = sample_shape(rng, scene.shapes, background, allowed)
            if shape is not None:
                options.append(Edit(kind, shape=shape))
    elif kind == "remove":
        if len(scene.shapes) > 1:
            options += [Edit(kind, target=i, ref=ref) for i, ref in referable]
    elif kind in ("move", "resize"):
        directions = DIRECTIONS if kind == "move" else RESIZE_DIRECTIONS
        for i, ref in referable:
            for direction in directions:
                edit = Edit(kind, target=i, ref=ref, direction=direction)
                if is_valid_edit(scene, edit):
                    options.append(edit)
    elif kind == "background":
        used = {shape.colour for shape in scene.shapes}
        options += [
            Edit(kind, colour=colour)
            for colour in COLOURS
            if colour not in used and (colour != scene.background or len(background) == 2)
        ]
    elif kind == "swap":
        for i, ref in referable:
            for j, other_ref in referable:
                edit = Edit(kind, target=i, ref=ref, other=j, other_ref=other_ref)
                if i != j and is_valid_edit(scene, edit):
                    options.append(edit)
    return options
