"""Edits: each kind does what it says, and only there; invalid edits are refused."""

from __future__ import annotations

import numpy as np
import pytest

from ip2p_jax.worlds import shapes as S
from tests.worlds.conftest import records, region


def by_kind(num_per_kind: int = 12) -> dict[str, list[S.EditRecord]]:
    out: dict[str, list[S.EditRecord]] = {kind: [] for kind in S.EDIT_KINDS}
    for record in records("train", 3000):
        if len(out[record.edit.kind]) < num_per_kind:
            out[record.edit.kind].append(record)
    return out


def changed_pixels(record: S.EditRecord, size: int = 64) -> np.ndarray:
    return np.any(S.render(record.before, size) != S.render(record.after, size), axis=-1)


def inside_boxes(shapes: list[S.Shape], size: int = 64) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    for shape in shapes:
        x0, y0, x1, y1 = S.shape_bbox(shape, size)
        mask[y0:y1, x0:x1] = True
    return mask


def assert_only_changed(record: S.EditRecord, touched: list[S.Shape]) -> None:
    """Rendered before/after differ, and only inside the touched shapes' pixel boxes."""
    changed = changed_pixels(record)
    assert changed.any(), record.instruction
    assert not (changed & ~inside_boxes(touched)).any(), record.instruction


@pytest.mark.parametrize("kind", S.EDIT_KINDS)
def test_edit_does_what_it_says(kind):
    samples = by_kind()[kind]
    assert len(samples) >= 10, f"too few {kind} edits in the sample"
    for record in samples:
        before, after, edit = record.before, record.after, record.edit
        assert S.apply_edit(before, edit) == after
        old, new = list(before.shapes), list(after.shapes)
        if kind == "add":
            assert new == old + [edit.shape]
            assert_only_changed(record, [edit.shape])
            continue
        if kind == "background":
            assert new == old and after.background == edit.colour
            assert after.background_bottom is None
            assert edit.colour not in before.background_colours or before.background_bottom
            image_before, image_after = S.render(before), S.render(after)
            for shape in old:  # fully covered pixels keep the shape's colour
                full = S.shape_coverage(shape, 64) == 1.0
                assert np.array_equal(image_before[full], image_after[full])
            away = ~np.any([region(shape, 64) for shape in old], axis=0)
            assert (image_after[away] == S.COLOURS[edit.colour]).all()
            assert changed_pixels(record).any()
            continue
        target = old[edit.target]
        if kind == "remove":
            assert new == old[: edit.target] + old[edit.target + 1 :]
            assert_only_changed(record, [target])
            continue
        # The other kinds keep the shape count and change only the target (and swap partner).
        assert len(new) == len(old)
        untouched = [i for i in range(len(old)) if i not in (edit.target, edit.other)]
        assert all(new[i] == old[i] for i in untouched)
        result = new[edit.target]
        if kind == "recolour":
            assert result == S.Shape(target.kind, edit.colour, target.size, target.x, target.y)
            assert edit.colour != target.colour
            assert_only_changed(record, [target])
        elif kind == "move":
            dx, dy = S.DIRECTIONS[edit.direction]
            expected = (target.x + dx * S.MOVE_STEP, target.y + dy * S.MOVE_STEP)
            assert (result.x, result.y) == expected
            assert (result.kind, result.colour, result.size) == (
                target.kind,
                target.colour,
                target.size,
            )
            assert_only_changed(record, [target, result])
        elif kind == "resize":
            step = 1 if edit.direction == "bigger" else -1
            assert S.SIZE_ORDER.index(result.size) == S.SIZE_ORDER.index(target.size) + step
            assert result == S.Shape(target.kind, target.colour, result.size, target.x, target.y)
            assert_only_changed(record, [target, result])
        elif kind == "swap":
            partner, partner_after = old[edit.other], new[edit.other]
            assert (result.x, result.y) == (partner.x, partner.y)
            assert (partner_after.x, partner_after.y) == (target.x, target.y)
            assert (result.kind, result.colour, result.size) == (
                target.kind,
                target.colour,
                target.size,
            )
            assert_only_changed(record, [target, partner, result, partner_after])


def test_apply_edit_refuses_invalid_edits():
    left = S.Shape("circle", "red", "large", 0.2, 0.5)
    right = S.Shape("square", "blue", "small", 0.7, 0.5)
    scene = S.Scene((left, right), "white")
    with pytest.raises(ValueError, match="not inside"):
        S.apply_edit(scene, S.Edit("move", target=0, direction="left"))
    with pytest.raises(ValueError, match="already"):
        S.apply_edit(scene, S.Edit("recolour", target=0, colour="red"))
    with pytest.raises(ValueError, match="white background"):
        S.apply_edit(scene, S.Edit("recolour", target=0, colour="white"))
    with pytest.raises(ValueError, match="cannot get bigger"):
        S.apply_edit(scene, S.Edit("resize", target=0, direction="bigger"))
    with pytest.raises(ValueError, match="overlap"):
        S.apply_edit(scene, S.Edit("add", shape=S.Shape("star", "green", "large", 0.45, 0.5)))
    with pytest.raises(ValueError, match="1 to 4"):
        S.apply_edit(S.Scene((left,), "white"), S.Edit("remove", target=0))
    with pytest.raises(ValueError, match="shape index"):
        S.apply_edit(scene, S.Edit("remove", target=2))
    full = S.Scene(
        tuple(S.Shape("circle", "red", "small", x, y) for x in (0.2, 0.7) for y in (0.2, 0.7)),
        "white",
    )
    with pytest.raises(ValueError, match="5 shapes"):
        S.apply_edit(full, S.Edit("add", shape=S.Shape("star", "green", "small", 0.45, 0.45)))
    moved = S.apply_edit(scene, S.Edit("move", target=1, direction="up"))
    assert moved.shapes[1].y == 0.5 - S.MOVE_STEP and moved.shapes[0] == left
