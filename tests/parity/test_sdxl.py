"""SDXL InstructPix2Pix against diffusers/transformers on identical weights, from folders that
diffusers' own StableDiffusionXLInstructPix2PixPipeline.save_pretrained wrote: the UNet with
the "text_time" added conditioning, the VAE, both text encoders (the second a
CLIPTextModelWithProjection), and whole edits with the same latents and noise. Tolerances:
1e-4 max abs error (fp32 on the CPU, outputs of order 1), edits included."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

TOLERANCE = 1e-4
# Real SDXL's layout in miniature (the tiny-sdxl preset has two levels, as diffusers' own
# test model): three levels, attention below the top one, per-level transformer depths
# (1, 1, 2) and heads (2, 4, 8); the two text encoders are 32 and 48 wide.
THREE_LEVELS = {
    "unet": {
        "block_out_channels": [32, 64, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [2, 4, 8],
        "transformer_layers_per_block": [1, 1, 2],
    }
}


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    from ip2p_jax.testing.reference_models import build_sdxl_folder

    return build_sdxl_folder(tmp_path_factory.mktemp("sdxl") / "model", overrides=THREE_LEVELS)


def test_ip2p_parity_passes_on_an_sdxl_folder(sdxl_folder, capsys):
    """`ip2p parity FOLDER --pipeline`: every component the folder has, then whole edits
    against StableDiffusionXLInstructPix2PixPipeline with the same latents and noise."""
    from ip2p_jax.apps.cli.main import main

    args = ["parity", str(sdxl_folder), "--resolution", "32", "--pipeline", "--json"]
    assert main(args + ["--samplers", "euler", "--tolerance", "1e-4"]) == 0
    results = json.loads(capsys.readouterr().out)
    outputs = {(r["component"], r["output"]) for r in results}
    assert {c for c, _ in outputs} == {"unet", "vae", "text_encoder", "text_encoder_2", "pipeline"}
    assert ("text_encoder_2", "text_embeds") in outputs
    for r in results:
        assert r["passed"] and 0.05 < r["reference_max_abs"] < 100, r
        if r["component"] == "pipeline":
            assert r["max_abs_error"] < 1e-4, r  # measured 2e-6; the bound is 1/255 mean


def test_an_sdxl_edit_with_every_option_matches(sdxl_folder):
    """diffusers' SDXL options in one edit: a negative prompt is encoded (without one the
    null text is zeros, as diffusers'); guidance_rescale rescales the guided output as
    rescale_noise_cfg; the size conditioning sets the time ids; denoising_end stops the
    chain early (a still noisy result, 1 of 3 steps here)."""
    from PIL import Image

    from ip2p_jax.diffusion.samplers import denoising_end_step, get_sampler
    from ip2p_jax.diffusion.schedules import NoiseSchedule
    from ip2p_jax.testing.parity import edit_both

    plan = get_sampler("euler").plan(NoiseSchedule.from_folder(sdxl_folder), 3)
    assert denoising_end_step(plan, 0.4, 1000) == 1  # timesteps 667, 334, 1: stops after 667
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), np.uint8))
    options = {
        "negative_prompt": "blurry",
        "guidance_rescale": 0.7,
        "original_size": (96, 64),
        "crops_coords_top_left": (8, 4),
        "target_size": (48, 48),
        "denoising_end": 0.4,
    }
    ours, expected = edit_both(sdxl_folder, "euler", image, ["make it snowy"], steps=3, **options)
    error = np.abs(ours - expected).max()
    assert error < 1e-4, error  # measured 1.8e-6
    # Leaving an option out moves diffusers' edit by far more than that (on this random
    # model: original_size 9.8e-3, crops 1.1e-2, target_size 1.3e-2, denoising_end 9.3e-2;
    # the one with the least effect is checked here, the others measured once).
    kept = {k: v for k, v in options.items() if k != "original_size"}
    _, moved = edit_both(sdxl_folder, "euler", image, ["make it snowy"], steps=3, **kept)
    assert np.abs(moved - expected).max() > 20 * TOLERANCE


def test_the_added_conditioning_is_required(sdxl_folder):
    from ip2p_jax.weights.model_folder import load_component

    unet = load_component(sdxl_folder, "unet")
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    rng = np.random.default_rng(0)
    sample = jnp.asarray(rng.standard_normal((1, 8, 8, cfg.in_channels)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((1, 77, cfg.cross_attention_dim)), jnp.float32)
    text = jnp.asarray(rng.standard_normal((1, pooled)), jnp.float32)
    # Wrong or missing added conditioning fails while tracing, before any compile.
    with pytest.raises(ValueError, match="needs text_embeds .* and time_ids"):
        jax.eval_shape(unet.module.apply, {"params": unet.params}, sample, 500.0, context)
    with pytest.raises(ValueError, match=f"expects {cfg.projection_class_embeddings_input_dim}"):
        jax.eval_shape(
            unet.module.apply,
            {"params": unet.params},
            sample,
            500.0,
            context,
            text[:, 1:],
            jnp.ones((1, 6)),
        )


def test_an_sdxl_folder_converts_and_exports_back_bit_for_bit(sdxl_folder, tmp_path):
    """`ip2p convert` then `ip2p export`: every weight of the four components comes back as
    diffusers saved it (the second encoder's text_projection at the top, as
    CLIPTextModelWithProjection names it), with tokenizer_2 and an SDXL model_index.json
    that diffusers' StableDiffusionXLInstructPix2PixPipeline loads."""
    from diffusers import StableDiffusionXLInstructPix2PixPipeline
    from safetensors.numpy import load_file

    from ip2p_jax.apps.cli.main import main

    ours, back = tmp_path / "flax", tmp_path / "diffusers"
    assert main(["convert", str(sdxl_folder), str(ours)]) == 0
    assert json.loads((ours / "ip2p_jax.json").read_text())["components"][-1] == "text_encoder_2"
    assert main(["export", str(ours), str(back)]) == 0
    for name, stem in [
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
        ("text_encoder_2", "model"),
    ]:
        original = load_file(sdxl_folder / name / f"{stem}.safetensors")
        original.pop("text_model.embeddings.position_ids", None)  # a buffer, not a weight
        exported = load_file(back / name / f"{stem}.safetensors")
        # transformers 5 saves CLIPTextModel without the text_model. prefix that we export
        # (every version loads it); the second encoder keeps it.
        exported = {
            key if key in original else key.removeprefix("text_model."): value
            for key, value in exported.items()
        }
        assert set(exported) == set(original), name
        for key, value in exported.items():
            np.testing.assert_array_equal(value, original[key], err_msg=f"{name}: {key}")
    assert "text_projection.weight" in exported
    assert (back / "tokenizer_2" / "tokenizer_config.json").is_file()
    index = json.loads((back / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLInstructPix2PixPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    pipe = StableDiffusionXLInstructPix2PixPipeline.from_pretrained(back)
    assert pipe.tokenizer_2.pad_token == "!"  # SDXL's second tokenizer pads with "!"


def test_ip2p_edit_on_an_sdxl_folder_keeps_the_input_size(sdxl_folder, tmp_path):
    from PIL import Image

    from ip2p_jax.apps.cli.main import main

    source, out = tmp_path / "in.png", tmp_path / "out.png"
    # Edited at 32 x 32 as the parity test's Euler edit (its program is reused), returned at
    # the input's 64 x 48.
    pixels = np.random.default_rng(2).integers(0, 256, (48, 64, 3), np.uint8)
    Image.fromarray(pixels).save(source)
    args = ["edit", "--model", str(sdxl_folder), "--image", str(source), "--out", str(out)]
    args += ["--instruction", "make it snowy", "--steps", "4", "--resolution", "32"]
    args += ["--sampler", "euler"]
    assert main(args) == 0
    with Image.open(out) as edited:
        assert edited.size == (64, 48)


def test_ip2p_parity_cosxl_edit_on_an_edm_folder(tmp_path, capsys):
    """CosXL Edit: an EDMEulerScheduler folder (v-prediction, exponential sigmas), the image
    condition scaled by the VAE's factor, sampled by edm_euler; against diffusers' pipeline
    with is_cosxl_edit=True."""
    from ip2p_jax.apps.cli.main import main
    from ip2p_jax.testing.reference_models import build_sdxl_folder

    folder = build_sdxl_folder(tmp_path / "cosxl", scheduler="EDMEulerScheduler")
    args = ["parity", str(folder), "--components", "unet", "--resolution", "32", "--json"]
    args += ["--pipeline", "--samplers", "edm_euler", "--cosxl-edit", "--tolerance", "1e-4"]
    assert main(args) == 0
    edit = [r for r in json.loads(capsys.readouterr().out) if r["component"] == "pipeline"]
    assert len(edit) == 1 and edit[0]["max_abs_error"] < 1e-4, edit
    # A beta-schedule sampler, or CosXL mode on an SDXL folder, is refused before compiling.
    from ip2p_jax.pipelines.sdxl_edit import SDXLEditPipeline

    pipe = SDXLEditPipeline.from_pretrained(folder, cosxl_edit=True)
    pixels = np.zeros((1, 32, 32, 3), np.float32)
    with pytest.raises(ValueError, match="EDM noise levels.*use the edm_euler sampler"):
        pipe.edit_arrays(pixels, ["make it snowy"], steps=2, sampler="euler")
    with pytest.raises(ValueError, match="an EDM model .* has none"):
        pipe.edit_arrays(pixels, ["a"], steps=2, sampler="edm_euler", denoising_end=0.5)
    # `ip2p edit --cosxl-edit` samples with edm_euler unless told otherwise.
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "in.png")
    args = ["edit", "--model", str(folder), "--cosxl-edit", "--image", str(tmp_path / "in.png")]
    args += ["--instruction", "a", "--out", str(tmp_path / "out.png"), "--steps", "2"]
    assert main([*args, "--resolution", "32", "--guidance-rescale", "0.5"]) == 0
    assert (tmp_path / "out.png").is_file()


def test_bad_sdxl_options_are_refused_before_compiling(sdxl_folder, tiny_folder):
    from ip2p_jax.pipelines.edit import EditPipeline
    from ip2p_jax.pipelines.sdxl_edit import SDXLEditPipeline

    pixels = np.zeros((1, 32, 32, 3), np.float32)
    sdxl = SDXLEditPipeline.from_pretrained(sdxl_folder)
    for options, error, message in [
        ({"original_size": (32,)}, ValueError, "original_size must be two non-negative ints"),
        ({"original_size": 512}, ValueError, "original_size must be two"),
        ({"target_size": (32.0, 32)}, ValueError, "target_size must be two"),
        ({"crop": (0, 0)}, TypeError, "takes no crop; its size conditioning is original_size"),
        ({"denoising_end": 1.0}, ValueError, "denoising_end must be in \\(0, 1\\)"),
        ({"denoising_end": 0.001}, ValueError, "stops the chain before its first step"),
    ]:
        with pytest.raises(error, match=message):
            sdxl.edit_arrays(pixels, ["a"], steps=2, sampler="euler", **options)
    sd = EditPipeline.from_pretrained(tiny_folder)
    with pytest.raises(TypeError, match="takes no original_size: the size conditioning is SDX"):
        sd.edit(pixels, "a", steps=2, original_size=(32, 32))
