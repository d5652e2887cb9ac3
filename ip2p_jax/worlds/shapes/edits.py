"""Edits: the structured record of a change, and applying it to a scene."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ip2p_jax.worlds.shapes.palette import SIZE_ORDER
from ip2p_jax.worlds.shapes.referring import Ref
from ip2p_jax.worlds.shapes.scene import Scene, Shape, scene_problems

EDIT_KINDS = ("recolour", "add", "remove", "move", "resize", "background", "swap")
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),  # image rows grow downwards
    "down": (0, 1),
}
RESIZE_DIRECTIONS = ("bigger", "smaller")
MOVE_STEP = 3 / 16  # a move shifts the centre by this fraction of the side (12 px at 64)


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


def is_valid_edit(scene: Scene, edit: Edit) -> bool:
    """Whether apply_edit accepts the edit on this scene."""
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
