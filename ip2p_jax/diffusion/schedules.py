"""Noise schedules and sampling timesteps, computed as diffusers' schedulers compute them.

Everything here is host-side numpy, done once per (sampler, steps): betas -> alphas_cumprod
-> sigmas, and the timestep spacings ``leading``, ``trailing`` and ``linspace``. The
scheduler's ``scheduler_config.json`` is kept raw, because a missing field takes the default
of whichever scheduler class reads it, exactly as diffusers' ``from_config`` does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from ip2p_jax.models.config import ConfigError, load_json

BETA_SCHEDULES = ("linear", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SPACINGS = ("leading", "trailing", "linspace")

# The fields every diffusers scheduler shares, with the defaults of their classes.
_COMMON = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "trained_betas": None,
    "rescale_betas_zero_snr": False,
}

# Stable Diffusion 1.x's scheduler_config.json (timbrooks/instruct-pix2pix ships the same
# fields): the config a model trained from scratch here is given. Written out in full,
# because a field left out takes the reading class's default, and DDIM's clip_sample=True
# would clip the latents' x0 estimate to [-1, 1] and wreck every image.
SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule of a model (its ``scheduler/scheduler_config.json``)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    raw: tuple[tuple[str, Any], ...] = ()  # the whole config, for sampler-specific fields
    scheduler_class: str = ""  # the config's _class_name (EDMEulerScheduler: an EDM model)

    @property
    def is_edm(self) -> bool:
        """Whether the model was trained on EDM noise levels (CosXL), not on betas."""
        return self.scheduler_class.startswith("EDM")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "scheduler config") -> NoiseSchedule:
        """Reads the shared fields, refusing what no sampler here implements."""
        fields = {k: raw.get(k, v) for k, v in _COMMON.items()}
        if fields["trained_betas"] is not None:
            raise ConfigError(f"{source}: trained_betas is not supported")
        if fields["rescale_betas_zero_snr"]:
            raise ConfigError(f"{source}: rescale_betas_zero_snr is not supported")
        if fields["beta_schedule"] not in BETA_SCHEDULES:
            raise ConfigError(
                f"{source}: beta_schedule={fields['beta_schedule']!r} is not supported "
                f"(only {BETA_SCHEDULES})"
            )
        if fields["prediction_type"] not in PREDICTION_TYPES:
            raise ConfigError(
                f"{source}: prediction_type={fields['prediction_type']!r} is not supported "
                f"(only {PREDICTION_TYPES})"
            )
        return cls(
            num_train_timesteps=fields["num_train_timesteps"],
            beta_start=fields["beta_start"],
            beta_end=fields["beta_end"],
            beta_schedule=fields["beta_schedule"],
            prediction_type=fields["prediction_type"],
            raw=tuple(sorted((k, _hashable(v)) for k, v in raw.items() if not k.startswith("_"))),
            scheduler_class=str(raw.get("_class_name", "")),
        )

    @classmethod
    def from_folder(cls, model_folder: str | Path) -> NoiseSchedule:
        """``scheduler/scheduler_config.json`` of a model folder; SD's schedule if absent."""
        path = Path(model_folder) / "scheduler" / "scheduler_config.json"
        return cls.from_dict(load_json(path), str(path)) if path.is_file() else cls()

    def option(self, name: str, default: Any) -> Any:
        """A sampler-specific field, or that sampler class's default when the file lacks it."""
        return dict(self.raw).get(name, default)

    def alphas_cumprod(self) -> np.ndarray:
        """Cumulative products of 1 - beta, as torch computes them (a float64 accumulator,
        rounded to float32)."""
        steps = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = linspace_like_torch(self.beta_start, self.beta_end, steps)
        else:  # scaled_linear: linear in sqrt(beta)
            betas = linspace_like_torch(self.beta_start**0.5, self.beta_end**0.5, steps) ** 2
        return np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32)

    def sigmas(self) -> np.ndarray:
        """k-diffusion sigmas sqrt((1 - a) / a) for every training timestep (float32)."""
        alphas = self.alphas_cumprod()
        return ((1 - alphas) / alphas) ** 0.5


def linspace_like_torch(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(..., dtype=float32) bit for bit: a float32 step, the first half counted
    up from ``start`` and the second half down from ``end``."""
    first, last = np.float32(start), np.float32(end)
    step = np.float32((last - first) / np.float32(max(steps - 1, 1)))
    i = np.arange(steps)
    values = np.where(i < steps // 2, first + i * step, last - (steps - 1 - i) * step)
    return values.astype(np.float32)


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def spaced_timesteps(
    spacing: str, steps: int, train_steps: int, offset: int, *, integer: bool
) -> np.ndarray:
    """Descending timesteps as the diffusers schedulers space them (Euler-family: floats,
    DDIM: integers)."""
    if spacing not in SPACINGS:
        raise ConfigError(f"timestep_spacing={spacing!r} is not supported (only {SPACINGS})")
    if not 1 <= steps <= train_steps:
        raise ValueError(f"steps must be in [1, {train_steps}], got {steps}")
    if spacing == "linspace":
        t = np.linspace(0, train_steps - 1, steps, dtype=np.float64 if integer else np.float32)
        t = t.round()[::-1] if integer else t[::-1]
    elif spacing == "leading":
        t = (np.arange(0, steps) * (train_steps // steps)).round()[::-1] + offset
    else:
        t = np.arange(train_steps, 0, -train_steps / steps).round() - 1
    return t.astype(np.int64 if integer else np.float32).copy()
