"""The MagicBrush evaluation script's metrics (evaluation/image_eval.py), per image pair.

- ``l1``, ``l2``: the generated image resized to the target's size (PIL bicubic, Pillow's
  default for RGB), both as [0, 1] tensors; mean |d| and mean d^2 over all values
  (nn.L1Loss / nn.MSELoss).
- ``clip_i``: cosine of the CLIP ViT-B/32 image embeddings of generated and target image.
- ``clip_t``: cosine of the generated image's CLIP embedding with the target's caption's
  (``clip_t_oracle``: the target image's with the same caption, which the script also prints).
- ``dino``: cosine of DINO ViT-S/16 CLS embeddings, generated vs target.

Preprocessing is the script's, done on PIL images as torchvision does: CLIP gets clip.load's
transform (shorter side to the model's size, bicubic; centre crop; CLIP mean/std); DINO gets
Resize(256, bicubic), CenterCrop(224) and ImageNet mean/std. The models are transformers
folders (CLIPModel, ViTModel), built only when a scorer is: torch is not imported before.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ip2p_jax.evaluation.clip_metrics import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DinoEmbedder,
    cosine_similarity,
    pixel_distances,
)

DINO_RESIZE, DINO_CROP = 256, 224  # the script's DINO transform
# DINO's own ViT (vision_transformer.py, vit_small) normalises with eps 1e-6; the converted
# facebook/dino-vits16 config says transformers' default 1e-12.
DINO_LAYER_NORM_EPS = 1e-6
CHUNK = 32  # images per model call: bounds memory, does not change a score
MODEL_METRICS = ("clip_i", "clip_t", "clip_t_oracle", "dino")


def resize_center_crop(image: Image.Image, resize: int, crop: int) -> np.ndarray:
    """torchvision's Resize(resize, BICUBIC) + CenterCrop(crop) + ToTensor on a PIL image.

    The shorter side becomes ``resize`` and the longer ``int(resize * long / short)``, resized
    by PIL (bicubic, antialiased, on uint8: what torchvision does with a PIL image); then the
    centre ``crop`` x ``crop``, offsets rounded as torchvision rounds them. Returns float32
    (crop, crop, 3) in [0, 1]."""
    if crop > resize:
        raise ValueError(f"crop {crop} is larger than the resized short side {resize}")
    image = image.convert("RGB")
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(resize * long / short)
    size = (resize, new_long) if width <= height else (new_long, resize)
    if size != image.size:
        image = image.resize(size, Image.BICUBIC)
    width, height = image.size
    top, left = int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))
    pixels = np.asarray(image, np.float32)[top : top + crop, left : left + crop]
    return pixels / np.float32(255.0)


def normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(N, H, W, 3) [0, 1] -> (N, 3, H, W) normalised, float32 (torchvision's Normalize)."""
    mean_a, std_a = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return np.ascontiguousarray(((pixels - mean_a) / std_a).transpose(0, 3, 1, 2))


def distances(generated: Image.Image, target: Image.Image) -> tuple[float, float]:
    """(L1, L2) of one pair: the generated image resized to the target's size first."""
    generated, target = generated.convert("RGB"), target.convert("RGB")
    if generated.size != target.size:
        generated = generated.resize(target.size, Image.BICUBIC)
    pair = [np.asarray(im, np.float32)[None] / np.float32(255.0) for im in (generated, target)]
    l1, l2 = pixel_distances(*pair)
    return float(l1[0]), float(l2[0])


class MagicBrushScorer:
    """The script's model metrics on transformers folders: CLIP (CLIPModel and its tokenizer;
    ViT-B/32 for the published numbers) and DINO (ViTModel; dino-vits16). Either may be None,
    and its metrics are then left out."""

    def __init__(
        self,
        clip: str | os.PathLike | None = None,
        dino: str | os.PathLike | None = None,
        *,
        device: str = "cpu",
    ):
        self.clip = self.dino = None
        if clip is not None:
            from datagen.clip_filter import ClipSimilarity
            from ip2p_jax.models.tokenizer import CLIPTokenizer

            self.clip = ClipSimilarity(clip, device=device)
            # OpenAI's tokenizer, cleanup included (ftfy, HTML unescape): clip.tokenize's ids.
            self.tokenizer = CLIPTokenizer.from_folder(clip)
        if dino is not None:
            self.dino = DinoEmbedder(dino, device=device, layer_norm_eps=DINO_LAYER_NORM_EPS)

    @property
    def metrics(self) -> tuple[str, ...]:
        """The model metrics this scorer gives."""
        names = ("clip_i", "clip_t", "clip_t_oracle") if self.clip is not None else ()
        return names + (("dino",) if self.dino is not None else ())

    def clip_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, D) unit-norm CLIP embeddings with clip.load's transform (Resize(n_px, bicubic),
        CenterCrop(n_px), CLIP mean/std; n_px = the model's input size)."""
        from datagen.clip_filter import CLIP_MEAN, CLIP_STD

        side = self.clip.size

        def embed(chunk):
            pixels = np.stack([resize_center_crop(im, side, side) for im in chunk])
            return self.clip.encode_pixels(_torch(normalize(pixels, CLIP_MEAN, CLIP_STD)))

        return _chunked(images, lambda chunk: embed(chunk).cpu().numpy())

    def clip_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) unit-norm CLIP text embeddings of clip.tokenize's ids (a caption past 77
        tokens is truncated with a warning, where clip.tokenize raises)."""

        def embed(chunk):
            ids = _torch(self.tokenizer(chunk).astype(np.int64))
            return self.clip.encode_token_ids(ids).cpu().numpy()

        return _chunked(list(texts), embed)

    def dino_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, D) unit-norm DINO CLS embeddings with the script's transform."""

        def embed(chunk):
            pixels = np.stack([resize_center_crop(im, DINO_RESIZE, DINO_CROP) for im in chunk])
            return self.dino.embed_pixels(normalize(pixels, IMAGENET_MEAN, IMAGENET_STD))

        return _chunked(images, embed)

    def score(
        self,
        generated: Sequence[Image.Image],
        targets: Sequence[Image.Image],
        captions: Sequence[str | None],
    ) -> list[dict[str, float]]:
        """One dict per pair: l1, l2 and this scorer's model metrics."""
        if not (len(generated) == len(targets) == len(captions)):
            raise ValueError(
                f"{len(generated)} generated images need as many targets and captions, "
                f"got {len(targets)} and {len(captions)}"
            )
        scores = [
            dict(zip(("l1", "l2"), distances(g, t), strict=True))
            for g, t in zip(generated, targets, strict=True)
        ]
        columns: dict[str, np.ndarray] = {}
        if self.clip is not None:
            if any(c is None for c in captions):
                raise ValueError("CLIP-T needs a caption for every target")
            gen, tgt = self.clip_images(generated), self.clip_images(targets)
            text = self.clip_texts(captions)
            columns["clip_i"] = cosine_similarity(gen, tgt)
            columns["clip_t"] = cosine_similarity(gen, text)
            columns["clip_t_oracle"] = cosine_similarity(tgt, text)
        if self.dino is not None:
            columns["dino"] = cosine_similarity(
                self.dino_images(generated), self.dino_images(targets)
            )
        for k, row in enumerate(scores):
            row.update({name: float(values[k]) for name, values in columns.items()})
        return scores


def _torch(array: np.ndarray):
    import torch

    return torch.from_numpy(array)


def _chunked(items: Sequence, embed) -> np.ndarray:
    """``embed`` over chunks of CHUNK items, stacked."""
    return np.concatenate([embed(items[i : i + CHUNK]) for i in range(0, len(items), CHUNK)])
