"""Bucketed training on the micro setup: one train-step program per bucket trained on, each
reported, and a run stopped and resumed from its checkpoint ends bit-identical to one that
ran straight through (the same batches, in the same buckets)."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from ip2p_jax.train import loop
from ip2p_jax.train.bucketing import check_bucketable
from ip2p_jax.train.reporting import read_metrics
from tests.data.conftest import mixed_dataset  # noqa: F401 (a fixture)
from tests.train.conftest import micro_config

pytestmark = pytest.mark.xdist_group("train runs")


def _bucketed(dataset, **changes):
    config = micro_config(dataset, **changes)
    return dataclasses.replace(config, data=dataclasses.replace(config.data, buckets=True))


def test_a_bucketed_run_resumes_exactly_and_compiles_once_per_bucket(
    mixed_dataset,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
):
    trainers = []

    def recording(*args):
        trainers.append(make_trainer(*args))
        return trainers[-1]

    make_trainer = loop.make_trainer
    monkeypatch.setattr(loop, "make_trainer", recording)
    straight = loop.train(_bucketed(mixed_dataset), tmp_path / "straight")
    reported = [line for line in capsys.readouterr().out.splitlines() if "compiles for" in line]
    # 6 steps over 5 batches an epoch (three 32x32, two 44x20; 16x64 has too few pairs).
    assert [line.split(" batches")[0].split()[-1] for line in reported] in (
        ["32x32", "44x20"],
        ["44x20", "32x32"],
    )
    assert "of at most 2: 32x32 44x20" in reported[-1]
    assert trainers[0].step_program().jitted._cache_size() == 2  # the programs compiled
    sizes = json.loads((tmp_path / "straight/buckets/train.json").read_text())["sizes"]
    assert sorted(map(tuple, sizes))[0] == (16, 64) and len(sizes) == 41

    loop.train(_bucketed(mixed_dataset, steps=3), tmp_path / "resumed")
    resumed = loop.train(_bucketed(mixed_dataset), tmp_path / "resumed", resume=True)
    assert int(resumed.step) == 6

    def losses(workdir):
        return {row["step"]: row["loss"] for row in read_metrics(workdir)}

    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_buckets_refuse_a_latent_cache_sdxl_and_too_long_a_list(tmp_path):
    """Checked by the trainer before anything compiles (step._prepared_models)."""
    config = _bucketed(tmp_path)
    unet, vae = (SimpleNamespace(block_out_channels=[32, 64]) for _ in range(2))  # factor 4
    models = SimpleNamespace(unet=SimpleNamespace(config=unet), vae=SimpleNamespace(config=vae))
    check_bucketable(config, models)

    def refused(match: str, models=models, **data) -> None:
        changed = dataclasses.replace(config, data=dataclasses.replace(config.data, **data))
        with pytest.raises(ValueError, match=match):
            check_bucketable(changed, models)

    refused("data.cache_latents holds latents of one size", cache_latents=True)
    refused("17 buckets of 32\\*\\*2 pixels .* data.max_buckets=9", max_buckets=9)
    refused("data.bucket_step=6 is not a multiple .* factor 4", bucket_step=6)
    refused("SDXL's time ids", models=SimpleNamespace(**vars(models), text_encoder_2=object()))
