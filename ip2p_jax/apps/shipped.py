"""The shapes model that ships inside the package: the default of ``ip2p edit``, ``ip2p grid``,
``ip2p eval shapes``, ``ip2p app`` and ``make demo``, so a fresh install edits with no downloads.

It was trained by ``make train-shapes`` on this project's shapes world (64 px scenes of
coloured shapes) and exported by ``make ship-shapes`` as a diffusers folder in float16. It
edits shapes scenes; it knows nothing of photographs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ip2p_jax.assets import ASSETS

SHAPES_MODEL = ASSETS / "shapes_model"


@dataclass(frozen=True)
class SamplingDefaults:
    """How a model is sampled where the user does not say."""

    resolution: int  # long side, pixels
    steps: int
    text_scale: float  # s_T
    image_scale: float  # s_I
    sampler: str


# The reference's edit_cli.py: 512 px, 100 Euler-ancestral steps, s_T 7.5, s_I 1.5.
REFERENCE_SAMPLING = SamplingDefaults(512, 100, 7.5, 1.5, "euler_ancestral")
# The bundled model's: the side it was trained at, 20 steps, and the s_T that scored best on
# the validation split (scripts/sweep_shapes_sampling.py, 100 edits: s_T 3 and 5 39 %, 7.5
# 34 %, 10 24 %; 3 has the higher PSNR). Its quality table is measured with these.
SHAPES_SAMPLING = SamplingDefaults(64, 20, 3.0, 1.5, "euler_ancestral")


def sampling_defaults(shipped: bool, cosxl_edit: bool = False) -> SamplingDefaults:
    """The bundled model's defaults, or the reference's for any other model; a CosXL Edit
    model (EDM noise levels) samples with edm_euler, the sampler of its scheduler."""
    if cosxl_edit:
        return replace(REFERENCE_SAMPLING, sampler="edm_euler")
    return SHAPES_SAMPLING if shipped else REFERENCE_SAMPLING


def shipped_model() -> Path:
    """The bundled shapes model's folder; FileNotFoundError with the fix if it is missing."""
    if not (SHAPES_MODEL / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the bundled shapes model is missing ({SHAPES_MODEL}/model_index.json); "
            "reinstall ip2p-jax, rebuild it with `make train-shapes ship-shapes`, "
            "or pass --model"
        )
    return SHAPES_MODEL
