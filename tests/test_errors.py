"""Failing loudly at the boundary (DESIGN.md, principle 6).

Every broken input -- a missing folder, absent or truncated weights, an unsupported config
value, a checkpoint of the wrong shape -- must stop with an error that names the file, the
key or the shape and says what was expected. Each test damages a private copy of the tiny
model folder (the session fixture is shared and read-only).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import safetensors.numpy

from ip2p_jax.apps.cli.main import main
from ip2p_jax.models.config import ConfigError
from ip2p_jax.weights.convert import ConversionError
from ip2p_jax.weights.model_folder import MARKER, convert_to_flax, load_component
from ip2p_jax.weights.safetensors_io import WeightsError

WEIGHT_FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}


@pytest.fixture
def model(tiny_folder, tmp_path) -> Path:
    """A private copy of the tiny diffusers folder, free to damage."""
    return Path(shutil.copytree(tiny_folder, tmp_path / "model"))


@pytest.fixture(scope="module")
def checkpoint(tiny_folder, tmp_path_factory) -> Path:
    """The tiny folder converted to our Flax checkpoint (read-only; copy before damaging)."""
    return convert_to_flax(tiny_folder, tmp_path_factory.mktemp("errors") / "flax")


def edit_config(folder: Path, component: str, **fields) -> Path:
    path = folder / component / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return path


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# Missing files ---------------------------------------------------------------------------


def test_missing_component_folder_is_named(model):
    shutil.rmtree(model / "vae")
    with pytest.raises(FileNotFoundError, match=r"has no vae/ folder") as info:
        load_component(model, "vae")
    assert str(model) in str(info.value)


def test_missing_component_config_is_named(model):
    (model / "vae" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing config file: .*vae/config\.json"):
        load_component(model, "vae")


def test_malformed_config_json_is_named(model):
    (model / "vae" / "config.json").write_text('{"act_fn": ')
    with pytest.raises(ConfigError, match=r"vae/config\.json is not valid JSON"):
        load_component(model, "vae")


@pytest.mark.parametrize(
    ("component", "expected"),
    [
        (
            "vae",
            [
                "diffusion_pytorch_model.safetensors",
                "diffusion_pytorch_model.safetensors.index.json",
                "diffusion_pytorch_model.bin",
            ],
        ),
        (
            "text_encoder",
            ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"],
        ),
    ],
)
def test_missing_weights_name_the_expected_files(model, component, expected):
    (model / WEIGHT_FILES[component]).unlink()
    with pytest.raises(WeightsError, match=rf"{component} has no weights: expected") as info:
        load_component(model, component)
    for name in expected:
        assert name in str(info.value)


def test_sharded_index_with_a_missing_shard_names_it(model):
    (model / WEIGHT_FILES["vae"]).unlink()
    shard = "diffusion_pytorch_model-00001-of-00001.safetensors"
    index = {"metadata": {}, "weight_map": {"encoder.conv_in.weight": shard}}
    (model / "vae" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=rf"lists shards that are missing: .*{shard}"):
        load_component(model, "vae")


# Unreadable weights ----------------------------------------------------------------------


def test_truncated_safetensors_names_the_file(model):
    truncate(model / WEIGHT_FILES["unet"])
    with pytest.raises(WeightsError, match=r"may be truncated|is the download truncated") as info:
        load_component(model, "unet")
    assert str(model / WEIGHT_FILES["unet"]) in str(info.value)


@pytest.mark.parametrize(
    "content",
    [b"<html><body>404 Not Found</body></html>" * 4, b""],
    ids=["html-page", "empty"],
)
def test_garbage_weights_file_names_the_file(model, content):
    (model / WEIGHT_FILES["vae"]).write_bytes(content)
    with pytest.raises(WeightsError, match=r"not a readable safetensors file") as info:
        load_component(model, "vae")
    assert str(model / WEIGHT_FILES["vae"]) in str(info.value)


# Configs that ask for math we don't implement --------------------------------------------


@pytest.mark.parametrize(
    ("component", "field", "value", "supported"),
    [
        ("unet", "resnet_time_scale_shift", "scale_shift", "'default'"),
        ("unet", "class_embed_type", "timestep", "None"),
        ("unet", "time_embedding_type", "fourier", "'positional'"),
        ("vae", "act_fn", "gelu", "'silu'"),
        ("text_encoder", "hidden_act", "relu", "quick_gelu"),
    ],
)
def test_unsupported_config_value_names_field_and_file(model, component, field, value, supported):
    path = edit_config(model, component, **{field: value})
    with pytest.raises(ConfigError, match=rf"{field}='{value}' is not supported") as info:
        load_component(model, component)
    assert str(path) in str(info.value)
    assert supported in str(info.value).split("is not supported", 1)[1]  # what we do support


def test_unknown_unet_config_field_is_refused(model):
    path = edit_config(model, "unet", attention_flavor="fancy")
    with pytest.raises(ConfigError, match=r"unknown config field 'attention_flavor'") as info:
        load_component(model, "unet")
    assert str(path) in str(info.value)


def test_unsupported_unet_block_is_named(model):
    edit_config(model, "unet", down_block_types=["CrossAttnDownBlock2D", "SimpleDownBlock2D"])
    with pytest.raises(ConfigError, match=r"unet/config\.json: unsupported blocks.*SimpleDown"):
        load_component(model, "unet")


# Checkpoints that don't fit the config ----------------------------------------------------


def test_wrong_shapes_are_listed_by_pytorch_name_with_both_shapes(model):
    edit_config(model, "unet", cross_attention_dim=48)
    with pytest.raises(ConversionError, match=r"does not match the model config") as info:
        load_component(model, "unet")
    message = str(info.value)
    assert str(model / WEIGHT_FILES["unet"]) in message
    assert "wrong shape:" in message
    # PyTorch layout (out, in): the checkpoint's context width is 32, the config asks for 48.
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert f"{key}: (32, 32), expected (32, 48)" in message


def test_wrong_shapes_are_not_also_reported_missing(model):
    edit_config(model, "unet", cross_attention_dim=48)
    with pytest.raises(ConversionError) as info:
        load_component(model, "unet")
    assert "missing:" not in str(info.value)


def test_missing_and_unexpected_keys_are_named(model):
    weights = model / WEIGHT_FILES["vae"]
    state = safetensors.numpy.load_file(weights)
    state["encoder.conv_input.weight"] = state.pop("encoder.conv_in.weight")
    safetensors.numpy.save_file(state, weights)
    with pytest.raises(ConversionError) as info:
        load_component(model, "vae")
    message = str(info.value)
    assert str(weights) in message
    assert re.search(r"missing: .*\bencoder\.conv_in\.weight\b", message)
    assert re.search(r"unexpected: .*\bencoder\.conv_input\.weight\b", message)
    assert "wrong shape" not in message


def test_our_checkpoint_with_wrong_shapes_names_params_and_shapes(checkpoint, tmp_path):
    ckpt = Path(shutil.copytree(checkpoint, tmp_path / "flax"))
    edit_config(ckpt, "unet", cross_attention_dim=48)
    with pytest.raises(
        ConversionError, match=r"unet/params\.safetensors: the checkpoint does not match"
    ) as info:
        load_component(ckpt, "unet")
    message = str(info.value)
    assert "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel" in message
    assert "(32, 32), expected (48, 32)" in message


def test_narrowing_conv_in_is_refused(model):
    with pytest.raises(
        ConversionError, match=r"unet/config\.json: in_channels is 8; in_channels=4 would narrow"
    ):
        load_component(model, "unet", in_channels=4)


# Atomic checkpoint writes -----------------------------------------------------------------


def test_convert_refuses_an_existing_destination(tiny_folder, tmp_path):
    out = tmp_path / "flax"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"exists; pass overwrite=True"):
        convert_to_flax(tiny_folder, out)
    assert (out / "keep.txt").read_text() == "mine"


def test_convert_overwrite_replaces_the_destination(tiny_folder, tmp_path):
    out = tmp_path / "flax"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    convert_to_flax(tiny_folder, out, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert (out / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flax"]  # no staging or trash left


def test_failed_conversion_leaves_nothing_behind(model, tmp_path):
    truncate(model / WEIGHT_FILES["text_encoder"])  # unet and vae convert, text_encoder fails
    parent = tmp_path / "out"
    with pytest.raises(WeightsError, match=r"text_encoder/model\.safetensors"):
        convert_to_flax(model, parent / "flax")
    assert not (parent / "flax").exists()
    assert list(parent.iterdir()) == []  # no hidden staging folder either


def test_failed_overwrite_keeps_the_old_checkpoint(model, tmp_path):
    out = tmp_path / "out" / "flax"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    truncate(model / WEIGHT_FILES["text_encoder"])
    with pytest.raises(WeightsError):
        convert_to_flax(model, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["flax"]


# The command line -------------------------------------------------------------------------


def test_cli_convert_missing_folder_exits_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["convert", str(missing), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ip2p convert: error:")
    assert str(missing) in err
    assert not (tmp_path / "out").exists()


def test_cli_convert_existing_output_exits_2(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["convert", str(tiny_folder), str(out)]) == 2
    err = capsys.readouterr().err
    assert "ip2p convert: error:" in err
    assert str(out) in err and "--overwrite" in err


def test_cli_convert_bad_config_exits_2_naming_field(model, tmp_path, capsys):
    edit_config(model, "vae", act_fn="gelu")
    assert main(["convert", str(model), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "vae/config.json" in err and "act_fn='gelu' is not supported" in err


def test_cli_parity_exits_1_when_a_component_exceeds_tolerance(tiny_folder, capsys):
    pytest.importorskip("diffusers")
    argv = ["parity", str(tiny_folder), "--resolution", "64", "--components", "vae"]
    assert main([*argv, "--tolerance", "1e-12"]) == 1
    err = capsys.readouterr().err
    assert re.search(r"FAILED: .*\bvae\.", err)


def test_parity_on_a_folder_without_components_is_a_clear_error(tmp_path, capsys):
    assert main(["parity", str(tmp_path), "--components", "vae"]) == 2
    assert f"{tmp_path} has no vae/config.json" in capsys.readouterr().err


def test_unknown_component_name_is_refused(tiny_folder):
    with pytest.raises(ValueError, match=r"unknown component 'vea'; choose from"):
        load_component(tiny_folder, "vea")
