"""Scenes: shapes on a background, their JSON form, and what makes one valid."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ip2p_jax.worlds.shapes.outlines import UNIT_AREAS
from ip2p_jax.worlds.shapes.palette import COLOURS, SHAPE_KINDS, SIZES

MAX_SHAPES = 4
EDGE = 0.02  # a shape's enclosing circle keeps this far from the border
GAP = 0.03  # and this far from any other shape's enclosing circle


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


def fits(shape: Shape) -> bool:
    """Whether the shape's enclosing circle keeps EDGE from the border."""
    r = shape.radius
    return EDGE + r <= shape.x <= 1 - EDGE - r and EDGE + r <= shape.y <= 1 - EDGE - r


def apart(a: Shape, b: Shape) -> bool:
    """Whether the two shapes' enclosing circles keep GAP between them."""
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
        if not fits(shape):
            problems.append(f"shape {i}: not inside the image")
        for j in range(i):
            other = scene.shapes[j]
            if other.size in SIZES and not apart(shape, other):
                problems.append(f"shapes {j} and {i} overlap")
    return problems
