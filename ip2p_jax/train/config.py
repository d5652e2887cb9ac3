"""Training configs: frozen dataclasses, built by a Python file's `get_config()` and changed
field by field from the command line (`--config.optim.learning_rate=3e-4`)."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Where the weights start. `init_from` is a diffusers folder, hub id or our checkpoint
    (its UNet's conv_in is widened to `in_channels`); empty means random weights from the
    diffusers-style config dicts below (the shapes world's small models)."""

    init_from: str = ""
    vae_from: str = ""  # a separately trained VAE (e.g. `ip2p train-vae`), replacing init's
    in_channels: int = 8
    # Train the text encoder with the UNet (same optimizer, EMA and export). For a world with
    # no pretrained encoder: a frozen random one mixes words by position with weights no one
    # trained, so a new phrasing of a known edit looks new to the UNet.
    train_text_encoder: bool = False
    # Grow init_from's UNet first: cross-attention in its plain down and up blocks too, the
    # new blocks starting as the identity (train.grow). More text-to-pixel binding at the
    # latents' full resolution, where a small shape is a few latent pixels wide.
    add_cross_attention: bool = False
    unet: dict | None = None
    vae: dict | None = None
    text_encoder: dict | None = None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The edit-pair dataset and its augmentation (see ip2p_jax.data)."""

    path: str = "data/shapes"
    train_split: str = "train"
    validation_split: str = "validation"
    resolution: int = 256
    min_resize: int = 0  # 0: the resolution
    max_resize: int = 0
    flip_prob: float = 0.5
    workers: int = 2
    # Threads reading ahead in each loading process (data.InputConfig.read_threads): none for
    # local files, whose reads are quick; some (grain's default is 16) for remote storage.
    read_threads: int = 0
    # Encode the split once with the frozen VAE (into workdir/latents) and train on that:
    # no augmentation then, and about half the step time saved on small models.
    cache_latents: bool = False
    # Probability of leaving out each word of a training instruction (data.InputConfig);
    # for a text encoder trained from scratch (model.train_text_encoder).
    word_dropout: float = 0.0
    # Aspect-ratio buckets (data.buckets): batches of one size each from a fixed list of
    # about resolution**2 pixels, sides multiples of bucket_step (0: the model's factor, 64
    # for SD), aspect ratios up to bucket_max_ratio:1. The train step compiles once per
    # bucket trained on; a list longer than max_buckets is refused before anything runs.
    buckets: bool = False
    bucket_step: int = 0
    bucket_max_ratio: float = 4.0
    max_buckets: int = 32


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup, a constant or cosine rate after it, global-norm clipping."""

    learning_rate: float = 1e-4
    warmup_steps: int = 0
    # "constant"; "cosine" (to 0 at the last step); "wsd": constant, then linear to 0 over
    # the last `decay_steps` (warmup-stable-decay: a run can go on at the constant rate
    # and choose its end later, since changing `steps` moves only the decay)
    schedule: str = "constant"
    decay_steps: int = 0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-2
    grad_clip: float = 1.0  # 0 disables


@dataclasses.dataclass(frozen=True)
class DropoutConfig:
    """Conditioning dropout as the reference: r ~ U(0,1); r < text_only drops the text,
    the next `both` drops both, the next `image_only` drops the image latent."""

    text_only: float = 0.05
    both: float = 0.05
    image_only: float = 0.05


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (train.lora) in place of full fine-tuning: `rank` > 0 trains only
    them, on the frozen model, and checkpoints hold only them. Targets are PyTorch module
    names as PEFT's target_modules matches them (a name or its last parts), comma-separated:
    the default is the attention projections of diffusers' LoRA scripts; feed-forwards are
    "ff.net.0.proj,ff.net.2", ResNet convolutions "conv1,conv2"."""

    rank: int = 0  # 0: no LoRA, the trained weights are trained whole
    alpha: float = 0.0  # the update's scale is alpha / rank; 0: the rank (a scale of 1)
    targets: str = "to_q,to_k,to_v,to_out.0"  # UNet modules
    # Text encoder modules adapted too (e.g. "q_proj,k_proj,v_proj,out_proj"); "" none.
    text_encoder_targets: str = ""


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Overrides of the backend profile (ip2p_jax.runtime.profile, where each choice is
    explained); None keeps the running backend's choice. E.g.
    `--config.runtime.optimizer_update=fused` on a CPU."""

    compiler_options: dict | None = None  # XLA options, name -> value; {} for none
    conv_patches_max_rows: int | None = None  # 0: every convolution native
    tune_malloc: bool | None = None
    optimizer_update: str | None = None  # "leafwise" or "fused"
    unroll_grad_accum: bool | None = None
    attention_kernel: str | None = None  # models.attention.KERNELS: "blockwise", "cudnn", ...


