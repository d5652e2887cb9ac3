"""LoRA adapters from the files diffusers' ``load_lora_weights`` reads for SD-1.x pipelines,
merged into our params as its ``fuse_lora`` does: ``W + scale * alpha / rank * up @ down``.

One file holds one of these layouts, told apart by its keys:

- diffusers, as its training scripts save (``save_lora_weights`` of a PEFT state dict put
  through ``convert_state_dict_to_diffusers``): ``unet.<module>.lora.down.weight`` and
  ``.lora.up.weight``, the text encoder's under ``text_encoder.``;
- PEFT: ``unet.<module>.lora_A.weight`` and ``.lora_B.weight``;
- kohya (sd-scripts, A1111): ``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight`` and
  ``.alpha``, the module's dots written as underscores; ``lora_te_`` for the text encoder;
- diffusers' older attention processors: ``unet.<attention>.processor.to_q_lora.down.weight``
  (and ``to_k``, ``to_v``, ``to_out``).

Alpha: a module's ``.alpha`` tensor where the file has one; else the file's
``lora_adapter_metadata`` (PEFT's ``lora_alpha``, ``alpha_pattern``, ``use_rslora``: alpha over
the square root of the rank), as diffusers writes it; else the rank (a scale of 1). The rank
is each module's own, read from its tensors. DoRA, LoHa, LoKr and bias adapters are refused.

:func:`write_lora` writes our trained adapters (train.lora) in PEFT's layout with that
metadata, as diffusers' ``save_lora_weights`` does for a PEFT model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from ip2p_jax.weights.convert import (
    ConversionError,
    flax_path,
    modernize_key,
    to_flax_layout,
    to_torch_layout,
    torch_key,
)
from ip2p_jax.weights.safetensors_io import iter_safetensors, read_metadata, write_safetensors

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
# (key ending, which tensor it is); the longest endings first.
PARTS = (
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".alpha", "alpha"),
    ("_lora.down.weight", "down"),  # diffusers' older processors: processor.to_q_lora.down
    ("_lora.up.weight", "up"),
)
PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)$")
PROCESSOR_TARGETS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
METADATA_KEY = "lora_adapter_metadata"


class LoraError(ValueError):
    """A LoRA file this loader cannot read, or one that does not fit the model."""


@dataclasses.dataclass(frozen=True)
class Adapter:
    """One module's low-rank update, as the file stores it (PyTorch layout)."""

    component: str
    module: str  # its name in the file: dots, or underscores in kohya's layout
    down: np.ndarray  # [rank, in] or [rank, in, kh, kw]
    up: np.ndarray  # [out, rank] or [out, rank, 1, 1]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> np.ndarray:
        """``alpha / rank * up @ down`` in the weight's PyTorch layout, float32."""
        up = self.up.reshape(self.up.shape[0], self.rank).astype(np.float32)
        down = self.down.reshape(self.rank, -1).astype(np.float32)
        scale = self.alpha / self.rank
        return (scale * (up @ down)).reshape(up.shape[0], *self.down.shape[1:])


def read_lora(path: str | os.PathLike) -> list[Adapter]:
    """Every adapter of a LoRA safetensors file (any layout above), with its alpha."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise LoraError(f"{path}: expected one .safetensors LoRA file, found {len(found)}")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    parts: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, array in iter_safetensors(path):
        component, module, part = _split_key(key, path)
        parts.setdefault((component, module), {})[part] = array
    if not parts:
        raise LoraError(f"{path} holds no tensors")
    metadata = _adapter_metadata(path)
    adapters = []
    for (component, module), tensors in parts.items():
        missing = [name for name in ("down", "up") if name not in tensors]
        if missing:
            raise LoraError(f"{path}: {component} module {module} lacks its {missing[0]} tensor")
        down, up = tensors["down"], tensors["up"]
        alpha = (
            float(np.asarray(tensors["alpha"]).reshape(()))
            if "alpha" in tensors
            else _metadata_alpha(metadata, component, module, down.shape[0])
        )
        adapters.append(Adapter(component, module, down, up, alpha))
    return adapters


def _split_key(key: str, path: Path) -> tuple[str, str, str]:
    """(component, module, part) of a file's key; LoraError for a key of no layout here."""
    found = next(((ending, part) for ending, part in PARTS if key.endswith(ending)), None)
    if found is None:
        kind = "DoRA" if "magnitude" in key else "an adapter kind or tensor"
        raise LoraError(
            f"{path}: key {key!r} is {kind} this loader does not merge (it takes LoRA "
            "down/up pairs and alphas)"
        )
    ending, part = found
    stem = key[: -len(ending)]
    for prefix, component in KOHYA_PREFIXES.items():
        if stem.startswith(prefix):
            return component, stem[len(prefix) :], part
    component, _, module = stem.partition(".")
    if component not in COMPONENTS or not module:
        raise LoraError(
            f"{path}: key {key!r} names no component: expected a prefix "
            f"{', '.join(c + '.' for c in COMPONENTS)} or {', '.join(KOHYA_PREFIXES)}"
        )
    processor = PROCESSOR.match(module)
    if processor:
        module = f"{processor.group(1)}.{PROCESSOR_TARGETS[processor.group(2)]}"
    return component, module, part


