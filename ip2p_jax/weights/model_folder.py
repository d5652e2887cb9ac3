"""Model folders: diffusers layout in, our Flax checkpoint out, and back to diffusers.

A diffusers folder holds ``model_index.json`` and ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/`` (and ``scheduler/``). Our checkpoint keeps that layout, with each component's
weights as ``params.safetensors`` in Flax layout and a marker file ``ip2p_jax.json``, so
loading it is a memory map, not a conversion.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from ip2p_jax.diffusion.schedules import NoiseSchedule
from ip2p_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from ip2p_jax.models.config import load_json
from ip2p_jax.models.tokenizer import BUNDLED_DIR, CLIPTokenizer
from ip2p_jax.models.unet import UNet2DConditionModel, UNetConfig
from ip2p_jax.models.vae import AutoencoderKL, VAEConfig
from ip2p_jax.runtime.profile import BackendProfile, current_profile
from ip2p_jax.weights.atomic import atomic_folder
from ip2p_jax.weights.convert import (
    ConversionError,
    params_to_state_dict,
    raise_mismatch,
    state_dict_to_params,
    widen_conv_in,
)
from ip2p_jax.weights.safetensors_io import (
    WeightsError,
    find_weights,
    iter_safetensors,
    iter_weights,
    write_safetensors,
)

MARKER = "ip2p_jax.json"
PARAMS_FILE = "params.safetensors"
FORMAT_VERSION = 1
COPIED_FOLDERS = ("tokenizer", "tokenizer_2", "scheduler")
# What a hub download fetches: the configs, the tokenizer files and each component's own
# weights. Not the whole-pipeline single-file checkpoints some repos keep at their root, nor
# the fp16 / non-EMA variants beside the weights (each several GB).
HUB_FILES = (
    "*.json",
    "*.txt",
    "*/diffusion_pytorch_model.safetensors",
    "*/diffusion_pytorch_model-*-of-*.safetensors",
    "*/model.safetensors",
    "*/model-*-of-*.safetensors",
    f"*/{PARAMS_FILE}",
)
PARAM_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(jnp.bfloat16),
    "float16": np.dtype(np.float16),
}


@dataclasses.dataclass(frozen=True)
class Component:
    """How one model component is configured, built, traced and named on disk."""

    name: str
    config_class: type
    module_class: type[nn.Module]
    weights_stem: str  # diffusers / transformers weight file name, without suffix
    example_inputs: Callable[[Any], tuple]  # config -> inputs that trace ``init``
    torch_prefix: str = ""  # prefix of exported keys
    unprefixed: frozenset[str] = frozenset()  # top-level params exported without the prefix

    def state_dict(self, params: Mapping) -> dict[str, np.ndarray]:
        """``params`` as the PyTorch class names them (the inverse of loading)."""
        state = params_to_state_dict(
            {k: v for k, v in params.items() if k not in self.unprefixed}, self.torch_prefix
        )
        kept = {k: v for k, v in params.items() if k in self.unprefixed}
        return {**state, **params_to_state_dict(kept)}


def _unet_inputs(cfg: UNetConfig) -> tuple:
    side = 2 ** len(cfg.block_out_channels)
    inputs = (
        jnp.zeros((1, side, side, cfg.in_channels)),
        jnp.zeros((1,)),
        jnp.zeros((1, 1, cfg.cross_attention_dim)),
    )
    if cfg.addition_embed_type is None:
        return inputs
    # SDXL's six time ids; the pooled text takes the rest of the added embedding's input.
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return (*inputs, jnp.zeros((1, pooled)), jnp.zeros((1, 6)))


def _vae_inputs(cfg: VAEConfig) -> tuple:
    side = 2 ** len(cfg.block_out_channels)
    return (jnp.zeros((1, side, side, cfg.in_channels)),)


def _text_inputs(cfg: CLIPTextConfig) -> tuple:
    return (jnp.zeros((1, cfg.max_position_embeddings), jnp.int32),)


COMPONENTS = {
    "unet": Component(
        "unet", UNetConfig, UNet2DConditionModel, "diffusion_pytorch_model", _unet_inputs
    ),
    "vae": Component("vae", VAEConfig, AutoencoderKL, "diffusion_pytorch_model", _vae_inputs),
    # Exported with transformers 4's text_model prefix, which every transformers version loads.
    "text_encoder": Component(
        "text_encoder", CLIPTextConfig, CLIPTextModel, "model", _text_inputs, "text_model."
    ),
    # SDXL's second encoder, a CLIPTextModelWithProjection: text_model.* and text_projection.
    "text_encoder_2": Component(
        "text_encoder_2",
        CLIPTextConfig,
        CLIPTextModel,
        "model",
        _text_inputs,
        "text_model.",
        frozenset({"text_projection"}),
    ),
}
# The components of a Stable Diffusion (1.x, 2.x) InstructPix2Pix folder.
SD_COMPONENTS = ("unet", "vae", "text_encoder")
SDXL_COMPONENTS = (*SD_COMPONENTS, "text_encoder_2")


def folder_components(folder: str | os.PathLike) -> tuple[str, ...]:
    """The model components of a diffusers folder or our checkpoint: SDXL's (a second text
    encoder, as diffusers' SDXL pipelines save it) when it has text_encoder_2/, else SD's."""
    return SDXL_COMPONENTS if (Path(folder) / "text_encoder_2").is_dir() else SD_COMPONENTS


def param_dtype(dtype: str | np.dtype) -> np.dtype:
    """One of :data:`PARAM_DTYPES`, by name or dtype."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in PARAM_DTYPES:
        raise ValueError(f"unsupported param dtype {dtype!r}; choose from {sorted(PARAM_DTYPES)}")
    return PARAM_DTYPES[name]


