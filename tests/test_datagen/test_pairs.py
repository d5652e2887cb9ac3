"""Prompt-to-Prompt pairs: the sampler against diffusers' own pipeline, and the attention
processors against attention written out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datagen import prompt2prompt
from datagen.pairs import PairConfig, PairSampler, SampleDraw, p2p_active

SIZE, STEPS = 32, 4
CAPTIONS = ("a red car", "a blue car on a road")


def sampler(folder, mode="self", pairs_per_call=2):
    return PairSampler(
        folder, PairConfig(steps=STEPS, resolution=SIZE, mode=mode), pairs_per_call=pairs_per_call
    )


def test_p_zero_equals_two_independent_diffusers_generations(sd_folder):
    """With p = 0 nothing is borrowed: each image is what diffusers' StableDiffusionPipeline
    renders for its caption from the same seed (initial and per-step noise) and scale."""
    from diffusers import StableDiffusionPipeline

    ours = sampler(sd_folder)
    draws = [SampleDraw(11, 0.0, 9.0), SampleDraw(12, 0.0, 12.5)]
    images = ours.render(*CAPTIONS, draws)
    pipe = StableDiffusionPipeline(
        vae=ours.vae,
        text_encoder=ours.text_encoder,
        tokenizer=ours.tokenizer,
        unet=ours.unet,
        scheduler=ours.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    for k, draw in enumerate(draws):
        for side, caption in enumerate(CAPTIONS):
            reference = pipe(
                caption,
                height=SIZE,
                width=SIZE,
                num_inference_steps=STEPS,
                guidance_scale=draw.cfg_scale,
                generator=torch.Generator().manual_seed(draw.seed),
                output_type="np",
            ).images[0]
            # fp32; the batch of 4 rows vs diffusers' 2 changes only the summation order
            np.testing.assert_allclose(images[k, side], reference, atol=1e-5)


@pytest.mark.parametrize("mode", ["self", "replace", "refine"])
def test_identical_captions_give_identical_images(sd_folder, mode):
    images = sampler(sd_folder, mode).render("a red car", "a red car", [SampleDraw(5, 0.6, 8.0)])
    # 'refine' redoes the edited row's attention by hand, the input row's in the fused kernel:
    # equal up to float rounding. The others run the same kernel on equal rows: bit-equal.
    atol = 1e-5 if mode == "refine" else 0
    np.testing.assert_allclose(images[0, 0], images[0, 1], rtol=0, atol=atol)


@pytest.mark.parametrize("mode", ["self", "replace", "refine"])
def test_borrowing_changes_the_edited_image_only(sd_folder, mode):
    ours = sampler(sd_folder, mode)
    captions = ("a red car", "a blue car")  # equal token counts, for 'replace'
    plain, shared = (ours.render(*captions, [SampleDraw(5, p, 8.0)])[0] for p in (0.0, 1.0))
    np.testing.assert_array_equal(plain[0], shared[0])
    assert np.abs(plain[1] - shared[1]).max() > 1e-4


def test_batching_samples_changes_nothing(sd_folder):
    """Mixed p (active and inactive pairs in one call) and scales, 1 vs 3 pairs per call."""
    draws = [SampleDraw(1, 0.0, 7.5), SampleDraw(2, 0.9, 15.0), SampleDraw(3, 0.4, 10.0)]
    one = sampler(sd_folder, pairs_per_call=1).render(*CAPTIONS, draws)
    three = sampler(sd_folder, pairs_per_call=3).render(*CAPTIONS, draws)
    np.testing.assert_allclose(one, three, atol=1e-5)


def test_replace_refuses_captions_of_unequal_token_counts(sd_folder):
    with pytest.raises(prompt2prompt.TokenCountMismatch, match="use 'refine'"):
        sampler(sd_folder, "replace").render(*CAPTIONS, [SampleDraw(1, 0.5, 8.0)])


def test_pair_config_draws_and_schedule():
    config = PairConfig()
    draw = config.draw(123)
    assert draw == config.draw(123) and draw != config.draw(124)
    assert 0.1 <= draw.p2p_threshold <= 0.9 and 7.5 <= draw.cfg_scale <= 15.0
    # the original: the first `threshold` of the steps borrow, i / (steps - 1) < threshold
    assert [p2p_active(0.5, i, 5) for i in range(5)] == [True, True, False, False, False]
    assert not any(p2p_active(0.0, i, 5) for i in range(5))
    with pytest.raises(ValueError, match="mode"):
        PairConfig(mode="swap")
    with pytest.raises(ValueError, match="min_p2p"):
        PairConfig(min_p2p=0.5, max_p2p=0.2)


def test_refinement_mapper_aligns_shared_tokens():
    # source: <s> a red car </s>; target: <s> a big red car </s>
    mapper, alphas = prompt2prompt.refinement_mapper([0, 5, 7, 9, 1], [0, 5, 6, 7, 9, 1], 8)
    assert mapper.tolist() == [0, 1, 2, 2, 3, 4, 6, 7]
    assert alphas.tolist() == [1, 1, 0, 1, 1, 1, 1, 1]


def _attention_by_hand(attn, x, context):
    """Per-row softmax(q k^T * scale) and the value projections, heads split."""
    heads = attn.heads

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    q, k, v = split(attn.to_q(x)), split(attn.to_k(context)), split(attn.to_v(context))
    return (q @ k.transpose(-1, -2) * attn.scale).softmax(-1), v


def _output(attn, probs, v):
    out = (probs @ v).transpose(1, 2).reshape(probs.shape[0], probs.shape[2], -1)
    return attn.to_out[0](out)


@pytest.mark.parametrize("mode", ["self", "replace", "refine"])
def test_processor_borrows_the_right_maps(mode):
    """Two pairs, the first active: its edited rows use the input rows' maps (self: both
    halves; replace/refine: the conditional half, cross-attention), the second pair and the
    input rows are untouched. Checked against attention written out by hand."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    is_cross = mode != "self"
    attn = Attention(16, cross_attention_dim=12 if is_cross else None, heads=2, dim_head=8)
    controller = prompt2prompt.P2PController(mode, active=torch.tensor([True, False]))
    mapper, alphas = prompt2prompt.refinement_mapper([0, 5, 7, 1], [0, 5, 6, 7, 1], 6)
    controller.mapper, controller.alphas = mapper, alphas
    attn.set_processor(prompt2prompt.P2PAttnProcessor(controller, is_cross))
    x = torch.randn(8, 10, 16)  # [u_in0, u_ed0, u_in1, u_ed1, c_in0, c_ed0, c_in1, c_ed1]
    context = torch.randn(8, 6, 12) if is_cross else x
    with torch.no_grad():
        out = attn(x, encoder_hidden_states=context if is_cross else None)
        probs, v = _attention_by_hand(attn, x, context)
        expected_probs = probs.clone()
        if mode == "self":
            expected_probs[1], expected_probs[5] = probs[0], probs[4]
        elif mode == "replace":
            expected_probs[5] = probs[4]
        else:
            a = alphas
            expected_probs[5] = probs[4][..., mapper] * a + probs[5] * (1 - a)
        expected = _output(attn, expected_probs, v)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(expected_probs[5], probs[5])  # the check above could fail


