"""The paper's evaluation sweep (metrics/compute_metrics.py) over an edit-pair dataset.

The same examples, with the same seeds (example k: ``seed + k``), are edited at every sweep
point: InstructPix2Pix at each (s_T, s_I), SDEdit at each strength. Each edit is scored
(clip_metrics.EditScorer) and every point's scores are averaged into one row. Edits run in
fixed-size batches (the last one padded), so a method compiles once (SDEdit once per
strength: a strength is a number of steps).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from ip2p_jax.evaluation.clip_metrics import METRICS, EditScorer, to_unit_range
from ip2p_jax.pipelines.images import decode_png
from ip2p_jax.weights.atomic import write_text_atomically

IP2P = "instruct-pix2pix"
SDEDIT = "sdedit"
PAPER_IMAGE_SCALES = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2)
PAPER_TEXT_SCALES = (7.5,)
DEFAULT_STRENGTHS = (0.3, 0.5, 0.7, 0.9)
CAPTION_FIELDS = ("instruction", "input_caption", "edited_caption")


@dataclasses.dataclass(frozen=True)
class EvalExample:
    """One dataset example, decoded and resized to the evaluation size."""

    index: int  # in its split
    key: str
    instruction: str
    input_caption: str
    edited_caption: str
    image: np.ndarray  # uint8 (S, S, 3)
    target: np.ndarray | None  # the dataset's edited image, uint8 (S, S, 3), if it has one


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One scale setting of one method; SDEdit's ``text_scale`` is its guidance scale."""

    method: str
    text_scale: float
    image_scale: float | None = None
    strength: float | None = None

    @property
    def label(self) -> str:
        if self.method == IP2P:
            return f"s_T={self.text_scale:g} s_I={self.image_scale:g}"
        return f"SDEdit s={self.strength:g}"

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "text_scale": self.text_scale}
        if self.method == IP2P:
            out["image_scale"] = self.image_scale
        else:
            out["strength"] = self.strength
        return out


def ip2p_points(
    text_scales: Sequence[float] = PAPER_TEXT_SCALES,
    image_scales: Sequence[float] = PAPER_IMAGE_SCALES,
) -> list[SweepPoint]:
    """InstructPix2Pix at every (s_T, s_I), s_I varying fastest."""
    return [
        SweepPoint(IP2P, float(t), image_scale=float(i)) for t in text_scales for i in image_scales
    ]


def sdedit_points(
    strengths: Sequence[float] = DEFAULT_STRENGTHS, guidance_scale: float = 7.5
) -> list[SweepPoint]:
    """SDEdit at every strength."""
    return [SweepPoint(SDEDIT, float(guidance_scale), strength=float(s)) for s in strengths]


# -- the data ---------------------------------------------------------------------------------


def _square(data: bytes, size: int) -> np.ndarray:
    """Decoded, centre-cropped to a square and resized to size x size (Lanczos): the original
    evaluated square images at one resolution, and one size keeps a single compile."""
    pixels = decode_png(data)
    height, width = pixels.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    image = Image.fromarray(pixels[top : top + side, left : left + side])
    if image.size != (size, size):
        image = image.resize((size, size), Image.LANCZOS)
    return np.asarray(image)


