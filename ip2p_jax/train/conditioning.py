"""The text conditioning a train step gives the UNet, for SD and SDXL models.

SD (1.x, 2.x): the text encoder's last hidden states. SDXL, as diffusers'
train_instruct_pix2pix_sdxl.py: the penultimate hidden states of both encoders joined
(models.clip_text.sdxl_text_conditioning), the second encoder's pooled projection as
``text_embeds``, and the time ids of a square crop at the training resolution with no crop
offset. Conditioning dropout swaps the states for those of "" and leaves the pooled text and
the time ids alone, as that script does (its inference pipeline zeroes them instead).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from ip2p_jax.models.clip_text import sdxl_text_conditioning
from ip2p_jax.models.tokenizer import CLIPTokenizer
from ip2p_jax.train.models import ModelSet

# SDXL's time ids: original height, width, crop top, left, target height, width.
TIME_IDS = 6


@dataclasses.dataclass(frozen=True)
class TokenizerPair:
    """SDXL's two tokenizers as one for the data loader: ids [N, 2, T], the first
    tokenizer's then the second's (they differ in padding)."""

    first: CLIPTokenizer
    second: CLIPTokenizer

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        return np.stack([self.first(texts), self.second(texts)], axis=1)


def is_sdxl(models: ModelSet) -> bool:
    """Whether the models condition like SDXL (a second text encoder)."""
    return models.text_encoder_2 is not None


def text_encoder_names(models: ModelSet) -> tuple[str, ...]:
    return ("text_encoder", "text_encoder_2") if is_sdxl(models) else ("text_encoder",)


def batch_tokenizer(models: ModelSet) -> CLIPTokenizer | TokenizerPair:
    """What tokenizes a batch's instructions into its ``input_ids`` for these models."""
    if is_sdxl(models):
        return TokenizerPair(models.tokenizer, models.tokenizer_2)
    return models.tokenizer


def encode_text(
    models: ModelSet, params: Mapping[str, Any], input_ids: jax.Array
) -> tuple[jax.Array, jax.Array | None]:
    """(text states [N, T, D], pooled text [N, P] or None for SD) of `batch_tokenizer`'s ids;
    ``params`` holds each text encoder's by name."""
    first = models.text_encoder.module
    if not is_sdxl(models):
        return first.apply({"params": params["text_encoder"]}, input_ids).last_hidden_state, None
    second = models.text_encoder_2.module
    return sdxl_text_conditioning(
        first.apply({"params": params["text_encoder"]}, input_ids[:, 0], output_hidden_states=True),
        second.apply(
            {"params": params["text_encoder_2"]}, input_ids[:, 1], output_hidden_states=True
        ),
    )


def time_ids(resolution: int) -> np.ndarray:
    """SDXL's time ids [1, 6] of a training example: a square `resolution` crop taken from
    an image of that size at (0, 0), as the script's defaults."""
    return np.asarray([[resolution, resolution, 0, 0, resolution, resolution]], np.float32)
