"""Whole datasets from each source, as `ip2p datagen` builds them: the shapes world, the
original release's folder format and the hub parquet sets, each written as one TFDS dataset."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from ip2p_jax.data import importers
from ip2p_jax.data.edit_pairs import EditPairSource, split_sizes, write_dataset

SPLITS = ("train", "validation", "test")


def build_shapes(
    out_dir: str | os.PathLike,
    num: int,
    *,
    num_validation: int | None = None,
    num_heldout: int | None = None,
    size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    workers: int = 1,
) -> Path:
    """The shapes world: `num` train examples, and validation (same distribution) and heldout
    (unseen phrasings and colour/shape combinations) splits, by default num/20 each. With
    `workers` > 1 that many processes render (the dataset is the same, byte for byte)."""
    from ip2p_jax.worlds import shapes

    if num < 1:
        raise ValueError(f"--num must be at least 1, got {num}")
    if size < 16 or size % 8:
        raise ValueError(f"--size must be a multiple of 8 and at least 16, got {size}")
    side = max(1, num // 20)
    counts = {
        "train": num,
        "validation": side if num_validation is None else num_validation,
        "heldout": side if num_heldout is None else num_heldout,
    }
    splits = {
        split: shapes.generate_examples(count, split=split, seed=seed, size=size, workers=workers)
        for split, count in counts.items()
        if count > 0
    }
    return write_dataset(
        out_dir,
        splits,
        description="The shapes world: coloured shapes, instructed edits with exact ground "
        "truth (annotations hold the before/after scenes).",
        metadata={"source": "shapes", "size": size, "seed": seed, "counts": counts},
        overwrite=overwrite,
    )


def import_original(
    folder: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False
) -> tuple[Path, list[importers.ImportReport]]:
    """The original release's folder, split over prompts 0.9/0.05/0.05 as its loader did.
    A split with no prompt (fewer than 20 prompts) is left out with a warning: TFDS cannot
    write an empty split."""
    count = len(importers.read_seeds(folder))
    bounds = importers.split_bounds(count)
    empty = [split for split in SPLITS if bounds[split][0] == bounds[split][1]]
    if len(empty) == len(SPLITS):
        raise ValueError(f"{folder}/seeds.json lists no prompt with a kept pair")
    if empty:
        warnings.warn(
            f"{folder}: {count} prompts leave the split(s) {empty} empty (0.9/0.05/0.05 "
            "over prompts, as the original); they are left out",
            importers.DataImportWarning,
            stacklevel=2,
        )
    kept = [split for split in SPLITS if split not in empty]
    reports = {split: importers.ImportReport(source=f"{folder} ({split})") for split in kept}
    splits = {
        split: importers.import_original(folder, split, report=reports[split]) for split in kept
    }
    path = write_dataset(
        out_dir,
        splits,
        description="InstructPix2Pix pairs imported from the original folder format.",
        metadata={"source": "original", "folder": str(Path(folder).resolve())},
        overwrite=overwrite,
    )
    return path, list(reports.values())


def import_parquet(
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> tuple[Path, list[importers.ImportReport]]:
    """The hub parquet sets, split by a stable hash of each example's key."""
    files = importers.parquet_files(list(paths))
    reports = {split: importers.ImportReport(source=f"parquet ({split})") for split in SPLITS}
    splits = {
        split: importers.import_parquet(files, split=split, report=reports[split])
        for split in SPLITS
    }
    path = write_dataset(
        out_dir,
        splits,
        description="InstructPix2Pix pairs imported from the hub parquet sets.",
        metadata={
            "source": "parquet",
            "files": [str(file) for file in files],
            "split": dict(importers.DEFAULT_FRACTIONS),
        },
        overwrite=overwrite,
    )
    return path, list(reports.values())


def describe(path: str | os.PathLike) -> str:
    """Splits, sizes, metadata and the first example of each split, for `ip2p datagen info`."""
    sizes = split_sizes(path)
    lines = []
    for split, count in sizes.items():
        source = EditPairSource(path, split)
        if not lines:
            lines += [f"{source.path}", f"metadata: {source.metadata}"]
        first = source[0] if count else None
        sample = f"  e.g. {first['key']}: {first['instruction']!r}" if first else ""
        lines.append(f"{split}: {count} examples{sample}")
    return "\n".join(lines)
