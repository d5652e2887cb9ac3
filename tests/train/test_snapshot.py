"""`ip2p export-run`: a run's model at any saved step is the model a run stopping there exports."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from ip2p_jax.apps.cli.main import main
from ip2p_jax.train.loop import train
from ip2p_jax.weights.model_folder import load_component
from tests.train.conftest import micro_config


def _unet_leaves(folder) -> dict:
    params = load_component(folder, "unet").params
    return {name: np.asarray(value) for name, value in flatten_dict(params, sep="/").items()}


def test_export_run_at_a_saved_step_is_the_model_of_a_run_that_ended_there(
    three_step_run, six_step_run, tmp_path
):
    short, long = three_step_run, six_step_run[0]  # the same config, 3 and 6 steps

    assert main(["export-run", str(long), str(tmp_path / "at3"), "--step", "3"]) == 0
    ended = _unet_leaves(short / "model")
    exported = _unet_leaves(tmp_path / "at3")
    assert ended.keys() == exported.keys()
    for name, value in ended.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)

    raw = tmp_path / "raw3"
    assert main(["export-run", str(long), str(raw), "--step", "3", "--raw-weights"]) == 0
    raw_leaves = _unet_leaves(raw)
    differs = [not np.array_equal(raw_leaves[n], v) for n, v in ended.items()]
    assert any(differs)  # the EMA (decay 0.99) is not the optimizer's weights

    latest = tmp_path / "latest"
    assert main(["export-run", str(long), str(latest)]) == 0
    final, latest_leaves = _unet_leaves(long / "model"), _unet_leaves(latest)
    for name, value in final.items():
        np.testing.assert_array_equal(latest_leaves[name], value, err_msg=name)


def test_export_run_names_the_missing_step_and_the_saved_ones(three_step_run, tmp_path, capsys):
    assert main(["export-run", str(three_step_run), str(tmp_path / "out"), "--step", "2"]) == 2
    assert "has no checkpoint of step 2; it has [3]" in capsys.readouterr().err
    assert main(["export-run", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "is not an `ip2p train` workdir" in capsys.readouterr().err


def test_config_round_trips_through_the_run_folder(shapes32, tmp_path):
    from ip2p_jax.train.snapshot import run_task

    config = micro_config(shapes32, steps=3, prediction_type="v_prediction")
    train(config, tmp_path)
    assert run_task(tmp_path).config == config
    # A run written before a field existed gets the field's default.
    written = json.loads((tmp_path / "config.json").read_text())
    del written["model"]["train_text_encoder"], written["remat"]
    (tmp_path / "config.json").write_text(json.dumps(written))
    assert run_task(tmp_path).config == config
    with pytest.raises(FileNotFoundError):
        run_task(tmp_path / "nowhere")
