"""Writing English: scene captions and the instruction for an edit in a given phrasing."""

from __future__ import annotations

from ip2p_jax.worlds.shapes.edits import Edit
from ip2p_jax.worlds.shapes.scene import Scene
from ip2p_jax.worlds.shapes.templates import DIR_TO, REGION_PHRASES, RESIZE_WORDS


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def region_phrase(x: float, y: float) -> str:
    """ "in the top left" ... "in the bottom right": the third of the image (x, y) falls in."""
    return REGION_PHRASES[min(int(y * 3), 2)][min(int(x * 3), 2)]


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
    if edit.shape is not None:
        shape = edit.shape
        fields["obj"] = f"{_article(shape.colour)} {shape.colour} {shape.kind}"
        fields["obj_sized"] = f"{_article(shape.size)} {shape.size} {shape.colour} {shape.kind}"
        fields["where"] = region_phrase(shape.x, shape.y)
    if edit.kind == "move" and edit.direction is not None:
        fields["dir"] = edit.direction
        fields["dir_to"] = DIR_TO[edit.direction]
    if edit.kind == "resize" and edit.direction is not None:
        fields.update(RESIZE_WORDS[edit.direction])
    return fields


def instruction_text(edit: Edit, template: str) -> str:
    """The instruction for `edit` in the phrasing `template` (one of its kind's templates)."""
    return template.format(**_fields(edit))
