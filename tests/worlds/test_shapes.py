"""The shapes world: rendered pixels match the scene annotations, edits do what they say,
phrasings and held-out combinations land in the right splits, generation is deterministic."""

from __future__ import annotations

import itertools
import json
import math
from functools import cache

import numpy as np
import pytest

from ip2p_jax.data.schema import FIELDS
from ip2p_jax.images import decode_png
from ip2p_jax.worlds import shapes as S


@cache
def records(split: str, num: int) -> tuple[S.EditRecord, ...]:
    """Shared samples (records are cheap; no rendering)."""
    return tuple(S.generate_records(num, split=split, seed=0))


def by_kind(num_per_kind: int = 12) -> dict[str, list[S.EditRecord]]:
    out: dict[str, list[S.EditRecord]] = {kind: [] for kind in S.EDIT_KINDS}
    for record in records("train", 3000):
        if len(out[record.edit.kind]) < num_per_kind:
            out[record.edit.kind].append(record)
    return out


def background_image(scene: S.Scene, size: int) -> np.ndarray:
    """The per-pixel background colour, as ints."""
    rows = [S.COLOURS[scene.background_at((y + 0.5) / size)] for y in range(size)]
    return np.broadcast_to(np.asarray(rows)[:, None, :], (size, size, 3)).astype(int)


