"""The shapes world: synthetic edit pairs with exact ground truth, numpy + Pillow only.

A scene is 1-4 coloured shapes (circle, square, triangle, star, diamond, hexagon, cross) in
three sizes on a plain or two-tone (top/bottom) background. An edit (recolour, add, remove,
move, resize, background, swap) is a structured record applied to the before-scene; the
instruction is one of several phrasings of it, naming shapes by their shortest unambiguous
description. Every example carries both scenes and the edit as JSON annotations, so a model's
output can be scored against the exact after-scene.

Geometry is resolution independent: positions and sizes are fractions of the image side, a
shape of size s fits in a circle of radius SIZES[s] around its centre, and shapes keep a gap
of GAP between those circles (and EDGE from the border). Rendering averages SUPERSAMPLE**2
point samples per pixel, so a pixel a shape covers fully has exactly the shape's colour, one
it misses has exactly the background colour, and edge pixels blend the two. The palette is
chosen so that no such blend lies within 5/255 of a third palette colour: "pixels equal to the
red colour" is exactly "pixels fully inside a red shape" (for even image sizes, where the
two-tone split falls on a pixel boundary).

Splits: "train" and "validation" (same distribution, different seeds) never contain a
HELDOUT_COMBOS (colour, kind) pair in either scene nor a HELDOUT_TEMPLATES phrasing; every
"heldout" example uses a held-out phrasing and has a held-out pair in its before-scene
(the edit touches one where its kind allows).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ip2p_jax.data.schema import make_example
from ip2p_jax.images import encode_png

WORLD = "shapes"

# Far apart in RGB, and no 2-way blend (k/16 of one, the rest another) comes near a third.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 50),
    "green": (40, 160, 70),
    "blue": (40, 90, 220),
    "purple": (140, 60, 180),
    "pink": (250, 150, 200),
    "cyan": (40, 200, 220),
    "brown": (130, 80, 40),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
_COLOUR_NAMES = tuple(COLOURS)
SHAPE_KINDS = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross")
SIZES: dict[str, float] = {"small": 0.08, "medium": 0.11, "large": 0.15}  # radius / side
SIZE_ORDER = tuple(SIZES)
EDIT_KINDS = ("recolour", "add", "remove", "move", "resize", "background", "swap")
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),  # image rows grow downwards
    "down": (0, 1),
}
RESIZE_DIRECTIONS = ("bigger", "smaller")
POSITIONS = ("left", "right", "top", "bottom")  # referring to one of two same-looking shapes
SPLITS = ("train", "validation", "heldout")

MAX_SHAPES = 4
MOVE_STEP = 3 / 16  # a move shifts the centre by this fraction of the side (12 px at 64)
GRID = 256  # centres lie on multiples of 1/GRID: exact in binary, so JSON round trips exactly
EDGE = 0.02  # a shape's enclosing circle keeps this far from the border
GAP = 0.03  # and this far from any other shape's enclosing circle
POSITION_GAP = 0.2  # "the left circle": the two circles are this far apart along x (y: upper)
SUPERSAMPLE = 4  # point samples per pixel side
SPLIT_BACKGROUND_P = 0.25
SHAPE_COUNT_P = (0.2, 0.3, 0.3, 0.2)  # 1, 2, 3, 4 shapes
_PLACE_TRIES = 40

# Never in train/validation (neither scene, nor the instruction); only in "heldout".
HELDOUT_COMBOS: tuple[tuple[str, str], ...] = (
    ("purple", "circle"),
    ("orange", "star"),
    ("blue", "triangle"),
    ("green", "square"),
)
_HELDOUT_SET = frozenset(HELDOUT_COMBOS)

# Placeholders: ref/ref2 (a referring expression), colour, a_colour ("an orange"), obj ("a red
# circle"), obj_sized ("a large red circle"), where ("in the top left"), dir (left/up/...),
# dir_to ("to the left"/"up"), comparative/verb/change/updown (bigger/enlarge/increase/up or
# smaller/shrink/reduce/down). Every instruction matches exactly one template (tested).
TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolour": (
        "make {ref} {colour}",
        "turn {ref} {colour}",
        "paint {ref} {colour}",
        "change the colour of {ref} to {colour}",
        "recolor {ref} {colour}",
    ),
    "add": ("add {obj}", "add {obj_sized} {where}", "put {obj} {where}", "draw {obj} {where}"),
    "remove": ("remove {ref}", "delete {ref}", "take away {ref}", "get rid of {ref}"),
    "move": ("move {ref} {dir_to}", "shift {ref} {dir}", "nudge {ref} {dir}"),
    "resize": ("make {ref} {comparative}", "{verb} {ref}", "{change} the size of {ref}"),
    "background": (
        "make the background {colour}",
        "change the background to {colour}",
        "paint the background {colour}",
        "turn the background {colour}",
    ),
    "swap": (
        "swap {ref} and {ref2}",
        "switch the positions of {ref} and {ref2}",
        "swap the positions of {ref} and {ref2}",
        "make {ref} and {ref2} change places",
    ),
}
# Each uses a word no train phrasing has (dye, should be, insert, erase, slide, scale,
# picture, backdrop, trade).
HELDOUT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolour": ("dye {ref} {colour}", "{ref} should be {colour} instead"),
    "add": ("insert {obj} {where}",),
    "remove": ("erase {ref}",),
    "move": ("slide {ref} {dir}",),
    "resize": ("scale {ref} {updown}",),
    "background": ("give the picture {a_colour} background", "use {a_colour} backdrop"),
    "swap": ("let {ref} and {ref2} trade places",),
}

_POSITION_WORDS = {"left": "left", "right": "right", "top": "upper", "bottom": "lower"}
_DIR_TO = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
_RESIZE_WORDS = {
    "bigger": {"comparative": "bigger", "verb": "enlarge", "change": "increase", "updown": "up"},
    "smaller": {"comparative": "smaller", "verb": "shrink", "change": "reduce", "updown": "down"},
}
_WHERE = (  # 3 x 3 regions by thirds of the image, row-major from the top left
    ("in the top left", "at the top", "in the top right"),
    ("on the left", "in the middle", "on the right"),
    ("in the bottom left", "at the bottom", "in the bottom right"),
)

# --- geometry: each kind in the unit circle, centroid at the origin, y pointing down ---------

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


def _inside_unit(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
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


# --- scenes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One shape: kind, colour name, size name and centre (x right, y down, in [0, 1])."""

    kind: str
    colour: str
    size: str
    x: float
    y: float

    @property
    def radius(self) -> float:
        """Radius of the circle the shape fits in, as a fraction of the image side."""
        return SIZES[self.size]

    @property
    def combo(self) -> tuple[str, str]:
        """(colour, kind), the pair the held-out split is about."""
        return (self.colour, self.kind)

    def area(self) -> float:
        """Exact area as a fraction of the image area."""
        return UNIT_AREAS[self.kind] * self.radius**2

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; from_dict(to_dict()) == self."""
        return {
            "kind": self.kind,
            "colour": self.colour,
            "size": self.size,
            "x": self.x,
            "y": self.y,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Shape:
        """Inverse of to_dict."""
        kind, colour, size = str(data["kind"]), str(data["colour"]), str(data["size"])
        return cls(kind, colour, size, float(data["x"]), float(data["y"]))


@dataclass(frozen=True)
class Scene:
    """Shapes on a background: plain, or two-tone with `background` on the top half and
    `background_bottom` on the bottom half."""

    shapes: tuple[Shape, ...]
    background: str
    background_bottom: str | None = None

    @property
    def background_colours(self) -> tuple[str, ...]:
        """The one or two background colour names."""
        if self.background_bottom is None:
            return (self.background,)
        return (self.background, self.background_bottom)

    def background_at(self, y: float) -> str:
        """Background colour name at height y (scene coordinates)."""
        if self.background_bottom is None or y < 0.5:
            return self.background
        return self.background_bottom

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; from_dict(to_dict()) == self."""
        return {
            "shapes": [shape.to_dict() for shape in self.shapes],
            "background": self.background,
            "background_bottom": self.background_bottom,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scene:
        """Inverse of to_dict."""
        bottom = data.get("background_bottom")
        return cls(
            tuple(Shape.from_dict(shape) for shape in data["shapes"]),
            str(data["background"]),
            None if bottom is None else str(bottom),
        )


def _fits(shape: Shape) -> bool:
    r = shape.radius
    return EDGE + r <= shape.x <= 1 - EDGE - r and EDGE + r <= shape.y <= 1 - EDGE - r


def _apart(a: Shape, b: Shape) -> bool:
    reach = a.radius + b.radius + GAP
    return (a.x - b.x) ** 2 + (a.y - b.y) ** 2 >= reach * reach


def scene_problems(scene: Scene) -> list[str]:
    """What makes a scene invalid (empty list when valid): unknown names, 0 or more than
    MAX_SHAPES shapes, a shape outside the image, overlapping or coloured like the background."""
    problems = []
    if not 1 <= len(scene.shapes) <= MAX_SHAPES:
        problems.append(f"{len(scene.shapes)} shapes, expected 1 to {MAX_SHAPES}")
    background = scene.background_colours
    problems += [f"unknown background colour {c!r}" for c in background if c not in COLOURS]
    if scene.background_bottom == scene.background:
        problems.append("a two-tone background needs two different colours")
    for i, shape in enumerate(scene.shapes):
        if shape.kind not in SHAPE_KINDS or shape.colour not in COLOURS or shape.size not in SIZES:
            problems.append(f"shape {i}: unknown kind, colour or size in {shape}")
            continue
        if shape.colour in background:
            problems.append(f"shape {i}: {shape.colour} on a {shape.colour} background")
        if not _fits(shape):
            problems.append(f"shape {i}: not inside the image")
        for j in range(i):
            other = scene.shapes[j]
            if other.size in SIZES and not _apart(shape, other):
                problems.append(f"shapes {j} and {i} overlap")
    return problems


# --- rendering --------------------------------------------------------------------------------


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
    inside = _inside_unit(shape.kind, u[None, :], v[:, None])
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


# --- referring expressions --------------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """How an instruction names a shape: its kind plus whichever of colour, size and position
    (the left/right/upper/lower of exactly two otherwise alike shapes) it needs."""

    kind: str
    colour: str | None = None
    size: str | None = None
    position: str | None = None

    def text(self) -> str:
        """ "the lower small red circle" style wording."""
        words = ["the"]
        if self.position is not None:
            words.append(_POSITION_WORDS[self.position])
        words += [w for w in (self.size, self.colour) if w is not None]
        words.append(self.kind)
        return " ".join(words)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict without the unset attributes; from_dict(to_dict()) == self."""
        out = {
            "kind": self.kind,
            "colour": self.colour,
            "size": self.size,
            "position": self.position,
        }
        return {name: value for name, value in out.items() if value is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Ref:
        """Inverse of to_dict."""
        return cls(data["kind"], data.get("colour"), data.get("size"), data.get("position"))


_POSITION_AXIS = {"left": ("x", -1), "right": ("x", 1), "top": ("y", -1), "bottom": ("y", 1)}
# Fewest attributes first; ties broken colour, then size, then position.
_REF_ATTRIBUTES = (
    (),
    ("colour",),
    ("size",),
    ("position",),
    ("colour", "size"),
    ("colour", "position"),
    ("size", "position"),
    ("colour", "size", "position"),
)


def resolve(scene: Scene, ref: Ref) -> tuple[int, ...]:
    """Indices of the shapes `ref` can mean: exactly one when it is unambiguous. A position
    picks one of exactly two matching shapes when they are POSITION_GAP apart along its axis."""
    matches = tuple(
        i
        for i, shape in enumerate(scene.shapes)
        if shape.kind == ref.kind
        and ref.colour in (None, shape.colour)
        and ref.size in (None, shape.size)
    )
    if ref.position is None or len(matches) != 2:
        return matches
    axis, sign = _POSITION_AXIS[ref.position]
    first, second = (getattr(scene.shapes[i], axis) for i in matches)
    if abs(first - second) < POSITION_GAP:
        return matches
    return (matches[0],) if (first - second) * sign > 0 else (matches[1],)


def refer(scene: Scene, index: int) -> Ref | None:
    """The shortest unambiguous description of shape `index`, or None when it has none."""
    shape = scene.shapes[index]
    for attributes in _REF_ATTRIBUTES:
        positions = POSITIONS if "position" in attributes else (None,)
        for position in positions:
            ref = Ref(
                shape.kind,
                shape.colour if "colour" in attributes else None,
                shape.size if "size" in attributes else None,
                position,
            )
            if resolve(scene, ref) == (index,):
                return ref
    return None


# --- edits ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edit:
    """One edit. `target`/`other` index the before-scene's shapes and `ref`/`other_ref` are how
    the instruction names them; `colour` is the new shape or background colour; `direction`
    is left/right/up/down (move) or bigger/smaller (resize); `shape` is the added shape."""

    kind: str
    target: int | None = None
    ref: Ref | None = None
    other: int | None = None
    other_ref: Ref | None = None
    colour: str | None = None
    direction: str | None = None
    shape: Shape | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict without the unset fields; from_dict(to_dict()) == self."""
        out: dict[str, Any] = {"kind": self.kind}
        for name in ("target", "other", "colour", "direction"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        for name in ("ref", "other_ref", "shape"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name).to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Edit:
        """Inverse of to_dict."""
        ref, other_ref, shape = data.get("ref"), data.get("other_ref"), data.get("shape")
        return cls(
            kind=data["kind"],
            target=data.get("target"),
            ref=None if ref is None else Ref.from_dict(ref),
            other=data.get("other"),
            other_ref=None if other_ref is None else Ref.from_dict(other_ref),
            colour=data.get("colour"),
            direction=data.get("direction"),
            shape=None if shape is None else Shape.from_dict(shape),
        )


def edit_kinds() -> tuple[str, ...]:
    """The edit kinds, in a fixed order."""
    return EDIT_KINDS


def _index(scene: Scene, index: int | None, what: str) -> int:
    if not isinstance(index, int) or not 0 <= index < len(scene.shapes):
        raise ValueError(
            f"{what} {index!r} is not a shape index of a {len(scene.shapes)}-shape scene"
        )
    return index


def apply_edit(scene: Scene, edit: Edit) -> Scene:
    """The after-scene (pure). Raises ValueError for a malformed edit, one that changes
    nothing, or one whose result is not a valid scene (off the image, overlapping, ...)."""
    shapes = list(scene.shapes)
    background, bottom = scene.background, scene.background_bottom
    kind = edit.kind
    if kind in ("recolour", "remove", "move", "resize", "swap"):
        target = _index(scene, edit.target, "target")
        shape = shapes[target]
    if kind == "recolour":
        if edit.colour == shape.colour:
            raise ValueError(f"recolour to {edit.colour}: the shape is {edit.colour} already")
        shapes[target] = replace(shape, colour=edit.colour)
    elif kind == "add":
        if edit.shape is None:
            raise ValueError("an add edit needs the added shape")
        shapes.append(edit.shape)
    elif kind == "remove":
        del shapes[target]
    elif kind == "move":
        if edit.direction not in DIRECTIONS:
            raise ValueError(f"move direction {edit.direction!r}; expected one of {DIRECTIONS}")
        dx, dy = DIRECTIONS[edit.direction]
        shapes[target] = replace(shape, x=shape.x + dx * MOVE_STEP, y=shape.y + dy * MOVE_STEP)
    elif kind == "resize":
        if edit.direction not in RESIZE_DIRECTIONS:
            raise ValueError(f"resize direction {edit.direction!r}; expected {RESIZE_DIRECTIONS}")
        step = 1 if edit.direction == "bigger" else -1
        position = SIZE_ORDER.index(shape.size) + step
        if not 0 <= position < len(SIZE_ORDER):
            raise ValueError(f"a {shape.size} shape cannot get {edit.direction}")
        shapes[target] = replace(shape, size=SIZE_ORDER[position])
    elif kind == "background":
        if edit.colour == background and bottom is None:
            raise ValueError(f"the background is {background} already")
        background, bottom = edit.colour, None
    elif kind == "swap":
        other = _index(scene, edit.other, "other")
        partner = shapes[other]
        if (shape.kind, shape.colour, shape.size) == (partner.kind, partner.colour, partner.size):
            raise ValueError("swapping two identical shapes changes nothing")
        shapes[target] = replace(shape, x=partner.x, y=partner.y)
        shapes[other] = replace(partner, x=shape.x, y=shape.y)
    else:
        raise ValueError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")
    after = Scene(tuple(shapes), background, bottom)
    problems = scene_problems(after)
    if problems:
        raise ValueError(f"{kind} edit gives an invalid scene: {'; '.join(problems)}")
    return after


def _valid(scene: Scene, edit: Edit) -> bool:
    try:
        apply_edit(scene, edit)
    except ValueError:
        return False
    return True


def touched_combos(scene: Scene, edit: Edit) -> set[tuple[str, str]]:
    """The (colour, kind) pairs the edit acts on or creates."""
    combos = {scene.shapes[i].combo for i in (edit.target, edit.other) if i is not None}
    if edit.kind == "recolour" and edit.target is not None:
        combos.add((edit.colour, scene.shapes[edit.target].kind))
    if edit.shape is not None:
        combos.add(edit.shape.combo)
    return combos


# --- language ---------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def region_phrase(x: float, y: float) -> str:
    """ "in the top left" ... "in the bottom right": the third of the image (x, y) falls in."""
    return _WHERE[min(int(y * 3), 2)][min(int(x * 3), 2)]


def caption(scene: Scene) -> str:
    """Deterministic description: shapes left to right, then the background."""
    ordered = sorted(scene.shapes, key=lambda shape: (shape.x, shape.y))
    parts = [f"a {shape.size} {shape.colour} {shape.kind}" for shape in ordered]
    if len(parts) > 1:
        things = ", ".join(parts[:-1]) + " and " + parts[-1]
    else:
        things = parts[0] if parts else "nothing"
    if scene.background_bottom is None:
        where = f"on {_article(scene.background)} {scene.background} background"
    else:
        where = (
            f"on a background that is {scene.background} at the top "
            f"and {scene.background_bottom} at the bottom"
        )
    return f"{things} {where}"


def _fields(edit: Edit) -> dict[str, str]:
    fields: dict[str, str] = {}
    if edit.ref is not None:
        fields["ref"] = edit.ref.text()
    if edit.other_ref is not None:
        fields["ref2"] = edit.other_ref.text()
    if edit.colour is not None:
        fields["colour"] = edit.colour
        fields["a_colour"] = f"{_article(edit.colour)} {edit.colour}"
    if edit.shape is not None:
        shape = edit.shape
        fields["obj"] = f"{_article(shape.colour)} {shape.colour} {shape.kind}"
        fields["obj_sized"] = f"{_article(shape.size)} {shape.size} {shape.colour} {shape.kind}"
        fields["where"] = region_phrase(shape.x, shape.y)
    if edit.kind == "move" and edit.direction is not None:
        fields["dir"] = edit.direction
        fields["dir_to"] = _DIR_TO[edit.direction]
    if edit.kind == "resize" and edit.direction is not None:
        fields.update(_RESIZE_WORDS[edit.direction])
    return fields


def instruction_text(edit: Edit, template: str) -> str:
    """The instruction for `edit` in the phrasing `template` (one of its kind's templates)."""
    return template.format(**_fields(edit))


def _alternatives(words: Any) -> str:
    return "(?:" + "|".join(re.escape(word) for word in words) + ")"


_REF_PATTERN = (
    f"the (?:{_alternatives(_POSITION_WORDS.values())} )?(?:{_alternatives(SIZES)} )?"
    f"(?:{_alternatives(COLOURS)} )?{_alternatives(SHAPE_KINDS)}"
)
_COLOUR_KIND = f"{_alternatives(COLOURS)} {_alternatives(SHAPE_KINDS)}"
_FIELD_PATTERNS = {
    "ref": _REF_PATTERN,
    "ref2": _REF_PATTERN,
    "colour": _alternatives(COLOURS),
    "a_colour": f"an? {_alternatives(COLOURS)}",
    "obj": f"an? {_COLOUR_KIND}",
    "obj_sized": f"an? {_alternatives(SIZES)} {_COLOUR_KIND}",
    "where": _alternatives(phrase for row in _WHERE for phrase in row),
    "dir": _alternatives(DIRECTIONS),
    "dir_to": _alternatives(_DIR_TO.values()),
    **{
        name: _alternatives(words[name] for words in _RESIZE_WORDS.values())
        for name in ("comparative", "verb", "change", "updown")
    },
}


def _template_regex(template: str) -> re.Pattern[str]:
    pieces = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    pattern = "".join(
        re.escape(piece) if i % 2 == 0 else f"(?P<{piece}>{_FIELD_PATTERNS[piece]})"
        for i, piece in enumerate(pieces)
    )
    return re.compile(pattern)


_TEMPLATE_REGEXES = [
    (kind, template, _template_regex(template))
    for table in (TRAIN_TEMPLATES, HELDOUT_TEMPLATES)
    for kind, templates in table.items()
    for template in templates
]


def parse_instruction(text: str) -> list[tuple[str, str, dict[str, str]]]:
    """Every (edit kind, template, filled fields) whose template matches all of `text`;
    exactly one for any instruction this module writes."""
    found = []
    for kind, template, regex in _TEMPLATE_REGEXES:
        match = regex.fullmatch(text)
        if match is not None:
            found.append((kind, template, match.groupdict()))
    return found


def is_heldout_template(template: str) -> bool:
    """True for the phrasings reserved for the heldout split."""
    return any(template in templates for templates in HELDOUT_TEMPLATES.values())


# --- generation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditRecord:
    """One generated example before rendering: both scenes, the edit and its wording."""

    key: str
    seed: int
    split: str
    before: Scene
    after: Scene
    edit: Edit
    template: str
    instruction: str
    input_caption: str
    edited_caption: str

    def annotations(self, size: int) -> str:
        """The JSON the example's `annotations` field holds (see decode_annotations)."""
        return json.dumps(
            {
                "before": self.before.to_dict(),
                "after": self.after.to_dict(),
                "edit": self.edit.to_dict(),
                "world": WORLD,
                "size": size,
                "template": self.template,
            }
        )


def _split_index(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return SPLITS.index(split)


def example_seed(seed: int, split: str, index: int) -> int:
    """The 32-bit seed of example `index`: a function of (seed, split, index) only."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed} and {index}")
    state = np.random.SeedSequence([seed, _split_index(split), index]).generate_state(1)
    return int(state[0])


def _pick(rng: np.random.Generator, items: Any) -> Any:
    items = tuple(items)
    return items[int(rng.integers(len(items)))]


def _sample_shape(
    rng: np.random.Generator,
    shapes: tuple[Shape, ...] | list[Shape],
    background: tuple[str, ...],
    allowed: Callable[[tuple[str, str]], bool],
    combo: tuple[str, str] | None = None,
) -> Shape | None:
    """A shape (of `combo` if given) placed clear of `shapes`, or None if none fits."""
    if combo is None:
        kind = _pick(rng, SHAPE_KINDS)
        colour = _pick(rng, [c for c in COLOURS if c not in background and allowed((c, kind))])
    else:
        colour, kind = combo
    size = _pick(rng, SIZE_ORDER)
    low = math.ceil((SIZES[size] + EDGE) * GRID)
    high = math.floor((1 - SIZES[size] - EDGE) * GRID)
    for _ in range(_PLACE_TRIES):
        x, y = (int(value) / GRID for value in rng.integers(low, high + 1, size=2))
        shape = Shape(kind, colour, size, x, y)
        if _fits(shape) and all(_apart(shape, other) for other in shapes):
            return shape
    return None


def _sample_scene(
    rng: np.random.Generator, allowed: Callable[[tuple[str, str]], bool], heldout: bool
) -> Scene:
    if rng.random() < SPLIT_BACKGROUND_P:
        top, bottom = (_COLOUR_NAMES[i] for i in rng.choice(len(COLOURS), 2, replace=False))
    else:
        top, bottom = _pick(rng, COLOURS), None
    background = (top,) if bottom is None else (top, bottom)
    count = int(rng.choice(MAX_SHAPES, p=SHAPE_COUNT_P)) + 1
    shapes: list[Shape] = []
    if heldout:  # every heldout scene shows at least one held-out pair
        combos = [combo for combo in HELDOUT_COMBOS if combo[0] not in background]
        first = _sample_shape(rng, shapes, background, allowed, _pick(rng, combos))
        assert first is not None  # an empty image always has room
        shapes.append(first)
    while len(shapes) < count:
        shape = _sample_shape(rng, shapes, background, allowed)
        if shape is None:
            break
        shapes.append(shape)
    return Scene(tuple(shapes), top, bottom)


def _options(
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
            shape = _sample_shape(rng, scene.shapes, background, allowed)
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
                if _valid(scene, edit):
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
                if i != j and _valid(scene, edit):
                    options.append(edit)
    return options


def make_record(index: int, *, split: str = "train", seed: int = 0) -> EditRecord:
    """Example `index` of a split, without images: a function of (index, split, seed) only."""
    example = example_seed(seed, split, index)
    rng = np.random.default_rng(example)
    heldout = split == "heldout"
    allowed = (lambda combo: True) if heldout else (lambda combo: combo not in _HELDOUT_SET)
    before = _sample_scene(rng, allowed, heldout)
    refs = [refer(before, i) for i in range(len(before.shapes))]
    # Uniform over the kinds that have a valid edit here (background always has one).
    for position in rng.permutation(len(EDIT_KINDS)):
        kind = EDIT_KINDS[int(position)]
        options = _options(before, kind, refs, rng, allowed)
        if options:
            break
    if heldout:  # prefer an edit that acts on or creates a held-out pair
        touching = [edit for edit in options if touched_combos(before, edit) & _HELDOUT_SET]
        options = touching or options
    edit = _pick(rng, options)
    after = apply_edit(before, edit)
    templates = (HELDOUT_TEMPLATES if heldout else TRAIN_TEMPLATES)[kind]
    template = _pick(rng, templates)
    return EditRecord(
        key=f"{WORLD}/{split}/{index:07d}",
        seed=example,
        split=split,
        before=before,
        after=after,
        edit=edit,
        template=template,
        instruction=instruction_text(edit, template),
        input_caption=caption(before),
        edited_caption=caption(after),
    )


def generate_records(
    num: int, *, split: str = "train", seed: int = 0, start: int = 0
) -> Iterator[EditRecord]:
    """Records start .. start + num - 1 of a split (cheap: no rendering)."""
    _split_index(split)
    for index in range(start, start + num):
        yield make_record(index, split=split, seed=seed)


def record_to_example(record: EditRecord, size: int = 64) -> dict[str, Any]:
    """Renders a record into a dataset example (ip2p_jax.data.schema), images as PNG."""
    return make_example(
        input_image=encode_png(render(record.before, size)),
        edited_image=encode_png(render(record.after, size)),
        instruction=record.instruction,
        key=record.key,
        input_caption=record.input_caption,
        edited_caption=record.edited_caption,
        annotations=record.annotations(size),
        seed=record.seed,
    )


def generate_examples(
    num: int, *, split: str = "train", seed: int = 0, size: int = 64, start: int = 0
) -> Iterator[dict[str, Any]]:
    """`num` rendered examples of a split, deterministic in (split, seed, size) and the
    example index: example i is the same however many are asked for."""
    for record in generate_records(num, split=split, seed=seed, start=start):
        yield record_to_example(record, size)


def decode_annotations(text: str) -> tuple[Scene, Scene, Edit]:
    """(before, after, edit) from an example's annotations JSON."""
    data = json.loads(text)
    if data.get("world") != WORLD:
        raise ValueError(f"annotations are from world {data.get('world')!r}, not {WORLD!r}")
    return (
        Scene.from_dict(data["before"]),
        Scene.from_dict(data["after"]),
        Edit.from_dict(data["edit"]),
    )