def test_refine_runs_on_the_device_of_the_attention_tensors():
    """The mapper and alphas are built from token ids on the CPU; on a GPU, mixing them with
    the attention maps raised 'Expected all tensors to be on the same device'. The meta device
    checks devices the same way, so this runs without a GPU."""
    controller = prompt2prompt.P2PController("refine", active=torch.tensor([True, False]))
    controller.mapper, controller.alphas = prompt2prompt.refinement_mapper(
        [0, 5, 7, 1], [0, 5, 6, 7, 1], 6
    )
    assert controller.alphas.device.type == "cpu"  # as _set_mapper's tokenizer path gives
    query = torch.empty(8, 2, 10, 8, device="meta")  # (batch, heads, queries, dim)
    key, value = (torch.empty(8, 2, 6, 8, device="meta") for _ in range(2))
    out = torch.empty(8, 2, 10, 8, device="meta")
    controller.refine(query, key, value, out, scale=8**-0.5)
    assert out.device.type == "meta"


def test_refine_mapper_is_moved_to_the_sampler_device_once_per_prompt(sd_folder):
    """`_set_mapper` puts the mapper and alphas on the sampler's device and dtype, so no
    attention call copies them from the host."""
    ours = sampler(sd_folder, "refine")
    ours.device = torch.device("meta")  # stands in for a GPU: only _set_mapper is run
    ours._set_mapper(*CAPTIONS)
    assert ours.controller.mapper.device.type == "meta"
    assert ours.controller.alphas.device.type == "meta"
    assert ours.controller.alphas.dtype == ours.unet.dtype


