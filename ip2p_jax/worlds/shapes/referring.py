"""Referring expressions: naming a shape by its shortest unambiguous description."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ip2p_jax.worlds.shapes.scene import Scene

POSITIONS = ("left", "right", "top", "bottom")  # referring to one of two same-looking shapes
POSITION_GAP = 0.2  # "the left circle": the two circles are this far apart along x (y: upper)
POSITION_WORDS = {"left": "left", "right": "right", "top": "upper", "bottom": "lower"}


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
            words.append(POSITION_WORDS[self.position])
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