def build_module(
    component: Component,
    config: Any,
    profile: BackendProfile | None = None,
    compute_dtype: str | None = None,
) -> nn.Module:
    """``component``'s module for ``config``, run as ``profile`` (default: the running
    backend's, runtime.profile) says: its attention kernel and convolution lowering, in
    ``compute_dtype`` (default: the profile's). None of it changes the params, and only the
    compute dtype changes the numbers beyond float rounding."""
    profile = profile or current_profile()
    return component.module_class(config, execution=profile.execution(compute_dtype))


@dataclasses.dataclass
class LoadedComponent:
    """A component's config (ours and the raw JSON, kept for export), module and params."""

    config: Any
    raw_config: dict[str, Any]
    module: nn.Module
    params: dict

    def use_profile(self, profile: BackendProfile, compute_dtype: str | None = None) -> None:
        """Runs the module as ``profile`` says (attention kernel, convolution lowering), in
        ``compute_dtype`` (default: the module's own); in place, the params stay."""
        dtype = compute_dtype or self.module.execution.dtype
        self.module = self.module.clone(execution=profile.execution(dtype))

    def use_attention(self, kernel: str) -> None:
        """Runs the module's attention with the kernel named ``kernel`` (in place)."""
        execution = self.module.execution.replace(attention=kernel)
        self.module = self.module.clone(execution=execution)


def abstract_params(component: Component, config: Any) -> dict:
    """The param tree's shapes and dtypes, traced without allocating any weights."""
    module = component.module_class(config)  # shapes only: the lowering does not matter
    inputs = component.example_inputs(config)
    return jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]


def abstract_component(
    name: str,
    raw: dict,
    profile: BackendProfile | None = None,
    *,
    compute_dtype: str | None = None,
    param_dtype: str = "float32",
) -> LoadedComponent:
    """Component ``name`` ("unet", "vae", "text_encoder") of the diffusers config ``raw`` with
    params as shapes only (``jax.ShapeDtypeStruct`` in ``param_dtype``): a model to lower, cost
    or plan memory for at full size without allocating it. Its module is run as
    `build_module` says."""
    component = COMPONENTS[name]
    config = component.config_class.from_dict(raw, source=f"{name} config")
    params = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, jnp.dtype(param_dtype)),
        abstract_params(component, config),
    )
    module = build_module(component, config, profile, compute_dtype)
    return LoadedComponent(config, raw, module, params)


