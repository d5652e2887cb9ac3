"""Generated pairs on disk in the original release's folder layout, one folder per prompt,
each written whole or not at all, so a restarted job skips exactly the finished prompts:

    generation.json              the recipe (checked again on restart)
    0000012/prompt.json          {"input": ..., "edit": ..., "output": ..., "id": ...}
    0000012/3713524215_0.jpg     input image of the kept sample with seed 3713524215
    0000012/3713524215_1.jpg     its edited image
    0000012/metadata.jsonl       {"seed": ..., "p2p_threshold": ..., "cfg_scale": ..., clip_sim_*}
    seeds.json                   [["0000012", ["3713524215", ...]], ...] once a shard finishes
    jobs/shard-00000-of-00001.json   a job's summary: counts, failed prompts and why

A prompt is written to a hidden staging folder (`.0000012.xxxx`) and renamed into place when
whole. A writer killed mid-write leaves the staging folder, which no listing takes for a prompt
and the next start of a job over that prompt removes. A prompt that raised gets no folder, so a
rerun tries it again.

`ip2p datagen import original` (ip2p_jax.data.build.import_original) turns it into the TFDS
dataset; `ip2p datagen pairs --dataset` does that at the end of a complete run.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ip2p_jax.weights.atomic import atomic_folder, record_settings, write_text_atomically

JPEG_QUALITY = 100  # as the original saved its pairs
RECIPE_FILE = "generation.json"
JOBS_FOLDER = "jobs"  # one summary per job (shard): counts and failed prompts


@dataclass(frozen=True)
class KeptPair:
    """One sample that passed the filter: its images (uint8, H x W x 3) and metadata."""

    seed: int
    input_image: np.ndarray
    edited_image: np.ndarray
    metadata: Mapping[str, float]


class PairFolder:
    """The output folder of a pair-generation job (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, recipe: Mapping[str, Any] | None = None):
        """Opens `root`, writing `recipe` there, or checking it against the one already there:
        a restarted job must render with the same recipe, or its seeds would mean other pairs.
        Without `recipe`, opens a folder whose job has written its recipe (a job's worker)."""
        self.root = Path(root)
        path = self.root / RECIPE_FILE
        if recipe is None:
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: the job's driver writes it first")
            self.recipe = json.loads(path.read_text())
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self.recipe = record_settings(
            path,
            dict(recipe),
            fix="use a new output folder, or the same settings and models to continue it",
        )

    def prompt_dir(self, index: int) -> Path:
        """The folder of prompt `index` (its line number in the prompts file)."""
        return self.root / f"{index:07d}"

    def is_done(self, index: int) -> bool:
        """Whether prompt `index` was finished (by this job or an earlier one)."""
        return self.prompt_dir(index).is_dir()

    def start(self, indices: Sequence[int]) -> list[int]:
        """The prompts of `indices` not done yet, after removing what killed writers of them
        left behind (see `clean_staging`). Call it where no writer of these prompts runs."""
        self.clean_staging(indices)
        return [i for i in indices if not self.is_done(i)]

    def clean_staging(self, indices: Sequence[int]) -> int:
        """Removes the hidden staging folders (`.0000012.xxxx`, `.0000012.old`) of the prompts
        `indices`, which a writer killed mid-write leaves; returns how many. Only these
        prompts': other jobs (shards) may be writing theirs into the same folder."""
        wanted = {self.prompt_dir(i).name for i in indices}
        stale = [
            path
            for path in self.root.glob(".*")
            if path.is_dir() and path.name[1:].split(".")[0] in wanted
        ]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return len(stale)

    def write_job_summary(self, name: str, summary: Mapping[str, Any]) -> Path:
        """Writes a job's summary (counts, failed prompts with their reasons) as
        `jobs/{name}.json`, atomically; a rerun of the job replaces it."""
        text = json.dumps(summary, indent=2, sort_keys=True)
        return write_text_atomically(self.root / JOBS_FOLDER / f"{name}.json", text)

    def write(self, index: int, prompt: Mapping[str, Any], pairs: Sequence[KeptPair]) -> Path:
        """Writes prompt `index` with its kept pairs, atomically. A prompt with no pair kept
        gets its folder too (prompt.json only), so a restart does not render it again."""
        with atomic_folder(self.prompt_dir(index), overwrite=False) as staging:
            (staging / "prompt.json").write_text(json.dumps(dict(prompt)))
            lines = []
            for pair in pairs:
                for side, image in enumerate((pair.input_image, pair.edited_image)):
                    Image.fromarray(image).save(
                        staging / f"{pair.seed}_{side}.jpg", quality=JPEG_QUALITY
                    )
                lines.append(json.dumps({"seed": pair.seed, **pair.metadata}) + "\n")
            (staging / "metadata.jsonl").write_text("".join(lines))
        return self.prompt_dir(index)
