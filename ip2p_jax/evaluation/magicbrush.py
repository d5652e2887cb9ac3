"""The MagicBrush protocol: edit the test sessions as the MagicBrush scripts do, then score.

Editing follows the authors' edit_cli_single_multi_turn.py: turn 1 is edited from the
session's input image; in the single-turn setting every later turn k is edited from its
ground-truth input (the ground truth of turn k-1), in the multi-turn setting from the
model's own saved turn k-1. Every edit uses the same seed (the script reseeds before each),
and each input is fitted as the script fits it (long side near ``resolution``, sides multiples
of 64, centre-cropped to that aspect, Lanczos); the output is kept at that size.

Scoring follows evaluation/image_eval.py (magicbrush_metrics): single-turn ('all turn' in
the script) averages every turn's independent edit against that turn's target; multi-turn
('final turn') averages each session's last iterative edit against its last target.

Edits run in waves (turn 1 and the single-turn edits, then multi-turn turn 2, turn 3, ...),
each in batches of one input size padded to one batch size, so the model compiles once per
size. Images are written atomically and a rerun edits only the missing ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ip2p_jax.evaluation.magicbrush_layout import (
    Session,
    Turn,
    first_output,
    multi_turn_output,
    single_turn_output,
)
from ip2p_jax.evaluation.magicbrush_metrics import MagicBrushScorer
from ip2p_jax.evaluation.plots import save_png
from ip2p_jax.pipelines.images import load_image
from ip2p_jax.weights.atomic import record_settings, write_text_atomically

SINGLE, MULTI = "single_turn", "multi_turn"
TURN_CHOICES = {"single": (SINGLE,), "multi": (MULTI,), "both": (SINGLE, MULTI)}
METRICS = ("l1", "l2", "clip_i", "clip_t", "dino", "clip_t_oracle")
SIZE_MULTIPLE = 64  # the edit script fits inputs to multiples of 64
SETTINGS_FILE = "edit_settings.json"

# (input images, instructions) -> edited images, one per input.
EditFn = Callable[[list[Image.Image], list[str]], list[Image.Image]]


def edit_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The size the MagicBrush edit script fits an input to: scaled so the long side is
    ``resolution``, the short side rounded up to a multiple of 64 (which sets the scale),
    both sides then floored to multiples of 64."""
    if resolution < SIZE_MULTIPLE:
        raise ValueError(f"resolution must be at least {SIZE_MULTIPLE}, got {resolution}")
    factor = resolution / max(width, height)
    short = min(width, height)
    factor = math.ceil(short * factor / SIZE_MULTIPLE) * SIZE_MULTIPLE / short
    return (
        int((width * factor) // SIZE_MULTIPLE) * SIZE_MULTIPLE,
        int((height * factor) // SIZE_MULTIPLE) * SIZE_MULTIPLE,
    )


def pipeline_editor(
    pipe,
    *,
    steps: int,
    text_scale: float,
    image_scale: float,
    sampler: str,
    seed: int,
    resolution: int,
) -> EditFn:
    """An EditFn running ``pipe.edit`` as the edit script: inputs fitted to ``edit_size``,
    every image with the same ``seed``, outputs at the fitted size."""

    def edit(images: list[Image.Image], instructions: list[str]) -> list[Image.Image]:
        sizes = [edit_size(*image.size, resolution) for image in images]
        results: list[Image.Image | None] = [None] * len(images)
        for size in dict.fromkeys(sizes):  # one pipe call per size
            group = [k for k, s in enumerate(sizes) if s == size]
            fitted = [ImageOps.fit(images[k], size, method=Image.LANCZOS) for k in group]
            edited = pipe.edit(
                fitted,
                [instructions[k] for k in group],
                steps=steps,
                text_scale=text_scale,
                image_scale=image_scale,
                seed=[seed] * len(group),
                sampler=sampler,
                resolution=max(size),  # already fitted: target_size keeps it as it is
                multiple_of=SIZE_MULTIPLE,
                keep_size=False,
                progress=False,
            )
            for k, image in zip(group, edited, strict=True):
                results[k] = image
        return results  # type: ignore[return-value]

    return edit


# -- editing ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EditJob:
    """One image to generate: what it edits, how, and where it goes."""

    source: Path
    instruction: str
    out: Path


def plan_waves(
    sessions: Sequence[Session], out: Path, settings: Sequence[str]
) -> list[list[EditJob]]:
    """The edits in dependency order: wave 1 holds every turn 1 and (single-turn) every later
    turn from its ground truth; wave k > 1 holds multi-turn turn k, from wave k-1's output."""
    first: list[EditJob] = []
    chained: dict[int, list[EditJob]] = {}
    for session in sessions:
        head = session.turns[0]
        first.append(EditJob(head.source, head.instruction, first_output(out, session.name)))
        for previous, turn in zip(session.turns, session.turns[1:], strict=False):
            if SINGLE in settings:
                first.append(EditJob(turn.source, turn.instruction, single_turn_output(out, turn)))
            if MULTI in settings:
                chained.setdefault(turn.number, []).append(
                    EditJob(
                        multi_turn_output(out, previous),
                        turn.instruction,
                        multi_turn_output(out, turn),
                    )
                )
    return [first] + [chained[k] for k in sorted(chained)]


def generate(
    sessions: Sequence[Session],
    editor: EditFn,
    out: Path,
    *,
    settings: Sequence[str] = (SINGLE, MULTI),
    batch_size: int = 8,
    progress: bool | None = None,
) -> tuple[int, int]:
    """Generates every missing image of ``settings`` under ``out``; returns (edited, skipped
    as already there). Each batch is one input size, padded by repeating its last job to one
    batch size for the whole run (``batch_size``, or fewer when fewer edits are left)."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    waves = plan_waves(sessions, out, settings)
    for job in (job for wave in waves for job in wave):
        # A run killed mid-write leaves its temporary beside the image (its name holds
        # '.png', which the script's own loader would take for an edit): drop it.
        for stale in job.out.parent.glob(f".{job.out.name}.*"):
            stale.unlink()
    total = sum(len(wave) for wave in waves)
    pending = [[job for job in wave if not job.out.exists()] for wave in waves]
    todo = sum(len(wave) for wave in pending)
    size = min(batch_size, todo) if todo else 1
    enabled = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=todo, unit="edit", disable=not enabled)
    for number, wave in enumerate(pending, start=1):
        bar.set_description("turn 1 and single-turn" if number == 1 else f"multi-turn {number}")
        by_size: dict[tuple[int, int], list[EditJob]] = {}
        for job in wave:  # the chained inputs of this wave exist now
            with Image.open(job.source) as image:
                by_size.setdefault(image.size, []).append(job)
        for jobs in by_size.values():
            for start in range(0, len(jobs), size):
                chunk = jobs[start : start + size]
                padded = chunk + chunk[-1:] * (size - len(chunk))
                edited = editor(
                    [load_image(job.source) for job in padded], [job.instruction for job in padded]
                )
                for job, image in zip(chunk, edited[: len(chunk)], strict=True):
                    save_png(image, job.out)
                bar.update(len(chunk))
    bar.close()
    return todo, total - todo


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Records the edit settings in ``out``; a folder whose images were made with others is
    refused (a resumed run must not mix them)."""
    record_settings(
        out / SETTINGS_FILE, settings, fix="use another --out, or the same settings to resume"
    )


# -- scoring ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pair:
    """A generated image and the ground truth it is scored against."""

    setting: str
    turn: Turn  # the turn whose target it is
    generated: Path


def scored_pairs(sessions: Sequence[Session], out: Path, settings: Sequence[str]) -> list[Pair]:
    """Single-turn: every turn's independent edit; multi-turn: each session's final
    iterative edit (the script's all-turn and final-turn pairs)."""
    pairs = []
    if SINGLE in settings:
        pairs += [
            Pair(SINGLE, turn, single_turn_output(out, turn)) for s in sessions for turn in s.turns
        ]
    if MULTI in settings:
        pairs += [Pair(MULTI, s.turns[-1], multi_turn_output(out, s.turns[-1])) for s in sessions]
    return pairs


def score(
    sessions: Sequence[Session],
    out: Path,
    scorer: MagicBrushScorer,
    *,
    settings: Sequence[str] = (SINGLE, MULTI),
    chunk: int = 64,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Scores the generated images under ``out``, ``chunk`` pairs in memory at a time:
    {'summary': {setting: {count, means}}, 'examples': [one record per pair]}."""
    from tqdm.auto import tqdm

    pairs = scored_pairs(sessions, out, settings)
    missing = [str(p.generated) for p in pairs if not p.generated.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} generated images are missing: {missing[:3]}")
    enabled = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=len(pairs), unit="pair", desc="scoring", disable=not enabled)
    scores: list[dict[str, float]] = []
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        scores += scorer.score(
            [load_image(p.generated) for p in part],
            [load_image(p.turn.target) for p in part],
            [p.turn.caption for p in part],
        )
        bar.update(len(part))
    bar.close()
    examples = [
        {
            "setting": p.setting,
            "session": p.turn.session,
            "turn": p.turn.number,
            "generated": str(p.generated.relative_to(out)),
            "target": str(p.turn.target),
            **values,
        }
        for p, values in zip(pairs, scores, strict=True)
    ]
    summary = {}
    for setting in settings:
        rows = [e for e in examples if e["setting"] == setting]
        names = [m for m in METRICS if m in rows[0]]
        summary[setting] = {
            "count": len(rows),
            **{m: float(np.mean([row[m] for row in rows])) for m in names},
        }
    return {"summary": summary, "examples": examples}


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """The per-setting means as aligned text."""
    names = [m for m in METRICS if any(m in row for row in summary.values())]
    lines = [f"{'setting':<12} {'n':>5} " + " ".join(f"{m:>13}" for m in names)]
    for setting, row in summary.items():
        values = " ".join(f"{row[m]:>13.4f}" if m in row else f"{'-':>13}" for m in names)
        lines.append(f"{setting:<12} {row['count']:>5} {values}")
    return "\n".join(lines)


def write_metrics(path: Path, result: dict[str, Any], settings: dict[str, Any]) -> None:
    """Settings, per-setting means and every pair's scores as one JSON file, atomically."""
    report = {"settings": settings, **result}
    write_text_atomically(path, json.dumps(report, indent=2) + "\n")