def load_examples(
    data: str | os.PathLike,
    *,
    split: str = "validation",
    num: int = 100,
    resolution: int = 256,
    order: str = "first",
    seed: int = 0,
    with_targets: bool = True,
) -> list[EvalExample]:
    """``num`` examples of a split: the first ones (``order='first'``) or the first of a
    seeded permutation (``'random'``, as the original's randperm). Every chosen example must
    have an instruction and both captions: the direction similarity needs the captions."""
    from ip2p_jax.data.edit_pairs import EditPairSource

    if num < 1:
        raise ValueError(f"--num must be at least 1, got {num}")
    if resolution < 8 or resolution % 8:
        raise ValueError(f"--resolution must be a positive multiple of 8, got {resolution}")
    if order not in ("first", "random"):
        raise ValueError(f"order must be 'first' or 'random', got {order!r}")
    source = EditPairSource(data, split)
    if num > len(source):
        raise ValueError(
            f"{source.path} split {split!r} has {len(source)} examples; --num {num} asks for more"
        )
    indices = (
        np.arange(num)
        if order == "first"
        else np.random.default_rng(seed).permutation(len(source))[:num]
    )
    examples, lacking = [], []
    for index in indices.tolist():
        record = source[index]
        missing = [name for name in CAPTION_FIELDS if not record.get(name, "").strip()]
        if missing:
            lacking.append(f"example {index} ({record.get('key', '?')}): {', '.join(missing)}")
            continue
        examples.append(
            EvalExample(
                index=index,
                key=record["key"],
                instruction=record["instruction"],
                input_caption=record["input_caption"],
                edited_caption=record["edited_caption"],
                image=_square(record["input_image"], resolution),
                target=_square(record["edited_image"], resolution) if with_targets else None,
            )
        )
    if lacking:
        shown = "; ".join(lacking[:5]) + (
            f"; and {len(lacking) - 5} more" if len(lacking) > 5 else ""
        )
        raise ValueError(
            f"{source.path} split {split!r}: {len(lacking)} of {num} examples lack a field the "
            f"CLIP metrics need (empty {'/'.join(CAPTION_FIELDS)}): {shown}"
        )
    return examples


# -- editing ----------------------------------------------------------------------------------

# (images, examples, points, seeds) -> edited uint8 images at the inputs' size. One call is
# one batch; all its points share a method (and, for SDEdit, a strength).
EditFn = Callable[[list[Image.Image], list[EvalExample], list[SweepPoint], list[int]], list]


def ip2p_editor(pipe, *, steps: int, sampler: str = "euler_ancestral") -> EditFn:
    """An EditFn running ``EditPipeline.edit`` at each job's (s_T, s_I)."""

    def edit(images, examples, points, seeds):
        return pipe.edit(
            images,
            [e.instruction for e in examples],
            steps=steps,
            text_scale=[p.text_scale for p in points],
            image_scale=[p.image_scale for p in points],
            seed=seeds,
            sampler=sampler,
            resolution=images[0].width,
            keep_size=False,
            progress=False,
        )

    return edit


def sdedit_editor(pipe, *, steps: int, sampler: str = "euler_ancestral") -> EditFn:
    """An EditFn running ``SDEditPipeline.edit`` from each example's edited caption."""

    def edit(images, examples, points, seeds):
        strengths = {p.strength for p in points}
        if len(strengths) != 1:
            raise ValueError(f"one SDEdit batch runs one strength, got {sorted(strengths)}")
        return pipe.edit(
            images,
            [e.edited_caption for e in examples],
            strength=points[0].strength,
            steps=steps,
            guidance_scale=[p.text_scale for p in points],
            seed=seeds,
            sampler=sampler,
            resolution=images[0].width,
            progress=False,
        )

    return edit


@dataclasses.dataclass
class SweepResult:
    """Per-point rows (means and count), per-example scores, and the edits kept for a grid."""

    rows: list[dict[str, Any]]
    examples: list[dict[str, Any]]
    grid_edits: dict[SweepPoint, list[np.ndarray]]


def _batches(jobs: list, batch_size: int) -> list[tuple[list, int]]:
    """Chunks of ``batch_size`` (at most the job count); the last is padded by repeating its
    final job, so every chunk has the same shape. Returns (chunk, number of real jobs)."""
    size = min(batch_size, len(jobs))
    out = []
    for start in range(0, len(jobs), size):
        chunk = jobs[start : start + size]
        real = len(chunk)
        out.append((chunk + chunk[-1:] * (size - real), real))
    return out