# What the input image's latent is: the VAE posterior's mode, as the original's ddpm_edit.py
# and diffusers' train_instruct_pix2pix.py; or a draw from it, as train_instruct_pix2pix_sdxl.py.
IMAGE_CONDITIONS = ("mode", "sample")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    dropout: DropoutConfig = dataclasses.field(default_factory=DropoutConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    batch_size: int = 64  # global, per optimizer step: per-device x devices x grad_accum
    grad_accum: int = 1
    steps: int = 1000
    prediction_type: str = "epsilon"  # or "v_prediction"
    image_condition: str = "mode"  # IMAGE_CONDITIONS
    ema_decay: float = 0.9999  # 0 disables; warmed up as min(decay, (1+n)/(10+n))
    # "float32" or "bfloat16" (bf16 compute on fp32 master weights); None: the backend's
    # (float32 on a CPU, bfloat16 on GPUs and TPUs; runtime.profile).
    compute_dtype: str | None = None
    # Rematerialise each UNet ResNet block and transformer in the backward pass, saving what
    # this jax.checkpoint policy saves (models.unet.REMAT_POLICIES: "nothing_saveable",
    # "dots_saveable", ...); "" none. A run written when this was a bool reads True as
    # "nothing_saveable" and False as "".
    remat: str = ""
    fsdp: int = 1  # devices per FSDP group; the rest of the mesh is data parallel
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    validate_every: int = 0  # 0: no validation edits
    validation_steps: int = 20  # sampling steps of the validation edits
    validation_images: int = 4
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        if isinstance(self.remat, bool):  # config.json of a run from before the named policies
            object.__setattr__(self, "remat", "nothing_saveable" if self.remat else "")


class ConfigOverrideError(ValueError):
    """A command-line override naming a field that doesn't exist or a value of the wrong type."""


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Any:
    """Runs `get_config()` of the Python file at `path` (a TrainConfig, or another config
    dataclass such as VAETrainConfig), then applies `--config.a.b=value` overrides (values
    are Python literals; bare words are strings)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"_ip2p_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} has no get_config() function")
    config = module.get_config()
    for override in overrides:
        config = apply_override(config, override)
    return config


def apply_override(config: Any, override: str) -> Any:
    """`config.a.b=value` or `a.b=value` -> a new config with that field replaced."""
    text = override.removeprefix("--").removeprefix("config.")
    if "=" not in text:
        raise ConfigOverrideError(f"override {override!r} must look like --config.a.b=value")
    dotted, raw = text.split("=", 1)
    return _replace(config, dotted.split("."), raw, dotted)


def _replace(node: Any, names: list[str], raw: str, dotted: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(node)}
    name = names[0]
    if name not in fields:
        raise ConfigOverrideError(
            f"--config.{dotted}: {type(node).__name__} has no field {name!r}; "
            f"it has {sorted(fields)}"
        )
    current = getattr(node, name)
    if len(names) > 1:
        if dataclasses.is_dataclass(current):
            value = _replace(current, names[1:], raw, dotted)
        elif isinstance(current, dict) or current is None:
            value = _set_in_dict(current or {}, names[1:], _literal(raw))
        else:
            raise ConfigOverrideError(f"--config.{dotted}: {name} is not a section")
    else:
        value = _typed(_literal(raw), fields[name], type(node), dotted)
    return dataclasses.replace(node, **{name: value})


def _set_in_dict(mapping: dict, names: list[str], value: Any) -> dict:
    out = dict(mapping)
    out[names[0]] = _set_in_dict(out.get(names[0]) or {}, names[1:], value) if names[1:] else value
    return out


def _literal(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # a bare word: a string


def _typed(value: Any, field: dataclasses.Field, owner: type, dotted: str) -> Any:
    hint = typing.get_type_hints(owner)[field.name]
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for kind in allowed:
        if kind is type(None) and value is None:
            return None
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in (str, dict) and isinstance(value, kind):
            return value
    raise ConfigOverrideError(f"--config.{dotted}={value!r}: expected {hint}")