def is_our_checkpoint(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is; a hub id (``org/name``) through huggingface_hub when online."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is a file; expected a model folder")
        return path
    text = str(name_or_path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
        except ImportError as err:
            raise FileNotFoundError(
                f"{text} is not a local folder; downloading it needs huggingface_hub"
            ) from err
        try:
            return Path(snapshot_download(text, allow_patterns=list(HUB_FILES)))
        except Exception as err:  # offline, unknown id, gated repo, ...
            raise FileNotFoundError(
                f"{text} is not a local folder, and downloading it from the hub failed: {err}"
            ) from err
    raise FileNotFoundError(f"model folder not found: {path}")


def load_component(
    folder: str | os.PathLike,
    name: str,
    *,
    in_channels: int | None = None,
    dtype: str | np.dtype | None = "float32",
    profile: BackendProfile | None = None,
    compute_dtype: str | None = None,
) -> LoadedComponent:
    """Loads one component from a diffusers folder or our checkpoint.

    ``dtype`` casts the params (``"float32"``, ``"bfloat16"``, ``"float16"``; None keeps
    the stored dtype). ``in_channels`` widens a UNet's conv_in (4 -> 8 for InstructPix2Pix):
    new channels zero, pretrained weights and bias kept. The module runs as ``profile``
    says (default: the running backend's, see :func:`build_module`), computing in
    ``compute_dtype`` (default: ``dtype``, the params'; the profile's when that is None).
    """
    if name not in COMPONENTS:
        raise ValueError(f"unknown component {name!r}; choose from {sorted(COMPONENTS)}")
    component = COMPONENTS[name]
    root = Path(folder)
    sub = root / name
    if not sub.is_dir():
        raise FileNotFoundError(
            f"{root} has no {name}/ folder (a model folder needs unet/, vae/, text_encoder/, "
            "tokenizer/)"
        )
    raw = load_json(sub / "config.json")
    config = component.config_class.from_dict(raw, source=str(sub / "config.json"))
    widen = name == "unet" and in_channels is not None and in_channels != config.in_channels
    if widen and in_channels < config.in_channels:
        raise ConversionError(
            f"{sub / 'config.json'}: in_channels is {config.in_channels}; "
            f"in_channels={in_channels} would narrow conv_in"
        )
    dtype = param_dtype(dtype) if dtype is not None else None
    expected = abstract_params(component, config)  # the stored weights' shapes
    if is_our_checkpoint(root):
        if not (sub / PARAMS_FILE).is_file():
            raise WeightsError(f"{sub / PARAMS_FILE} is missing ({root} is an ip2p-jax checkpoint)")
        params = _read_flax_params(sub / PARAMS_FILE, expected, dtype)
    else:
        files = find_weights(sub, component.weights_stem)
        params = state_dict_to_params(
            iter_weights(files), expected, source=str(files[0]), dtype=dtype
        )
    if widen:
        params = widen_conv_in(params, in_channels)
        config = dataclasses.replace(config, in_channels=in_channels)
        raw = {**raw, "in_channels": in_channels}
    compute_dtype = compute_dtype or (dtype.name if dtype is not None else None)
    module = build_module(component, config, profile, compute_dtype)
    return LoadedComponent(config, raw, module, params)


def init_component(
    name: str,
    raw_config: dict,
    seed: int,
    profile: BackendProfile | None = None,
    compute_dtype: str | None = None,
) -> LoadedComponent:
    """A component with random float32 weights (flax's default initialisers) from a config
    dict; its module runs as ``profile`` says (default: the running backend's), computing in
    ``compute_dtype`` (default: float32, the weights')."""
    component = COMPONENTS[name]
    config = component.config_class.from_dict(raw_config, source=f"model.{name}")
    module = build_module(component, config, profile, compute_dtype or "float32")
    inputs = component.example_inputs(config)
    params = jax.jit(module.init)(jax.random.key(seed), *inputs)["params"]
    return LoadedComponent(config, dict(raw_config), module, params)


def _read_flax_params(path: Path, expected: dict, dtype) -> dict:
    wanted = flatten_dict(expected)
    flat = {}
    for key, array in iter_safetensors(path):
        flat[tuple(key.split("/"))] = array.astype(dtype, copy=False) if dtype else array
    wrong = [
        f"{'/'.join(k)}: {flat[k].shape}, expected {v.shape}"
        for k, v in wanted.items()
        if k in flat and flat[k].shape != v.shape
    ]
    missing = sorted("/".join(k) for k in wanted.keys() - flat.keys())
    raise_mismatch(
        str(path), missing, sorted("/".join(k) for k in flat.keys() - wanted.keys()), wrong
    )
    return unflatten_dict(flat)


def _copy_side_folders(source: Path, target: Path) -> None:
    for folder in COPIED_FOLDERS:
        if (source / folder).is_dir():
            shutil.copytree(source / folder, target / folder)


def _model_index(source: Path, unet_in_channels: int, components: Sequence[str]) -> dict[str, Any]:
    """The source's model_index.json (if any) naming the classes diffusers loads the written
    components with; SDXL's pipeline classes when there is a text_encoder_2."""
    index = (
        load_json(source / "model_index.json") if (source / "model_index.json").is_file() else {}
    )
    sdxl = "text_encoder_2" in components
    if unet_in_channels == 8:
        index["_class_name"] = (
            "StableDiffusionXLInstructPix2PixPipeline"
            if sdxl
            else "StableDiffusionInstructPix2PixPipeline"
        )
    index.setdefault(
        "_class_name", "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    )
    index.update(
        unet=["diffusers", "UNet2DConditionModel"],
        vae=["diffusers", "AutoencoderKL"],
        text_encoder=["transformers", "CLIPTextModel"],
        tokenizer=["transformers", "CLIPTokenizer"],
    )
    if sdxl:
        index.update(
            text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
            tokenizer_2=["transformers", "CLIPTokenizer"],
        )
        index.setdefault("force_zeros_for_empty_prompt", True)
        return index
    for optional in ("safety_checker", "feature_extractor", "image_encoder"):
        index.setdefault(optional, [None, None])
    index.setdefault("requires_safety_checker", False)
    return index


def _write_component(folder: Path, name: str, raw_config: dict, params: dict) -> None:
    flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(params).items()}
    write_safetensors(folder / name / PARAMS_FILE, flat, {"format": "flax"})
    (folder / name / "config.json").write_text(json.dumps(raw_config, indent=2))


def _write_marker(folder: Path, source: str, components: Sequence[str]) -> None:
    marker = {
        "format": "ip2p-jax",
        "version": FORMAT_VERSION,
        "source": source,
        "components": list(components),
    }
    (folder / MARKER).write_text(json.dumps(marker, indent=2))


def convert_to_flax(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    in_channels: int | None = None,
    overwrite: bool = False,
    components: Sequence[str] | None = None,
    dtype: str = "float32",
) -> Path:
    """A diffusers folder (or hub id) -> our checkpoint in ``dtype``, written atomically;
    ``components`` default to the folder's (`folder_components`: SDXL's with its second text
    encoder and tokenizer_2).

    Components are converted one at a time, each streamed tensor by tensor, so peak memory
    is about one component's fp32 size.
    """
    source = resolve_model(source)
    destination = Path(destination)
    components = tuple(components or folder_components(source))
    unet_channels = None
    with atomic_folder(destination, overwrite) as staging:
        for name in components:
            loaded = load_component(source, name, in_channels=in_channels, dtype=dtype)
            _write_component(staging, name, loaded.raw_config, loaded.params)
            if name == "unet":
                unet_channels = loaded.config.in_channels
            del loaded
        _copy_side_folders(source, staging)
        index = _model_index(source, unet_channels or 4, components)
        (staging / "model_index.json").write_text(json.dumps(index, indent=2))
        _write_marker(staging, str(source), components)
    return destination


def write_checkpoint(
    destination: str | os.PathLike,
    components: Mapping[str, LoadedComponent],
    tokenizer: CLIPTokenizer,
    schedule: NoiseSchedule,
    *,
    tokenizer_2: CLIPTokenizer | None = None,
    overwrite: bool = True,
) -> Path:
    """Our checkpoint from components in memory (a trained model), written atomically, with
    the tokenizer's files (and SDXL's ``tokenizer_2`` beside a ``text_encoder_2``) and the
    noise schedule as an Euler-ancestral scheduler config."""
    destination = Path(destination)
    if ("text_encoder_2" in components) != (tokenizer_2 is not None):
        raise ValueError("a text_encoder_2 component and tokenizer_2 go together (SDXL's)")
    with atomic_folder(destination, overwrite) as staging:
        for name, component in components.items():
            _write_component(staging, name, component.raw_config, jax.device_get(component.params))
        shutil.copytree(tokenizer.folder or BUNDLED_DIR, staging / "tokenizer")
        if tokenizer_2 is not None:
            shutil.copytree(tokenizer_2.folder or BUNDLED_DIR, staging / "tokenizer_2")
        scheduler = {
            "_class_name": "EulerAncestralDiscreteScheduler",
            **dict(schedule.raw),
            "num_train_timesteps": schedule.num_train_timesteps,
            "beta_start": schedule.beta_start,
            "beta_end": schedule.beta_end,
            "beta_schedule": schedule.beta_schedule,
            "prediction_type": schedule.prediction_type,
        }
        (staging / "scheduler").mkdir()
        (staging / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(scheduler, indent=2)
        )
        unet_channels = components["unet"].config.in_channels if "unet" in components else 4
        index = _model_index(staging, unet_channels, list(components))
        index["scheduler"] = ["diffusers", scheduler["_class_name"]]
        (staging / "model_index.json").write_text(json.dumps(index, indent=2))
        _write_marker(staging, "trained with ip2p-jax", list(components))
    return destination


def export_diffusers(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    overwrite: bool = False,
    dtype: str | None = None,
) -> Path:
    """Our checkpoint -> a diffusers folder (safetensors, PyTorch layout), written atomically.

    ``dtype`` (``"float16"``, ...) casts the stored weights; None keeps them as they are.
    ``StableDiffusionInstructPix2PixPipeline.from_pretrained(destination)`` loads it (for an
    SDXL checkpoint, with text_encoder_2: ``StableDiffusionXLInstructPix2PixPipeline``).
    """
    source = resolve_model(source)
    destination = Path(destination)
    components = folder_components(source)
    unet_channels = 4
    with atomic_folder(destination, overwrite) as staging:
        for name in components:
            component = COMPONENTS[name]
            loaded = load_component(source, name, dtype=dtype)
            state = component.state_dict(loaded.params)
            weights = staging / name / f"{component.weights_stem}.safetensors"
            write_safetensors(weights, state, {"format": "pt"})
            (staging / name / "config.json").write_text(json.dumps(loaded.raw_config, indent=2))
            if name == "unet":
                unet_channels = loaded.config.in_channels
            del loaded, state
        _copy_side_folders(source, staging)
        index = _model_index(source, unet_channels, components)
        (staging / "model_index.json").write_text(json.dumps(index, indent=2))
    return destination


def flax_params(loaded: LoadedComponent) -> dict:
    """The params as jax arrays, ready for ``module.apply({"params": ...}, ...)``."""
    return jax.tree_util.tree_map(jnp.asarray, loaded.params)
