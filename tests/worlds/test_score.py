"""Scoring edits against the ground truth: the true after-image passes, the untouched input
and wrong edits fail, colour noise is forgiven."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ip2p_jax.worlds import shapes as S
from ip2p_jax.worlds.shapes.score import (
    BLENDED,
    NEAR_AGREEMENT,
    PALETTE_NAMES,
    PSNR_CAP,
    colour_labels,
    score_edit,
    summarize,
)
from tests.worlds.conftest import records

SIZE = 64


def heldout_by_kind() -> list[S.EditRecord]:
    """Three held-out records of every edit kind."""
    picked: dict[str, list[S.EditRecord]] = {kind: [] for kind in S.EDIT_KINDS}
    for record in records("heldout", 600):
        if len(picked[record.edit.kind]) < 3:
            picked[record.edit.kind].append(record)
    assert all(len(found) == 3 for found in picked.values()), picked
    return [record for found in picked.values() for record in found]


CASES = heldout_by_kind()


def test_labels_are_the_rendered_colours_away_from_edges():
    for record in CASES[:6]:
        labels = colour_labels(record.after, SIZE)
        image = S.render(record.after, SIZE)
        pure = labels != BLENDED
        palette = np.asarray([S.COLOURS[name] for name in PALETTE_NAMES])
        assert np.array_equal(image[pure], palette[labels[pure]])
        assert pure.mean() > 0.8  # edges are a thin share of the image


@pytest.mark.parametrize("record", CASES, ids=lambda r: f"{r.edit.kind}-{r.key}")
def test_the_true_after_image_succeeds_and_the_input_fails(record):
    truth = score_edit(S.render(record.after, SIZE), record.before, record.after)
    assert truth.success and truth.changed_agreement == 1.0 and truth.kept_agreement == 1.0
    assert truth.psnr == PSNR_CAP and truth.l1 == 0.0
    unedited = score_edit(S.render(record.before, SIZE), record.before, record.after)
    assert not unedited.success and unedited.changed_agreement == 0.0
    assert unedited.psnr < truth.psnr


def test_colour_noise_is_forgiven_but_lowers_psnr():
    rng = np.random.default_rng(0)
    for record in CASES:
        image = S.render(record.after, SIZE).astype(float) + rng.normal(0, 8, (SIZE, SIZE, 3))
        score = score_edit(np.clip(image, 0, 255).astype(np.uint8), record.before, record.after)
        assert score.success, record.key
        assert 25 < score.psnr < 40 and score.l1 > 0


def test_a_wrong_colour_or_a_change_elsewhere_fails():
    recolours = [r for r in CASES if r.edit.kind == "recolour"]
    for record in recolours:
        target = record.after.shapes[record.edit.target]
        wrong = next(
            c for c in PALETTE_NAMES if c not in (target.colour, *record.before.background_colours)
        )
        shapes = list(record.after.shapes)
        shapes[record.edit.target] = dataclasses.replace(target, colour=wrong)
        mistaken = dataclasses.replace(record.after, shapes=tuple(shapes))
        score = score_edit(S.render(mistaken, SIZE), record.before, record.after)
        assert not score.success and score.changed_agreement < 0.5
    # the right edit, plus a large black square where the scene had only background
    spots = [(x, y) for x in (0.2, 0.5, 0.8) for y in (0.2, 0.5, 0.8)]
    spoiled = [
        (record, dataclasses.replace(record.after, shapes=(*record.after.shapes, stray)))
        for record in CASES
        for stray in (S.Shape("square", "black", "large", x, y) for x, y in spots)
        if "black" not in record.after.background_colours
    ]
    spoiled = [(record, scene) for record, scene in spoiled if not S.scene_problems(scene)]
    assert len(spoiled) >= 5
    for record, scene in spoiled[:5]:
        score = score_edit(S.render(scene, SIZE), record.before, record.after)
        assert score.changed_agreement == 1.0 and not score.success


def test_summary_counts_per_kind_and_overall():
    truth = [(r.edit.kind, score_edit(S.render(r.after, SIZE), r.before, r.after)) for r in CASES]
    before = [(r.edit.kind, score_edit(S.render(r.before, SIZE), r.before, r.after)) for r in CASES]
    table = summarize(truth[:9] + before[9:])
    assert list(table)[-1] == "overall"
    assert table["overall"]["count"] == len(CASES)
    assert table["overall"]["success"] == pytest.approx(9 / len(CASES))
    assert set(table) == {*S.EDIT_KINDS, "overall"}


def test_a_non_square_image_and_a_no_op_edit_are_refused():
    record = CASES[0]
    with pytest.raises(ValueError, match=r"square RGB image .* \(64, 32, 3\)"):
        score_edit(np.zeros((64, 32, 3), np.uint8), record.before, record.after)
    with pytest.raises(ValueError, match="render the same at 64 px"):
        score_edit(S.render(record.before, SIZE), record.before, record.before)


def test_a_removal_instead_of_a_shrink_fails_on_the_pixels_next_to_the_change():
    """Shrinking a small shape and removing it change much the same pixels; the kept inside
    of the shrunk shape (near the change) tells them apart."""
    records = [
        r
        for r in S.generate_records(200, split="heldout")
        if r.edit.kind == "resize" and r.edit.direction == "smaller"
    ]
    assert len(records) >= 3
    for record in records[:3]:
        shapes = [s for k, s in enumerate(record.before.shapes) if k != record.edit.target]
        removed = dataclasses.replace(record.before, shapes=tuple(shapes))
        score = score_edit(S.render(removed, SIZE), record.before, record.after)
        assert not score.success and score.near_agreement < NEAR_AGREEMENT, record.instruction
        assert score.kept_agreement >= 0.95  # the whole-image test alone would pass it


def _adds(template: str, count: int = 3) -> list[S.EditRecord]:
    found = [r for r in records("train", 3000) if r.template == template]
    assert len(found) >= count, template
    return found[:count]


def _drawn(record: S.EditRecord, **changes) -> np.ndarray:
    """The before-scene with the added shape drawn as `changes` say."""
    shape = dataclasses.replace(record.edit.shape, **changes)
    return S.render(dataclasses.replace(record.after, shapes=(*record.before.shapes, shape)), SIZE)


def test_an_added_shape_may_lie_anywhere_in_the_third_the_instruction_names():
    for record in _adds("put {obj} {where}") + _adds("add {obj_sized} {where}"):
        shape = record.edit.shape
        nudged = _drawn(record, x=shape.x + (0.04 if shape.x % (1 / 3) < 1 / 6 else -0.04))
        assert not score_edit(nudged, record.before, record.after).success  # not the exact spot
        score = score_edit(nudged, record.before, record.after, record.instruction)
        assert score.success, record.instruction
        # PSNR stays that to the generator's after-image, which the nudge moved away from
        assert score.psnr < PSNR_CAP
        elsewhere = _drawn(record, x=(shape.x + 0.5) % 1, y=(shape.y + 0.5) % 1)
        assert not score_edit(elsewhere, record.before, record.after, record.instruction).success


def test_an_unplaced_add_succeeds_anywhere_but_not_in_a_wrong_colour_kind_or_named_size():
    for record in _adds("add {obj}"):
        shape = record.edit.shape
        spots = [(x, y) for x in (0.2, 0.5, 0.8) for y in (0.2, 0.5, 0.8)]
        placed = [
            dataclasses.replace(shape, x=x, y=y, size="medium")
            for x, y in spots
            if not S.scene_problems(
                dataclasses.replace(
                    record.after,
                    shapes=(*record.before.shapes, dataclasses.replace(shape, x=x, y=y)),
                )
            )
        ]
        assert placed, record.key
        moved = dataclasses.asdict(placed[0])
        assert score_edit(_drawn(record, **moved), record.before, record.after, record.instruction)
        wrong_colour = next(
            c for c in PALETTE_NAMES if c not in (shape.colour, *record.before.background_colours)
        )
        wrong_kind = "cross" if shape.kind != "cross" else "circle"
        for wrong in ({"colour": wrong_colour}, {"kind": wrong_kind}):
            image = _drawn(record, **{**moved, "size": "large", **wrong})
            score = score_edit(image, record.before, record.after, record.instruction)
            assert not score.success, (record.instruction, wrong)
    for record in _adds("add {obj_sized} {where}"):
        other = "small" if record.edit.shape.size == "large" else "large"
        image = _drawn(record, size=other)
        assert not score_edit(image, record.before, record.after, record.instruction).success


def test_an_instruction_that_is_not_an_add_of_the_world_is_refused_for_an_add():
    record = _adds("add {obj}", 1)[0]
    image = S.render(record.after, SIZE)
    with pytest.raises(ValueError, match="not one add instruction"):
        score_edit(image, record.before, record.after, "please add something")
