"""The CLIP filter: similarities against CLIPModel's own forward pass, and the selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datagen.clip_filter import CLIP_MEAN, CLIP_STD, FilterConfig, select


def test_scores_match_clip_models_own_embeddings(clip):
    """The four similarities from CLIPModel.forward's image_embeds/text_embeds, with the
    original's preprocessing (bicubic resize of [0, 1] images, CLIP mean/std)."""
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.random((2, 2, 48, 48, 3), dtype=np.float32))
    captions = (["a red car", "a dog"], ["a blue car", "a dog in a hat"])
    scores = clip.scores(images[:, 0], images[:, 1], *captions)

    pixels = images.reshape(4, 48, 48, 3).permute(0, 3, 1, 2)
    pixels = F.interpolate(pixels, size=clip.size, mode="bicubic", align_corners=False)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    texts = clip.tokenizer(
        [captions[0][0], captions[1][0], captions[0][1], captions[1][1]],
        padding="max_length",
        max_length=77,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = clip.model(input_ids=texts.input_ids, pixel_values=(pixels - mean) / std)
    image = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)  # in0 ed0 in1 ed1
    text = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)  # same order
    for k in range(2):
        i0, i1, t0, t1 = image[2 * k], image[2 * k + 1], text[2 * k], text[2 * k + 1]
        expected = {
            "clip_sim_0": float(i0 @ t0),
            "clip_sim_1": float(i1 @ t1),
            "clip_sim_dir": float(F.cosine_similarity(i1 - i0, t1 - t0, dim=0)),
            "clip_sim_image": float(i0 @ i1),
        }
        assert scores[k] == pytest.approx(expected, abs=1e-5)


def _scores(c0, c1, direction, image):
    return {"clip_sim_0": c0, "clip_sim_1": c1, "clip_sim_dir": direction, "clip_sim_image": image}


def test_filter_keeps_and_drops_the_right_pairs():
    config = FilterConfig(keep=2)  # the paper's thresholds: 0.2, 0.2, 0.75
    scored = [
        _scores(0.30, 0.30, 0.25, 0.80),  # passes
        _scores(0.19, 0.30, 0.90, 0.90),  # caption 0 too low
        _scores(0.30, 0.19, 0.90, 0.90),  # caption 1 too low
        _scores(0.30, 0.30, 0.19, 0.90),  # direction too low
        _scores(0.30, 0.30, 0.90, 0.74),  # images too different
        _scores(0.20, 0.20, 0.40, 0.75),  # passes, exactly at every threshold
        _scores(0.30, 0.30, 0.30, 0.99),  # passes
    ]
    reasons = [config.rejection(s) for s in scored]
    assert reasons == [None, "caption_sim", "caption_sim", "direction_sim", "image_sim", None, None]
    assert select(scored, config) == [5, 6]  # best two by direction, best first
    assert select(scored, FilterConfig(keep=10)) == [5, 6, 0]
    assert select(scored, FilterConfig(min_image_sim=0.95)) == [6]
