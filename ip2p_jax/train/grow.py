"""Growing a trained UNet without changing what it computes, so training can go on from it
with more capacity where the old one ran out.

:func:`add_cross_attention` turns each plain down and up block (``DownBlock2D``,
``UpBlock2D``) into its cross-attention twin. The twin's resnets, samplers and names are the
plain block's, so every trained weight keeps its path; its new transformers start with
``proj_out`` at zero, so each adds nothing to its residual and the grown UNet gives the old
one's output exactly. Their other weights are freshly initialised: with ``proj_out`` at zero
the first steps train only it, then the rest learn through it (as a zero-initialised
ControlNet convolution does).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from ip2p_jax.weights.model_folder import LoadedComponent, init_component

CROSS_ATTENTION_TWINS = {
    "DownBlock2D": "CrossAttnDownBlock2D",
    "UpBlock2D": "CrossAttnUpBlock2D",
}


def add_cross_attention(unet: LoadedComponent, seed: int = 0) -> LoadedComponent:
    """The UNet with cross-attention in every down and up block (see the module docstring).
    Raises ValueError when it has it everywhere already: nothing would grow."""
    fields = ("down_block_types", "up_block_types")
    raw = dict(unet.raw_config)
    for field in fields:
        raw[field] = [CROSS_ATTENTION_TWINS.get(name, name) for name in getattr(unet.config, field)]
    if all(raw[field] == list(getattr(unet.config, field)) for field in fields):
        raise ValueError(
            "the UNet has cross-attention in every down and up block already "
            f"({list(unet.config.down_block_types)}, {list(unet.config.up_block_types)})"
        )
    grown = init_component("unet", raw, seed)
    old = flatten_dict(unet.params)
    dtype = np.asarray(next(iter(old.values()))).dtype
    fresh = flatten_dict(grown.params)
    params = {}
    for path, value in fresh.items():
        if path in old:
            if np.shape(old[path]) != value.shape:
                raise ValueError(
                    f"unet param {'/'.join(path)}: trained shape {np.shape(old[path])}, "
                    f"the grown UNet's {value.shape}"
                )
            params[path] = np.asarray(old[path])
        elif "proj_out" in path:
            params[path] = np.zeros(value.shape, dtype)
        else:
            params[path] = np.asarray(value, dtype)
    lost = sorted("/".join(p) for p in old if p not in fresh)
    if lost:
        raise ValueError(f"the grown UNet has no place for trained params {lost[:5]}")
    return dataclasses.replace(grown, params=unflatten_dict(params))
