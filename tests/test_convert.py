"""Conversion both ways: the rename table, bit-identical round trips, conv_in widening."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.numpy
import torch

from ip2p_jax.weights.convert import flax_path, modernize_key, torch_key, widen_conv_in
from ip2p_jax.weights.model_folder import convert_to_flax, export_diffusers, load_component

WEIGHT_FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_folder, tmp_path_factory):
    return convert_to_flax(tiny_folder, tmp_path_factory.mktemp("ckpt") / "flax")


@pytest.mark.parametrize(
    ("key", "ndim", "path"),
    [
        (
            "down_blocks.0.resnets.1.conv1.weight",
            4,
            ("down_blocks_0", "resnets_1", "conv1", "kernel"),
        ),
        ("time_embedding.linear_1.weight", 2, ("time_embedding", "linear_1", "kernel")),
        (
            "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.bias",
            1,
            ("mid_block", "attentions_0", "transformer_blocks_0", "ff", "net_0", "proj", "bias"),
        ),
        (
            "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0.weight",
            2,
            ("up_blocks_1", "attentions_2", "transformer_blocks_0", "attn1", "to_out_0", "kernel"),
        ),
        ("conv_norm_out.weight", 1, ("conv_norm_out", "scale")),
        ("embeddings.token_embedding.weight", 2, ("embeddings", "token_embedding", "embedding")),
        (
            "encoder.layers.11.layer_norm2.weight",
            1,
            ("encoder", "layers_11", "layer_norm2", "scale"),
        ),
    ],
)
def test_rename_table_both_ways(key, ndim, path):
    assert flax_path(key, ndim) == path
    assert torch_key(path) == key


def test_legacy_names_are_modernized():
    assert (
        modernize_key("text_model.encoder.layers.0.mlp.fc1.weight")
        == "encoder.layers.0.mlp.fc1.weight"
    )
    assert modernize_key("encoder.mid_block.attentions.0.proj_attn.bias") == (
        "encoder.mid_block.attentions.0.to_out.0.bias"
    )
    assert modernize_key("decoder.mid_block.attentions.0.query.weight") == (
        "decoder.mid_block.attentions.0.to_q.weight"
    )


def test_every_tiny_key_round_trips_through_the_table(tiny_folder):
    for relative in WEIGHT_FILES.values():
        tensors = safetensors.numpy.load_file(tiny_folder / relative)
        for key, array in tensors.items():
            assert torch_key(flax_path(modernize_key(key), array.ndim)) == modernize_key(key)


def test_round_trip_torch_flax_torch_is_bit_identical(tiny_folder, tiny_checkpoint, tmp_path):
    exported = export_diffusers(tiny_checkpoint, tmp_path / "exported")
    for name, relative in WEIGHT_FILES.items():
        original = safetensors.numpy.load_file(tiny_folder / relative)
        back = safetensors.numpy.load_file(exported / relative)
        back = {modernize_key(k): v for k, v in back.items()}
        original = {modernize_key(k): v for k, v in original.items()}
        assert back.keys() == original.keys(), name
        for key, array in original.items():
            assert back[key].dtype == array.dtype and back[key].shape == array.shape, key
            assert np.array_equal(back[key], array), key


def test_exported_folder_loads_in_diffusers_and_gives_the_same_outputs(
    tiny_folder, tiny_checkpoint, tmp_path
):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    exported = export_diffusers(tiny_checkpoint, tmp_path / "exported")
    original = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_folder)
    loaded = StableDiffusionInstructPix2PixPipeline.from_pretrained(exported)
    g = torch.Generator().manual_seed(0)
    sample, context = torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    image = torch.rand(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        for a, b in [
            (original.unet(sample, 10, context).sample, loaded.unet(sample, 10, context).sample),
            (original.vae(image).sample, loaded.vae(image).sample),
            (
                original.text_encoder(ids).last_hidden_state,
                loaded.text_encoder(ids).last_hidden_state,
            ),
        ]:
            assert torch.equal(a, b)


def test_checkpoint_loads_the_same_params_as_the_diffusers_folder(tiny_folder, tiny_checkpoint):
    for name in WEIGHT_FILES:
        a = load_component(tiny_folder, name).params
        b = load_component(tiny_checkpoint, name).params
        flat_a = dict(_leaves(a))
        flat_b = dict(_leaves(b))
        assert flat_a.keys() == flat_b.keys()
        assert all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)


def _leaves(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def test_widening_keeps_weights_zeroes_new_channels_and_keeps_bias():
    rng = np.random.default_rng(0)
    params = {"conv_in": {"kernel": rng.normal(size=(3, 3, 4, 6)), "bias": rng.normal(size=6)}}
    wide = widen_conv_in(params, 8)["conv_in"]
    assert wide["kernel"].shape == (3, 3, 8, 6)
    np.testing.assert_array_equal(wide["kernel"][:, :, :4], params["conv_in"]["kernel"])
    assert not wide["kernel"][:, :, 4:].any()
    np.testing.assert_array_equal(wide["bias"], params["conv_in"]["bias"])


def test_widened_unet_with_zero_image_latent_equals_the_original(tmp_path):
    """A 4-channel SD UNet widened to 8: with a zero image latent it computes the same eps."""
    import jax.numpy as jnp

    from ip2p_jax.testing.reference_models import build_pipeline_folder

    folder = build_pipeline_folder(tmp_path / "sd", "tiny", overrides={"unet": {"in_channels": 4}})
    narrow = load_component(folder, "unet")
    wide = load_component(folder, "unet", in_channels=8)
    assert wide.config.in_channels == 8 and wide.raw_config["in_channels"] == 8
    rng = np.random.default_rng(0)
    noisy = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
    context = jnp.asarray(rng.normal(size=(2, 77, 32)), jnp.float32)
    t = jnp.asarray([5.0, 700.0])
    expected = narrow.module.apply({"params": narrow.params}, noisy, t, context)
    widened_input = jnp.concatenate([noisy, jnp.zeros_like(noisy)], axis=-1)
    got = wide.module.apply({"params": wide.params}, widened_input, t, context)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))

    # The widened checkpoint exports as an InstructPix2Pix folder that diffusers loads.
    checkpoint = convert_to_flax(folder, tmp_path / "flax", in_channels=8)
    exported = export_diffusers(checkpoint, tmp_path / "ip2p")
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(exported)
    assert pipe.unet.config.in_channels == 8
    torch_unet = load_component(folder, "unet")  # original torch-layout bias survives
    np.testing.assert_array_equal(
        pipe.unet.conv_in.bias.detach().numpy(), np.asarray(torch_unet.params["conv_in"]["bias"])
    )


def test_sharded_safetensors_and_torch_bin_load_the_same_params(tiny_folder, tmp_path):
    from diffusers import UNet2DConditionModel

    reference = load_component(tiny_folder, "unet").params
    torch_unet = UNet2DConditionModel.from_pretrained(tiny_folder / "unet")
    for variant, kwargs in {
        "sharded": {"max_shard_size": "200KB"},
        "bin": {"safe_serialization": False},
    }.items():
        folder = tmp_path / variant
        torch_unet.save_pretrained(folder / "unet", **kwargs)
        files = sorted(p.name for p in (folder / "unet").iterdir())
        assert any(n.endswith(".index.json") or n.endswith(".bin") for n in files), files
        params = load_component(folder, "unet").params
        a, b = dict(_leaves(reference)), dict(_leaves(params))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), variant


def test_bfloat16_checkpoint_holds_the_rounded_fp32_params(tiny_folder, tmp_path):
    import jax.numpy as jnp

    checkpoint = convert_to_flax(tiny_folder, tmp_path / "bf16", dtype="bfloat16")
    full = dict(_leaves(load_component(tiny_folder, "unet").params))
    half = dict(_leaves(load_component(checkpoint, "unet", dtype=None).params))
    assert all(v.dtype == jnp.bfloat16 for v in half.values())
    assert all(np.array_equal(half[k], full[k].astype(jnp.bfloat16)) for k in full)
    with pytest.raises(ValueError, match="unsupported param dtype 'int8'"):
        load_component(tiny_folder, "vae", dtype="int8")


def test_a_hub_download_fetches_each_components_weights_and_nothing_bigger():
    from huggingface_hub.utils import filter_repo_objects

    from ip2p_jax.weights.model_folder import HUB_FILES

    # Files of timbrooks/instruct-pix2pix and of an SD-1.5 mirror, as the hub lists them.
    wanted = [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "unet/params.safetensors",
    ]
    unwanted = [
        "instruct-pix2pix-00-22000.safetensors",
        "instruct-pix2pix-00-22000.ckpt",
        "v1-5-pruned-emaonly.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors",
        "text_encoder/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "README.md",
    ]
    kept = list(filter_repo_objects(wanted + unwanted, allow_patterns=list(HUB_FILES)))
    assert kept == wanted
