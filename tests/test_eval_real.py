"""``ip2p eval edits``: the paper's CLIP metrics, pixel and DINO distances, the sweep, its
plot and grid, and SDEdit (img2img) against diffusers, all on tiny random models."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
from PIL import Image

from ip2p_jax.apps.cli.evaluate import run_edits
from ip2p_jax.apps.cli.main import build_parser
from ip2p_jax.evaluation import sweep
from ip2p_jax.evaluation.clip_metrics import EditScorer, cosine_similarity, pixel_distances
from ip2p_jax.evaluation.plots import PLOT_DPI, PLOT_SIZE, edit_grid, plot_tradeoff
from ip2p_jax.pipelines.sdedit import SDEditPipeline, check_text_to_image_model, kept_steps

SIZE = 32  # pixels: the tiny VAE halves it, the tiny CLIP and ViT take 32 px

# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from ip2p_jax.testing.reference_models import build_clip_folder

    return build_clip_folder(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory):
    """A tiny random ViTModel (DINO's architecture), saved by transformers."""
    from ip2p_jax.testing.reference_models import build_vit_folder

    return build_vit_folder(tmp_path_factory.mktemp("dino") / "dino", image_size=SIZE)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny text-to-image SD (4-channel UNet), diffusers layout."""
    from ip2p_jax.testing.reference_models import build_pipeline_folder

    path = tmp_path_factory.mktemp("sd") / "model"
    return build_pipeline_folder(path, "tiny", overrides={"unet": {"in_channels": 4}})


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    """The shapes world at 32 px: 3 validation examples with captions and exact targets."""
    from ip2p_jax.data.build import build_shapes

    out = tmp_path_factory.mktemp("shapes")
    build_shapes(out, 1, num_validation=3, num_heldout=0, size=SIZE)
    return out


@pytest.fixture(scope="module")
def scorer(clip_folder, dino_folder):
    return EditScorer(clip_folder, dino=dino_folder)


def _images(seed: int, n: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), np.uint8)


# -- metrics ----------------------------------------------------------------------------------


def test_metrics_equal_a_direct_torch_computation(scorer, clip_folder, dino_folder):
    import torch
    import torch.nn.functional as F
    from transformers import CLIPModel, CLIPTokenizer, ViTModel

    inputs, edits, targets = (_images(s).astype(np.float32) / 255 for s in (1, 2, 3))
    captions_in = ["a red circle", "two green squares", "a photo of a cat"]
    captions_out = ["a blue circle", "two green squares on snow", "a photo of a dog"]
    scores = scorer.score(inputs, edits, captions_in, captions_out, targets)

    model = CLIPModel.from_pretrained(str(clip_folder)).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_folder))
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[None, :, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[None, :, None, None]

    def pooled(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    with torch.no_grad():

        def image(x):  # the tiny CLIP takes 32 px: the bicubic resize is the identity
            x = torch.from_numpy(x).permute(0, 3, 1, 2)
            return F.normalize(pooled(model.get_image_features(pixel_values=(x - mean) / std)))

        def text(t):
            ids = tokenizer(t, padding="max_length", max_length=77, return_tensors="pt")
            return F.normalize(pooled(model.get_text_features(**ids)))

        i0, i1, t0, t1 = image(inputs), image(edits), text(captions_in), text(captions_out)
        dino = ViTModel.from_pretrained(str(dino_folder)).eval()
        imagenet = (torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225]))

        def cls(x):
            x = (torch.from_numpy(x).permute(0, 3, 1, 2) - imagenet[0][:, None, None]) / imagenet[
                1
            ][:, None, None]
            return dino(pixel_values=x).last_hidden_state[:, 0]

        expected = {
            "clip_image": F.cosine_similarity(i0, i1),
            "clip_direction": F.cosine_similarity(i1 - i0, t1 - t0),
            "clip_text": F.cosine_similarity(i1, t1),
            "dino": F.cosine_similarity(cls(edits), cls(targets)),
        }
    for name, values in expected.items():
        got = [s[name] for s in scores]
        np.testing.assert_allclose(got, values.numpy(), atol=1e-5, err_msg=name)
    diff = edits.astype(np.float64) - targets
    np.testing.assert_allclose([s["l1"] for s in scores], np.abs(diff).mean((1, 2, 3)))
    np.testing.assert_allclose([s["l2"] for s in scores], (diff**2).mean((1, 2, 3)))
    # The direction metric is not symmetric in a trivial way: it must vary across examples.
    assert len({round(s["clip_direction"], 6) for s in scores}) == 3


def test_identical_images_are_similar_and_at_distance_zero(scorer):
    images = _images(4).astype(np.float32) / 255
    scores = scorer.score(images, images, ["a cat"] * 3, ["a dog"] * 3, images)
    for s in scores:
        assert s["clip_image"] == pytest.approx(1.0, abs=1e-6)
        assert s["dino"] == pytest.approx(1.0, abs=1e-6)
        assert s["l1"] == 0.0 and s["l2"] == 0.0
        assert s["clip_direction"] == 0.0  # no change in the image: no direction
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(cosine_similarity(a, np.array([[2.0, 0.0], [-1.0, -1.0]])), [1, -1])
    l1, l2 = pixel_distances(np.zeros((1, 2, 2, 3)), np.full((1, 2, 2, 3), 0.5))
    assert (l1[0], l2[0]) == (0.5, 0.25)


# -- the sweep with stand-in editors ----------------------------------------------------------


class Recorder:
    """A stand-in editor: returns the input (or the target), and records every call."""

    def __init__(self, answer: str):
        self.answer, self.calls = answer, []

    def __call__(self, images, examples, points, seeds):
        self.calls.append(([e.key for e in examples], list(points), list(seeds)))
        return [getattr(e, self.answer) for e in examples]


def test_sweep_uses_the_same_examples_and_seeds_at_every_point(shapes_data, scorer):
    examples = sweep.load_examples(shapes_data, num=3, resolution=SIZE)
    assert [e.index for e in examples] == [0, 1, 2]
    assert all(e.image.shape == (SIZE, SIZE, 3) and e.target is not None for e in examples)
    ip2p, sdedit = Recorder("image"), Recorder("target")
    points = sweep.ip2p_points([7.5], [1.0, 1.5]) + sweep.sdedit_points([0.5, 0.8])
    result = sweep.run_sweep(
        examples, scorer, {sweep.IP2P: ip2p, sweep.SDEDIT: sdedit}, points, seed=5, batch_size=4
    )
    # InstructPix2Pix's 6 jobs batch across its scales (4 + 2 padded to 4); SDEdit per strength.
    assert [len(keys) for keys, _, _ in ip2p.calls] == [4, 4]
    assert ip2p.calls[0][2] == [5, 6, 7, 5] and ip2p.calls[1][2] == [6, 7, 7, 7]
    assert [{p.strength for p in c[1]} for c in sdedit.calls] == [{0.5}, {0.8}]
    rows = {(r["method"], r.get("image_scale", r.get("strength"))): r for r in result.rows}
    assert list(rows) == [("instruct-pix2pix", 1.0), ("instruct-pix2pix", 1.5)] + [
        ("sdedit", 0.5),
        ("sdedit", 0.8),
    ]
    assert all(r["count"] == 3 for r in result.rows)
    assert rows["instruct-pix2pix", 1.0]["clip_image"] == pytest.approx(1.0, abs=1e-6)
    assert rows["sdedit", 0.5]["l1"] == 0.0 and rows["sdedit", 0.5]["dino"] == pytest.approx(1)
    by_point: dict = {}
    for record in result.examples:
        by_point.setdefault(record.get("image_scale", record.get("strength")), []).append(
            (record["key"], record["seed"])
        )
    assert len(by_point) == 4 and len({tuple(v) for v in by_point.values()}) == 1
    assert [seed for _, seed in by_point[1.0]] == [5, 6, 7]


def test_plot_and_grid_have_their_sizes(tmp_path):
    rows = [
        {"method": "instruct-pix2pix", "text_scale": 7.5, "image_scale": s, "clip_image": 1 - s / 9}
        | {"clip_direction": s / 10}
        for s in (1.0, 1.5, 2.0)
    ] + [
        {"method": "sdedit", "text_scale": 7.5, "strength": s, "clip_image": 1 - s}
        | {"clip_direction": s / 5}
        for s in (0.3, 0.6)
    ]
    path = plot_tradeoff(rows, tmp_path / "plot.png", title="t")
    with Image.open(path) as image:
        assert image.size == (PLOT_SIZE[0] * PLOT_DPI, PLOT_SIZE[1] * PLOT_DPI)
    images = list(_images(0, 2))
    sheet = edit_grid(images, [("a", images), ("b", images)], images)
    assert sheet.size == (4 * SIZE, 16 + 2 * SIZE)
    assert np.array_equal(np.asarray(sheet)[16 : 16 + SIZE, SIZE : 2 * SIZE], images[0])
    with pytest.raises(ValueError, match="column 'b' has 1 images for 2 rows"):
        edit_grid(images, [("b", images[:1])])


# -- SDEdit -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m"])
@pytest.mark.filterwarnings("ignore:The configuration file of this scheduler:FutureWarning")
def test_sdedit_matches_diffusers_img2img(sd_folder, scheduler, monkeypatch):
    """Same weights, same VAE posterior draw and start noise: diffusers'
    StableDiffusionImg2ImgPipeline and ours agree to 1e-4 on [0, 1] pixels (float32; seen:
    2e-6). Deterministic schedulers, so no per-step noise."""
    import diffusers.models.autoencoders.vae as diffusers_vae
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        StableDiffusionImg2ImgPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    from ip2p_jax.pipelines.images import to_model_array

    scheduler_class = {
        "ddim": DDIMScheduler,
        "euler": EulerDiscreteScheduler,
        "dpmpp_2m": DPMSolverMultistepScheduler,
    }[scheduler]
    reference = StableDiffusionImg2ImgPipeline(
        vae=AutoencoderKL.from_pretrained(sd_folder / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(sd_folder / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(sd_folder / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(sd_folder / "unet"),
        scheduler=scheduler_class.from_pretrained(sd_folder / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    images = [Image.fromarray(image) for image in _images(7, 2)]
    prompts = ["a red square", "two blue circles on grass"]
    rng = np.random.default_rng(0)
    posterior, start = (rng.standard_normal((2, 4, 16, 16)).astype(np.float32) for _ in range(2))
    # diffusers draws the posterior sample in the VAE module and the start noise in the
    # pipeline's module: each returns its fixed array.
    monkeypatch.setattr(diffusers_vae, "randn_tensor", lambda *a, **k: torch.from_numpy(posterior))
    monkeypatch.setattr(img2img, "randn_tensor", lambda *a, **k: torch.from_numpy(start))
    options = {"strength": 0.75, "num_inference_steps": 4, "guidance_scale": 7.5}
    with torch.no_grad():
        expected = reference(prompts, image=images, output_type="np", **options).images

    ours = SDEditPipeline.from_pretrained(sd_folder)
    got = ours.edit_arrays(
        np.stack([to_model_array(image, image.size) for image in images]),
        prompts,
        strength=0.75,
        steps=4,
        guidance_scale=7.5,
        sampler=scheduler,
        latent_noise=posterior.transpose(0, 2, 3, 1),
        start_noise=start.transpose(0, 2, 3, 1),
    )
    got = np.clip(got / 2 + 0.5, 0, 1)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.abs(got - to_unit(images)).mean() > 1e-3  # it changed the images


def to_unit(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images]).astype(np.float32) / 255


# -- the command, end to end ------------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    """The arguments as `ip2p eval edits` parses them."""
    return build_parser().parse_args(["eval", "edits", *argv])


def test_eval_edits_writes_metrics_plot_and_grid(
    tiny_folder, sd_folder, clip_folder, dino_folder, shapes_data, tmp_path, capsys
):
    out = tmp_path / "eval"
    common = ["--data", str(shapes_data), "--clip", str(clip_folder), "--num", "3"]
    args = _args(
        "--model",
        str(tiny_folder),
        *common,
        "--image-scales",
        "1.0,1.5",
        "--steps",
        "2",
        "--resolution",
        str(SIZE),
        "--batch-size",
        "4",
        "--sdedit",
        str(sd_folder),
        "--strengths",
        "0.5,1.0",
        "--dino",
        str(dino_folder),
        "--grid-rows",
        "2",
        "--out",
        str(out),
    )
    assert run_edits(args) == 0
    printed = capsys.readouterr().out
    assert "clip_direction" in printed and str(out / "metrics.json") in printed

    report = json.loads((out / "metrics.json").read_text())
    assert report["settings"]["steps"] == 2 and report["settings"]["num"] == 3
    rows = report["rows"]
    assert [(r["method"], r.get("image_scale", r.get("strength"))) for r in rows] == [
        ("instruct-pix2pix", 1.0),
        ("instruct-pix2pix", 1.5),
        ("sdedit", 0.5),
        ("sdedit", 1.0),
    ]
    for row in rows:
        assert row["count"] == 3
        for name in ("clip_image", "clip_direction", "clip_text", "l1", "l2", "dino"):
            assert math.isfinite(row[name]), (row, name)
        assert 0 <= row["l1"] <= 1 and -1 <= row["clip_image"] <= 1
    assert len(report["examples"]) == 12
    assert {e["seed"] for e in report["examples"]} == {0, 1, 2}
    for row in rows:  # a row's means are its examples' means
        mine = [
            e
            for e in report["examples"]
            if e["method"] == row["method"]
            and e.get("image_scale", e.get("strength"))
            == row.get("image_scale", row.get("strength"))
        ]
        assert row["l1"] == pytest.approx(np.mean([e["l1"] for e in mine]))

    with Image.open(out / "plot.png") as plot:
        assert plot.size == (PLOT_SIZE[0] * PLOT_DPI, PLOT_SIZE[1] * PLOT_DPI)
    with Image.open(out / "grid.png") as grid:  # input, 2 s_I, 2 strengths, target; 2 rows
        assert grid.size == (6 * SIZE, 16 + 2 * SIZE)
        first_input = np.asarray(grid.convert("RGB"))[16 : 16 + SIZE, :SIZE]
    examples = sweep.load_examples(shapes_data, num=1, resolution=SIZE)
    assert np.array_equal(first_input, examples[0].image)


# -- errors, before anything compiles ---------------------------------------------------------


def test_an_instruct_pix2pix_model_is_refused_for_sdedit(tiny_folder, clip_folder, shapes_data):
    with pytest.raises(ValueError, match="needs a 4-channel text-to-image.*takes 8 input channels"):
        check_text_to_image_model(tiny_folder)
    args = _args(
        "--model", str(tiny_folder), "--data", str(shapes_data), "--clip", str(clip_folder)
    )
    args.sdedit = str(tiny_folder)
    with pytest.raises(ValueError, match="InstructPix2Pix model"):
        run_edits(args)


def test_a_dataset_without_captions_is_named(tmp_path):
    from ip2p_jax.data.edit_pairs import write_dataset
    from ip2p_jax.data.schema import make_example
    from ip2p_jax.pipelines.images import encode_png

    png = encode_png(_images(0, 1)[0])
    examples = [
        make_example(png, png, "make it red", key="pair/0", input_caption="a", edited_caption="b"),
        make_example(png, png, "make it blue", key="pair/1"),
    ]
    write_dataset(tmp_path, {"validation": examples})
    with pytest.raises(ValueError, match=r"edit_pairs.*example 1 \(pair/1\): input_caption"):
        sweep.load_examples(tmp_path, num=2, resolution=SIZE)
    assert len(sweep.load_examples(tmp_path, num=1, resolution=SIZE)) == 1
    with pytest.raises(ValueError, match="has 2 examples; --num 5"):
        sweep.load_examples(tmp_path, num=5, resolution=SIZE)
    with pytest.raises(ValueError, match="no split 'test'"):
        sweep.load_examples(tmp_path, split="test", num=1)


def test_strengths_that_leave_no_step_are_refused():
    assert kept_steps(50, 0.3) == 15 and kept_steps(4, 1.0) == 4
    with pytest.raises(ValueError, match="leaves no denoising step"):
        kept_steps(2, 0.3)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        kept_steps(10, 1.5)