def run_sweep(
    examples: Sequence[EvalExample],
    scorer: EditScorer,
    editors: dict[str, EditFn],
    points: Sequence[SweepPoint],
    *,
    seed: int = 0,
    batch_size: int = 8,
    grid_rows: int = 4,
    progress: bool | None = None,
) -> SweepResult:
    """Edits every example at every point with its method's editor and scores each edit.

    Example k gets the seed ``seed + k`` at every point. Jobs batch across the points of a
    method (scales are data), except SDEdit's strengths, which batch apart. The edits of
    the first ``grid_rows`` examples are kept for the grid.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    missing = sorted({p.method for p in points} - set(editors))
    if missing:
        raise ValueError(f"no editor for {missing}")
    examples = list(examples)
    images = [Image.fromarray(e.image) for e in examples]
    groups: dict[tuple, list[tuple[SweepPoint, int]]] = {}
    for point in points:
        group = (point.method, point.strength)  # SDEdit compiles per strength
        groups.setdefault(group, []).extend((point, k) for k in range(len(examples)))
    scores: dict[tuple[SweepPoint, int], dict[str, float]] = {}
    grid: dict[SweepPoint, list[np.ndarray]] = {p: [] for p in points}
    enabled = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=len(points) * len(examples), unit="edit", disable=not enabled)
    for (method, _), jobs in groups.items():
        for chunk, real in _batches(jobs, batch_size):
            bar.set_description(f"{method} {chunk[0][0].label}")
            edited = editors[method](
                [images[k] for _, k in chunk],
                [examples[k] for _, k in chunk],
                [point for point, _ in chunk],
                [seed + k for _, k in chunk],
            )
            chunk = chunk[:real]  # drop the padding
            picked = [examples[k] for _, k in chunk]
            edits = np.stack(
                [
                    _at_size(edit, e.image.shape[:2])
                    for edit, e in zip(edited[:real], picked, strict=True)
                ]
            )
            targets = [e.target for e in picked]
            batch_scores = scorer.score(
                to_unit_range([e.image for e in picked]),
                to_unit_range(edits),
                [e.input_caption for e in picked],
                [e.edited_caption for e in picked],
                None if any(t is None for t in targets) else to_unit_range(targets),
            )
            for (point, k), edit, score in zip(chunk, edits, batch_scores, strict=True):
                scores[point, k] = score
                if k < grid_rows:
                    grid[point].append(edit)
            bar.update(real)
    bar.close()
    records = [
        {
            **point.fields(),
            "index": examples[k].index,
            "key": examples[k].key,
            "seed": seed + k,
            **scores[point, k],
        }
        for point in points
        for k in range(len(examples))
    ]
    return SweepResult(summarize(points, scores, len(examples)), records, grid)


def _at_size(edit: Image.Image | np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """An edit as uint8 RGB at the input's (H, W) (resized when the editor returned another)."""
    image = edit if isinstance(edit, Image.Image) else Image.fromarray(np.asarray(edit))
    image = image.convert("RGB")
    if image.size != (shape[1], shape[0]):
        image = image.resize((shape[1], shape[0]), Image.LANCZOS)
    return np.asarray(image)


def summarize(
    points: Sequence[SweepPoint], scores: dict[tuple[SweepPoint, int], dict[str, float]], n: int
) -> list[dict[str, Any]]:
    """One row per point: its fields, the count and the mean of each metric."""
    rows = []
    for point in points:
        per_example = [scores[point, k] for k in range(n)]
        names = [m for m in METRICS if m in per_example[0]]
        means = {m: float(np.mean([s[m] for s in per_example])) for m in names}
        rows.append({**point.fields(), "count": n, **means})
    return rows


# -- reporting --------------------------------------------------------------------------------


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as aligned text: method, scale, count and each metric present."""
    names = [m for m in METRICS if any(m in row for row in rows)]
    header = f"{'method':<17} {'s_T':>5} {'scale':>6} {'n':>5} " + " ".join(
        f"{m:>14}" for m in names
    )
    lines = [header]
    for row in rows:
        scale = row.get("image_scale", row.get("strength"))
        values = " ".join(
            f"{row[m]:>14.4f}" if m in row and math.isfinite(row[m]) else f"{'-':>14}"
            for m in names
        )
        lines.append(
            f"{row['method']:<17} {row['text_scale']:>5g} {scale:>6g} {row['count']:>5} {values}"
        )
    return "\n".join(lines)


def write_metrics(path: str | os.PathLike, result: SweepResult, settings: dict[str, Any]) -> None:
    """settings, rows and per-example scores as one JSON file, written atomically."""
    report = {"settings": settings, "rows": result.rows, "examples": result.examples}
    write_text_atomically(path, json.dumps(report, indent=2) + "\n")
