"""Samplers as pure JAX functions: Euler ancestral (the paper's), Euler, DDIM, DPM-Solver++(2M),
and EDM Euler (CosXL's, on EDM noise levels instead of betas).

Each sampler has a host-side ``plan`` (timesteps and noise levels, computed once with numpy as
the matching diffusers scheduler computes them) and a pure ``step``. :func:`sample` runs the
whole chain in one ``lax.fori_loop``, so a sampler is ``(denoise, x, plan, keys) -> x``.
Per-step noise comes from each example's own key, or is injected for parity tests.

Euler-family samplers work in k-diffusion space (x = x0 + sigma * eps, model input scaled by
1 / sqrt(sigma^2 + 1)); DDIM and DPM-Solver++ in the variance-preserving space, as diffusers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ip2p_jax.diffusion.schedules import NoiseSchedule, linspace_like_torch, spaced_timesteps

Plan = dict[str, jax.Array]
Denoise = Callable[[jax.Array, jax.Array], jax.Array]  # (model input, timestep) -> model output


def _x0_vp(output: jax.Array, x: jax.Array, alpha: jax.Array, sigma: jax.Array, kind: str):
    """The clean-sample prediction in VP space (x = alpha x0 + sigma eps)."""
    if kind == "epsilon":
        return (x - sigma * output) / alpha
    return alpha * x - sigma * output  # v_prediction


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Base: subclasses define ``plan`` and ``step``; ``stochastic`` samplers draw noise."""

    stochastic = False

    def plan(self, schedule: NoiseSchedule, steps: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def step(self, plan: Plan, i, x, output, noise, previous, kind: str):
        """One update: returns (next x, the state the next step needs)."""
        raise NotImplementedError


def _require_betas(schedule: NoiseSchedule, sampler: str) -> None:
    """The beta-schedule samplers cannot run a model trained on EDM noise levels."""
    if schedule.is_edm:
        raise ValueError(
            f"the model's scheduler is {schedule.scheduler_class} (EDM noise levels, as CosXL): "
            f"the {sampler} sampler needs a beta schedule; use the edm_euler sampler"
        )


def _k_sigmas(schedule: NoiseSchedule, steps: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Euler-family timesteps, sigmas (with a final 0) and the initial noise scale."""
    _require_betas(schedule, "Euler")
    spacing = schedule.option("timestep_spacing", "linspace")
    offset = schedule.option("steps_offset", 0)
    t = spaced_timesteps(spacing, steps, schedule.num_train_timesteps, offset, integer=False)
    table = schedule.sigmas()
    sigmas = np.interp(t, np.arange(len(table)), table)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    top = float(sigmas.max())
    init = top if spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5
    return t, sigmas, init


def _k_plan(schedule: NoiseSchedule, steps: int) -> dict[str, np.ndarray]:
    t, sigmas, init = _k_sigmas(schedule, steps)
    return {
        "timesteps": t,
        "sigmas": sigmas,
        "input_scale": (1.0 / (sigmas[:-1] ** 2 + 1) ** 0.5).astype(np.float32),
        "init_sigma": np.float32(init),
    }


def _k_x0(output, x, sigma, kind):
    if kind == "epsilon":
        return x - sigma * output
    return output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)


@dataclasses.dataclass(frozen=True)
class EulerAncestral(Sampler):
    """diffusers EulerAncestralDiscreteScheduler / k-diffusion sample_euler_ancestral."""

    stochastic = True

    def plan(self, schedule, steps):
        return _k_plan(schedule, steps)

    def step(self, plan, i, x, output, noise, previous, kind):
        sigma, sigma_to = plan["sigmas"][i], plan["sigmas"][i + 1]
        x0 = _k_x0(output, x, sigma, kind)
        sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        x = x + (x - x0) / sigma * (sigma_down - sigma)
        return x + noise * sigma_up, previous


@dataclasses.dataclass(frozen=True)
class Euler(Sampler):
    """diffusers EulerDiscreteScheduler (s_churn = 0): deterministic."""

    def plan(self, schedule, steps):
        return _k_plan(schedule, steps)

    def step(self, plan, i, x, output, noise, previous, kind):
        sigma = plan["sigmas"][i]
        x0 = _k_x0(output, x, sigma, kind)
        return x + (x - x0) / sigma * (plan["sigmas"][i + 1] - sigma), previous


@dataclasses.dataclass(frozen=True)
class DDIM(Sampler):
    """diffusers DDIMScheduler; ``eta`` > 0 adds noise (eta = 1 is DDPM-like)."""

    eta: float = 0.0

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.eta > 0

    def plan(self, schedule, steps):
        _require_betas(schedule, "DDIM")
        spacing = schedule.option("timestep_spacing", "leading")
        offset = schedule.option("steps_offset", 0)
        train = schedule.num_train_timesteps
        t = spaced_timesteps(spacing, steps, train, offset, integer=True)
        alphas = schedule.alphas_cumprod()
        final = 1.0 if schedule.option("set_alpha_to_one", True) else alphas[0]
        previous = t - train // steps
        prev_alpha = np.where(previous >= 0, alphas[np.maximum(previous, 0)], final)
        return {
            "timesteps": t.astype(np.float32),
            "alpha": alphas[t].astype(np.float32),
            "alpha_prev": prev_alpha.astype(np.float32),
            "clip": np.float32(
                schedule.option("clip_sample_range", 1.0)
                if schedule.option("clip_sample", True)
                else np.inf
            ),
            "input_scale": np.ones(steps, np.float32),
            "init_sigma": np.float32(1.0),
        }

    def step(self, plan, i, x, output, noise, previous, kind):
        alpha, alpha_prev = plan["alpha"][i], plan["alpha_prev"][i]
        x0 = _x0_vp(output, x, alpha**0.5, (1 - alpha) ** 0.5, kind)
        x0 = jnp.clip(x0, -plan["clip"], plan["clip"])  # clip_sample (infinite when off)
        eps = output if kind == "epsilon" else alpha**0.5 * output + (1 - alpha) ** 0.5 * x
        variance = (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)
        std = self.eta * variance**0.5
        x = alpha_prev**0.5 * x0 + (1 - alpha_prev - std**2) ** 0.5 * eps
        return (x + std * noise if self.eta > 0 else x), previous


@dataclasses.dataclass(frozen=True)
class DPMSolverPP2M(Sampler):
    """diffusers DPMSolverMultistepScheduler: dpmsolver++, order 2, midpoint, final sigma 0."""

    def plan(self, schedule, steps):
        _require_betas(schedule, "DPM-Solver++")
        spacing = schedule.option("timestep_spacing", "linspace")
        offset = schedule.option("steps_offset", 0)
        train = schedule.num_train_timesteps
        if spacing == "linspace":
            t = np.linspace(0, train - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
        elif spacing == "leading":
            t = (np.arange(0, steps + 1) * (train // (steps + 1))).round()[::-1][:-1] + offset
        else:
            t = spaced_timesteps("trailing", steps, train, offset, integer=True)
        table = schedule.sigmas()
        sigmas = np.interp(t, np.arange(len(table)), table)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        return {
            "timesteps": t.astype(np.float32),
            "sigmas": sigmas,
            "input_scale": np.ones(steps, np.float32),
            "init_sigma": np.float32(1.0),
        }

    def step(self, plan, i, x, output, noise, previous, kind):
        def alpha_sigma(k_sigma):
            alpha = 1 / (k_sigma**2 + 1) ** 0.5
            return alpha, k_sigma * alpha

        s = plan["sigmas"]
        alpha_s0, sigma_s0 = alpha_sigma(s[i])
        alpha_t, sigma_t = alpha_sigma(s[i + 1])
        alpha_s1, sigma_s1 = alpha_sigma(s[jnp.maximum(i - 1, 0)])
        x0 = _x0_vp(output, x, alpha_s0, sigma_s0, kind)
        lam = lambda a, sg: jnp.log(a) - jnp.log(sg)
        h = lam(alpha_t, sigma_t) - lam(alpha_s0, sigma_s0)
        first = (sigma_t / sigma_s0) * x - alpha_t * jnp.expm1(-h) * x0
        r0 = (lam(alpha_s0, sigma_s0) - lam(alpha_s1, sigma_s1)) / h
        d1 = (x0 - previous) / r0
        second = first - 0.5 * alpha_t * jnp.expm1(-h) * d1
        # First order on the first step and on the last (its sigma is 0), as diffusers.
        last = i == plan["timesteps"].shape[0] - 1
        return jnp.where((i == 0) | last, first, second), x0


@dataclasses.dataclass(frozen=True)
class EDMEuler(Sampler):
    """diffusers EDMEulerScheduler (s_churn = 0): Euler on EDM noise levels (Karras or
    exponential), the UNet conditioned on 0.25 log(sigma), inputs scaled by
    1 / sqrt(sigma^2 + sigma_data^2), outputs preconditioned with c_skip and c_out."""

    def plan(self, schedule, steps):
        if not schedule.is_edm:
            raise ValueError(
                f"edm_euler needs a model trained on EDM noise levels (an EDMEulerScheduler "
                f"config, as CosXL); this one's scheduler is {schedule.scheduler_class or 'SD'}'s"
            )
        low, high = schedule.option("sigma_min", 0.002), schedule.option("sigma_max", 80.0)
        kind = schedule.option("sigma_schedule", "karras")
        if kind == "karras":
            rho = schedule.option("rho", 7.0)
            ramp = np.linspace(0, 1, steps, dtype=np.float64)
            top, bottom = high ** (1 / rho), low ** (1 / rho)
            sigmas = ((top + ramp * (bottom - top)) ** rho).astype(np.float32)
        elif kind == "exponential":  # float32 throughout, as diffusers computes it
            logs = linspace_like_torch(np.log(low), np.log(high), steps)
            sigmas = np.exp(logs)[::-1].astype(np.float32)
        else:
            raise ValueError(f"sigma_schedule={kind!r} is not supported (karras, exponential)")
        final = schedule.option("final_sigmas_type", "zero")
        if final not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type={final!r} is not supported (zero, sigma_min)")
        last = sigmas[-1] if final == "sigma_min" else 0.0
        data = np.float32(schedule.option("sigma_data", 0.5))
        return {
            "timesteps": (np.float32(0.25) * np.log(sigmas)).astype(np.float32),
            "sigmas": np.concatenate([sigmas, [last]]).astype(np.float32),
            "input_scale": (1 / (sigmas**2 + data**2) ** 0.5).astype(np.float32),
            "init_sigma": np.float32((high**2 + 1) ** 0.5),
            "sigma_data": data,
        }

    def step(self, plan, i, x, output, noise, previous, kind):
        sigma, data = plan["sigmas"][i], plan["sigma_data"]
        c_skip = data**2 / (sigma**2 + data**2)
        c_out = sigma * data / (sigma**2 + data**2) ** 0.5
        denoised = c_skip * x + (c_out if kind == "epsilon" else -c_out) * output
        return x + (x - denoised) / sigma * (plan["sigmas"][i + 1] - sigma), previous


SAMPLERS: dict[str, Callable[..., Sampler]] = {
    "euler_ancestral": EulerAncestral,
    "euler": Euler,
    "ddim": DDIM,
    "dpmpp_2m": DPMSolverPP2M,
    "edm_euler": EDMEuler,
}


def get_sampler(name: str, **options: Any) -> Sampler:
    """A sampler by name (see :data:`SAMPLERS`)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](**options)


def step_noise(keys: jax.Array, i, shape: tuple[int, ...]) -> jax.Array:
    """Per-example N(0, 1) for step ``i``: example b draws from fold_in(keys[b], i + 1), so an
    image depends on its own seed only, not on what else is in the batch."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i + 1), shape))(keys)


def initial_noise(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Per-example N(0, 1) initial latents (fold_in 0)."""
    return step_noise(keys, -1, shape)


def sample(
    sampler: Sampler,
    denoise: Denoise,
    plan: Plan,
    x: jax.Array,
    *,
    prediction_type: str = "epsilon",
    keys: jax.Array | None = None,
    noise: jax.Array | None = None,
    on_step: Callable[[jax.Array], None] | None = None,
    end: int | None = None,
) -> jax.Array:
    """Runs the chain from unit-variance noise ``x`` to a clean latent, in one fori_loop.

    ``noise`` [steps, *x.shape] replaces the per-step draws from ``keys`` (parity tests).
    ``on_step(i)`` is called on the host after each step (a progress bar). ``end`` stops the
    chain after that many of the plan's steps (a still noisy latent, as diffusers'
    ``denoising_end``; see `denoising_end_step`).
    """
    steps = plan["timesteps"].shape[0] if end is None else end
    if sampler.stochastic and keys is None and noise is None:
        raise ValueError(f"{type(sampler).__name__} draws noise: pass keys or noise")
    x = x * plan["init_sigma"]

    def body(i, carry):
        x, previous = carry
        output = denoise(x * plan["input_scale"][i], plan["timesteps"][i])
        if not sampler.stochastic:
            fresh = jnp.zeros_like(x)
        elif noise is not None:
            fresh = noise[i]
        else:
            fresh = step_noise(keys, i, x.shape[1:])
        x, previous = sampler.step(plan, i, x, output, fresh, previous, prediction_type)
        if on_step is not None:
            jax.debug.callback(on_step, i)
        return x.astype(carry[0].dtype), previous.astype(carry[1].dtype)

    x, _ = jax.lax.fori_loop(0, steps, body, (x, jnp.zeros_like(x)))
    return x


def denoising_end_step(plan: Plan, denoising_end: float, num_train_timesteps: int) -> int:
    """How many of the plan's steps run before diffusers' ``denoising_end`` (a fraction in
    (0, 1)) stops the chain: those whose timestep is at least
    ``round(T - denoising_end * T)``, T the training timesteps (SDXL's pipelines, for a
    refiner to take over from there)."""
    if not 0.0 < denoising_end < 1.0:
        raise ValueError(f"denoising_end must be in (0, 1), got {denoising_end}")
    cutoff = int(round(num_train_timesteps - denoising_end * num_train_timesteps))
    end = int((np.asarray(plan["timesteps"]) >= cutoff).sum())
    if end == 0:
        raise ValueError(f"denoising_end={denoising_end} stops the chain before its first step")
    return end
