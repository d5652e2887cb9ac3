"""The pair-generation job: folder layout, restart, recipe check, regeneration from a seed,
sharding, and the dataset it builds reading through the training input pipeline."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from datagen.clip_filter import FilterConfig
from datagen.fingerprint import folder_fingerprint
from datagen.pair_job import (
    PromptRunner,
    generate_pairs,
    recipe,
    run_locally,
    sample_seeds,
    shard_indices,
)
from datagen.pairs import PairConfig, PairSampler, to_uint8
from datagen.prompts import read_prompts
from datagen.writer import JPEG_QUALITY, KeptPair, PairFolder

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


def _recipe(model, clip, filter_config=PERMISSIVE, samples=3):
    return recipe(CONFIG, filter_config, samples=samples, seed=0, model=model, clip=clip)


@pytest.fixture(scope="module")
def models(sd_folder, clip_folder):
    """The (SD, CLIP) folders the job's recipe fingerprints."""
    return sd_folder, clip_folder


def _job(folder, sampler, clip, models, filter_config=PERMISSIVE, **kwargs):
    out = PairFolder(folder, _recipe(*models, filter_config))
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


def test_job_writes_the_original_layout_and_restarts(tmp_path, pair_sampler, clip, models):
    out, summary = _job(tmp_path / "pairs", pair_sampler, clip, models, shard=0, num_shards=2)
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
    _, again_summary = _job(tmp_path / "pairs", pair_sampler, clip, models)
    assert (again_summary.resumed, again_summary.prompts) == (2, 1)
    assert (prompt_dir / "metadata.jsonl").stat().st_mtime_ns == before
    assert out.is_done(2) and not list(out.root.glob(".0*"))  # no staging left behind


def test_a_strict_filter_keeps_nothing_but_marks_the_prompt_done(
    tmp_path, pair_sampler, clip, models
):
    strict = FilterConfig(min_image_sim=2.0)  # no cosine similarity reaches 2
    out, summary = _job(tmp_path / "pairs", pair_sampler, clip, models, strict)
    assert summary.kept == 0 and summary.prompts_without_pairs == 3
    assert (
        summary.rejected["image_sim"]
        + summary.rejected["caption_sim"]
        + summary.rejected["direction_sim"]
        == 9
    )
    assert out.is_done(0) and not list(out.prompt_dir(0).glob("*.jpg"))


def test_restart_with_another_recipe_or_model_is_refused(tmp_path, sd_folder, clip_folder):
    PairFolder(tmp_path / "pairs", _recipe(sd_folder, clip_folder))
    with pytest.raises(ValueError, match=r"samples: 3 -> 5"):
        PairFolder(tmp_path / "pairs", _recipe(sd_folder, clip_folder, samples=5))
    # The same model at another path continues the job; another model at the same path
    # (one weight changed) does not: the recipe holds fingerprints, not names.
    moved = shutil.copytree(sd_folder, tmp_path / "elsewhere" / "model")
    PairFolder(tmp_path / "pairs", _recipe(moved, clip_folder))
    weights = next((moved / "unet").glob("*.safetensors"))
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"model_fingerprint: '[0-9a-f]+' -> '[0-9a-f]+'"):
        PairFolder(tmp_path / "pairs", _recipe(moved, clip_folder))


def test_staging_is_never_imported_and_is_cleaned_on_start(tmp_path, sd_folder, clip_folder):
    from ip2p_jax.data.importers import read_seeds, write_seeds_json

    out = PairFolder(tmp_path / "pairs", _recipe(sd_folder, clip_folder))
    image = np.zeros((8, 8, 3), np.uint8)
    pair = KeptPair(seed=5, input_image=image, edited_image=image, metadata={})
    out.write(0, PROMPTS[0], [pair])
    # What a writer SIGKILLed mid-write leaves: its staging folder, images already in it, and
    # the trash of an interrupted overwrite.
    staging = out.root / ".0000001.k3x9q2"
    staging.mkdir()
    for side in (0, 1):
        Image.fromarray(image).save(staging / f"7_{side}.jpg")
    (out.root / ".0000002.old").mkdir()
    other_shard = out.root / ".0000009.a1b2c3"  # another job's prompt, maybe being written
    other_shard.mkdir()
    write_seeds_json(out.root)
    assert read_seeds(out.root) == [("0000000", ["5"])]
    assert out.start([0, 1, 2]) == [1, 2]
    assert sorted(p.name for p in out.root.glob(".*")) == [other_shard.name]


