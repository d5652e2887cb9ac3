"""The CLIP filter of generated pairs, as the original (metrics/clip_similarity.py and the
selection in generate_img_dataset.py), on transformers' CLIPModel.

Four cosine similarities per pair: each image with its caption (clip_sim_0, clip_sim_1), the
change in image embedding with the change in caption embedding (clip_sim_dir) and the two
images with each other (clip_sim_image). A pair is kept when all pass their thresholds; of
those, the best `keep` by direction similarity.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# OpenAI CLIP's input normalisation (the original hard-codes the same constants).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SCORES = ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image")


@dataclass(frozen=True)
class FilterConfig:
    """Thresholds (the paper's: 0.2 / 0.2 / 0.75) and how many pairs a prompt keeps."""

    min_caption_sim: float = 0.2
    min_direction_sim: float = 0.2
    min_image_sim: float = 0.75
    keep: int = 4

    def rejection(self, scores: Mapping[str, float]) -> str | None:
        """Why a pair fails the filter (the first failing test), or None if it passes."""
        if (
            scores["clip_sim_0"] < self.min_caption_sim
            or scores["clip_sim_1"] < self.min_caption_sim
        ):
            return "caption_sim"
        if scores["clip_sim_dir"] < self.min_direction_sim:
            return "direction_sim"
        if scores["clip_sim_image"] < self.min_image_sim:
            return "image_sim"
        return None


def select(scored: Sequence[Mapping[str, float]], config: FilterConfig) -> list[int]:
    """Indices of the pairs a prompt keeps: those passing every threshold, best direction
    similarity first, at most `config.keep` (ties broken by the earlier sample)."""
    passing = [i for i, scores in enumerate(scored) if config.rejection(scores) is None]
    passing.sort(key=lambda i: (-scored[i]["clip_sim_dir"], i))
    return passing[: config.keep]


class ClipSimilarity:
    """The original's ClipSimilarity on a transformers CLIPModel folder (ViT-L/14 for the
    paper's numbers). Images go in as [0, 1] floats (N, H, W, 3), are resized bicubically to
    the model's input size and normalised as CLIP expects."""

    def __init__(self, model: str | os.PathLike, *, device: str = "cpu"):
        from transformers import CLIPModel, CLIPTokenizer

        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(str(model)).to(self.device).eval()
        self.model.requires_grad_(False)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(model))
        self.size = self.model.config.vision_config.image_size
        self.mean = torch.tensor(CLIP_MEAN, device=self.device)[None, :, None, None]
        self.std = torch.tensor(CLIP_STD, device=self.device)[None, :, None, None]

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings; long captions truncated (clip.tokenize(truncate=True))."""
        tokens = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=77, return_tensors="pt"
        ).to(self.device)
        features = _embedding(self.model.get_text_features(**tokens))
        return features / features.norm(dim=1, keepdim=True)

    @torch.no_grad()
    def encode_token_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Unit-norm text embeddings of token ids already made (N, 77), e.g. by OpenAI's
        tokenizer; the embedding is read at the first end token, so the padding id is free."""
        features = _embedding(self.model.get_text_features(input_ids=input_ids.to(self.device)))
        return features / features.norm(dim=1, keepdim=True)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings of [0, 1] images (N, H, W, 3)."""
        images = images.to(self.device, torch.float32).permute(0, 3, 1, 2)
        images = F.interpolate(images, size=self.size, mode="bicubic", align_corners=False)
        return self.encode_pixels((images - self.mean) / self.std)

    @torch.no_grad()
    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings of images already preprocessed: (N, 3, S, S) at the
        model's size, normalised with CLIP_MEAN / CLIP_STD (for a caller with its own resize,
        such as the MagicBrush protocol's)."""
        pixel_values = pixel_values.to(self.device, torch.float32)
        features = _embedding(self.model.get_image_features(pixel_values=pixel_values))
        return features / features.norm(dim=1, keepdim=True)

    def scores(
        self,
        images_0: torch.Tensor,
        images_1: torch.Tensor,
        captions_0: Sequence[str],
        captions_1: Sequence[str],
    ) -> list[dict[str, float]]:
        """The four similarities of each pair (one dict per pair, keys SCORES)."""
        image_0, image_1 = self.encode_image(images_0), self.encode_image(images_1)
        text_0, text_1 = self.encode_text(captions_0), self.encode_text(captions_1)
        sims = {
            "clip_sim_0": F.cosine_similarity(image_0, text_0),
            "clip_sim_1": F.cosine_similarity(image_1, text_1),
            "clip_sim_dir": F.cosine_similarity(image_1 - image_0, text_1 - text_0),
            "clip_sim_image": F.cosine_similarity(image_0, image_1),
        }
        return [{name: float(sims[name][i]) for name in SCORES} for i in range(len(image_0))]


def _embedding(output) -> torch.Tensor:
    """transformers 5 returns a model output with the projected embedding as pooler_output;
    transformers 4 returned the tensor itself."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
