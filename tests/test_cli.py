"""The ``ip2p`` command end to end: convert, export, parity, demo."""

from __future__ import annotations

import json

import numpy as np
import safetensors.numpy
from PIL import Image

from ip2p_jax.cli import main


def test_convert_then_export_through_the_cli(tiny_folder, tmp_path, capsys):
    flax_dir, back = tmp_path / "flax", tmp_path / "back"
    assert main(["convert", str(tiny_folder), str(flax_dir)]) == 0
    assert (flax_dir / "ip2p_jax.json").is_file()
    assert (flax_dir / "unet" / "params.safetensors").is_file()
    assert main(["export", str(flax_dir), str(back)]) == 0
    original = safetensors.numpy.load_file(tiny_folder / "vae/diffusion_pytorch_model.safetensors")
    exported = safetensors.numpy.load_file(back / "vae/diffusion_pytorch_model.safetensors")
    assert all(np.array_equal(original[k], exported[k]) for k in original)
    assert "wrote" in capsys.readouterr().out


def test_parity_json_reports_every_output(tiny_folder, capsys):
    assert main(["parity", str(tiny_folder), "--resolution", "64", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    outputs = {(r["component"], r["output"]) for r in rows}
    assert ("unet", "sample") in outputs and ("vae", "decode") in outputs
    assert ("text_encoder", "pooler_output") in outputs
    assert all(r["passed"] and r["max_abs_error"] < 1e-4 for r in rows)


def test_demo_writes_a_grid_and_passes_parity(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    grid = Image.open(tmp_path / "demo_grid.png")
    assert grid.size == (64 * 2 * 4, 64 * 4)
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "demo_grid.png" in out
