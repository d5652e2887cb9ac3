"""Batch editing from a JSON-lines manifest: streamed in batches, resumable.

Each line is ``{"image": PATH, "instruction": TEXT}`` with optional ``"out"`` (file name in
the output folder), ``"seed"``, ``"text_scale"``, ``"image_scale"``. Image paths are relative
to the manifest's folder. Outputs that already exist are skipped, so a rerun resumes; each
output is written atomically. With aspect-ratio buckets (``ip2p edit --buckets``) the images
are grouped by bucket, each group edited in batches of one shape (apps.bucket_edits).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ip2p_jax.apps.bucket_edits import bucket_batches, describe_batches
from ip2p_jax.data.buckets import Bucket
from ip2p_jax.pipelines.edit import EditPipeline

FIELDS = {"image", "instruction", "out", "seed", "text_scale", "image_scale"}


@dataclasses.dataclass(frozen=True)
class EditJob:
    """One line of the manifest, resolved."""

    line: int
    image: Path
    instruction: str
    out: Path
    seed: int
    text_scale: float
    image_scale: float


def read_manifest(path: Path, out_dir: Path, defaults: dict[str, Any]) -> list[EditJob]:
    """Parses and checks every line up front, so a bad line fails before any compile."""
    jobs = []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err})") from err
        if not isinstance(row, dict) or "image" not in row or "instruction" not in row:
            raise ValueError(f'{where}: needs at least "image" and "instruction"')
        if unknown := set(row) - FIELDS:
            raise ValueError(f"{where}: unknown fields {sorted(unknown)} (known: {sorted(FIELDS)})")
        image = Path(row["image"])
        image = image if image.is_absolute() else path.parent / image
        name = row.get("out") or f"{number:05d}_{image.stem}.png"
        jobs.append(
            EditJob(
                number,
                image,
                str(row["instruction"]),
                out_dir / name,
                int(row.get("seed", defaults["seed"] + number)),
                float(row.get("text_scale", defaults["text_scale"])),
                float(row.get("image_scale", defaults["image_scale"])),
            )
        )
    outs = [job.out for job in jobs]
    if len(set(outs)) != len(outs):
        raise ValueError(f"{path}: two lines write the same output file")
    return jobs


def batches(jobs: list[EditJob], size: int) -> Iterator[list[EditJob]]:
    for start in range(0, len(jobs), size):
        yield jobs[start : start + size]


def edit_jobs(
    pipe: EditPipeline, jobs: list[EditJob], images: list | None = None, **edit_options: Any
) -> list:
    """One ``pipe.edit`` call on the jobs' images (or `images`, one per job), each with its
    instruction, seed and scales."""
    return pipe.edit(
        [job.image for job in jobs] if images is None else images,
        [job.instruction for job in jobs],
        seed=[job.seed for job in jobs],
        text_scale=[job.text_scale for job in jobs],
        image_scale=[job.image_scale for job in jobs],
        **edit_options,
    )


def run_jobs(
    pipe: EditPipeline,
    jobs: list[EditJob],
    *,
    batch_size: int = 4,
    resume: bool = True,
    buckets: tuple[Bucket, ...] | None = None,
    **edit_options: Any,
) -> tuple[int, int]:
    """Edits the jobs (with ``resume``, only those whose output is missing); returns
    (edited, skipped as already done). With ``buckets``, the images are edited at their
    aspect-ratio buckets' sizes, a bucket's batches of one shape (apps.bucket_edits)."""
    pending = [job for job in jobs if not (resume and job.out.exists())]
    if buckets is None:
        edited = (
            (group, edit_jobs(pipe, group, **edit_options))
            for group in batches(pending, batch_size)
        )
    else:
        planned = bucket_batches(pending, buckets, batch_size)
        print(f"aspect-ratio buckets: {describe_batches(planned)}")
        edited = (
            (
                batch.jobs,
                batch.outputs(
                    edit_jobs(
                        pipe, batch.rows, batch.inputs(), **{**edit_options, **batch.size_options()}
                    )
                ),
            )
            for batch in planned
        )
    done = 0
    for group, images in edited:
        for job, image in zip(group, images, strict=True):
            save_atomically(image, job.out)
        done += len(group)
        print(f"edited {done}/{len(pending)} ({len(jobs) - len(pending)} were done already)")
    return done, len(jobs) - len(pending)


def save_atomically(image, path: Path) -> None:
    """Writes beside the target, then renames: a killed run leaves no half-written image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format=_format(path))
    os.replace(tmp, path)


def _format(path: Path) -> str:
    return {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
