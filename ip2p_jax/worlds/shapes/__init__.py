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

Modules, each depending only on those above it: palette (colour, kind and size names),
outlines (each kind in the unit circle), scene (Shape, Scene, validity), raster (rendering),
referring (naming a shape), edits (Edit, apply_edit), splits (held-out pairs, seeds),
templates (phrasings), wording (captions, instructions), parse (instructions back to
templates), sample (random scenes and edits), generate (records and examples).
"""

from __future__ import annotations

from ip2p_jax.worlds.shapes.edits import (
    DIRECTIONS,
    EDIT_KINDS,
    MOVE_STEP,
    RESIZE_DIRECTIONS,
    Edit,
    apply_edit,
    edit_kinds,
    touched_combos,
)
from ip2p_jax.worlds.shapes.generate import (
    WORLD,
    EditRecord,
    decode_annotations,
    generate_examples,
    generate_records,
    in_train_phrasing,
    make_record,
    record_to_example,
)
from ip2p_jax.worlds.shapes.outlines import UNIT_AREAS
from ip2p_jax.worlds.shapes.palette import COLOURS, SHAPE_KINDS, SIZE_ORDER, SIZES
from ip2p_jax.worlds.shapes.parse import parse_instruction
from ip2p_jax.worlds.shapes.raster import SUPERSAMPLE, render, shape_bbox, shape_coverage
from ip2p_jax.worlds.shapes.referring import POSITION_GAP, POSITIONS, Ref, refer, resolve
from ip2p_jax.worlds.shapes.sample import GRID, SHAPE_COUNT_P, SPLIT_BACKGROUND_P
from ip2p_jax.worlds.shapes.scene import EDGE, GAP, MAX_SHAPES, Scene, Shape, scene_problems
from ip2p_jax.worlds.shapes.splits import HELDOUT_COMBOS, SPLITS, example_seed
from ip2p_jax.worlds.shapes.templates import (
    HELDOUT_TEMPLATES,
    TRAIN_COUNTERPARTS,
    TRAIN_TEMPLATES,
    is_heldout_template,
)
from ip2p_jax.worlds.shapes.wording import caption, instruction_text, region_phrase

__all__ = [
    "COLOURS",
    "DIRECTIONS",
    "EDGE",
    "EDIT_KINDS",
    "Edit",
    "EditRecord",
    "GAP",
    "GRID",
    "HELDOUT_COMBOS",
    "HELDOUT_TEMPLATES",
    "MAX_SHAPES",
    "MOVE_STEP",
    "POSITIONS",
    "POSITION_GAP",
    "RESIZE_DIRECTIONS",
    "Ref",
    "SHAPE_COUNT_P",
    "SHAPE_KINDS",
    "SIZES",
    "SIZE_ORDER",
    "SPLITS",
    "SPLIT_BACKGROUND_P",
    "SUPERSAMPLE",
    "Scene",
    "Shape",
    "TRAIN_COUNTERPARTS",
    "TRAIN_TEMPLATES",
    "UNIT_AREAS",
    "WORLD",
    "apply_edit",
    "caption",
    "decode_annotations",
    "edit_kinds",
    "example_seed",
    "generate_examples",
    "generate_records",
    "in_train_phrasing",
    "instruction_text",
    "is_heldout_template",
    "make_record",
    "parse_instruction",
    "record_to_example",
    "refer",
    "region_phrase",
    "render",
    "resolve",
    "scene_problems",
    "shape_bbox",
    "shape_coverage",
    "touched_combos",
]
