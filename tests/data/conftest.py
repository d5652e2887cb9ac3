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


def global_batches(make_loader, processes: int, count: int, batch: int, states=None):
    """`count` global batches of `processes` loaders (``make_loader(index, processes)``, of
    global batch `batch`; their blocks concatenated in process order, as the global array
    holds them), resumed from `states` (another run's) if given, and each one's state after."""
    from ip2p_jax.data.loader import resume_position

    iterators = []
    for index in range(processes):
        batches = iter(make_loader(index, processes))
        if states is not None:
            batches.set_state(resume_position(states, index, processes, batch // processes))
        iterators.append(batches)
    out = []
    for _ in range(count):
        blocks = [next(batches) for batches in iterators]
        out.append({k: np.concatenate([b[k] for b in blocks]) for k in ("key", "input_image")})
    return out, [batches.get_state() for batches in iterators]


def assert_same_batches(first: list[dict], second: list[dict]) -> None:
    """The same keys in the same order, with the same pixels (the same augmentation)."""
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a["key"].tolist() == b["key"].tolist()
        assert np.array_equal(a["input_image"], b["input_image"])


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


# (pairs, height, width) of the mixed-size split; with 32x32 buckets of step 4 the first two
# sizes go to 32x32, the third to 44x20 and the last to 16x64 (too few for a batch of 8).
MIXED_SIZES = ((16, 32, 32), (8, 34, 30), (16, 24, 48), (1, 64, 16))


def mixed_size_examples(seed: int = 0):
    """The pairs of MIXED_SIZES, interleaved by size so no order happens to batch them."""
    groups = [
        list(pair_examples(n, height=h, width=w, seed=seed + k, prefix=f"{w}x{h}"))
        for k, (n, h, w) in enumerate(MIXED_SIZES)
    ]
    for row in range(max(map(len, groups))):
        yield from (group[row] for group in groups if row < len(group))


@pytest.fixture(scope="session")
def mixed_dataset(tmp_path_factory):
    """A train split of 41 pairs of four sizes (MIXED_SIZES)."""
    from ip2p_jax.data.edit_pairs import write_dataset

    out = tmp_path_factory.mktemp("mixed")
    write_dataset(out, {"train": mixed_size_examples()})
    return out
