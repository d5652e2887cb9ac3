"""Aspect-ratio buckets in a training run (`--config.data.buckets=True`): the checks made
before anything compiles, the bucket plan of the training split (its image sizes read once
and kept in workdir/buckets), and the count of train-step programs the buckets compile.

The buckets are data.buckets.bucket_list(resolution**2, step, max_ratio), step being
data.bucket_step or the model's factor (data.buckets.size_multiple: 64 for SD). Each pair
trains at its input image's nearest bucket (the edited image has the same size, or the pair
is skipped as without buckets), resized to cover it at the augmentation's scale and randomly
cropped and flipped as a square would be. A latent cache holds latents of one size, so a
bucketed run reads pixels: buckets with data.cache_latents are refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ip2p_jax.data.bucket_sampler import BucketPlan, pair_sizes
from ip2p_jax.data.buckets import Bucket, bucket_list, describe, size_multiple
from ip2p_jax.data.edit_pairs import EditPairSource
from ip2p_jax.runtime.distributed import barrier, is_primary
from ip2p_jax.train.config import DataConfig
from ip2p_jax.train.latent_cache import split_fingerprint
from ip2p_jax.weights.atomic import write_text_atomically

SIZES_FORMAT = 1


def training_buckets(data: DataConfig, models: Any) -> tuple[Bucket, ...]:
    """The run's bucket list (`models` has the UNet and VAE: their factor is the default
    step); ValueError, naming the fields to change, when the list is longer than
    data.max_buckets or its step does not suit the model."""
    factor = size_multiple(models.unet.config, models.vae.config)
    step = data.bucket_step or factor
    if step % factor:
        raise ValueError(
            f"data.bucket_step={step} is not a multiple of the model's size factor {factor} "
            "(VAE x UNet downsampling): every UNet level needs whole latent pixels"
        )
    buckets = bucket_list(data.resolution**2, step, data.bucket_max_ratio)
    if len(buckets) > data.max_buckets:
        raise ValueError(
            f"{len(buckets)} buckets of {data.resolution}**2 pixels with sides multiples of "
            f"{step} and aspect ratios up to {data.bucket_max_ratio}:1 ({describe(buckets)}), "
            f"each a train-step program, exceed data.max_buckets={data.max_buckets}: raise "
            "data.bucket_step or lower data.bucket_max_ratio (or raise data.max_buckets)"
        )
    return buckets


def check_bucketable(config: Any, models: Any) -> None:
    """Refuses what buckets cannot train with, before any compile: a latent cache (its
    latents have one size), SDXL (its time ids say one size), too many buckets."""
    if config.data.cache_latents:
        raise ValueError(
            "data.buckets=True crops each pair to its bucket's size, and data.cache_latents "
            "holds latents of one size: turn one of them off"
        )
    if getattr(models, "text_encoder_2", None) is not None:
        raise ValueError(
            "data.buckets=True: SDXL's time ids condition on one training size (data."
            "resolution); bucketed SDXL training is not supported"
        )
    training_buckets(config.data, models)


def bucket_plan(config: Any, trainer: Any, source: Any, workdir: Path) -> BucketPlan | None:
    """The training split's bucket plan when the config asks for buckets (else None): the
    split's image sizes from workdir/buckets/<split>.json, read from the split first if that
    file is missing or was made from other data. Process 0 reads, writes and reports; the
    others wait for the file (*collective*)."""
    data = config.data
    if not data.buckets:
        return None
    if not isinstance(source, EditPairSource):
        raise ValueError(f"data.buckets=True needs an edit-pair split, got {source!r}")
    buckets = training_buckets(data, trainer.models)
    report = print if is_primary() else lambda text: None
    path = workdir / "buckets" / f"{data.train_split}.json"
    wanted = {
        "format": SIZES_FORMAT,
        "source": repr(source),
        "split_fingerprint": split_fingerprint(source),
    }
    if is_primary() and _stale(path, wanted):
        sizes = pair_sizes(source, report)
        write_text_atomically(path, json.dumps({**wanted, "sizes": sizes}))
    barrier(f"bucket sizes {path}")
    sizes = [s if isinstance(s, str) else tuple(s) for s in json.loads(path.read_text())["sizes"]]
    plan = BucketPlan.from_sizes(sizes, buckets)
    report(f"aspect-ratio buckets ({describe(buckets)}):\n{plan.summary(config.batch_size)}")
    return plan


def _stale(path: Path, wanted: Mapping[str, Any]) -> bool:
    if not path.is_file():
        return True
    found = json.loads(path.read_text())
    return any(found.get(name) != value for name, value in wanted.items())


class StepPrograms:
    """The batch shapes the train step has met, each one compiled program: with buckets, one
    per bucket trained on, at most the plan's `trained` buckets. Each new one is reported to
    `reporter` (a train.reporting.Reporter) as it comes."""

    def __init__(self, trained: list[Bucket], reporter: Any):
        self.trained, self.reporter = trained, reporter
        self.seen: list[Bucket] = []

    def see(self, batch: Mapping[str, Any], step: int) -> None:
        """Notes the size of `batch` (global arrays) at `step`, the step about to run."""
        height, width = batch["input_image"].shape[1:3]
        bucket = Bucket(width, height)
        if bucket in self.seen:
            return
        if bucket not in self.trained:  # the sampler makes this impossible; say so if not
            raise RuntimeError(f"step {step + 1}: a {bucket} batch is no bucket of the plan")
        self.seen.append(bucket)
        self.reporter.message(
            f"step {step + 1}: the train step compiles for {bucket} batches (program "
            f"{len(self.seen)} of at most {len(self.trained)}: {describe(self.trained)})"
        )
