"""Aspect-ratio buckets: the list, the nearest-bucket rule, and the bucketed loader (one
bucket per batch, a seeded order, exact resume, the same batches on any process count)."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from ip2p_jax.data.augment import Augmentation, augment_pair
from ip2p_jax.data.bucket_sampler import BucketPlan, pair_sizes
from ip2p_jax.data.buckets import (
    Bucket,
    bucket_list,
    describe,
    nearest_bucket,
    resize_to_bucket,
    restore_size,
    size_multiple,
)
from ip2p_jax.data.edit_pairs import EditPairSource
from ip2p_jax.data.loader import EditPairLoader, InputConfig
from tests.data.conftest import assert_same_batches, global_batches, random_pair

MICRO = Augmentation(crop=32, min_resize=32, max_resize=36, flip_prob=0.5)
BUCKETS = bucket_list(32 * 32, step=4)


def test_the_256_list_is_kohyas_at_step_64():
    assert describe(bucket_list(256 * 256)) == (
        "128x512 128x448 128x384 192x320 256x256 320x192 384x128 448x128 512x128"
    )


@pytest.mark.parametrize(("area", "step", "ratio"), [(256**2, 32, 4.0), (1024**2, 64, 2.0)])
def test_every_bucket_fits_the_budget_and_the_ratio(area, step, ratio):
    buckets = bucket_list(area, step, ratio)
    side = int(area**0.5) // step * step
    assert Bucket(side, side) in buckets
    assert set(buckets) == {Bucket(b.height, b.width) for b in buckets}  # each turned upright
    for bucket in buckets:
        assert bucket.width % step == 0 and bucket.height % step == 0
        assert bucket.width * bucket.height <= area
        assert max(bucket.aspect, 1 / bucket.aspect) <= ratio
        # The tallest that fits: one step taller would be over the budget.
        assert bucket.width * (bucket.height + step) > area or bucket.height > bucket.width
    assert [b.aspect for b in buckets] == sorted({b.aspect for b in buckets})


def test_a_budget_below_one_step_square_is_refused():
    with pytest.raises(ValueError, match="at least step\\*\\*2 = 4096"):
        bucket_list(4000, 64)


def test_nearest_bucket_compares_aspect_ratios_in_log_scale():
    # 2:1 lies between 44x20 (2.2) and 40x24 (1.67): log-nearer 2.2 (factor 1.1 vs 1.2).
    assert nearest_bucket(48, 24, BUCKETS) == Bucket(44, 20)
    assert nearest_bucket(30, 34, BUCKETS) == Bucket(32, 32)
    assert nearest_bucket(1000, 10, BUCKETS) == Bucket(64, 16)  # past the widest
    # Exactly between 1:1 and 2:1 in log scale (sqrt 2 is irrational: use a list with an
    # exact tie): 2:1 is as far from 4:1 as from 1:1, and the tie goes to the larger bucket.
    tie = (Bucket(8, 8), Bucket(12, 3))
    assert nearest_bucket(16, 8, tie) == Bucket(8, 8)
    assert nearest_bucket(16, 8, (Bucket(4, 4), Bucket(8, 2))) == Bucket(8, 2)  # the wider
    assert Fraction(16, 8) / tie[0].aspect == tie[1].aspect / Fraction(16, 8)


def test_resizing_to_a_bucket_and_back_keeps_the_size():
    image = Image.fromarray(random_pair(np.random.default_rng(0), 34, 50)[0])
    bucket = nearest_bucket(*image.size, BUCKETS)
    moved = resize_to_bucket(image, bucket)
    assert moved.size == bucket and restore_size(moved, image.size).size == image.size
    assert resize_to_bucket(moved, bucket) is moved  # already that size: untouched


def test_size_multiple_is_the_vae_times_the_unet_downsampling():
    class Config:
        def __init__(self, blocks):
            self.block_out_channels = [0] * blocks

    assert size_multiple(Config(4), Config(4)) == 64  # SD-1.x
    assert size_multiple(Config(3), Config(4)) == 32  # SDXL


@pytest.mark.parametrize("size", [None, (44, 20)])
def test_a_bucket_crop_is_the_same_on_both_images(size):
    rng = np.random.default_rng(1)
    before, after = (Image.fromarray(a) for a in random_pair(rng, 24, 48))
    a, b = augment_pair(before, after, MICRO, np.random.default_rng(3), size)
    width, height = size or (32, 32)
    assert a.shape == (height, width, 3) and np.array_equal(b, a[..., ::-1])


def _plan(dataset) -> BucketPlan:
    return BucketPlan.from_sizes(pair_sizes(EditPairSource(dataset, "train")), BUCKETS)


def _loader(dataset, plan, *, shard=(0, 1), **config):
    config = {"batch_size": 8, "augmentation": MICRO, "seed": 7, **config}
    return EditPairLoader(
        EditPairSource(dataset, "train"),
        InputConfig(**config),
        shard_index=shard[0],
        shard_count=shard[1],
        buckets=plan,
    )


def _global_batches(dataset, plan, processes, count, states=None):
    def loader(index: int, processes: int) -> EditPairLoader:
        return _loader(dataset, plan, shard=(index, processes))

    return global_batches(loader, processes, count, 8, states)


def _same(first, second) -> bool:
    try:
        assert_same_batches(first, second)
    except AssertionError:
        return False
    return True


def test_each_batch_is_one_bucket_in_a_seeded_order(mixed_dataset):
    plan = _plan(mixed_dataset)
    assert plan.trained(8) == [Bucket(32, 32), Bucket(44, 20)]  # 16x64 has 1 pair, no batch
    batches = list(itertools.islice(iter(_loader(mixed_dataset, plan)), 10))  # 2 epochs of 5
    again = list(itertools.islice(iter(_loader(mixed_dataset, plan)), 10))
    other = list(itertools.islice(iter(_loader(mixed_dataset, plan, seed=8)), 10))
    assert _same(batches, again) and not _same(batches, other)
    for batch in batches:
        sizes = {str(key).split("/")[0] for key in batch["key"]}
        if batch["input_image"].shape[1:3] == (32, 32):
            assert sizes <= {"32x32", "30x34"}
        else:
            assert batch["input_image"].shape[1:3] == (20, 44) and sizes == {"48x24"}
    for epoch in (batches[:5], batches[5:]):  # every trained pair once an epoch
        keys = [key for batch in epoch for key in batch["key"].tolist()]
        assert len(set(keys)) == 40 and not any(key.startswith("16x64") for key in keys)
    assert [b["input_image"].shape[1] for b in batches[:5]] != [32] * 3 + [20] * 2  # shuffled


def test_bucketed_batches_resume_exactly_on_any_process_count(mixed_dataset):
    plan = _plan(mixed_dataset)
    whole, _ = _global_batches(mixed_dataset, plan, 1, 8)
    two, states = _global_batches(mixed_dataset, plan, 2, 3)
    assert_same_batches(whole[:3], two)
    rest, _ = _global_batches(mixed_dataset, plan, 2, 5, states=states)
    assert_same_batches(whole[3:], rest)
    one, _ = _global_batches(mixed_dataset, plan, 1, 5, states=states)  # on one process
    assert_same_batches(whole[3:], one)


def test_a_state_resumes_only_under_its_own_buckets(mixed_dataset):
    plan = _plan(mixed_dataset)
    batches = iter(_loader(mixed_dataset, plan))
    next(batches)
    state = batches.get_state()
    assert state["buckets"] == [str(b) for b in BUCKETS]
    other = BucketPlan.from_sizes(pair_sizes(EditPairSource(mixed_dataset, "train")), BUCKETS[1:])
    for loader in (_loader(mixed_dataset, other), _loader(mixed_dataset, None)):
        with pytest.raises(ValueError, match="made with buckets"):
            iter(loader).set_state(state)


def test_a_plan_without_a_whole_batch_is_refused(mixed_dataset):
    plan = _plan(mixed_dataset)
    with pytest.raises(ValueError, match="no bucket holds a whole batch of 25 pairs"):
        _loader(mixed_dataset, plan, batch_size=25)


def test_pair_sizes_name_the_pairs_left_out():
    from ip2p_jax.data.bucket_sampler import pair_size

    good, other = (
        {"instruction": "x", "input_image": p, "edited_image": q}
        for p, q in [(_png(8, 6), _png(8, 6)), (_png(8, 6), _png(6, 8))]
    )
    assert pair_size(good) == (6, 8)
    assert pair_size(other) == "size_mismatch"
    assert pair_size({**good, "instruction": " "}) == "empty_instruction"
    assert pair_size({**good, "input_image": b"not an image"}) == "corrupt_image"
    plan = BucketPlan.from_sizes([(6, 8), "size_mismatch"], BUCKETS)
    assert plan.assignment[1] == -1 and "left out: 1 pairs" in plan.summary(1)


def _png(height: int, width: int) -> bytes:
    from ip2p_jax.pipelines.images import encode_png

    return encode_png(np.zeros((height, width, 3), np.uint8))


def test_a_pair_unreadable_since_the_plan_stops_the_batch(tmp_path):
    """A bucketed batch cannot take the next example in a skipped one's place (it may be
    another bucket's): a pair the plan counted on that fails to decode now is an error."""
    from ip2p_jax.data.edit_pairs import write_dataset
    from ip2p_jax.data.schema import make_example
    from ip2p_jax.pipelines.images import encode_png

    rng = np.random.default_rng(0)
    examples = []
    for i in range(8):
        before, after = (encode_png(a) for a in random_pair(rng, 32, 32))
        if i == 2:  # a PNG header and then garbage
            after = after[:8] + b"\x00garbage" * 10
        examples.append(make_example(before, after, f"edit {i}", key=f"k{i}"))
    write_dataset(tmp_path, {"train": examples})
    square = BUCKETS.index(Bucket(32, 32))
    plan = BucketPlan(BUCKETS, np.full(8, square))  # as if every pair had decoded
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="k2 could be trained on"):
        next(iter(_loader(tmp_path, plan, shuffle=False)))
