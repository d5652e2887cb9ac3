"""Small edit-pair examples and datasets built on the spot."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ip2p_jax.data.schema import make_example
from ip2p_jax.pipelines.images import encode_png


def jpeg_bytes(array: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def random_pair(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, ...]:
    """An input image and its 'edit': the channels reversed, which commutes exactly with
    resizing, cropping and flipping, so a paired augmentation can be checked pixel by pixel."""
    before = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return before, np.ascontiguousarray(before[..., ::-1])


def pair_examples(n: int, *, height: int = 40, width: int = 48, seed: int = 0, prefix="ex"):
    """n examples with PNG images (lossless: decoded pixels are the arrays above)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        before, after = random_pair(rng, height, width)
        yield make_example(
            encode_png(before),
            encode_png(after),
            f"edit number {i}",
            key=f"{prefix}/{i:04d}",
            seed=i,
            clip_sim_dir=i / 100,
        )


@pytest.fixture(scope="module")
def pairs_dataset(tmp_path_factory):
    """A dataset of 36 train and 5 validation pairs (40x48 PNG)."""
    from ip2p_jax.data.edit_pairs import write_dataset

    out = tmp_path_factory.mktemp("pairs")
    write_dataset(
        out,
        {"train": pair_examples(36), "validation": pair_examples(5, seed=1, prefix="val")},
    )
    return out
