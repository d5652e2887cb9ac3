"""Rendering: pixels match the scene annotations exactly (colours, areas, centres), and
generated scenes are valid."""

from __future__ import annotations

import itertools
import math

import numpy as np

from ip2p_jax.pipelines.images import decode_png
from ip2p_jax.worlds import shapes as S
from tests.worlds.conftest import records, region


def background_image(scene: S.Scene, size: int) -> np.ndarray:
    """The per-pixel background colour, as ints."""
    rows = [S.COLOURS[scene.background_at((y + 0.5) / size)] for y in range(size)]
    return np.broadcast_to(np.asarray(rows)[:, None, :], (size, size, 3)).astype(int)


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
