"""LoRA training: low-rank adapters on chosen kernels of a frozen model, merged into its
weights inside the step (``W + alpha / rank * down @ up``, the update diffusers' LoRA
training scripts learn with PEFT).

An adapter tree mirrors the params: the module of each adapted kernel holds ``down`` ([in,
rank], or [kh, kw, in, rank] for a convolution) and ``up`` ([rank, out], or [1, 1, rank,
out]), in Flax layout; weights.lora writes them in PEFT's layout. As PEFT's "gaussian"
initialisation (the one diffusers' scripts ask for): ``down`` is N(0, 1/rank^2), ``up``
zeros, so a fresh adapter changes nothing.

Merging in the step rather than adding ``x @ down @ up`` beside each layer keeps the model
code as it is; the price is the adapted kernels' full weight gradient (one matmul a layer),
small next to the activations' for the attention projections adapted by default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from ip2p_jax.train.config import LoraConfig
from ip2p_jax.weights.lora import adapter_pairs, module_name

Path = tuple[str, ...]


def split_targets(targets: str) -> tuple[str, ...]:
    """``"to_q, to_k"`` -> ``("to_q", "to_k")``."""
    return tuple(name.strip() for name in targets.split(",") if name.strip())


def is_target(module: str, targets: Sequence[str]) -> bool:
    """PEFT's rule for target_modules names: the module's full name, or its last parts."""
    return any(module == target or module.endswith(f".{target}") for target in targets)


def target_paths(params: Mapping, targets: Sequence[str], *, component: str) -> list[Path]:
    """The paths of the kernels (dense and convolution) of the modules ``targets`` name;
    a ValueError naming some modules when none matches."""
    kernels = [path for path in flatten_dict(params) if path[-1] == "kernel"]
    chosen = [path for path in kernels if is_target(module_name(path), targets)]
    if not chosen:
        examples = ", ".join(module_name(path) for path in kernels[:4])
        raise ValueError(
            f"lora targets {list(targets)} match no {component} module (PEFT's rule: a "
            f"module's name or its last parts, e.g. 'to_q' or 'attn1.to_q'); its modules "
            f"are named like {examples}"
        )
    return chosen


def init_adapters(params: Mapping, paths: Sequence[Path], rank: int, seed: int) -> dict:
    """Fresh adapters (host arrays, float32) for the kernels at ``paths`` of ``params``:
    ``down`` N(0, 1/rank^2), ``up`` zeros."""
    flat = flatten_dict(params)
    rng = np.random.default_rng(seed)
    adapters = {}
    for path in sorted(paths):
        shape = tuple(flat[path].shape)  # [in, out] or [kh, kw, in, out]
        module = path[:-1]
        adapters[(*module, "down")] = rng.normal(0.0, 1.0 / rank, (*shape[:-1], rank)).astype(
            np.float32
        )
        up = (rank, shape[-1]) if len(shape) == 2 else (1, 1, rank, shape[-1])
        adapters[(*module, "up")] = np.zeros(up, np.float32)
    return unflatten_dict(adapters)


def adapter_delta(down: jax.Array, up: jax.Array) -> jax.Array:
    """``down @ up`` in the kernel's layout (a convolution's ``up`` is 1x1)."""
    if down.ndim == 2:
        return down @ up
    return jnp.einsum("hwir,ro->hwio", down, up[0, 0])


def merge_adapters(base: Mapping, adapters: Mapping, scale: float) -> dict:
    """``base`` with ``scale * down @ up`` added to each adapted kernel (pure; jit it).
    The sum is taken in float32 and cast back to the kernel's dtype."""
    flat = flatten_dict(base)
    for module, pair in adapter_pairs(adapters).items():
        path = (*module, "kernel")
        kernel = flat[path]
        delta = adapter_delta(pair["down"].astype(jnp.float32), pair["up"].astype(jnp.float32))
        flat[path] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
    return unflatten_dict(flat)


def alpha(config: LoraConfig) -> float:
    """The config's alpha; 0 means the rank (a scale of 1, diffusers' scripts' choice)."""
    return float(config.alpha or config.rank)


def lora_scale(config: LoraConfig) -> float:
    """alpha / rank, the factor of every adapter's update."""
    return alpha(config) / config.rank


def component_targets(config: LoraConfig) -> dict[str, tuple[str, ...]]:
    """The components a LoRA config adapts, each with its target names."""
    targets = {"unet": split_targets(config.targets)}
    if text := split_targets(config.text_encoder_targets):
        targets["text_encoder"] = text
    return {name: names for name, names in targets.items() if names}
