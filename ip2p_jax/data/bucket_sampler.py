"""Bucketed training order: every global batch holds pairs of one aspect-ratio bucket
(data.buckets), in a seeded order that is a pure function of the batch's index.

A pair's bucket is its input image's (data.buckets.nearest_bucket of its decoded size; the
edited image must have the same size, or the pair is skipped as a size mismatch, as without
buckets). Finding it takes the image sizes of the whole split, so :func:`pair_sizes` reads
the split once before training, decoding every pair as the loader will: a pair that cannot
be trained on is left out there, and bucketed batches never have a hole to fill.

Epoch e of :class:`BucketSampler`: each bucket's pairs shuffled (seed, e), cut into batches
of the global batch size (the rest of each bucket waits for the next epoch's shuffle), the
batches of every bucket shuffled together. Its index i is row i % B of batch i // B, as the
loader's plain order, so the loader's process blocks, state and resume work unchanged: each
process reads its block of the same global batch on any process count.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from ip2p_jax.data.augment import BadExample, check_instruction, decode_pair
from ip2p_jax.data.buckets import Bucket, describe, nearest_bucket

# A pair's entry in the table of sizes: its input image's (width, height), or why it is
# left out ("corrupt_image", "size_mismatch", "empty_instruction": the loader's skip reasons).
PairSize = tuple[int, int] | str


def pair_size(example: Mapping[str, Any]) -> PairSize:
    """The (width, height) of an example's images, or the reason the loader skips it."""
    try:
        check_instruction(example)
        before, _ = decode_pair(example)
    except BadExample as bad:
        return bad.reason
    return before.size


def pair_sizes(source: Sequence, report: Callable[[str], None] = print) -> list[PairSize]:
    """:func:`pair_size` of every example of `source` (a split), in order."""
    from tqdm import tqdm

    report(f"reading the image sizes of {len(source)} pairs of {source!r} for the buckets")
    return [pair_size(source[i]) for i in tqdm(range(len(source)), unit="pair", desc="buckets")]


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    """Which bucket each pair of a split trains in: `assignment[i]` indexes `buckets`, -1 for
    a pair left out."""

    buckets: tuple[Bucket, ...]
    assignment: np.ndarray

    @classmethod
    def from_sizes(cls, sizes: Sequence[PairSize], buckets: tuple[Bucket, ...]) -> BucketPlan:
        index = {bucket: k for k, bucket in enumerate(buckets)}
        assignment = np.asarray(
            [-1 if isinstance(s, str) else index[nearest_bucket(*s, buckets)] for s in sizes],
            np.int64,
        )
        return cls(tuple(buckets), assignment)

    def members(self) -> list[np.ndarray]:
        """The record indices of each bucket, ascending."""
        return [np.flatnonzero(self.assignment == k) for k in range(len(self.buckets))]

    def trained(self, batch_size: int) -> list[Bucket]:
        """The buckets with a whole batch of `batch_size` pairs: the ones batches come from."""
        members = self.members()
        return [b for b, m in zip(self.buckets, members, strict=True) if len(m) >= batch_size]

    def summary(self, batch_size: int) -> str:
        """One line per non-empty bucket: its pairs and whole batches per epoch."""
        lines = []
        for bucket, members in zip(self.buckets, self.members(), strict=True):
            if len(members):
                batches = len(members) // batch_size
                note = "" if batches else " (fewer than a batch: not trained on)"
                lines.append(f"{bucket}: {len(members)} pairs, {batches} batches/epoch{note}")
        left_out = int((self.assignment < 0).sum())
        if left_out:
            lines.append(f"left out: {left_out} pairs that cannot be trained on")
        return "\n".join(lines)


class BucketSampler:
    """A grain sampler over a :class:`BucketPlan`: index i is row i % B of global batch
    i // B, and every global batch is one bucket's (see the module docstring). Like
    grain's IndexSampler, index i draws its augmentation from Philox(seed + i)."""

    def __init__(
        self,
        plan: BucketPlan,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        num_epochs: int | None = None,
    ):
        self.plan, self.batch_size = plan, batch_size
        self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
        self.members = plan.members()
        self.batches_per_epoch = sum(len(m) // batch_size for m in self.members)
        if not self.batches_per_epoch:
            raise ValueError(
                f"no bucket holds a whole batch of {batch_size} pairs:\n"
                f"{plan.summary(batch_size)}\nlower batch_size, or set data.buckets=False"
            )
        self._epoch: tuple[int, np.ndarray] | None = None  # the last epoch's layout

    def layout(self, epoch: int) -> np.ndarray:
        """[batches, B] record indices of `epoch`'s global batches, in training order."""
        if self._epoch is not None and self._epoch[0] == epoch:
            return self._epoch[1]
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for members in self.members:
            order = rng.permutation(members) if self.shuffle else members
            whole = len(order) // self.batch_size * self.batch_size
            batches.extend(order[:whole].reshape(-1, self.batch_size))
        if self.shuffle:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        layout = np.stack(batches)
        self._epoch = (epoch, layout)
        return layout

    def bucket(self, record: int) -> Bucket:
        """The bucket of record `record` of the split."""
        return self.plan.buckets[self.plan.assignment[record]]

    def __len__(self) -> int:
        if self.num_epochs is None:
            return sys.maxsize  # repeats forever
        return self.num_epochs * self.batches_per_epoch * self.batch_size

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if index < 0 or index >= len(self):
            raise IndexError(f"index {index} is past the sampler's {len(self)} examples")
        epoch, within = divmod(index, self.batches_per_epoch * self.batch_size)
        record = int(self.layout(epoch).reshape(-1)[within])
        rng = np.random.Generator(np.random.Philox(key=self.seed + index))
        return grain.RecordMetadata(index=index, record_key=record, rng=rng)

    def __repr__(self) -> str:
        return (
            f"BucketSampler(buckets={describe(self.plan.buckets)!r}, "
            f"batch_size={self.batch_size}, seed={self.seed}, shuffle={self.shuffle}, "
            f"num_epochs={self.num_epochs})"
        )
