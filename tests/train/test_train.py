"""The training loop on the micro shapes setup: the loss falls, a resumed run is exactly the
straight run, SIGTERM saves and exits cleanly, a NaN stops the run, the model is usable."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from ip2p_jax.train.loop import TrainingDiverged, train
from ip2p_jax.train.reporting import read_metrics
from ip2p_jax.train.state_checkpoints import Checkpoints
from tests.train.conftest import micro_config

ROOT = Path(__file__).resolve().parents[2]


def _losses(workdir) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(workdir)}


def test_loss_falls_on_the_shapes_world(shapes32, tmp_path):
    config = micro_config(shapes32, steps=60, log_every=5, checkpoint_every=60, ema_decay=0.0)
    train(config, tmp_path)
    losses = list(_losses(tmp_path).values())
    first, last = np.mean(losses[:2]), np.mean(losses[-4:])
    assert last < 0.75 * first, losses
    _exported_model_loads_in_diffusers(tmp_path / "model", tmp_path / "diffusers")


def test_a_v_prediction_run_exports_a_v_prediction_scheduler(shapes32, tmp_path):
    config = micro_config(shapes32, steps=2, checkpoint_every=2, prediction_type="v_prediction")
    train(config, tmp_path)
    scheduler = json.loads((tmp_path / "model/scheduler/scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    # SD's fields in full: diffusers' DDIM would otherwise clip x0 to [-1, 1] (its default).
    assert (scheduler["clip_sample"], scheduler["steps_offset"]) == (False, 1)
    assert scheduler["set_alpha_to_one"] is False


def _exported_model_loads_in_diffusers(model: Path, out: Path) -> None:
    """The trained model (EMA weights) -> a diffusers folder that diffusers' InstructPix2Pix
    pipeline loads, with our trained UNet weights in it."""
    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from ip2p_jax.weights.model_folder import export_diffusers, load_component

    export_diffusers(model, out)
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(str(out))
    ours = load_component(model, "unet").params["conv_in"]["kernel"]  # [kh, kw, in, out]
    theirs = pipe.unet.conv_in.weight.detach()  # [out, in, kh, kw]
    np.testing.assert_array_equal(np.asarray(ours), theirs.permute(2, 3, 1, 0).numpy())
    assert pipe.unet.config.in_channels == 8 and isinstance(theirs, torch.Tensor)


def _text_encoder_leaves(folder, config):
    from ip2p_jax.train.models import load_models
    from ip2p_jax.weights.model_folder import load_component

    initial = load_models(config.model, config.seed).text_encoder.params
    exported = load_component(folder / "model", "text_encoder").params
    return jax.tree.leaves(initial), jax.tree.leaves(exported)


def test_a_frozen_text_encoder_is_exported_untouched(shapes32, three_step_run):
    from ip2p_jax.train.models import trained_names

    config = micro_config(shapes32, steps=3)  # three_step_run's: the encoder frozen
    assert trained_names(config) == ("unet",)
    initial, exported = _text_encoder_leaves(three_step_run, config)
    for a, b in zip(exported, initial, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_text_encoder_is_trained_when_the_config_says(shapes32, tmp_path):
    config = micro_config(shapes32, steps=3)
    config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, train_text_encoder=True)
    )
    state = train(config, tmp_path)
    assert set(state.params) == {"unet", "text_encoder"}
    initial, exported = _text_encoder_leaves(tmp_path, config)
    # The export holds the EMA of what was trained.
    expected = jax.tree.leaves(state.ema_params["text_encoder"])
    for a, b in zip(exported, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(exported, initial, strict=True)
    )


def test_resumed_run_equals_the_straight_run(shapes32, six_step_run, tmp_path):
    straight_dir, straight = six_step_run
    half = micro_config(shapes32, steps=3)
    train(half, tmp_path / "resumed")
    with pytest.raises(FileExistsError, match="--resume"):
        train(micro_config(shapes32), tmp_path / "resumed")
    resumed = train(micro_config(shapes32), tmp_path / "resumed", resume=True)
    assert int(resumed.step) == 6
    assert _losses(straight_dir) == _losses(tmp_path / "resumed")
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_sigterm_saves_and_exits_cleanly(shapes32, tmp_path):
    workdir = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from tests.train.conftest import micro_config
        from ip2p_jax.train.loop import train
        config = micro_config({str(shapes32)!r}, steps=10000, checkpoint_every=10000)
        train(config, {str(workdir)!r})
        print("returned", flush=True)
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "training never logged"
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGTERM)
    out, err = process.communicate(timeout=240)
    assert process.returncode == 0, err
    assert "returned" in out and "SIGTERM: saved step" in out + err
    saved = Checkpoints(workdir).latest_step()
    assert saved is not None and saved >= 2
    assert saved == max(_losses(workdir))  # the step it stopped at is the one saved


def test_non_finite_loss_stops_the_run_with_the_last_checkpoint_intact(
    shapes32, three_step_run, tmp_path
):
    shutil.copytree(three_step_run, tmp_path, dirs_exist_ok=True)  # a run saved at step 3
    config = micro_config(shapes32, steps=8)
    diverging = dataclasses.replace(
        config, optim=dataclasses.replace(config.optim, learning_rate=float("inf"))
    )
    with pytest.raises(TrainingDiverged, match="last checkpoint \\(3\\) is intact"):
        train(diverging, tmp_path, resume=True)
    assert Checkpoints(tmp_path).latest_step() == 3
