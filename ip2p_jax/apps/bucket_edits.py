"""Batch editing by aspect-ratio bucket (``ip2p edit --manifest ... --buckets``).

Images of many sizes would each compile the sampler for their own shape (and batch only
with images of exactly their size). Here each image goes to its nearest bucket of the
model's list (data.buckets: about `area` pixels, sides multiples of the model's factor), is
resized to it, and each bucket runs as batches of one shape: the batch size is the smaller
of --batch-size and the bucket's image count, a last short batch padded by repeating its
last image, so each bucket compiles the sampler once. Each output is resized back to its
input's size. The resize changes the aspect ratio by the gap to the bucket's (nothing is
cropped, so the edit lines up with the input); a finer step makes the gap smaller and the
list longer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from PIL import Image

from ip2p_jax.data.buckets import Bucket, nearest_bucket, resize_to_bucket, restore_size
from ip2p_jax.pipelines.images import image_size, load_image


@dataclasses.dataclass(frozen=True)
class BucketBatch:
    """One sampler call: `jobs` (manifest.EditJob) at `bucket`'s size, with `padding` copies
    of the last one making up the bucket's batch size; `sizes` are their inputs' sizes."""

    bucket: Bucket
    jobs: list[Any]
    sizes: list[tuple[int, int]]
    padding: int

    @property
    def rows(self) -> list[Any]:
        """The jobs as the sampler runs them: the last one repeated `padding` times."""
        return self.jobs + self.jobs[-1:] * self.padding

    def inputs(self) -> list[Image.Image]:
        """The rows' images, decoded and resized to the bucket."""
        images = [resize_to_bucket(load_image(job.image), self.bucket) for job in self.jobs]
        return images + images[-1:] * self.padding

    def size_options(self) -> dict[str, int]:
        """``EditPipeline.edit`` options under which an image of the bucket's size is edited
        at that size, untouched (its sides are multiples of their gcd)."""
        return {
            "resolution": max(self.bucket),
            "multiple_of": math.gcd(*self.bucket),
        }

    def outputs(self, edited: Sequence[Image.Image]) -> list[Image.Image]:
        """The jobs' edits (the padding dropped), each at its input's size."""
        kept = edited[: len(self.jobs)]
        return [restore_size(image, size) for image, size in zip(kept, self.sizes, strict=True)]


def bucket_batches(
    jobs: Sequence[Any], buckets: tuple[Bucket, ...], batch_size: int
) -> list[BucketBatch]:
    """The jobs (each with an ``image`` path) in batches of one bucket each: buckets in the
    list's order, jobs in theirs. Reads each image's header only (a missing or unreadable
    image fails here, before anything compiles)."""
    sizes = [image_size(job.image) for job in jobs]
    groups: dict[Bucket, list[int]] = {bucket: [] for bucket in buckets}
    for k, size in enumerate(sizes):
        groups[nearest_bucket(*size, buckets)].append(k)
    out = []
    for bucket, members in groups.items():
        if not members:
            continue
        size = min(batch_size, len(members))
        for start in range(0, len(members), size):
            chunk = members[start : start + size]
            out.append(
                BucketBatch(
                    bucket,
                    [jobs[k] for k in chunk],
                    [sizes[k] for k in chunk],
                    size - len(chunk),
                )
            )
    return out


def describe_batches(batches: Sequence[BucketBatch]) -> str:
    """'32x32: 3 images in 2 batches of 2; 48x16: ...': the plan, as the command prints it."""
    parts = []
    for bucket in dict.fromkeys(batch.bucket for batch in batches):
        own = [batch for batch in batches if batch.bucket == bucket]
        images = sum(len(batch.jobs) for batch in own)
        size = len(own[0].rows)
        parts.append(f"{bucket}: {images} images in {len(own)} batches of {size}")
    return "; ".join(parts)
