"""The paper's edit metrics (metrics/compute_metrics.py), plus pixel and DINO distances.

- ``clip_image``: cosine of the CLIP image embeddings of the input and the edit (how much of
  the input survives).
- ``clip_direction``: cosine of (edit - input) image embeddings with (edited caption - input
  caption) text embeddings (does the change follow the instruction).
- ``clip_text``: cosine of the edit with the edited caption (the original's ``sim_1``).
- ``l1``, ``l2``: mean absolute / squared difference to the target image, pixels in [0, 1].
- ``dino``: cosine of DINO CLS embeddings, edit vs target (vs input without a target).

CLIP is datagen's ClipSimilarity (transformers CLIPModel, PyTorch): it is imported when a
scorer is built, so the rest of ip2p_jax still never imports torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINO's input normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
METRICS = ("clip_image", "clip_direction", "clip_text", "l1", "l2", "dino")


def to_unit_range(images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """uint8 images (N, H, W, 3) of one size -> float32 in [0, 1]."""
    array = np.stack([np.asarray(image) for image in images])
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {array.dtype} {array.shape}")
    return array.astype(np.float32) / 255.0


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) arrays, as torch's F.cosine_similarity (each
    norm floored at 1e-8)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.maximum(np.linalg.norm(a, axis=1), 1e-8) * np.maximum(
        np.linalg.norm(b, axis=1), 1e-8
    )
    return (a * b).sum(axis=1) / norms


def pixel_distances(edits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image mean |edit - target| and mean (edit - target)^2 of [0, 1] images."""
    if edits.shape != targets.shape:
        raise ValueError(f"edits {edits.shape} and targets {targets.shape} differ in shape")
    diff = edits.astype(np.float64) - targets.astype(np.float64)
    axes = tuple(range(1, diff.ndim))
    return np.abs(diff).mean(axis=axes), (diff**2).mean(axis=axes)


class DinoEmbedder:
    """Unit-norm CLS embeddings from a transformers vision backbone folder (ViTModel for DINO,
    Dinov2Model, ...; loaded with AutoModel). Images are resized (bicubic) to the size of the
    folder's preprocessor_config.json (crop size, else size), or the model's image_size, and
    normalised with its mean/std (ImageNet's by default). No crop: whole images compare."""

    def __init__(self, model: str | os.PathLike, *, device: str = "cpu", **config: Any):
        """``config``: overrides of the folder's config (e.g. ``layer_norm_eps``)."""
        import torch
        from transformers import AutoModel

        self.device = torch.device(device)
        self.model = AutoModel.from_pretrained(str(model), **config).to(self.device).eval()
        self.model.requires_grad_(False)
        mean, std, size = IMAGENET_MEAN, IMAGENET_STD, None
        processor = Path(model) / "preprocessor_config.json"
        if processor.is_file():
            config = json.loads(processor.read_text())
            mean, std = config.get("image_mean", mean), config.get("image_std", std)
            size = _side(config.get("crop_size")) or _side(config.get("size"))
        self.size = size or int(self.model.config.image_size)
        self.mean = torch.tensor(mean, device=self.device)[None, :, None, None]
        self.std = torch.tensor(std, device=self.device)[None, :, None, None]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """(N, D) unit-norm CLS embeddings of [0, 1] images (N, H, W, 3)."""
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            pixels = torch.from_numpy(np.ascontiguousarray(images, np.float32)).to(self.device)
            pixels = F.interpolate(
                pixels.permute(0, 3, 1, 2), size=self.size, mode="bicubic", align_corners=False
            )
        return self.embed_pixels((pixels - self.mean) / self.std)

    def embed_pixels(self, pixel_values: Any) -> np.ndarray:
        """(N, D) unit-norm CLS embeddings of images already resized and normalised, (N, 3,
        H, W) float32 (numpy or torch). A side other than the model's interpolates its
        position embeddings, as DINO's own ViT does for any input size."""
        import torch

        with torch.no_grad():
            pixels = torch.as_tensor(pixel_values, dtype=torch.float32).to(self.device)
            extra = {}
            if pixels.shape[-1] != self.model.config.image_size:
                extra["interpolate_pos_encoding"] = True
            out = self.model(pixel_values=pixels, **extra)
            # The CLS token of the final (layer-normed) hidden states: DINO's image embedding.
            cls = out.last_hidden_state[:, 0]
            cls = cls / cls.norm(dim=1, keepdim=True)
        return cls.cpu().numpy()


def _side(size: Any) -> int | None:
    """A side length from a preprocessor's size field (int, or dict of height/shortest_edge)."""
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        return size.get("height") or size.get("shortest_edge")
    return None


class EditScorer:
    """Scores edits: CLIP (always), L1/L2 (with targets), DINO (when a model is given)."""

    def __init__(
        self,
        clip: str | os.PathLike,
        *,
        dino: str | os.PathLike | None = None,
        device: str = "cpu",
    ):
        from datagen.clip_filter import ClipSimilarity

        self.clip = ClipSimilarity(clip, device=device)
        self.dino = DinoEmbedder(dino, device=device) if dino is not None else None
        self._text_cache: dict[str, np.ndarray] = {}

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """Unit-norm CLIP image embeddings of [0, 1] images (N, H, W, 3).

        The original evaluation fed its [-1, 1] images straight into CLIP, whose
        preprocessing expects [0, 1]; we feed [0, 1], so absolute values differ from the
        paper's plot (the trade-off between methods is what compares)."""
        import torch

        return self.clip.encode_image(torch.from_numpy(np.ascontiguousarray(images))).numpy()

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm CLIP text embeddings; each caption is encoded once per scorer (every
        sweep point reuses the same captions)."""
        new = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if new:
            for text, row in zip(new, self.clip.encode_text(new).numpy(), strict=True):
                self._text_cache[text] = row
        return np.stack([self._text_cache[t] for t in texts])

    def score(
        self,
        inputs: np.ndarray,
        edits: np.ndarray,
        input_captions: Sequence[str],
        edited_captions: Sequence[str],
        targets: np.ndarray | None = None,
    ) -> list[dict[str, float]]:
        """One dict of metrics per edit. Images: [0, 1] floats (N, H, W, 3), edits and targets
        at the inputs' size. Without targets, l1 and l2 are left out."""
        n = len(inputs)
        if not (len(edits) == len(input_captions) == len(edited_captions) == n):
            raise ValueError(
                f"{n} inputs need as many edits and captions, got {len(edits)}, "
                f"{len(input_captions)} and {len(edited_captions)}"
            )
        image_in, image_out = self.encode_images(inputs), self.encode_images(edits)
        text_in, text_out = self.encode_texts(input_captions), self.encode_texts(edited_captions)
        scores: dict[str, np.ndarray] = {
            "clip_image": cosine_similarity(image_in, image_out),
            "clip_direction": cosine_similarity(image_out - image_in, text_out - text_in),
            "clip_text": cosine_similarity(image_out, text_out),
        }
        if targets is not None:
            scores["l1"], scores["l2"] = pixel_distances(edits, targets)
        if self.dino is not None:
            reference = targets if targets is not None else inputs
            scores["dino"] = cosine_similarity(self.dino(edits), self.dino(reference))
        return [{name: float(values[i]) for name, values in scores.items()} for i in range(n)]