def _adapter_metadata(path: Path) -> dict:
    raw = read_metadata(path).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def _metadata_alpha(metadata: Mapping, component: str, module: str, rank: int) -> float:
    """PEFT's alpha for a module: its alpha_pattern entry, else lora_alpha, else the rank.
    With use_rslora PEFT scales by alpha / sqrt(rank): returned as the alpha that gives that
    scale over the rank (Adapter.delta divides by the rank)."""
    config = {
        key[len(component) + 1 :]: value
        for key, value in metadata.items()
        if key.startswith(f"{component}.")
    }
    alpha = float(config.get("lora_alpha") or rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module == pattern or re.fullmatch(rf".*\.{pattern}", module):
            alpha = float(value)
            break
    if config.get("use_rslora"):
        alpha *= math.sqrt(rank)  # PEFT scales by alpha / sqrt(rank), delta() by / rank
    return alpha


def merge_lora(params: Mapping, adapters: list[Adapter], scale: float, *, source: str) -> dict:
    """``params`` (one component's) with each adapter's ``scale * delta`` added to its weight;
    LoraError naming the module when the model has no such weight or its shape differs.
    Unchanged leaves are the same arrays."""
    flat = flatten_dict(params)
    by_underscores = {
        _underscored(torch_key(path)[: -len(".weight")]): path
        for path in flat
        if path[-1] == "kernel"
    }
    merged = dict(flat)
    for adapter in adapters:
        path = _param_path(adapter, flat, by_underscores, source)
        delta = to_flax_layout(adapter.delta(), "kernel")
        weight = merged[path]
        if delta.shape != weight.shape:
            raise LoraError(
                f"{source}: {adapter.component} module {adapter.module}: the adapter's update "
                f"is {tuple(delta.shape)} (ours, HWIO/in-out), the weight is {tuple(weight.shape)}"
            )
        update = jnp.asarray(scale * delta, jnp.float32)
        merged[path] = (weight.astype(jnp.float32) + update).astype(weight.dtype)
    return unflatten_dict(merged)


def _underscored(module: str) -> str:
    return module.replace(".", "_")


def _param_path(adapter: Adapter, flat: Mapping, by_underscores: Mapping, source: str) -> tuple:
    module = modernize_key(adapter.module + ".weight")[: -len(".weight")]
    if "." not in module:  # kohya: the dotted name written with underscores
        path = by_underscores.get(module.removeprefix("text_model_"))
    else:
        try:
            path = flax_path(module + ".weight", adapter.down.ndim)
        except ConversionError:
            path = None
    if path is None or path not in flat:
        raise LoraError(
            f"{source}: the LoRA adapts {adapter.component} module {adapter.module}, which "
            f"this model's {adapter.component} does not have"
        )
    return path


def module_name(path: tuple[str, ...]) -> str:
    """The PyTorch module name of a kernel's Flax path (``down_blocks.0...attn1.to_q``)."""
    return torch_key(path)[: -len(".weight")]


def adapter_pairs(adapters: Mapping) -> dict[tuple[str, ...], dict[str, np.ndarray]]:
    """An adapter tree (train.lora: each adapted module holds ``down`` and ``up``) as
    ``{module path: {"down": ..., "up": ...}}``."""
    modules: dict[tuple[str, ...], dict] = {}
    for path, leaf in flatten_dict(adapters).items():
        modules.setdefault(path[:-1], {})[path[-1]] = leaf
    return modules


def lora_state_dict(adapters: Mapping, prefix: str) -> dict[str, np.ndarray]:
    """One component's adapter tree in PEFT's layout: ``{prefix}{module}.lora_A.weight``
    ([rank, in] or [rank, in, kh, kw]) and ``.lora_B.weight`` ([out, rank] or [out, rank, 1,
    1]), float32."""
    state = {}
    for module, pair in adapter_pairs(adapters).items():
        name = prefix + module_name((*module, "kernel"))
        for part, key in (("down", "lora_A"), ("up", "lora_B")):
            array = np.asarray(pair[part], np.float32)
            state[f"{name}.{key}.weight"] = to_torch_layout(array, "kernel")
    return state


def write_lora(
    path: str | os.PathLike, adapters: Mapping[str, Mapping], *, rank: int, alpha: float
) -> Path:
    """Writes adapter trees (``{"unet": ..., "text_encoder": ...}``, train.lora) as one
    safetensors file in PEFT's layout, keys prefixed by the component and by the PyTorch
    model's own prefix (``text_encoder.text_model.``), atomically. The adapter metadata
    diffusers writes goes with them (rank, alpha and the adapted modules of each component),
    so its ``load_lora_weights`` configures PEFT as we trained."""
    from ip2p_jax.weights.model_folder import COMPONENTS

    path = Path(path)
    tensors, metadata = {}, {}
    for component, tree in adapters.items():
        prefix = f"{component}.{COMPONENTS[component].torch_prefix}"
        tensors.update(lora_state_dict(tree, prefix))
        # Without the model's prefix: PEFT matches a target as a name's last parts, so these
        # name the modules in transformers 4's CLIPTextModel (text_model.encoder...) and in
        # 5's, which has no text_model and whose keys diffusers loads without it.
        modules = sorted(module_name((*module, "kernel")) for module in adapter_pairs(tree))
        metadata.update(
            {
                f"{component}.r": rank,
                f"{component}.lora_alpha": alpha,
                f"{component}.target_modules": modules,
                f"{component}.init_lora_weights": "gaussian",
            }
        )
    write_safetensors(path, tensors, {"format": "pt", METADATA_KEY: json.dumps(metadata)})
    return path
