"""The shapes model that ships inside the package: the default of ``ip2p edit``, ``ip2p grid``,
``ip2p eval shapes``, ``ip2p app`` and ``make demo``, so a fresh install edits with no downloads.

It was trained by ``make train-shapes`` on this project's shapes world (64 px scenes of
coloured shapes) and exported by ``make ship-shapes`` as a diffusers folder in float16. It
edits shapes scenes; it knows nothing of photographs.
"""

from __future__ import annotations

from pathlib import Path

SHAPES_MODEL = Path(__file__).with_name("assets") / "shapes_model"
SHAPES_RESOLUTION = 64  # the side it was trained at
SHAPES_STEPS = 20  # sampling steps its quality table was measured with


def shipped_model() -> Path:
    """The bundled shapes model's folder; FileNotFoundError with the fix if it is missing."""
    if not (SHAPES_MODEL / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the bundled shapes model is missing ({SHAPES_MODEL}/model_index.json); "
            "reinstall ip2p-jax, rebuild it with `make train-shapes ship-shapes`, "
            "or pass --model"
        )
    return SHAPES_MODEL