def region(shape: S.Shape, size: int) -> np.ndarray:
    """Pixels whose centre lies within the shape's circle grown by 0.75 px: every pixel the
    shape touches, and (by the GAP between shapes) none another shape touches."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    return np.hypot(xs - shape.x * size, ys - shape.y * size) <= shape.radius * size + 0.75


def check_pixels(scene: S.Scene, image: np.ndarray) -> None:
    """Every ground-truth claim about `scene` holds in the rendered `image`."""
    size = image.shape[0]
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    pixels = image.astype(int)
    background = background_image(scene, size)
    claimed = np.zeros((size, size), bool)
    for shape in scene.shapes:
        colour = np.asarray(S.COLOURS[shape.colour])
        inside = region(shape, size)
        claimed |= inside
        # The pixel holding the centre has exactly the shape's colour.
        centre = pixels[int(shape.y * size), int(shape.x * size)]
        assert np.array_equal(centre, colour), (shape, centre)
        # Pixels of exactly its colour (within 2/255) are exactly the fully covered ones ...
        exact = (np.abs(pixels - colour).max(axis=-1) <= 2) & inside
        assert np.array_equal(exact, S.shape_coverage(shape, size) == 1.0), shape
        # ... centred on the stated centre.
        ys, xs = np.nonzero(exact)
        error = math.hypot(xs.mean() + 0.5 - shape.x * size, ys.mean() + 0.5 - shape.y * size)
        assert error <= 1.0, (shape, error)
        # The area read back from the pixels (each pixel's share of shape colour over
        # background) is the stated size's area, to the edge quantisation of 4x4 samples.
        diff = (colour - background).astype(float)
        alpha = ((pixels - background) * diff).sum(axis=-1) / (diff * diff).sum(axis=-1)
        area = shape.area() * size * size
        assert abs(alpha[inside].sum() - area) <= shape.radius * size, (shape, area)
    # Everything away from the shapes is exactly background.
    assert np.array_equal(pixels[~claimed], background[~claimed])


def decoded(example: dict) -> tuple[S.Scene, S.Scene, np.ndarray, np.ndarray]:
    before, after, _ = S.decode_annotations(example["annotations"])
    images = decode_png(example["input_image"]), decode_png(example["edited_image"])
    return before, after, *images


# --- rendering and ground truth ---------------------------------------------------------------


def test_palette_blends_are_unambiguous():
    """No anti-aliased blend of two palette colours comes within 5/255 of a third one, and
    every colour differs from every other by at least 48 in some channel (so a 1/16 blend is
    3 or more away from both ends)."""
    colours = {name: np.asarray(rgb, float) for name, rgb in S.COLOURS.items()}
    for (a, rgb_a), (b, rgb_b) in itertools.permutations(colours.items(), 2):
        assert np.abs(rgb_a - rgb_b).max() >= 48, (a, b)
        for k in range(1, 16):
            blend = np.rint(rgb_b + (rgb_a - rgb_b) * k / 16)
            for c, rgb_c in colours.items():
                if c not in (a, b):
                    assert np.abs(blend - rgb_c).max() > 5, (a, b, k, c)


def test_ground_truth_matches_pixels_at_64():
    examples = list(S.generate_examples(150, split="train", seed=1))
    examples += list(S.generate_examples(30, split="heldout", seed=1))
    for example in examples:
        before, after, input_image, edited_image = decoded(example)
        check_pixels(before, input_image)
        check_pixels(after, edited_image)


def test_ground_truth_matches_pixels_at_256():
    for example in S.generate_examples(10, split="validation", seed=2, size=256):
        before, after, input_image, edited_image = decoded(example)
        assert input_image.shape == (256, 256, 3)
        check_pixels(before, input_image)
        check_pixels(after, edited_image)


def test_every_shape_kind_renders_true_at_several_sizes():
    """Each kind and size alone, at sizes 64 to 256 (and an odd size for the split)."""
    for kind, size_name in itertools.product(S.SHAPE_KINDS, S.SIZE_ORDER):
        shape = S.Shape(kind, "red", size_name, 0.4609375, 0.53125)
        for size in (64, 96, 128, 256):
            check_pixels(
                S.Scene((shape,), "white", "blue"),
                S.render(S.Scene((shape,), "white", "blue"), size),
            )
    odd = S.render(S.Scene((S.Shape("circle", "red", "small", 0.25, 0.25),), "white", "black"), 65)
    assert np.array_equal(odd[0, -1], S.COLOURS["white"])
    assert np.array_equal(odd[-1, -1], S.COLOURS["black"])
    assert not np.array_equal(odd[32, -1], S.COLOURS["white"])  # the middle row blends


def test_generated_scenes_are_valid():
    for record in records("train", 3000)[:1000] + records("heldout", 600):
        for scene in (record.before, record.after):
            assert S.scene_problems(scene) == []
            assert 1 <= len(scene.shapes) <= S.MAX_SHAPES
            for shape in scene.shapes:
                assert shape.x * S.GRID == int(shape.x * S.GRID)  # on the grid
                assert shape.colour not in scene.background_colours


# --- edits ------------------------------------------------------------------------------------


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


# --- language and splits ----------------------------------------------------------------------


def test_every_kind_and_train_phrasing_appears_and_parses_back():
    sample = records("train", 3000)
    assert {record.edit.kind for record in sample} == set(S.EDIT_KINDS)
    used = {record.template for record in sample}
    for kind, templates in S.TRAIN_TEMPLATES.items():
        for template in templates:
            assert template in used, (kind, template)
    for record in sample:
        # The text alone tells the template, and the template fits the edit kind.
        matches = S.parse_instruction(record.instruction)
        assert [(kind, template) for kind, template, _ in matches] == [
            (record.edit.kind, record.template)
        ], record.instruction
        assert record.template in S.TRAIN_TEMPLATES[record.edit.kind]
        assert record.instruction == record.instruction.strip().lower()


def heldout_phrases() -> list[str]:
    """'purple circle' style strings for the held-out pairs."""
    return [f"{colour} {kind}" for colour, kind in S.HELDOUT_COMBOS]


HELDOUT_WORDS = (
    "dye",
    "should be",
    "insert",
    "erase",
    "slide",
    "scale",
    "picture",
    "backdrop",
    "trade",
)


def test_train_and_validation_never_show_heldout_combos_or_phrasings():
    assert len(S.HELDOUT_COMBOS) == 4
    assert all(1 <= len(templates) <= 2 for templates in S.HELDOUT_TEMPLATES.values())
    assert set(S.HELDOUT_TEMPLATES) == set(S.EDIT_KINDS)
    held = set(S.HELDOUT_COMBOS)
    for record in records("train", 3000) + records("validation", 1500):
        before, after, edit = S.decode_annotations(record.annotations(64))
        combos = {shape.combo for shape in before.shapes + after.shapes}
        if edit.shape is not None:
            combos.add(edit.shape.combo)
        assert not combos & held, record.key
        assert not S.is_heldout_template(record.template), record.key
        ((_, template, _),) = S.parse_instruction(record.instruction)
        assert not S.is_heldout_template(template)
        texts = (record.instruction, record.input_caption, record.edited_caption)
        for text in texts:
            assert not any(phrase in text for phrase in heldout_phrases()), text
        assert not any(word in record.instruction for word in HELDOUT_WORDS), record.instruction


def test_heldout_split_uses_heldout_combos_and_phrasings():
    sample = records("heldout", 600)
    held = set(S.HELDOUT_COMBOS)
    seen_combos, seen_templates, touching = set(), set(), 0
    for record in sample:
        assert S.is_heldout_template(record.template), record.instruction
        ((kind, template, _),) = S.parse_instruction(record.instruction)
        assert (kind, template) == (record.edit.kind, record.template)
        in_before = {shape.combo for shape in record.before.shapes} & held
        assert in_before, record.key
        seen_combos |= in_before
        seen_templates.add(record.template)
        touching += bool(S.touched_combos(record.before, record.edit) & held)
    assert seen_combos == held
    assert seen_templates == {t for ts in S.HELDOUT_TEMPLATES.values() for t in ts}
    assert touching >= 0.7 * len(sample)  # the edit itself mostly acts on a held-out pair


def test_references_are_unambiguous_and_shortest():
    for record in records("train", 3000)[:2000] + records("heldout", 600):
        edit = record.edit
        fields = S.parse_instruction(record.instruction)[0][2]
        pairs = [(edit.ref, edit.target, "ref"), (edit.other_ref, edit.other, "ref2")]
        for ref, index, field in pairs:
            if index is None:
                assert ref is None
                continue
            assert S.resolve(record.before, ref) == (index,), record.instruction
            assert fields[field] == ref.text()
            # No description with fewer attributes names the shape alone.
            shape = record.before.shapes[index]
            count = sum(value is not None for value in (ref.colour, ref.size, ref.position))
            for colour, size, position in itertools.product(
                (None, shape.colour), (None, shape.size), (None, *S.POSITIONS)
            ):
                if sum(value is not None for value in (colour, size, position)) < count:
                    shorter = S.Ref(shape.kind, colour, size, position)
                    assert S.resolve(record.before, shorter) != (index,), record.instruction


def test_referring_expressions_on_hand_made_scenes():
    red = S.Shape("circle", "red", "small", 0.25, 0.5)
    blue = S.Shape("circle", "blue", "small", 0.75, 0.5)
    twin = S.Shape("circle", "red", "small", 0.75, 0.5)
    assert S.refer(S.Scene((red, blue), "white"), 0) == S.Ref("circle", "red")
    assert S.refer(S.Scene((red, twin), "white"), 1) == S.Ref("circle", position="right")
    assert S.refer(S.Scene((red, twin), "white"), 1).text() == "the right circle"
    close = S.Shape("circle", "red", "small", 0.4, 0.65)  # within POSITION_GAP both ways
    assert S.refer(S.Scene((red, close), "white"), 0) is None
    lone = S.Scene((S.Shape("star", "green", "large", 0.5, 0.5),), "white")
    assert S.refer(lone, 0).text() == "the star"


def test_captions_and_instruction_wording():
    scene = S.Scene(
        (
            S.Shape("square", "blue", "large", 0.7, 0.3),
            S.Shape("circle", "orange", "small", 0.2, 0.8),
        ),
        "white",
        "black",
    )
    assert S.caption(scene) == (
        "a small orange circle and a large blue square on a background that is white "
        "at the top and black at the bottom"
    )
    add = S.Edit("add", shape=S.Shape("star", "orange", "small", 0.2, 0.2))
    assert S.instruction_text(add, "put {obj} {where}") == "put an orange star in the top left"
    swap = S.Edit("swap", target=0, ref=S.Ref("square"), other=1, other_ref=S.Ref("circle"))
    assert S.instruction_text(swap, "swap {ref} and {ref2}") == "swap the square and the circle"
    grow = S.Edit("resize", target=0, ref=S.Ref("square"), direction="smaller")
    assert S.instruction_text(grow, "{verb} {ref}") == "shrink the square"


# --- determinism, records, schema -------------------------------------------------------------


def comparable(example: dict) -> dict:
    """The example without NaN metadata (NaN != NaN)."""
    return {k: v for k, v in example.items() if not (isinstance(v, float) and math.isnan(v))}


def test_generation_is_deterministic_and_index_stable():
    few = [comparable(e) for e in S.generate_examples(5, split="train", seed=7)]
    many = [comparable(e) for e in S.generate_examples(50, split="train", seed=7)]
    again = [comparable(e) for e in S.generate_examples(5, split="train", seed=7)]
    assert few == many[:5] == again
    assert [comparable(e) for e in S.generate_examples(3, seed=7, start=10)] == many[10:13]
    other_seed = [comparable(e) for e in S.generate_examples(5, split="train", seed=8)]
    validation = [comparable(e) for e in S.generate_examples(5, split="validation", seed=7)]
    for a, b, c in zip(few, other_seed, validation, strict=True):
        assert a["input_image"] != b["input_image"] and a["input_image"] != c["input_image"]
    with pytest.raises(ValueError, match="unknown split"):
        next(S.generate_examples(1, split="test"))


def test_examples_follow_the_schema():
    for index, example in enumerate(S.generate_examples(20, split="heldout", seed=3)):
        assert set(example) == set(FIELDS)
        assert example["key"] == f"shapes/heldout/{index:07d}"
        assert example["seed"] == S.example_seed(3, "heldout", index)
        record = S.make_record(index, split="heldout", seed=3)
        assert example["instruction"] == record.instruction
        assert example["input_caption"] == S.caption(record.before)
        assert example["edited_caption"] == S.caption(record.after)
        assert np.array_equal(decode_png(example["input_image"]), S.render(record.before))
        assert np.array_equal(decode_png(example["edited_image"]), S.render(record.after))
        annotations = json.loads(example["annotations"])
        assert annotations["world"] == "shapes" and annotations["size"] == 64
        assert annotations["template"] == record.template
        assert S.decode_annotations(example["annotations"]) == (
            record.before,
            record.after,
            record.edit,
        )
    with pytest.raises(ValueError, match="world"):
        S.decode_annotations(json.dumps({"world": "other"}))


def test_dicts_round_trip_exactly():
    for record in records("train", 3000)[:500] + records("heldout", 600)[:100]:
        for scene in (record.before, record.after):
            assert S.Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
        edit_dict = json.loads(json.dumps(record.edit.to_dict()))
        assert S.Edit.from_dict(edit_dict) == record.edit
        assert S.Edit.from_dict(edit_dict).to_dict() == record.edit.to_dict()
