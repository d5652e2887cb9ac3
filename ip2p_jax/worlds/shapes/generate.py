"""Generating examples: one record per (index, split, seed), rendered into dataset examples
whose annotations carry both scenes and the edit."""

from __future__ import annotations

import functools
import json
import multiprocessing
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ip2p_jax.data.schema import make_example
from ip2p_jax.pipelines.images import encode_png
from ip2p_jax.worlds.shapes.edits import EDIT_KINDS, Edit, apply_edit, touched_combos
from ip2p_jax.worlds.shapes.raster import render
from ip2p_jax.worlds.shapes.referring import refer
from ip2p_jax.worlds.shapes.sample import edit_options, pick, sample_scene
from ip2p_jax.worlds.shapes.scene import Scene
from ip2p_jax.worlds.shapes.splits import HELDOUT_COMBO_SET, example_seed, split_index
from ip2p_jax.worlds.shapes.templates import (
    HELDOUT_TEMPLATES,
    TRAIN_COUNTERPARTS,
    TRAIN_TEMPLATES,
)
from ip2p_jax.worlds.shapes.wording import caption, instruction_text

WORLD = "shapes"


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


def make_record(index: int, *, split: str = "train", seed: int = 0) -> EditRecord:
    """Example `index` of a split, without images: a function of (index, split, seed) only."""
    example = example_seed(seed, split, index)
    rng = np.random.default_rng(example)
    heldout = split == "heldout"
    allowed = (lambda combo: True) if heldout else (lambda combo: combo not in HELDOUT_COMBO_SET)
    before = sample_scene(rng, allowed, heldout)
    refs = [refer(before, i) for i in range(len(before.shapes))]
    # Uniform over the kinds that have a valid edit here (background always has one).
    for position in rng.permutation(len(EDIT_KINDS)):
        kind = EDIT_KINDS[int(position)]
        options = edit_options(before, kind, refs, rng, allowed)
        if options:
            break
    if heldout:  # prefer an edit that acts on or creates a held-out pair
        touching = [edit for edit in options if touched_combos(before, edit) & HELDOUT_COMBO_SET]
        options = touching or options
    edit = pick(rng, options)
    after = apply_edit(before, edit)
    templates = (HELDOUT_TEMPLATES if heldout else TRAIN_TEMPLATES)[kind]
    template = pick(rng, templates)
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


def in_train_phrasing(record: EditRecord) -> EditRecord:
    """The same scenes and edit, said in the held-out phrasing's nearest training phrasing
    (TRAIN_COUNTERPARTS); a record already in a training phrasing comes back as it is."""
    template = TRAIN_COUNTERPARTS.get(record.template)
    if template is None:
        return record
    return replace(record, template=template, instruction=instruction_text(record.edit, template))


def generate_records(
    num: int, *, split: str = "train", seed: int = 0, start: int = 0
) -> Iterator[EditRecord]:
    """Records start .. start + num - 1 of a split (cheap: no rendering)."""
    split_index(split)
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


# Examples a worker process renders per task: large enough that pickling and scheduling are
# a small share of the work (~0.4 s a chunk at 64 px), small enough to keep every worker busy.
CHUNK = 256


def generate_examples(
    num: int,
    *,
    split: str = "train",
    seed: int = 0,
    size: int = 64,
    start: int = 0,
    workers: int = 1,
) -> Iterator[dict[str, Any]]:
    """`num` rendered examples of a split, deterministic in (split, seed, size) and the
    example index: example i is the same however many are asked for, and however many
    `workers` processes render them (they come back in index order)."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if workers == 1 or num <= CHUNK:
        for record in generate_records(num, split=split, seed=seed, start=start):
            yield record_to_example(record, size)
        return
    chunks = [
        (first, min(CHUNK, start + num - first)) for first in range(start, start + num, CHUNK)
    ]
    render_chunk = functools.partial(_render_chunk, split=split, seed=seed, size=size)
    # Spawned, not forked: the caller may have started JAX's threads, which a fork would copy
    # mid-flight. imap keeps the order and holds at most the chunks not yet consumed.
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(workers, len(chunks))) as pool:
        for examples in pool.imap(render_chunk, chunks):
            yield from examples


def _render_chunk(
    chunk: tuple[int, int], *, split: str, seed: int, size: int
) -> list[dict[str, Any]]:
    first, count = chunk
    return list(generate_examples(count, split=split, seed=seed, size=size, start=first))


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
