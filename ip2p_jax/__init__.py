"""ip2p-jax: InstructPix2Pix in JAX/Flax.

The public API, imported on first use so that ``import ip2p_jax`` stays cheap::

    from ip2p_jax import EditPipeline
    pipe = EditPipeline.from_pretrained("timbrooks/instruct-pix2pix")
    edited = pipe.edit("photo.jpg", "make it snow")[0]

Everything else lives by concern: models/, diffusion/, pipelines/, weights/, runtime/, train/,
data/, worlds/, evaluation/, apps/, testing/ (see docs/design.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> the module that defines it
_PUBLIC = {
    "EditPipeline": "ip2p_jax.pipelines.edit",
    "SDEditPipeline": "ip2p_jax.pipelines.sdedit",
    "convert_to_flax": "ip2p_jax.weights.model_folder",
    "export_diffusers": "ip2p_jax.weights.model_folder",
    "load_component": "ip2p_jax.weights.model_folder",
    "CLIPTokenizer": "ip2p_jax.models.tokenizer",
}

__all__ = [
    "CLIPTokenizer",
    "EditPipeline",
    "SDEditPipeline",
    "convert_to_flax",
    "export_diffusers",
    "load_component",
]

if TYPE_CHECKING:
    from ip2p_jax.models.tokenizer import CLIPTokenizer
    from ip2p_jax.pipelines.edit import EditPipeline
    from ip2p_jax.pipelines.sdedit import SDEditPipeline
    from ip2p_jax.weights.model_folder import convert_to_flax, export_diffusers, load_component


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'ip2p_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
