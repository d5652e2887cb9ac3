"""Growing a trained UNet (train.grow): the same function, with new blocks that learn."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from ip2p_jax.train.grow import add_cross_attention
from ip2p_jax.weights.model_folder import init_component
from tests.train.conftest import MICRO_UNET


def _unet_inputs(seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 2)
    x = jax.random.normal(keys[0], (2, 16, 16, 8))
    context = jax.random.normal(keys[1], (2, 7, MICRO_UNET["cross_attention_dim"]))
    return x, jnp.array([20.0, 700.0]), context


def _apply(unet, params, inputs):
    # jitted: run op by op, a micro UNet's gradient took 26 s
    return jax.jit(unet.module.apply)({"params": params}, *inputs)


@pytest.fixture(scope="module")
def trained_and_grown():
    unet = init_component("unet", {**MICRO_UNET, "in_channels": 8}, seed=3)
    # flax's default initialisers leave biases at zero; a trained UNet's are not.
    unet.params = jax.tree.map(
        lambda p: p + 0.05 * np.random.default_rng(p.size).standard_normal(p.shape), unet.params
    )
    return unet, add_cross_attention(unet, seed=1)


def test_the_grown_unet_has_cross_attention_everywhere_and_keeps_every_weight(
    trained_and_grown,
):
    unet, grown = trained_and_grown
    assert grown.config.down_block_types == ("CrossAttnDownBlock2D",) * 2
    assert grown.config.up_block_types == ("CrossAttnUpBlock2D",) * 2
    assert grown.raw_config["down_block_types"] == ["CrossAttnDownBlock2D"] * 2
    old, new = flatten_dict(unet.params), flatten_dict(grown.params)
    for path, value in old.items():
        np.testing.assert_array_equal(new[path], value, err_msg="/".join(path))
    added = [path for path in new if path not in old]
    assert any(p[:2] == ("down_blocks_0", "attentions_0") for p in added)
    assert any(p[:2] == ("up_blocks_1", "attentions_1") for p in added)
    for path in added:
        if "proj_out" in path:
            assert not np.any(new[path]), "/".join(path)
    assert any(np.any(new[p]) for p in added if "proj_out" not in p and p[-1] == "kernel")


def test_the_grown_unet_computes_the_same_output(trained_and_grown):
    unet, grown = trained_and_grown
    inputs = _unet_inputs()
    np.testing.assert_array_equal(
        _apply(grown, grown.params, inputs), _apply(unet, unet.params, inputs)
    )


def test_the_new_blocks_get_gradients(trained_and_grown):
    _, grown = trained_and_grown
    inputs = _unet_inputs(1)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(_apply(grown, p, inputs) ** 2)))(grown.params)
    proj_out = grads["down_blocks_0"]["attentions_0"]["proj_out"]["kernel"]
    assert float(jnp.abs(proj_out).max()) > 0


def test_a_unet_with_attention_everywhere_is_refused(trained_and_grown):
    _, grown = trained_and_grown
    with pytest.raises(ValueError, match="cross-attention in every down and up block already"):
        add_cross_attention(grown)


def test_load_models_grows_init_froms_unet_and_needs_one(tmp_path):
    from ip2p_jax.testing.reference_models import build_pipeline_folder
    from ip2p_jax.train.config import ModelConfig
    from ip2p_jax.train.models import load_models

    folder = build_pipeline_folder(tmp_path / "sd", "tiny")
    models = load_models(ModelConfig(init_from=str(folder), add_cross_attention=True))
    assert set(models.unet.config.down_block_types) == {"CrossAttnDownBlock2D"}
    assert set(models.unet.config.up_block_types) == {"CrossAttnUpBlock2D"}
    with pytest.raises(ValueError, match="add_cross_attention grows model.init_from"):
        load_models(ModelConfig(unet={}, vae={}, text_encoder={}, add_cross_attention=True))
