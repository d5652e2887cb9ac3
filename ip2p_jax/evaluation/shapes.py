"""``ip2p eval shapes``: a model edits the shapes world's held-out examples, and each edit is
scored against the exact after-scene (ip2p_jax.worlds.shapes.score), per edit kind.

The examples are generated, not read from a dataset: example i of a split is the same for a
given seed, so the score of a model is repeatable on any machine.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ip2p_jax.weights.atomic import write_text_atomically
from ip2p_jax.worlds.shapes.generate import EditRecord, generate_records, in_train_phrasing
from ip2p_jax.worlds.shapes.raster import render
from ip2p_jax.worlds.shapes.score import EditScore, score_edit, summarize


class Editor(Protocol):
    """What is evaluated: EditPipeline.edit's signature, as far as used here."""

    def edit(self, images: Any, instructions: Any, **options: Any) -> list[Image.Image]: ...


def evaluate_shapes(
    editor: Editor,
    *,
    num: int = 200,
    split: str = "heldout",
    seed: int = 0,
    size: int = 64,
    batch_size: int = 16,
    train_phrasing: bool = False,
    **edit_options: Any,
) -> tuple[dict[str, dict[str, float]], list[tuple[EditRecord, EditScore]]]:
    """Edits examples 0..num-1 of a shapes split with `editor` and scores them.

    Returns the per-kind table (see score.summarize) and every (record, score). Example i
    gets seed `seed + i`, so a batch size changes nothing. ``edit_options`` go to
    ``editor.edit`` (steps, text_scale, image_scale, sampler, progress). With
    ``train_phrasing`` each held-out instruction is said in its nearest training phrasing
    (same scenes, same edits): what is left of the gap to validation is the new pairs' cost.
    """
    if num < 1 or batch_size < 1:
        raise ValueError(f"num and batch_size must be at least 1, got {num} and {batch_size}")
    records = list(generate_records(num, split=split, seed=seed))
    if train_phrasing:
        records = [in_train_phrasing(record) for record in records]
    results: list[tuple[EditRecord, EditScore]] = []
    for start in range(0, num, batch_size):
        batch = records[start : start + batch_size]
        edited = editor.edit(
            [Image.fromarray(render(record.before, size)) for record in batch],
            [record.instruction for record in batch],
            seed=[seed + start + i for i in range(len(batch))],
            resolution=size,
            **edit_options,
        )
        for record, image in zip(batch, edited, strict=True):
            pixels = np.asarray(image.convert("RGB").resize((size, size)))
            score = score_edit(pixels, record.before, record.after, record.instruction)
            results.append((record, score))
    return summarize((record.edit.kind, score) for record, score in results), results


def format_table(table: dict[str, dict[str, float]]) -> str:
    """The per-kind table as aligned text."""
    lines = [f"{'edit kind':<12} {'n':>5} {'success':>8} {'PSNR dB':>8} {'L1':>7}"]
    for kind, row in table.items():
        lines.append(
            f"{kind:<12} {row['count']:>5} {100 * row['success']:>7.1f}% "
            f"{row['psnr']:>8.2f} {row['l1']:>7.4f}"
        )
    return "\n".join(lines)


def write_report(
    path: str | os.PathLike,
    table: dict[str, dict[str, float]],
    results: list[tuple[EditRecord, EditScore]],
    settings: dict[str, Any],
) -> None:
    """The table, the settings and every example's score as one JSON file (atomic)."""
    examples = [
        {"key": r.key, "kind": r.edit.kind, "instruction": r.instruction, **asdict(s)}
        for r, s in results
    ]
    report = {"settings": settings, "table": table, "examples": examples}
    write_text_atomically(path, json.dumps(report, indent=2))
