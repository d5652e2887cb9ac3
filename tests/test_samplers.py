"""Each sampler against the matching diffusers scheduler: timesteps, sigmas, every update."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

from ip2p_jax.diffusion.samplers import get_sampler, sample
from ip2p_jax.diffusion.schedules import NoiseSchedule

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
CASES = [
    ("euler_ancestral", EulerAncestralDiscreteScheduler, {}, {}),
    ("euler_ancestral", EulerAncestralDiscreteScheduler, {"timestep_spacing": "leading"}, {}),
    ("euler_ancestral", EulerAncestralDiscreteScheduler, {"timestep_spacing": "trailing"}, {}),
    ("euler", EulerDiscreteScheduler, {}, {}),
    ("euler", EulerDiscreteScheduler, {"prediction_type": "v_prediction"}, {}),
    ("ddim", DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False}, {}),
    ("ddim", DDIMScheduler, {"timestep_spacing": "trailing"}, {"eta": 0.7}),
    ("ddim", DDIMScheduler, {"prediction_type": "v_prediction", "clip_sample": False}, {}),
    ("dpmpp_2m", DPMSolverMultistepScheduler, {}, {}),
    ("dpmpp_2m", DPMSolverMultistepScheduler, {"timestep_spacing": "leading"}, {}),
]
SHAPE = (2, 4, 5, 3)  # torch NCHW


def fake_model(x, t, lib):
    """A deterministic stand-in for the UNet that both frameworks compute alike."""
    return 0.3 * x + lib.sin(t / 150.0) * 0.5


@pytest.mark.parametrize(("name", "scheduler_class", "config", "options"), CASES)
@pytest.mark.parametrize("steps", [1, 7, 25])
def test_sampler_matches_diffusers_scheduler(name, scheduler_class, config, options, steps):
    raw = {**SD, **config}
    reference = scheduler_class(**raw)
    reference.set_timesteps(steps)
    sampler = get_sampler(name, **options)
    plan = sampler.plan(NoiseSchedule.from_dict(raw), steps)

    np.testing.assert_allclose(plan["timesteps"], reference.timesteps.numpy(), rtol=0, atol=0)
    if "sigmas" in plan:
        np.testing.assert_allclose(plan["sigmas"], reference.sigmas.numpy(), rtol=2e-6)
    np.testing.assert_allclose(plan["init_sigma"], float(reference.init_noise_sigma), rtol=2e-6)

    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
    # diffusers draws each step's noise from the generator in turn: a twin generator with the
    # same seed gives the same numbers, which our sampler takes as injected noise.
    twin = torch.Generator().manual_seed(1000 + steps)
    noise = torch.stack([torch.randn(SHAPE, generator=twin) for _ in range(steps)])
    generator = torch.Generator().manual_seed(1000 + steps)
    x = start * reference.init_noise_sigma
    for t in reference.timesteps:
        output = fake_model(reference.scale_model_input(x, t), t.float(), torch)
        kwargs = {"generator": generator} if sampler.stochastic else {}
        if name == "ddim":
            kwargs["eta"] = options.get("eta", 0.0)
        x = reference.step(output, t, x, **kwargs).prev_sample

    nhwc = lambda a: jnp.asarray(a.numpy().transpose(*range(a.ndim - 3), -2, -1, -3))
    plan_j = {k: jnp.asarray(v) for k, v in plan.items()}
    ours = sample(
        sampler,
        lambda xin, t: fake_model(xin, t, jnp),
        plan_j,
        nhwc(start),
        prediction_type=raw.get("prediction_type", "epsilon"),
        noise=nhwc(noise),
    )
    expected = x.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(
        np.asarray(ours), expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max()
    )


def test_unknown_sampler_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown sampler 'heun'; choose one of"):
        get_sampler("heun")


def test_steps_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match=r"steps must be in \[1, 1000\], got 0"):
        get_sampler("euler").plan(NoiseSchedule(), 0)


@pytest.mark.parametrize("sigma_schedule", ["karras", "exponential"])
def test_edm_euler_plan_matches_diffusers(sigma_schedule):
    from diffusers import EDMEulerScheduler

    config = {
        "_class_name": "EDMEulerScheduler",
        "sigma_min": 0.002,
        "sigma_max": 120.0,
        "sigma_data": 1.0,
        "prediction_type": "v_prediction",
        "sigma_schedule": sigma_schedule,
    }
    reference = EDMEulerScheduler.from_config(config)
    reference.set_timesteps(7)
    plan = get_sampler("edm_euler").plan(NoiseSchedule.from_dict(config), 7)
    np.testing.assert_allclose(plan["sigmas"], reference.sigmas.numpy(), rtol=1e-6)
    np.testing.assert_allclose(plan["timesteps"], reference.timesteps.numpy(), rtol=1e-6)
    sigmas = reference.sigmas[:-1]
    np.testing.assert_allclose(plan["input_scale"], 1 / (sigmas**2 + 1) ** 0.5, rtol=1e-6)
    assert plan["init_sigma"] == pytest.approx(reference.init_noise_sigma)
    with pytest.raises(ValueError, match="use the edm_euler sampler"):
        get_sampler("euler").plan(NoiseSchedule.from_dict(config), 7)
    with pytest.raises(ValueError, match="edm_euler needs a model trained on EDM"):
        get_sampler("edm_euler").plan(NoiseSchedule(), 7)
