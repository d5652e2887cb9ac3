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
