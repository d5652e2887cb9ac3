"""SDXL-family components against diffusers/transformers on identical weights, from folders
that diffusers' own StableDiffusionXLInstructPix2PixPipeline.save_pretrained wrote: the UNet
with the "text_time" added conditioning, the VAE, and both text encoders (the second a
CLIPTextModelWithProjection). Tolerance: 1e-4 max abs error, fp32 on the CPU, on outputs of
order 1."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ip2p_jax.testing.parity import run_parity

TOLERANCE = 1e-4
# Real SDXL's layout in miniature: three levels, attention below the top one, per-level
# transformer depths (1, 2, 3) and heads.
THREE_LEVELS = {
    "unet": {
        "block_out_channels": [32, 64, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [2, 4, 8],
        "transformer_layers_per_block": [1, 2, 3],
    }
}


def _build(tmp_path_factory, overrides=None):
    from ip2p_jax.testing.reference_models import build_sdxl_folder

    return build_sdxl_folder(tmp_path_factory.mktemp("sdxl") / "model", overrides=overrides)


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return _build(tmp_path_factory)


def _check(results):
    for r in results:
        assert 0.05 < r.reference_max_abs < 100, r
        assert r.max_abs_error <= TOLERANCE, r


def test_sdxl_components_match(sdxl_folder):
    results = run_parity(sdxl_folder, resolution=64, tolerance=TOLERANCE)
    assert {r.component for r in results} == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert ("text_encoder_2", "text_embeds") in {(r.component, r.output) for r in results}
    _check(results)


def test_three_level_sdxl_unet_matches(tmp_path_factory):
    folder = _build(tmp_path_factory, THREE_LEVELS)
    _check(run_parity(folder, components=["unet"], resolution=64, tolerance=TOLERANCE))


def test_the_added_conditioning_counts_and_is_required(sdxl_folder):
    from ip2p_jax.weights.model_folder import load_component

    unet = load_component(sdxl_folder, "unet")
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    rng = np.random.default_rng(0)
    sample = jnp.asarray(rng.standard_normal((1, 8, 8, cfg.in_channels)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((1, 77, cfg.cross_attention_dim)), jnp.float32)
    text = jnp.asarray(rng.standard_normal((1, pooled)), jnp.float32)
    apply = jax.jit(unet.module.apply)
    # one call, two rows: the same inputs but for the sizes in the time ids
    both = apply(
        {"params": unet.params},
        jnp.concatenate([sample, sample]),
        jnp.asarray([500.0, 500.0]),
        jnp.concatenate([context, context]),
        jnp.concatenate([text, text]),
        jnp.asarray([[512.0, 512, 0, 0, 512, 512], [512.0, 1024, 0, 0, 512, 1024]]),
    )
    assert float(jnp.abs(both[0] - both[1]).max()) > 100 * TOLERANCE  # the time ids are used
    # Wrong or missing added conditioning fails while tracing, before any compile.
    with pytest.raises(ValueError, match="needs text_embeds .* and time_ids"):
        jax.eval_shape(unet.module.apply, {"params": unet.params}, sample, 500.0, context)
    with pytest.raises(ValueError, match=f"expects {cfg.projection_class_embeddings_input_dim}"):
        jax.eval_shape(
            unet.module.apply,
            {"params": unet.params},
            sample,
            500.0,
            context,
            text[:, 1:],
            jnp.ones((1, 6)),
        )


def test_the_second_text_encoder_exports_under_transformers_names(sdxl_folder):
    """text_model.* with text_projection at the top, as CLIPTextModelWithProjection saves."""
    from safetensors.numpy import load_file

    from ip2p_jax.weights.model_folder import COMPONENTS, load_component

    loaded = load_component(sdxl_folder, "text_encoder_2")
    exported = COMPONENTS["text_encoder_2"].state_dict(loaded.params)
    saved = load_file(sdxl_folder / "text_encoder_2" / "model.safetensors")
    assert "text_projection.weight" in exported
    assert set(exported) == set(saved) - {"text_model.embeddings.position_ids"}
    for key, value in exported.items():
        np.testing.assert_array_equal(value, saved[key])
