"""The ``ip2p`` command end to end: convert, export, parity, demo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import safetensors.numpy
from PIL import Image

from ip2p_jax.apps.cli.main import main


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


def test_export_casts_the_weights_to_float16(tiny_folder, tmp_path):
    flax_dir, half = tmp_path / "flax", tmp_path / "half"
    assert main(["convert", str(tiny_folder), str(flax_dir)]) == 0
    assert main(["export", str(flax_dir), str(half), "--dtype", "float16"]) == 0
    original = safetensors.numpy.load_file(tiny_folder / "unet/diffusion_pytorch_model.safetensors")
    exported = safetensors.numpy.load_file(half / "unet/diffusion_pytorch_model.safetensors")
    assert {a.dtype for a in exported.values()} == {np.dtype(np.float16)}
    assert all(np.array_equal(original[k].astype(np.float16), exported[k]) for k in original)


def test_random_weights_demo_writes_a_grid_and_passes_parity(tmp_path, capsys):
    assert main(["demo", "--random-weights", "--out", str(tmp_path)]) == 0
    grid = Image.open(tmp_path / "demo_grid.png")
    assert grid.size == (64 * 2 * 4, 64 * 4)
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "demo_grid.png" in out


def _scene(path, color=(200, 40, 40)):
    Image.new("RGB", (40, 30), color).save(path)
    return path


def _quick(command, model, *args):
    """An edit or grid command line on a tiny model: 2 steps at 32 px."""
    return [command, "--model", str(model), "--steps", "2", "--resolution", "32", *map(str, args)]


def _one_image(command, model, tmp_path, out, *args):
    """``command`` on a drawn scene with the instruction "make it blue", written to ``out``."""
    scene = _scene(tmp_path / "in.png")
    return _quick(
        command, model, "--image", scene, "--instruction", "make it blue", "--out", out, *args
    )


def test_edit_one_image(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out" / "edited.png"
    assert main(_one_image("edit", tiny_folder, tmp_path, out)) == 0
    assert Image.open(out).size == (40, 30)
    assert "wrote 1 edit(s)" in capsys.readouterr().out


def test_edit_manifest_streams_and_resumes(tiny_folder, tmp_path, capsys):
    _scene(tmp_path / "a.png")
    _scene(tmp_path / "b.png", (10, 200, 10))
    manifest = tmp_path / "edits.jsonl"
    manifest.write_text(
        '{"image": "a.png", "instruction": "make it blue"}\n'
        '{"image": "b.png", "instruction": "add snow", "seed": 3, "out": "snow.png"}\n'
        '{"image": "a.png", "instruction": "night", "image_scale": 1.2}\n'
    )
    out_dir = tmp_path / "edited"
    args = _quick(
        "edit", tiny_folder, "--manifest", manifest, "--out-dir", out_dir, "--batch-size", "2"
    )
    assert main(args) == 0
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["00001_a.png", "00003_a.png", "snow.png"]
    first = (out_dir / "snow.png").read_bytes()
    (out_dir / "00003_a.png").unlink()
    capsys.readouterr()
    assert main(args) == 0
    assert "skipped 2 done" in capsys.readouterr().out
    assert (out_dir / "00003_a.png").is_file()
    assert (out_dir / "snow.png").read_bytes() == first


def test_bad_manifest_line_is_named_before_loading_the_model(tmp_path, capsys):
    manifest = tmp_path / "edits.jsonl"
    manifest.write_text('{"image": "a.png", "instruction": "x"}\n{"image": "b.png"}\n')
    args = [
        "edit",
        "--model",
        str(tmp_path / "no-model"),
        "--manifest",
        str(manifest),
        "--out-dir",
        str(tmp_path / "out"),
    ]
    assert main(args) == 2
    assert "edits.jsonl:2: needs at least" in capsys.readouterr().err


def test_grid_renders_every_scale_pair(tiny_folder, tmp_path):
    out = tmp_path / "grid.png"
    args = _one_image(
        "grid", tiny_folder, tmp_path, out, "--text-scales", "3,7.5", "--image-scales", "1,1.5,2"
    )
    assert main(args) == 0
    assert Image.open(out).size == (18 + 2 * 40, 18 + 3 * 30)


def test_parity_compares_a_bf16_pipeline_with_diffusers_fp32_one(tiny_folder, capsys):
    """The float32 rows are tests/parity's; here ours computes in bf16 and must land within
    the bf16 bounds, off the exact result. --json reports every output of every component."""
    from ip2p_jax.testing.parity import TOLERANCES

    args = ["parity", str(tiny_folder), "--resolution", "32", "--json", "--pipeline"]
    # DDIM: the sampler whose deterministic steps carry bf16's rounding furthest.
    assert main([*args, "--dtype", "bfloat16", "--samplers", "ddim"]) == 0
    rows = {(r["component"], r["output"]): r for r in json.loads(capsys.readouterr().out)}
    assert {("vae", "decode"), ("text_encoder", "pooler_output")} <= set(rows)
    assert all(row["passed"] for row in rows.values())
    bf16 = TOLERANCES["bfloat16"]
    pipeline_rows = [r for (component, _), r in rows.items() if component == "pipeline"]
    assert [r["output"] for r in pipeline_rows] == ["ddim"]
    for row in pipeline_rows:
        assert row["metric"] == "mean" and row["tolerance"] == bf16.pipeline and row["passed"]
        assert row["mean_abs_error"] > 1e-4  # bf16 compute, not float32's 1e-6
    unet = rows[("unet", "sample")]
    assert unet["tolerance"] == bf16.component and 1e-4 < unet["max_abs_error"] < bf16.component


def test_the_cli_offers_every_sampler_kernel_and_dtype():
    from ip2p_jax.apps.cli.arguments import ATTENTION_NAMES, DTYPE_NAMES, SAMPLER_NAMES
    from ip2p_jax.diffusion.samplers import SAMPLERS
    from ip2p_jax.models.attention import KERNELS
    from ip2p_jax.models.execution import COMPUTE_DTYPES

    assert sorted(SAMPLER_NAMES) == sorted(SAMPLERS)
    assert sorted(ATTENTION_NAMES) == sorted(KERNELS)
    assert sorted(DTYPE_NAMES) == sorted(COMPUTE_DTYPES)


def test_unset_sampling_options_come_from_the_model_kind(tiny_folder):
    """No --model: the bundled model, sampled as its quality table was measured; a given
    model: the reference's settings; an option given on the command line stays."""
    import argparse

    from ip2p_jax.apps.cli.arguments import fill_model_defaults
    from ip2p_jax.apps.shipped import REFERENCE_SAMPLING, SHAPES_SAMPLING, shipped_model

    names = ("steps", "resolution", "text_scale", "image_scale", "sampler")
    for model, want in ((None, SHAPES_SAMPLING), (str(tiny_folder), REFERENCE_SAMPLING)):
        args = argparse.Namespace(model=model, **dict.fromkeys(names))
        fill_model_defaults(args)
        assert args.model == (model or shipped_model())
        assert all(getattr(args, name) == getattr(want, name) for name in names)
    args = argparse.Namespace(model=None, **{**dict.fromkeys(names), "text_scale": 2.0})
    fill_model_defaults(args)
    assert args.text_scale == 2.0 and args.image_scale == SHAPES_SAMPLING.image_scale


def test_train_takes_all_three_cluster_flags_or_none(tmp_path, capsys):
    config = str(Path(__file__).resolve().parents[1] / "configs" / "shapes_tiny.py")
    command = ["train", "--config", config, "--workdir", str(tmp_path / "run")]
    assert main([*command, "--coordinator", "127.0.0.1:1234", "--process-id", "0"]) == 2
    err = capsys.readouterr().err
    assert "give all of --coordinator HOST:PORT, --num-processes and --process-id" in err
    assert not (tmp_path / "run").exists()  # refused before anything started
