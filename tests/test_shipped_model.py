"""The shapes model bundled in the package: its size and layout, that diffusers loads it,
and that it edits held-out scenes correctly (a golden check of the shipped weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ip2p_jax.apps.cli.main import main
from ip2p_jax.apps.shipped import SHAPES_MODEL, SHAPES_SAMPLING, shipped_model
from ip2p_jax.evaluation.shapes import evaluate_shapes
from ip2p_jax.worlds.shapes import make_record, render
from ip2p_jax.worlds.shapes.score import score_edit

MAX_BYTES = 30 * 2**20


@pytest.fixture(scope="module")
def shapes_pipeline():
    from ip2p_jax.pipelines.edit import EditPipeline

    return EditPipeline.from_pretrained(shipped_model())


def test_bundled_model_is_a_small_diffusers_folder():
    files = [p for p in SHAPES_MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < MAX_BYTES
    index = json.loads((SHAPES_MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInstructPix2PixPipeline"
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert name in index and (SHAPES_MODEL / name).is_dir()
    unet = json.loads((SHAPES_MODEL / "unet" / "config.json").read_text())
    assert unet["in_channels"] == 8


def test_diffusers_loads_the_bundled_model_and_edits_like_ours(shapes_pipeline):
    """The same weights in diffusers' own InstructPix2Pix pipeline: one deterministic DDIM
    edit agrees with ours to within 2 grey levels (fp32 both; float16 weights, upcast)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionInstructPix2PixPipeline

    record = make_record(0, split="heldout")
    image = Image.fromarray(render(record.before, SHAPES_SAMPLING.resolution))
    reference = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        SHAPES_MODEL, dtype=torch.float32, safety_checker=None
    )
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    latents = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    theirs = reference(
        record.instruction,
        image=image,
        num_inference_steps=SHAPES_SAMPLING.steps,
        latents=latents,
        output_type="np",
    ).images[0]
    ours = shapes_pipeline.edit_arrays(
        np.asarray(image, np.float32)[None] / 127.5 - 1.0,
        [record.instruction],
        steps=SHAPES_SAMPLING.steps,
        sampler="ddim",
        init_noise=latents.permute(0, 2, 3, 1).numpy(),
    )
    ours = (np.clip(np.asarray(ours[0]), -1, 1) + 1) / 2
    assert np.abs(ours - theirs).max() * 255 <= 2


def test_bundled_model_makes_edits_on_unseen_scenes(shapes_pipeline):
    """28 validation edits (unseen scenes, training phrasings) at the shipped defaults. On
    these 28 the bundled model (21,500 + 2250 + 4000 + 5000 steps) scores 28.6 % success and
    23.5 dB mean PSNR to the true result (50.5 % and 25.0 dB on 200), where random weights
    score 0 % and about 8 dB. The floors catch broken weights or sampling, and a model that only
    copies its input (no success)."""
    sampling = SHAPES_SAMPLING
    table, _ = evaluate_shapes(
        shapes_pipeline,
        num=28,
        split="validation",
        steps=sampling.steps,
        text_scale=sampling.text_scale,
        image_scale=sampling.image_scale,
        sampler=sampling.sampler,
        progress=False,
    )
    assert table["overall"]["psnr"] > 22.0, table
    assert table["overall"]["success"] >= 0.2, table


def test_edit_without_model_uses_the_bundled_one(tmp_path, capsys):
    record = make_record(3, split="heldout")
    source, out = tmp_path / "in.png", tmp_path / "out.png"
    Image.fromarray(render(record.before, SHAPES_SAMPLING.resolution)).save(source)
    argv = ["edit", "--image", str(source), "--instruction", record.instruction, "--out"]
    assert main([*argv, str(out)]) == 0
    edited = np.asarray(Image.open(out).convert("RGB"))
    assert edited.shape == (SHAPES_SAMPLING.resolution, SHAPES_SAMPLING.resolution, 3)
    assert score_edit(edited, record.before, record.after).psnr > 0
