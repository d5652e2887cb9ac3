"""The models a run trains and the frozen ones it conditions on, from a pretrained folder
(diffusers or ours, the UNet widened to 8 input channels) or freshly initialised from
diffusers-style config dicts (the shapes world's small models)."""

from __future__ import annotations

import dataclasses

import jax

from ip2p_jax.diffusion.schedules import SD_SCHEDULER_CONFIG, NoiseSchedule
from ip2p_jax.models.tokenizer import CLIPTokenizer
from ip2p_jax.runtime.memory import move_to_devices
from ip2p_jax.train.config import ModelConfig, TrainConfig
from ip2p_jax.train.grow import add_cross_attention
from ip2p_jax.train.lora import component_targets
from ip2p_jax.weights.model_folder import (
    LoadedComponent,
    init_component,
    load_component,
    resolve_model,
)


@dataclasses.dataclass
class ModelSet:
    """The UNet (trained), VAE (frozen), text encoder (frozen unless the config trains it),
    tokenizer and noise schedule; SDXL's second text encoder (frozen) and tokenizer."""

    unet: LoadedComponent
    vae: LoadedComponent
    text_encoder: LoadedComponent
    tokenizer: CLIPTokenizer
    schedule: NoiseSchedule
    text_encoder_2: LoadedComponent | None = None
    tokenizer_2: CLIPTokenizer | None = None


def trained_names(config: TrainConfig) -> tuple[str, ...]:
    """The components a run trains (whole, or their LoRA adapters when `config.lora.rank`
    is set), in the order of the train state's params."""
    if config.lora.rank:
        return tuple(component_targets(config.lora))
    return ("unet", "text_encoder") if config.model.train_text_encoder else ("unet",)


def load_models(config: ModelConfig, seed: int = 0) -> ModelSet:
    """Everything a run needs, as `config` says; see ModelConfig. An SDXL init_from (with
    text_encoder_2/) brings its second text encoder and tokenizer_2."""
    sdxl = {}
    if config.init_from:
        folder = resolve_model(config.init_from)
        unet = load_component(folder, "unet", in_channels=config.in_channels)
        vae = load_component(folder, "vae")
        text_encoder = load_component(folder, "text_encoder")
        tokenizer_dir = folder / "tokenizer"
        tokenizer = (
            CLIPTokenizer.from_folder(tokenizer_dir)
            if tokenizer_dir.is_dir()
            else CLIPTokenizer.bundled()
        )
        schedule = NoiseSchedule.from_folder(folder)
        if (folder / "text_encoder_2").is_dir():
            sdxl = {
                "text_encoder_2": load_component(folder, "text_encoder_2"),
                "tokenizer_2": CLIPTokenizer.from_folder(folder / "tokenizer_2"),
            }
        if config.add_cross_attention:
            unet = add_cross_attention(unet, seed)
    else:
        missing = [n for n in ("unet", "vae", "text_encoder") if getattr(config, n) is None]
        if missing and not (missing == ["vae"] and config.vae_from):
            raise ValueError(
                f"model.init_from is empty, so model.{missing} need config dicts "
                "(diffusers config.json fields) to initialise from"
            )
        if config.add_cross_attention:
            raise ValueError(
                "model.add_cross_attention grows model.init_from's trained UNet, and "
                "init_from is empty; for a fresh UNet, name CrossAttn blocks in model.unet"
            )
        unet = init_component("unet", {**config.unet, "in_channels": config.in_channels}, seed)
        vae = init_component("vae", config.vae, seed + 1) if config.vae else None
        text_encoder = init_component("text_encoder", config.text_encoder, seed + 2)
        tokenizer = CLIPTokenizer.bundled()
        schedule = NoiseSchedule.from_dict(SD_SCHEDULER_CONFIG, source="SD_SCHEDULER_CONFIG")
    if config.vae_from:
        vae = load_component(resolve_model(config.vae_from), "vae")
    return ModelSet(unet, vae, text_encoder, tokenizer, schedule, **sdxl)


def keep_shapes_only(component: LoadedComponent) -> None:
    """Replaces a trained component's weights by their shapes: once a train state holds the
    weights, the loaded copy is dead weight (3.4 GB of host memory for SD-1.5's UNet), and
    the shapes are all the trainer needs for its shardings."""
    component.params = jax.tree.map(
        lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), component.params
    )


def hand_over_weights(component: LoadedComponent, shardings: dict) -> dict:
    """Places a trained component's weights by ``shardings`` for a fresh train state and
    leaves the component their shapes (:func:`keep_shapes_only`); returns the placed tree.
    A component already handed over is refused: its weights live in that state now."""
    if any(isinstance(p, jax.ShapeDtypeStruct) for p in jax.tree.leaves(component.params)):
        raise RuntimeError(
            "these weights were handed over to a train state already (init_state was called "
            "before); restore that state's checkpoint or load the models again"
        )
    move_to_devices(component, shardings)
    placed = component.params
    keep_shapes_only(component)
    return placed
