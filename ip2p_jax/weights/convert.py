"""PyTorch state dicts <-> Flax params: one rename table and one set of layout rules, used
both ways.

Names: a diffusers/transformers key ``down_blocks.0.resnets.1.conv1.weight`` is the Flax path
``down_blocks_0/resnets_1/conv1/kernel``: list indices join their container's name, and the
leaf follows the layer kind. Layouts: conv OIHW <-> HWIO, linear (out, in) <-> (in, out),
norm weight <-> scale, embedding weight <-> embedding.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

# Module attributes that are lists in the PyTorch models; their index joins the name.
LIST_CONTAINERS = frozenset(
    {
        "down_blocks",
        "up_blocks",
        "resnets",
        "attentions",
        "downsamplers",
        "upsamplers",
        "transformer_blocks",
        "to_out",
        "net",
        "layers",
    }
)
EMBEDDINGS = frozenset({"token_embedding", "position_embedding"})
# Old checkpoint names, renamed on load (diffusers' deprecated VAE attention; transformers 4's
# text_model prefix). Exports use the current names.
LEGACY_RENAMES = (
    (re.compile(r"^text_model\."), ""),
    (re.compile(r"\.attentions\.(\d+)\.query\."), r".attentions.\1.to_q."),
    (re.compile(r"\.attentions\.(\d+)\.key\."), r".attentions.\1.to_k."),
    (re.compile(r"\.attentions\.(\d+)\.value\."), r".attentions.\1.to_v."),
    (re.compile(r"\.attentions\.(\d+)\.proj_attn\."), r".attentions.\1.to_out.0."),
)
# Buffers some checkpoints carry that are not parameters.
IGNORED_KEYS = frozenset({"embeddings.position_ids"})

Path = tuple[str, ...]


class ConversionError(ValueError):
    """The checkpoint's tensors don't fit the model the config describes."""


def modernize_key(key: str) -> str:
    """Applies :data:`LEGACY_RENAMES`."""
    for pattern, replacement in LEGACY_RENAMES:
        key = pattern.sub(replacement, key)
    return key


def flax_path(torch_key: str, ndim: int) -> Path:
    """``a.b.0.c.weight`` (a tensor of rank ``ndim``) -> ``("a", "b_0", "c", "kernel")``."""
    *modules, leaf = torch_key.split(".")
    path: list[str] = []
    for name in modules:
        if name.isdigit():
            if not path or path[-1] not in LIST_CONTAINERS:
                raise ConversionError(f"{torch_key}: index {name} follows no known list")
            path[-1] = f"{path[-1]}_{name}"
        else:
            path.append(name)
    if leaf == "bias":
        return (*path, "bias")
    if leaf != "weight":
        raise ConversionError(f"{torch_key}: unknown tensor kind {leaf!r}")
    if path and path[-1] in EMBEDDINGS:
        return (*path, "embedding")
    return (*path, "scale" if ndim == 1 else "kernel")


def torch_key(path: Path) -> str:
    """The inverse of :func:`flax_path`."""
    *modules, leaf = path
    parts = []
    for name in modules:
        match = re.fullmatch(r"(.+)_(\d+)", name)
        if match and match.group(1) in LIST_CONTAINERS:
            parts += [match.group(1), match.group(2)]
        else:
            parts.append(name)
    return ".".join([*parts, "bias" if leaf == "bias" else "weight"])


def to_flax_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """A PyTorch tensor in Flax layout (a view where possible)."""
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    return array


def to_torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """A Flax param in PyTorch layout (a view where possible)."""
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    return array


def state_dict_to_params(
    tensors: Iterable[tuple[str, np.ndarray]],
    expected: Mapping,
    *,
    source: str,
    dtype: np.dtype | None = np.float32,
) -> dict:
    """Converts PyTorch tensors (streamed) into the Flax param tree shaped like ``expected``.

    ``expected`` is the abstract tree of the model (``jax.eval_shape`` of its init). Every
    missing, unexpected or mis-shaped tensor is listed by its PyTorch name in one error.
    """
    wanted = {path: leaf.shape for path, leaf in flatten_dict(expected).items()}
    converted: dict[Path, np.ndarray] = {}
    unexpected, misshaped, misshaped_paths = [], [], set()
    for raw_key, array in tensors:
        key = modernize_key(raw_key)
        if key in IGNORED_KEYS:
            continue
        try:
            path = flax_path(key, array.ndim)
        except ConversionError:
            unexpected.append(raw_key)
            continue
        if path not in wanted:
            unexpected.append(raw_key)
            continue
        if array.ndim == 4 and len(wanted[path]) == 2 and array.shape[2:] == (1, 1):
            array = array[:, :, 0, 0]  # linear layers stored as 1x1 convs (original-SD VAE)
        value = to_flax_layout(array, path[-1])
        if value.shape != wanted[path]:
            expect = to_torch_layout(np.empty(wanted[path], np.uint8), path[-1]).shape
            misshaped.append(f"{raw_key}: {tuple(array.shape)}, expected {expect}")
            misshaped_paths.add(path)
            continue
        converted[path] = np.ascontiguousarray(value, dtype=dtype or value.dtype)
    missing = [torch_key(p) for p in wanted if p not in converted and p not in misshaped_paths]
    raise_mismatch(source, missing, unexpected, misshaped)
    return unflatten_dict(converted)


def raise_mismatch(
    source: str, missing: list[str], unexpected: list[str], misshaped: list[str]
) -> None:
    """One error listing every missing, unexpected and mis-shaped tensor (if there are any)."""
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{source}: the checkpoint does not match the model config"]
    for title, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", misshaped),
    ):
        if items:
            more = f", ... ({len(items)} in all)" if len(items) > 12 else ""
            lines.append(f"  {title}: {', '.join(items[:12])}{more}")
    raise ConversionError("\n".join(lines))


def params_to_state_dict(params: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """Flax params -> ``{pytorch_key: array}`` in PyTorch layout (views, no copies)."""
    return {
        prefix + torch_key(path): to_torch_layout(np.asarray(value), path[-1])
        for path, value in flatten_dict(params).items()
    }


def widen_conv_in(params: Mapping, in_channels: int) -> dict:
    """conv_in for more input channels: the pretrained weights on the first channels, zeros on
    the new ones, the bias kept (InstructPix2Pix: 4 noisy + 4 image-latent channels)."""
    kernel = np.asarray(params["conv_in"]["kernel"])
    have = kernel.shape[2]
    if in_channels < have:
        raise ConversionError(f"conv_in has {have} input channels; cannot narrow to {in_channels}")
    widened = np.zeros((*kernel.shape[:2], in_channels, kernel.shape[3]), kernel.dtype)
    widened[:, :, :have] = kernel
    return {**params, "conv_in": {**params["conv_in"], "kernel": widened}}
