"""The training objective against a PyTorch reference step with the real diffusers classes.

The reference is diffusers' examples/instruct_pix2pix/train_instruct_pix2pix.py (and the
original ddpm_edit.py's conditioning dropout), written once in
`ip2p_jax.testing.parity.torch_diffusion_loss` and fed the same latents, noise, timesteps and
dropout draw as `ip2p_jax.train.loss.diffusion_loss`. Both sides run in float32 on CPU.

What is compared: the dropout masks (exactly, at the boundaries); add_noise and the epsilon /
v targets at every timestep (float32 rounding); the loss on the tiny SD-1 and SD-2 folders
for both prediction types; every parameter's gradient of the tiny epsilon step.

Tolerances (float32, CPU; the default matmul precision is already full float32 there):
- loss: relative difference <= LOSS_RTOL = 1e-5. Measured: 0 to 1.1e-7 (the order of
  float32 sums in convs and attention). The slips a wrong step makes move it by 2.6e-4 or
  more on this batch (test_loss_tolerance_would_catch_a_wrong_step).
- gradients, per parameter tensor: max |g_ours - g_torch| <= GRAD_RTOL * max |g_torch| +
  GRAD_ATOL_FRACTION * (largest |g_torch| entry of the whole model), GRAD_RTOL = 1e-4,
  GRAD_ATOL_FRACTION = 1e-7; measured worst ratio about 4e-6. Global relative L2 error
  ||g_ours - g_torch|| / ||g_torch|| <= GLOBAL_RTOL = 1e-5; measured about 6.5e-7.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest

LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
GRAD_ATOL_FRACTION = 1e-7  # of the largest gradient entry of the whole model
GLOBAL_RTOL = 1e-5

# XLA:CPU spends most of a UNet gradient's ~10 s compile in LLVM optimization and the new
# fusion emitters; without them it compiles in ~4 s. Neither is float reassociation or fast
# math: the losses are bit-identical to a default compile, the gradient errors the same.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}

PREDICTION_TYPES = ("epsilon", "v_prediction")
UNCOND = 0.05  # the reference's conditioning_dropout_prob
# One example in each dropout case: text only, both, image only, none; then the edges of
# the timestep range.
DRAW = np.array([0.02, 0.07, 0.12, 0.5, 0.97, 0.31], np.float32)
TIMESTEPS = np.array([0, 999, 250, 500, 731, 87], np.int64)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """One batch in torch layout (NCHW); `nhwc` turns an image tensor into ours."""

    latents: np.ndarray  # [B, 4, h, w], already scaled
    image_latent: np.ndarray  # [B, 4, h, w]
    noise: np.ndarray  # [B, 4, h, w]
    text: np.ndarray  # [B, 77, D]
    null_text: np.ndarray  # [1, 77, D]
    timesteps: np.ndarray  # [B] int64
    draw: np.ndarray  # [B] float32, U(0, 1)
    added: dict | None = None  # SDXL's text_embeds [B, P] and time_ids [B, 6]

    @staticmethod
    def nhwc(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def _inputs(context_dim: int, seed: int = 0, side: int = 16, pooled_dim: int = 0) -> Inputs:
    rng = np.random.default_rng(seed)
    batch = len(DRAW)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    added = None
    if pooled_dim:  # SDXL: the pooled text, and the time ids of a training crop of 8 x side px
        ids = np.asarray([[8 * side, 8 * side, 0, 0, 8 * side, 8 * side]], np.float32)
        added = {"text_embeds": normal(batch, pooled_dim), "time_ids": np.repeat(ids, batch, 0)}
    return Inputs(
        added=added,
        latents=normal(batch, 4, side, side),
        image_latent=normal(batch, 4, side, side),
        noise=normal(batch, 4, side, side),
        text=normal(batch, 77, context_dim),
        null_text=normal(1, 77, context_dim),
        timesteps=TIMESTEPS.copy(),
        draw=DRAW.copy(),
    )


def _folder_inputs(folder) -> Inputs:
    import json

    config = json.loads((folder / "unet" / "config.json").read_text())
    pooled_dim = 0
    if config.get("addition_embed_type") == "text_time":  # what the six time ids leave
        time_dims = 6 * config["addition_time_embed_dim"]
        pooled_dim = config["projection_class_embeddings_input_dim"] - time_dims
    return _inputs(config["cross_attention_dim"], side=config["sample_size"], pooled_dim=pooled_dim)


def _reference_masks(r):
    """ddpm_edit.py / train_instruct_pix2pix.py: (prompt dropped, image-latent multiplier)."""
    prompt_mask = r < 2 * UNCOND
    input_mask = 1 - ((r >= UNCOND) & (r < 3 * UNCOND)).astype(np.float32)
    return prompt_mask, input_mask


def _reference_step(folder, inputs: Inputs, prediction_type: str):
    """The diffusers training step (loss.backward()) -> (loss, {state-dict name: grad})."""
    import torch

    # One intra-op thread: the tiny step then takes 0.2 s; with two, torch's OpenMP threads
    # spin against XLA's (or another process's) on a 2-core machine and it can take 10 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _torch_step(folder, inputs, prediction_type)
    finally:
        torch.set_num_threads(threads)


def _torch_step(folder, inputs: Inputs, prediction_type: str):
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from ip2p_jax.testing.parity import torch_diffusion_loss

    unet = UNet2DConditionModel.from_pretrained(folder / "unet").float()
    unet.train()  # as the script trains it (dropout is 0 in these configs)
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    loss = torch_diffusion_loss(
        unet,
        scheduler,
        latents=torch.from_numpy(inputs.latents),
        image_latent=torch.from_numpy(inputs.image_latent),
        noise=torch.from_numpy(inputs.noise),
        text=torch.from_numpy(inputs.text),
        null_text=torch.from_numpy(inputs.null_text),
        timesteps=torch.from_numpy(inputs.timesteps),
        random_p=torch.from_numpy(inputs.draw),
        conditioning_dropout_prob=UNCOND,
        prediction_type=prediction_type,
        added_cond_kwargs=inputs.added
        and {k: torch.from_numpy(v) for k, v in inputs.added.items()},
    )
    unet.zero_grad()
    loss.backward()
    grads = {name: p.grad for name, p in unet.named_parameters()}
    missing = sorted(name for name, g in grads.items() if g is None)
    assert not missing, f"torch parameters without a gradient: {missing}"
    return float(loss.detach()), {k: g.numpy().copy() for k, g in grads.items()}


@functools.cache
def _our_steps(folder, gradients: bool) -> dict[str, tuple[float, dict[str, np.ndarray]]]:
    """diffusion_loss for both prediction types in one compile, and jax.grad of the epsilon
    one when `gradients` -> {prediction_type: (loss, {state-dict name: grad in torch layout}
    or {})}. The two losses share one UNet forward; a second backward (v's) would double the
    compile time of this file, and v's gradient runs the same backward pass with another
    cotangent (its target holds no parameter and is checked elementwise below)."""
    import jax
    import jax.numpy as jnp

    from ip2p_jax.diffusion.schedules import NoiseSchedule
    from ip2p_jax.train.config import DropoutConfig
    from ip2p_jax.train.loss import diffusion_loss
    from ip2p_jax.weights.convert import params_to_state_dict
    from ip2p_jax.weights.model_folder import load_component

    inputs = _folder_inputs(folder)
    unet = load_component(folder, "unet")
    alphas_cumprod = jnp.asarray(NoiseSchedule.from_folder(folder).alphas_cumprod())
    nhwc = Inputs.nhwc
    added = {k: jnp.asarray(v) for k, v in (inputs.added or {}).items()}

    def loss_fn(params, prediction_type):
        def denoise(x, t, ctx):  # SDXL's added conditioning as our train step passes it
            return unet.module.apply({"params": params}, x, t, ctx, **added)

        return diffusion_loss(
            denoise,
            latents=jnp.asarray(nhwc(inputs.latents)),
            image_latent=jnp.asarray(nhwc(inputs.image_latent)),
            text=jnp.asarray(inputs.text),
            null_text=jnp.asarray(inputs.null_text),
            noise=jnp.asarray(nhwc(inputs.noise)),
            timesteps=jnp.asarray(inputs.timesteps, jnp.int32),
            dropout_draw=jnp.asarray(inputs.draw),
            rates=DropoutConfig(),  # the defaults are the reference's 0.05 / 0.05 / 0.05
            alphas_cumprod=alphas_cumprod,
            prediction_type=prediction_type,
        )

    def both(params):
        if gradients:
            eps = jax.value_and_grad(loss_fn)(params, "epsilon")
        else:
            eps = (loss_fn(params, "epsilon"), {})
        return {"epsilon": eps, "v_prediction": (loss_fn(params, "v_prediction"), {})}

    params = jax.tree.map(jnp.asarray, unet.params)
    results = jax.jit(both).lower(params).compile(FAST_COMPILE)(params)
    return {
        p: (float(loss), {k: np.asarray(v) for k, v in params_to_state_dict(grads).items()})
        for p, (loss, grads) in jax.device_get(results).items()
    }


def _compare(folder, prediction_type: str, gradients: bool):
    """Both steps on one batch -> the loss's relative error and, where ours has gradients,
    the per-tensor and global gradient errors. `gradients` picks _our_steps' compile."""
    ref_loss, ref_grads = _reference_step(folder, _folder_inputs(folder), prediction_type)
    our_loss, our_grads = _our_steps(folder, gradients)[prediction_type]
    result = {"ref_loss": ref_loss, "loss_rel": abs(our_loss - ref_loss) / abs(ref_loss)}
    if not our_grads:
        return result
    assert sorted(our_grads) == sorted(ref_grads), (
        sorted(set(our_grads) ^ set(ref_grads)),
        "gradient names differ",
    )
    per_tensor = {}
    squared_error = squared_norm = 0.0
    for name, ref in ref_grads.items():
        ours = our_grads[name]
        assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
        error = np.abs(ours.astype(np.float64) - ref)
        per_tensor[name] = (float(error.max()), float(np.abs(ref).max()))
        squared_error += float((error**2).sum())
        squared_norm += float((ref.astype(np.float64) ** 2).sum())
    return {
        **result,
        "scale": max(top for _, top in per_tensor.values()),
        "per_tensor": per_tensor,
        "global_rel": (squared_error / squared_norm) ** 0.5,
        "tensors": len(ref_grads),
    }


def _assert_loss_matches(result):
    assert 0.1 < result["ref_loss"] < 100  # a loss of order 1: the relative error means something
    assert result["loss_rel"] <= LOSS_RTOL, result["loss_rel"]


def _assert_step_matches(result):
    print(  # the measured figures (pytest -s)
        f"loss {result['ref_loss']:.6f} rel err {result['loss_rel']:.2e}; "
        f"grad global rel L2 {result['global_rel']:.2e}; worst per-tensor max err / max grad "
        f"{max(e / m for e, m in result['per_tensor'].values() if m > 0):.2e} "
        f"over {result['tensors']} tensors"
    )
    _assert_loss_matches(result)
    assert result["global_rel"] <= GLOBAL_RTOL, result["global_rel"]
    atol = GRAD_ATOL_FRACTION * result["scale"]
    bad = {
        name: (err, top)
        for name, (err, top) in result["per_tensor"].items()
        if not err <= GRAD_RTOL * top + atol
    }
    assert not bad, bad
    # Every tensor takes part: a gradient that is zero on both sides would compare trivially.
    assert all(top > 0 for _, top in result["per_tensor"].values())


def test_dropout_masks_match_reference_formula():
    import jax.numpy as jnp

    from ip2p_jax.train.config import DropoutConfig
    from ip2p_jax.train.loss import dropout_masks

    r = np.array([0.0, 0.0499, 0.05, 0.0999, 0.1, 0.1499, 0.15, 0.9, 0.999], np.float32)
    drop_text, drop_image = dropout_masks(jnp.asarray(r), DropoutConfig())
    prompt_mask, input_mask = _reference_masks(r)
    np.testing.assert_array_equal(np.asarray(drop_text), prompt_mask)
    np.testing.assert_array_equal(np.asarray(drop_image), input_mask == 0)
    # The four cases by hand: [text, text, both, both, image, image, none, none, none].
    np.testing.assert_array_equal(np.asarray(drop_text), [1, 1, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(drop_image), [0, 0, 1, 1, 1, 1, 0, 0, 0])


def test_batch_draw_covers_every_dropout_case():
    prompt_mask, input_mask = _reference_masks(DRAW)
    cases = {(bool(t), bool(i == 0)) for t, i in zip(prompt_mask, input_mask, strict=True)}
    assert cases == {(False, False), (True, False), (True, True), (False, True)}
    assert TIMESTEPS.min() == 0 and TIMESTEPS.max() == 999


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_forward_diffusion_matches_ddpm_scheduler(tiny_folder, prediction_type):
    """add_noise and the regression target at every training timestep."""
    import jax.numpy as jnp
    import torch
    from diffusers import DDPMScheduler

    from ip2p_jax.diffusion.forward import add_noise, regression_target
    from ip2p_jax.diffusion.schedules import NoiseSchedule

    scheduler = DDPMScheduler.from_pretrained(tiny_folder, subfolder="scheduler")
    ours = NoiseSchedule.from_folder(tiny_folder).alphas_cumprod()
    np.testing.assert_array_equal(ours, scheduler.alphas_cumprod.numpy())  # bit for bit

    rng = np.random.default_rng(3)
    t = np.arange(1000)
    x = rng.standard_normal((1000, 4, 2, 2)).astype(np.float32)
    noise = rng.standard_normal((1000, 4, 2, 2)).astype(np.float32)
    args = [torch.from_numpy(x), torch.from_numpy(noise), torch.from_numpy(t)]
    expected_noisy = scheduler.add_noise(*args).numpy()
    expected_target = (
        noise if prediction_type == "epsilon" else scheduler.get_velocity(*args).numpy()
    )
    a = jnp.asarray(ours)
    xs, ns, ts = jnp.asarray(Inputs.nhwc(x)), jnp.asarray(Inputs.nhwc(noise)), jnp.asarray(t)
    noisy = np.asarray(add_noise(a, xs, ns, ts)).transpose(0, 3, 1, 2)
    target = np.asarray(regression_target(prediction_type, a, xs, ns, ts)).transpose(0, 3, 1, 2)
    # Values up to ~4: 2e-6 is a few float32 ulps (measured: 4.8e-7, one ulp).
    np.testing.assert_allclose(noisy, expected_noisy, rtol=0, atol=2e-6)
    np.testing.assert_allclose(target, expected_target, rtol=0, atol=2e-6)


def test_train_step_matches_torch_tiny(tiny_folder):
    """Loss and every parameter's gradient of the epsilon step."""
    result = _compare(tiny_folder, "epsilon", gradients=True)
    assert "per_tensor" in result  # the gradients were compared
    _assert_step_matches(result)


@pytest.mark.parametrize(
    ("folder", "prediction_type", "gradients"),
    [
        ("tiny_folder", "v_prediction", True),  # from the compile that has epsilon's gradient
        # SD-2 style: linear proj_in/proj_out, per-block heads, upcast attention. One forward
        # compile for both losses: the UNet's backward pass is the code checked above.
        ("tiny_sd2_folder", "epsilon", False),
        ("tiny_sd2_folder", "v_prediction", False),
    ],
)
def test_loss_matches_torch(request, folder, prediction_type, gradients):
    result = _compare(request.getfixturevalue(folder), prediction_type, gradients)
    loss, error = result["ref_loss"], result["loss_rel"]
    print(f"{folder} {prediction_type}: loss {loss:.6f} rel err {error:.2e}")
    _assert_loss_matches(result)


def test_sdxl_train_step_matches_torch_tiny(tiny_sdxl_folder):
    """train_instruct_pix2pix_sdxl.py's step: the SDXL UNet (text_time: the pooled text and
    time ids through its added embedding; per-level transformer depths, linear projections)
    with the same dropout, noise and epsilon loss. Loss and every parameter's gradient."""
    result = _compare(tiny_sdxl_folder, "epsilon", gradients=True)
    assert any(name.startswith("add_embedding.") for name in result["per_tensor"])
    _assert_step_matches(result)


def test_loss_tolerance_would_catch_a_wrong_step(tiny_folder):
    """The batch discriminates: each plausible slip in the step (made in torch, on the
    reference itself) moves the loss by far more than LOSS_RTOL."""
    inputs = _folder_inputs(tiny_folder)
    reference, _ = _reference_step(tiny_folder, inputs, "epsilon")
    slips = {
        "no dropout": dataclasses.replace(inputs, draw=np.full_like(DRAW, 0.5)),
        "both case drops the text only": dataclasses.replace(
            inputs, draw=np.where(DRAW == np.float32(0.07), np.float32(0.02), DRAW)
        ),
        "image-only case keeps the image": dataclasses.replace(
            inputs, draw=np.where(DRAW == np.float32(0.12), np.float32(0.5), DRAW)
        ),
        "timesteps off by one": dataclasses.replace(
            inputs, timesteps=np.minimum(TIMESTEPS + 1, 999)
        ),
    }
    moved = {name: _reference_step(tiny_folder, x, "epsilon")[0] for name, x in slips.items()}
    moved["v target"] = _reference_step(tiny_folder, inputs, "v_prediction")[0]
    relative = {name: abs(loss - reference) / reference for name, loss in moved.items()}
    print({name: f"{r:.1e}" for name, r in relative.items()})
    assert all(r > 10 * LOSS_RTOL for r in relative.values()), relative
