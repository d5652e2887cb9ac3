"""configs/shapes_gpu.py and scripts/device_train_shapes.sh, the shapes model's GPU recipe:
at full size it fits the shipped model's 30 MB, and on this CPU, at tiny size, the script's
every part runs (generate with two processes, train 3 steps, export float16, score both
splits), and the model it writes is the recipe's. About 90 s on one core."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import load_file

from ip2p_jax.apps.shipped import SHAPES_MODEL
from ip2p_jax.train.config import load_config
from ip2p_jax.weights.model_folder import abstract_component
from tests.conftest import run_device_script

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "shapes_gpu.py"
SHIP_LIMIT_MB = 30


def test_the_recipe_model_fits_the_shipped_size():
    model = load_config(CONFIG).model
    unet = {**model.unet, "in_channels": model.in_channels}
    counts = {
        name: sum(
            math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract_component(name, raw).params)
        )
        for name, raw in (("unet", unet), ("text_encoder", model.text_encoder))
    }
    # float16 weights, plus the files that ship as they are: the VAE it reuses, the tokenizer.
    kept = sum(
        file.stat().st_size
        for folder in ("vae", "tokenizer", "scheduler")
        for file in (SHAPES_MODEL / folder).iterdir()
    )
    megabytes = (2 * sum(counts.values()) + kept) / 1e6
    assert megabytes < SHIP_LIMIT_MB, (counts, megabytes)
    assert counts["unet"] > 1.3 * 6.6e6  # larger than the shipped UNet (6.6 M)
    assert model.train_text_encoder and model.vae_from == str(SHAPES_MODEL)


def test_device_train_shapes_runs_every_part_on_the_cpu(tmp_path):
    output = run_device_script("device_train_shapes.sh", tmp_path, "--cpu")
    for part in ("data", "export-float16", "eval-validation", "eval-heldout"):
        assert f"=== {part}: ok" in output, output[-6000:]
    assert "=== train: ok" in output and "(step 3)" in output, output[-6000:]
    assert "shapes training (cpu): trained 3 steps, scored, all parts passed" in output
    log = (tmp_path / "device_train_shapes.log").read_text()
    assert "all parts passed" in log and "train: 300 examples" in log

    # The model: the recipe's architecture (at the smoke run's size), v-prediction, float16,
    # the shipped VAE unchanged (frozen, and a float16 round trip is exact).
    folder = tmp_path / "shapes_model"
    unet = json.loads((folder / "unet" / "config.json").read_text())
    recipe = load_config(CONFIG).model.unet
    assert unet["down_block_types"] == recipe["down_block_types"]
    assert unet["in_channels"] == 8 and unet["block_out_channels"] == [32, 32, 32]
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    ours = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    shipped = load_file(SHAPES_MODEL / "vae" / "diffusion_pytorch_model.safetensors")
    assert ours.keys() == shipped.keys()
    for key, value in shipped.items():
        assert ours[key].dtype == np.float16 and np.array_equal(ours[key], value), key
    text = load_file(folder / "text_encoder" / "model.safetensors")
    assert all(value.dtype == np.float16 for value in text.values())

    # Both splits scored, 4 edits each, and the run's record kept.
    for split in ("validation", "heldout"):
        report = json.loads((tmp_path / f"eval_{split}.json").read_text())
        assert len(report["examples"]) == 4 and report["settings"]["text_scale"] == 3.0
        assert report["settings"]["split"] == split
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and all(math.isfinite(row["loss"]) for row in rows)
    assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == 8