class _FailingSampler:
    """The test's sampler, raising for one caption (a prompt 'replace' cannot render, an
    out-of-memory on one long prompt...)."""

    def __init__(self, sampler, bad_caption):
        self.sampler, self.bad_caption, self.config = sampler, bad_caption, sampler.config

    def render_chunks(self, input_caption, edited_caption, draws):
        if input_caption == self.bad_caption:
            raise RuntimeError(f"cannot render {input_caption!r}")
        return self.sampler.render_chunks(input_caption, edited_caption, draws)


def test_a_prompt_that_raises_is_failed_not_done_and_retried(tmp_path, pair_sampler, clip, models):
    failing = _FailingSampler(pair_sampler, PROMPTS[1]["input"])
    out = PairFolder(tmp_path / "pairs", _recipe(*models))
    runner = PromptRunner(failing, clip, out, samples=3, filter_config=PERMISSIVE, seed=0)
    summary = run_locally(runner, PROMPTS, [0, 1, 2], progress=False)
    assert summary.failures == {1: "RuntimeError: cannot render 'a dog'"}
    assert (summary.prompts, summary.failed_fraction) == (2, 1 / 3)
    assert "prompts failed: 1 (RuntimeError 1; e.g. prompt 1:" in summary.describe()
    assert out.is_done(0) and not out.is_done(1) and out.is_done(2)
    assert json.loads(json.dumps(summary.to_json()))["failures"] == {"1": summary.failures[1]}
    # A rerun (the cause fixed) renders the failed prompt alone.
    runner.sampler = pair_sampler
    again = run_locally(runner, PROMPTS, [0, 1, 2], progress=False)
    assert (again.resumed, again.prompts, again.failures) == (2, 1, {})
    assert out.is_done(1)


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
    args += ["--pairs-per-call", "2", "--vae", str(sd_folder / "vae")]  # decodes as without
    assert main(args) == 0
    stored = json.loads((tmp_path / "pairs/generation.json").read_text())
    assert stored["vae_fingerprint"] == folder_fingerprint(sd_folder / "vae")
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


def test_cli_exits_non_zero_when_too_many_prompts_fail(tmp_path, sd_folder, clip_folder, capsys):
    from ip2p_jax.apps.cli.main import main
    from ip2p_jax.data.importers import read_seeds

    # 'replace' swaps cross-attention maps token for token: "a dog" -> "a dog in a hat"
    # cannot be rendered (a systematic error), "a red car" -> "a blue car" can.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS[:2]))
    args = ["datagen", "pairs", "--prompts", str(prompts), "--model", str(sd_folder)]
    args += ["--clip", str(clip_folder), "--out", str(tmp_path / "pairs"), "--mode", "replace"]
    args += ["--samples", "1", "--steps", "2", "--resolution", "32", "--no-progress"]
    args += ["--clip-threshold", "-1", "--clip-dir-threshold", "-1", "--clip-img-threshold", "-1"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "1 of the prompts attempted failed (50.0%, above --max-failed 1.0%)" in out
    summary = json.loads((tmp_path / "pairs/jobs/shard-00000-of-00001.json").read_text())
    assert list(summary["failures"]) == ["1"]
    assert summary["failures"]["1"].startswith("TokenCountMismatch: 'replace' swaps maps")
    assert not (tmp_path / "pairs/0000001").exists()
    assert [name for name, _ in read_seeds(tmp_path / "pairs")] == ["0000000"]
    # A rerun tries the failed prompt again (and only it); a looser --max-failed passes.
    assert main(args + ["--max-failed", "1"]) == 0
    summary = json.loads((tmp_path / "pairs/jobs/shard-00000-of-00001.json").read_text())
    assert (summary["resumed"], summary["prompts"], list(summary["failures"])) == (1, 0, ["1"])