@pytest.fixture(scope="module")
def other_vae(sd_folder, tmp_path_factory):
    """The tiny model's VAE with its decoder perturbed, saved as a standalone VAE folder (as
    stabilityai/sd-vae-ft-mse is: a fine-tuned decoder, the same latent space)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(sd_folder / "vae"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, param in sorted(vae.decoder.named_parameters()):
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    path = tmp_path_factory.mktemp("vae") / "sd-vae-other"
    vae.save_pretrained(str(path))
    return path


def _record_decoded_latents(ours: PairSampler) -> list[torch.Tensor]:
    """The latents each vae.decode call of `ours` receives."""
    seen, decode = [], ours.vae.decode

    def record(latents, *args, **kwargs):
        seen.append(latents.clone())
        return decode(latents, *args, **kwargs)

    ours.vae.decode = record
    return seen


def test_vae_option_changes_the_pixels_not_the_latents(sd_folder, other_vae):
    from diffusers import AutoencoderKL

    config = PairConfig(steps=2, resolution=32, mode="self")
    draws = [SampleDraw(7, 0.5, 8.0)]
    samplers = {
        "default": PairSampler(sd_folder, config),
        "own": PairSampler(sd_folder, config, vae=sd_folder / "vae"),
        "other": PairSampler(sd_folder, config, vae=str(other_vae)),
    }
    latents = {name: _record_decoded_latents(s) for name, s in samplers.items()}
    images = {name: s.render(*CAPTIONS, draws) for name, s in samplers.items()}
    torch.testing.assert_close(latents["other"][0], latents["default"][0], rtol=0, atol=0)
    np.testing.assert_array_equal(images["own"], images["default"])  # the same weights
    assert np.abs(images["other"] - images["default"]).max() > 1e-3
    # the pixels are the other VAE's decoding of those same latents
    with torch.no_grad():
        pixels = AutoencoderKL.from_pretrained(str(other_vae)).decode(latents["default"][0])
    pixels = (pixels.sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(images["other"].reshape(pixels.shape), pixels, atol=1e-6)


def test_vae_option_refuses_what_is_not_a_matching_vae(sd_folder, tmp_path):
    import re

    from diffusers import AutoencoderKL

    config = PairConfig(steps=2, resolution=32)
    missing = tmp_path / "no-such-vae"
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((sd_folder / "vae" / "config.json").read_text())
    for path, why in [
        (missing, "no .*config.json"),
        (sd_folder, "no .*config.json"),  # a pipeline folder, not its vae subfolder
        (sd_folder / "unet", "'UNet2DConditionModel', not 'AutoencoderKL'"),
        (weightless, "no weights file"),
    ]:
        with pytest.raises(FileNotFoundError, match=re.escape(str(path)) + ".*" + why):
            PairSampler(sd_folder, config, vae=path)

    base = AutoencoderKL.load_config(str(sd_folder / "vae"))
    three = tmp_path / "three-channels"
    AutoencoderKL.from_config({**base, "latent_channels": 3}).save_pretrained(str(three))
    with pytest.raises(ValueError, match="latent_channels=3.*in_channels=4"):
        PairSampler(sd_folder, config, vae=three)
    deeper = tmp_path / "deeper"
    AutoencoderKL.from_config(
        {
            **base,
            "block_out_channels": [32, 64, 64],
            "down_block_types": ["DownEncoderBlock2D"] * 3,
            "up_block_types": ["UpDecoderBlock2D"] * 3,
        }
    ).save_pretrained(str(deeper))
    with pytest.raises(ValueError, match="downsamples by 4 but .* by 2"):
        PairSampler(sd_folder, config, vae=deeper)
