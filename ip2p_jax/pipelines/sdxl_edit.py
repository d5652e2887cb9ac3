"""SDXLEditPipeline: InstructPix2Pix on SDXL, as diffusers' StableDiffusionXLInstructPix2Pix-
Pipeline. What differs from SD-1.x editing (EditPipeline):

- two text encoders: their penultimate hidden states joined along the features are the
  UNet's text states, and the second's projected pooled output is its ``text_embeds``;
- the time ids ``(original height, width, crop top, left, target height, width)``: by
  default the edited size with no crop, as diffusers' for an image of that size; set them
  with ``original_size``, ``crops_coords_top_left`` and ``target_size``;
- with no negative prompt the null text is zeros (states and pooled), as diffusers'
  ``force_zeros_for_empty_prompt`` (the folder's model_index.json says; true for SDXL);
- CosXL Edit (``cosxl_edit=True``, diffusers' ``is_cosxl_edit``, which model_index.json does
  not record): the image condition scaled by the VAE's factor, and the folder's
  EDMEulerScheduler sampled by ``edm_euler`` (v-prediction with EDM preconditioning).

The guidance rows are diffusers': (text, image), (null, image), (null, zero image).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ip2p_jax.diffusion.schedules import NoiseSchedule
from ip2p_jax.models.clip_text import sdxl_text_conditioning
from ip2p_jax.models.config import load_json
from ip2p_jax.models.tokenizer import CLIPTokenizer
from ip2p_jax.pipelines.base import pad_texts
from ip2p_jax.pipelines.edit import EditPipeline
from ip2p_jax.runtime.compilation import jit
from ip2p_jax.weights.model_folder import LoadedComponent

# diffusers' names for SDXL's size conditioning (the UNet's time ids).
SIZE_CONDITIONING = ("original_size", "crops_coords_top_left", "target_size")


@jit(static_argnums=(0, 1))
def _encode_two(module, module_2, params, params_2, ids, ids_2):
    """(text states [N, 77, D1 + D2], pooled text [N, P]) as SDXL's pipeline encodes."""
    first = module.apply({"params": params}, ids, output_hidden_states=True)
    second = module_2.apply({"params": params_2}, ids_2, output_hidden_states=True)
    return sdxl_text_conditioning(first, second)


