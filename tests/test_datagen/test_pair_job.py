"""The pair-generation job: folder layout, restart, recipe check, regeneration from a seed,
sharding, and the dataset it builds reading through the training input pipeline."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from datagen.clip_filter import FilterConfig
from datagen.pair_job import generate_pairs, recipe, sample_seeds, shard_indices
from datagen.pairs import PairConfig, PairSampler, to_uint8
from datagen.prompts import read_prompts
from datagen.writer import JPEG_QUALITY, PairFolder

CONFIG = PairConfig(steps=3, resolution=32)
# Random weights: CLIP similarities are arbitrary, so thresholds that keep anything here.
PERMISSIVE = FilterConfig(min_caption_sim=-1, min_direction_sim=-1, min_image_sim=-1, keep=2)
PROMPTS = [
    {"input": "a red car", "edit": "make it blue", "output": "a blue car", "id": "a"},
    {"input": "a dog", "edit": "give it a hat", "output": "a dog in a hat", "id": "b"},
    {"input": "a house", "edit": "make it winter", "output": "a house in winter", "id": "c"},
]


@pytest.fixture(scope="module")
def pair_sampler(sd_folder):
    return PairSampler(sd_folder, CONFIG, pairs_per_call=3)


def _job(folder, sampler, clip, filter_config=PERMISSIVE, **kwargs):
    out = PairFolder(folder, recipe(CONFIG, filter_config, samples=3, seed=0, model="m", clip="c"))
    summary = generate_pairs(
        PROMPTS,
        sampler,
        clip,
        out,
        samples=3,
        filter_config=filter_config,
        progress=False,
        **kwargs,
    )
    return out, summary


def test_job_writes_the_original_layout_and_restarts(tmp_path, pair_sampler, clip):
    out, summary = _job(tmp_path / "pairs", pair_sampler, clip, shard=0, num_shards=2)
    assert shard_indices(3, 0, 2) == [0, 1] and shard_indices(3, 1, 2) == [2]
    assert (summary.prompts, summary.samples, summary.kept) == (2, 6, 4)
    assert summary.rejected["beyond_keep"] == 2
    assert not out.is_done(2)
    prompt_dir = out.prompt_dir(1)
    assert json.loads((prompt_dir / "prompt.json").read_text()) == PROMPTS[1]
    lines = [json.loads(line) for line in (prompt_dir / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and {line["seed"] for line in lines} <= set(sample_seeds(0, 1, 3))
    directions = [line["clip_sim_dir"] for line in lines]
    assert directions == sorted(directions, reverse=True)  # the best kept first
    for line in lines:
        assert {p.name for p in prompt_dir.glob(f"{line['seed']}_*.jpg")} == {
            f"{line['seed']}_0.jpg",
            f"{line['seed']}_1.jpg",
        }
    # a kept pair regenerates exactly from its recorded seed
    seed = lines[0]["seed"]
    draw = CONFIG.draw(seed)
    assert (draw.p2p_threshold, draw.cfg_scale) == (
        lines[0]["p2p_threshold"],
        lines[0]["cfg_scale"],
    )
    again = to_uint8(pair_sampler.render(PROMPTS[1]["input"], PROMPTS[1]["output"], [draw]))[0]
    for side in (0, 1):
        buffer = io.BytesIO()
        Image.fromarray(again[side]).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        assert buffer.getvalue() == (prompt_dir / f"{seed}_{side}.jpg").read_bytes()

    # restart: the done prompts are skipped and left as they were, the rest rendered
    before = (prompt_dir / "metadata.jsonl").stat().st_mtime_ns
    _, again_summary = _job(tmp_path / "pairs", pair_sampler, clip)
    assert (again_summary.resumed, again_summary.prompts) == (2, 1)
    assert (prompt_dir / "metadata.jsonl").stat().st_mtime_ns == before
    assert out.is_done(2) and not list(out.root.glob(".0*"))  # no staging left behind


def test_a_strict_filter_keeps_nothing_but_marks_the_prompt_done(tmp_path, pair_sampler, clip):
    strict = FilterConfig(min_image_sim=2.0)  # no cosine similarity reaches 2
    out, summary = _job(tmp_path / "pairs", pair_sampler, clip, strict)
    assert summary.kept == 0 and summary.prompts_without_pairs == 3
    assert (
        summary.rejected["image_sim"]
        + summary.rejected["caption_sim"]
        + summary.rejected["direction_sim"]
        == 9
    )
    assert out.is_done(0) and not list(out.prompt_dir(0).glob("*.jpg"))


def test_restart_with_another_recipe_is_refused(tmp_path):
    PairFolder(tmp_path, recipe(CONFIG, PERMISSIVE, samples=3, seed=0, model="m", clip="c"))
    with pytest.raises(ValueError, match=r"samples: 3 -> 5"):
        PairFolder(tmp_path, recipe(CONFIG, PERMISSIVE, samples=5, seed=0, model="m", clip="c"))


def test_sample_seeds_are_fixed_distinct_and_per_prompt():
    seeds = sample_seeds(0, 7, 100)
    assert seeds == sample_seeds(0, 7, 100) and len(set(seeds)) == 100
    assert seeds[:10] != sample_seeds(0, 8, 10) and seeds[:10] != sample_seeds(1, 7, 10)
    assert all(0 <= s < 2**32 for s in seeds)


def test_shards_cover_every_prompt_once():
    covered = [i for shard in range(4) for i in shard_indices(10, shard, 4)]
    assert covered == list(range(10))
    with pytest.raises(ValueError, match="shard 4 of 4"):
        shard_indices(10, 4, 4)


def test_read_prompts_names_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"caption": "a", "edit": "b", "output": "c"}\n\n{"input": "a", "edit": ""}\n')
    with pytest.raises(
        ValueError, match=r"prompts.jsonl:3: .*missing or empty: \['edit', 'output'\]"
    ):
        read_prompts(path)
    path.write_text('{"caption": "a", "edit": "b", "output": "c"}\n')
    assert read_prompts(path) == [{"input": "a", "edit": "b", "output": "c"}]


def test_cli_builds_a_dataset_the_training_pipeline_reads(tmp_path, sd_folder, clip_folder):
    from ip2p_jax.apps.cli.main import main
    from ip2p_jax.data.augment import Augmentation
    from ip2p_jax.data.edit_pairs import EditPairSource, split_sizes
    from ip2p_jax.data.loader import EditPairLoader, InputConfig

    prompts = tmp_path / "prompts.jsonl"
    many = [dict(p, id=f"{p['id']}{i}") for i in range(7) for p in PROMPTS][:20]
    prompts.write_text("".join(json.dumps(p) + "\n" for p in many))
    args = ["datagen", "pairs", "--prompts", str(prompts), "--model", str(sd_folder)]
    args += ["--clip", str(clip_folder), "--out", str(tmp_path / "pairs")]
    args += ["--dataset", str(tmp_path / "data"), "--samples", "2", "--keep", "1"]
    args += ["--steps", "2", "--resolution", "32", "--clip-threshold", "-1"]
    args += ["--clip-dir-threshold", "-1", "--clip-img-threshold", "-1", "--no-progress"]
    args += ["--pairs-per-call", "2"]
    assert main(args) == 0
    sizes = split_sizes(tmp_path / "data")
    assert sizes == {"train": 18, "validation": 1, "test": 1}  # the original's 0.9/0.05/0.05
    augmentation = Augmentation(crop=32, min_resize=32, max_resize=32)
    config = InputConfig(batch_size=6, augmentation=augmentation)
    loader = EditPairLoader(
        EditPairSource(tmp_path / "data", "train"), config, shard_index=0, shard_count=1
    )
    batch = next(iter(loader))
    assert batch["input_image"].shape == (6, 32, 32, 3)
    assert len(batch["instruction"]) == 6