class SDXLEditPipeline(EditPipeline):
    """InstructPix2Pix editing with an SDXL UNet (addition_embed_type "text_time") and its
    two text encoders; loads folders saved by StableDiffusionXLInstructPix2PixPipeline."""

    COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
    SIDE_FOLDERS = ("tokenizer", "tokenizer_2")

    def __init__(
        self,
        unet: LoadedComponent,
        vae: LoadedComponent,
        text_encoder: LoadedComponent,
        text_encoder_2: LoadedComponent,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        schedule: NoiseSchedule,
        mesh: Mesh | None = None,
        *,
        force_zeros_for_empty_prompt: bool = True,
    ):
        super().__init__(unet, vae, text_encoder, tokenizer, schedule, mesh)
        if text_encoder_2.config.projection_dim is None:
            raise ValueError(
                "text_encoder_2 must be a CLIPTextModelWithProjection (its pooled output "
                "projected is the UNet's text_embeds)"
            )
        replicated = NamedSharding(self.mesh, P())
        self.text_encoder_2 = dataclasses.replace(
            text_encoder_2, params=jax.device_put(text_encoder_2.params, replicated)
        )
        self.tokenizer_2 = tokenizer_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    @classmethod
    def from_pretrained(cls, model, *, cosxl_edit: bool = False, **options) -> SDXLEditPipeline:
        """`LatentPipeline.from_pretrained`; ``cosxl_edit`` for Stability's CosXL Edit (an
        EDMEulerScheduler folder), whose image condition is scaled by the VAE's factor."""
        pipe = super().from_pretrained(model, **options)
        if cosxl_edit:
            if not pipe.schedule.is_edm:
                raise ValueError(
                    f"cosxl_edit: {model} has a {pipe.schedule.scheduler_class or 'beta'} "
                    "scheduler; CosXL Edit models have an EDMEulerScheduler"
                )
            pipe.image_latent_scale = pipe.vae.config.scaling_factor
        return pipe

    @staticmethod
    def check_components(unet: LoadedComponent, vae: LoadedComponent) -> None:
        EditPipeline.check_components(unet, vae)
        if unet.config.addition_embed_type != "text_time":
            raise ValueError(
                "SDXL editing needs a UNet with addition_embed_type 'text_time' (time ids and "
                f"pooled text); this one has {unet.config.addition_embed_type!r}"
            )

    @classmethod
    def assemble(cls, folder: Path, components: dict[str, LoadedComponent], mesh: Mesh):
        index = folder / "model_index.json"
        force_zeros = load_json(index).get("force_zeros_for_empty_prompt", True)
        return cls(
            *(components[name] for name in cls.COMPONENTS),
            CLIPTokenizer.from_folder(folder / "tokenizer"),
            CLIPTokenizer.from_folder(folder / "tokenizer_2"),
            NoiseSchedule.from_folder(folder),
            mesh,
            force_zeros_for_empty_prompt=bool(force_zeros),
        )

    def use_attention(self, kernel: str) -> None:
        super().use_attention(kernel)
        self.text_encoder_2.use_attention(kernel)

    def encode_prompts(self, prompts) -> tuple[jax.Array, jax.Array]:
        """(text states [N, 77, D1 + D2], pooled text [N, P]) of the prompts; overlong ones
        are truncated with a warning."""
        prompts = list(prompts)
        return _encode_two(
            self.text_encoder.module,
            self.text_encoder_2.module,
            self.text_encoder.params,
            self.text_encoder_2.params,
            jnp.asarray(self.tokenizer(prompts)),
            jnp.asarray(self.tokenizer_2(prompts)),
        )

    def check_added_conditioning(self, options: dict) -> None:
        """SDXL's size conditioning, as diffusers' pipeline takes it: ``original_size`` and
        ``target_size`` (height, width; default the edited size) and ``crops_coords_top_left``
        (top, left; default (0, 0))."""
        if unknown := sorted(set(options) - set(SIZE_CONDITIONING)):
            raise TypeError(
                f"SDXLEditPipeline takes no {', '.join(unknown)}; its size conditioning is "
                f"{', '.join(SIZE_CONDITIONING)}"
            )
        for name, value in options.items():
            pair = value is None or (
                isinstance(value, tuple | list)
                and len(value) == 2
                and all(isinstance(v, int | np.integer) for v in value)
            )
            if not pair or (value is not None and min(value) < 0):
                raise ValueError(f"{name} must be two non-negative ints, got {value!r}")

    def _encode_prompt_pairs(
        self,
        prompts,
        negatives,
        padded,
        size=None,
        *,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
    ):
        """The UNet's conditioning of the prompts and of their nulls, a dict each
        (encoder_hidden_states, text_embeds, time_ids), padded by repeating the last row.
        The time ids: original size, crop top-left, target size (see
        `check_added_conditioning`)."""
        if size is None:
            raise ValueError("SDXL's time ids need the edited size")
        ids = [*(original_size or size), *(crops_coords_top_left or (0, 0)), *(target_size or size)]
        rows = len(prompts) + padded
        zero_nulls = negatives is None and self.force_zeros_for_empty_prompt
        if zero_nulls:
            states, pooled = self.encode_prompts(pad_texts(prompts, padded))
            null_states, null_pooled = jnp.zeros_like(states), jnp.zeros_like(pooled)
        else:
            encoded, null_encoded = super()._encode_prompt_pairs(prompts, negatives, padded)
            (states, pooled), (null_states, null_pooled) = encoded, null_encoded
        time_ids = jnp.tile(jnp.asarray([ids], jnp.float32), (rows, 1))
        text = {"encoder_hidden_states": states, "text_embeds": pooled, "time_ids": time_ids}
        null = {
            "encoder_hidden_states": null_states,
            "text_embeds": null_pooled,
            "time_ids": time_ids,
        }
        return text, null
