"""EditPipeline: load a model once, then edit batches of images by instruction.

Text encoding, VAE encoding, the sampling loop (with two-condition guidance) and VAE decoding
are each one jitted function, compiled once per (resolution, batch size, sampler, steps).
Seeds, scales and instructions are data, so changing them never recompiles. The batch is
split over the 'data' axis of a device mesh; params are replicated.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from ip2p_jax import memory
from ip2p_jax.checkpoint import LoadedComponent, load_component, resolve_model
from ip2p_jax.compilation import enable_compilation_cache, jit
from ip2p_jax.guidance import guided_denoiser
from ip2p_jax.images import load_image, target_size, to_model_array, to_pil
from ip2p_jax.models.vae import AutoencoderKL
from ip2p_jax.samplers import Sampler, get_sampler, initial_noise, sample
from ip2p_jax.schedules import NoiseSchedule
from ip2p_jax.tokenizer import CLIPTokenizer

TRACES = {"sample": 0}  # how often the sampling loop was traced (= compiled); tests read it


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named 'data' over the given (default: all) devices."""
    devices = list(devices or jax.devices())
    return Mesh(np.array(devices), ("data",))


class _Progress:
    """A step counter fed from inside the jitted loop; silent when stderr is no terminal."""

    current: _Progress | None = None  # the run the jitted loop reports to

    def __init__(self, total: int, enabled: bool | None):
        self.total, self.done = total, 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def update(self, i) -> None:
        # Under a mesh the callback can fire once per device: report the furthest step.
        step = int(i) + 1
        if self.enabled and step > self.done:
            self.done = step
            end = "\n" if step == self.total else ""
            sys.stderr.write(f"\rsampling: step {step}/{self.total}{end}")
            sys.stderr.flush()


def _report_step(i) -> None:
    """The host callback compiled into the loop (a fixed function, so it never recompiles)."""
    if _Progress.current is not None:
        _Progress.current.update(i)


@jit(static_argnums=(0, 1, 2, 3, 4))
def _sample_latents(
    unet_module,
    sampler: Sampler,
    three_rows: bool,
    prediction_type: str,
    progress,
    unet_params,
    plan,
    text,
    null_text,
    image_latent,
    text_scale,
    image_scale,
    keys,
    init_noise,
    step_noise,
):
    TRACES["sample"] += 1
    denoise = guided_denoiser(
        lambda x, t, ctx: unet_module.apply({"params": unet_params}, x, t, ctx),
        text=text,
        null_text=null_text,
        image_latent=image_latent,
        text_scale=text_scale,
        image_scale=image_scale,
        three_rows=three_rows,
    )
    if init_noise is None:
        init_noise = initial_noise(keys, image_latent.shape[1:])
    return sample(
        sampler,
        denoise,
        plan,
        init_noise,
        prediction_type=prediction_type,
        keys=keys,
        noise=step_noise,
        on_step=_report_step if progress else None,
    )


@jit(static_argnums=0)
def _encode_text(module, params, ids):
    return module.apply({"params": params}, ids).last_hidden_state


@jit(static_argnums=0)
def _encode_image(module, params, pixels):
    return module.apply({"params": params}, pixels, method=AutoencoderKL.encode).mode()


@jit(static_argnums=0)
def _decode(module, params, latents):
    return module.apply({"params": params}, latents, method=AutoencoderKL.decode)


class LatentPipeline:
    """What every latent-diffusion pipeline here shares: the components, placed on a device
    mesh (params replicated, the batch split over 'data'), loading from a folder, the text
    encoder program, and running a batch of images group by group of equal shapes.
    Subclasses check the UNet (``check_components``) and add their sampling."""

    def __init__(
        self,
        unet: LoadedComponent,
        vae: LoadedComponent,
        text_encoder: LoadedComponent,
        tokenizer: CLIPTokenizer,
        schedule: NoiseSchedule,
        mesh: Mesh | None = None,
    ):
        self.check_components(unet, vae)
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.schedule = tokenizer, schedule
        self.mesh = mesh or data_mesh()
        replicated = NamedSharding(self.mesh, P())
        for component in (unet, vae, text_encoder):
            memory.move_to_devices(component, replicated)

    @staticmethod
    def check_components(unet: LoadedComponent, vae: LoadedComponent) -> None:
        """Raises ValueError when the UNet does not fit the pipeline (subclasses)."""

    @classmethod
    def model_folder(cls, model: str | os.PathLike) -> Path:
        """The model's folder, once it has every component's subfolder."""
        folder = resolve_model(model)
        missing = [
            c for c in ("unet", "vae", "text_encoder", "tokenizer") if not (folder / c).is_dir()
        ]
        if missing:
            raise FileNotFoundError(f"{folder} lacks {', '.join(m + '/' for m in missing)}")
        return folder

    @classmethod
    def from_pretrained(
        cls, model: str | os.PathLike, *, dtype: str = "float32", mesh: Mesh | None = None
    ):
        """Loads a diffusers folder, a hub id (when online) or an ip2p-jax checkpoint."""
        folder = cls.model_folder(model)
        enable_compilation_cache()
        memory.release_large_blocks()  # until the first edit has compiled (see memory.py)
        return cls(
            load_component(folder, "unet", dtype=dtype),
            load_component(folder, "vae", dtype=dtype),
            load_component(folder, "text_encoder", dtype=dtype),
            CLIPTokenizer.from_folder(folder / "tokenizer"),
            NoiseSchedule.from_folder(folder),
            mesh,
        )

    def encode_prompts(self, prompts: Sequence[str]) -> jax.Array:
        """CLIP last hidden states [N, 77, D]; overlong prompts are truncated with a warning."""
        ids = self.tokenizer(list(prompts))
        return _encode_text(self.text_encoder.module, self.text_encoder.params, jnp.asarray(ids))

    def _shard(self, *arrays):
        spec = NamedSharding(self.mesh, P("data"))
        return [None if a is None else jax.device_put(a, spec) for a in arrays]

    def _padding(self, batch: int) -> int:
        """Rows to add so the mesh splits the batch evenly (dropped after decoding)."""
        return -batch % self.mesh.devices.size

    def _encode_prompt_pairs(
        self, prompts: list[str], negatives: list[str], padded: int
    ) -> tuple[jax.Array, jax.Array]:
        """Text states of the prompts and of their null (negative) prompts, each padded by
        repeating the last row: one text-encoder call for both."""
        states = self.encode_prompts(
            prompts + prompts[-1:] * padded + negatives + negatives[-1:] * padded
        )
        texts, nulls = jnp.split(states, 2)
        return texts, nulls

    def _sample(
        self,
        sampler: Sampler,
        plan: dict,
        steps: int,
        *,
        three_rows: bool,
        progress: bool | None,
        text: jax.Array,
        null_text: jax.Array,
        image_latent: jax.Array,
        text_scale: jax.Array,
        image_scale: jax.Array,
        keys: jax.Array,
        init_noise: jax.Array | None,
        step_noise: np.ndarray | None,
    ) -> jax.Array:
        """The jitted sampling loop (`_sample_latents`) on padded, sharded inputs,
        reporting its `steps` steps."""
        reporter = _Progress(steps, progress)
        _Progress.current = reporter
        return _sample_latents(
            self.unet.module,
            sampler,
            three_rows,
            self.schedule.prediction_type,
            reporter.enabled,
            self.unet.params,
            {k: jnp.asarray(v) for k, v in plan.items()},
            text,
            null_text,
            image_latent,
            text_scale,
            image_scale,
            keys,
            init_noise,
            None if step_noise is None else jnp.asarray(step_noise),
        )

    def _decode_latents(self, latents: jax.Array, batch: int) -> np.ndarray:
        """Sampled latents -> the first `batch` images [B, H, W, 3] in about [-1, 1]."""
        scaled = latents / self.vae.config.scaling_factor
        images = np.asarray(_decode(self.vae.module, self.vae.params, scaled))[:batch]
        memory.keep_blocks_for_reuse()
        return images

    @staticmethod
    def _run_by_shape(
        images: Sequence[Image.Image | str | os.PathLike],
        resolution: int,
        multiple_of: int,
        run_group: Callable[[np.ndarray, list[int]], np.ndarray],
        keep_size: bool,
    ) -> list[Image.Image]:
        """Loads the images, resizes each (long side ``resolution``, sides multiples of
        ``multiple_of``) and calls ``run_group(pixels in [-1, 1], indices)`` once per shape,
        in first-seen order; returns PIL images in the input order."""
        loaded = [load_image(image) for image in images]
        sizes = [target_size(*im.size, resolution, multiple_of) for im in loaded]
        results: list[Image.Image | None] = [None] * len(loaded)
        for size in dict.fromkeys(sizes):
            group = [k for k in range(len(loaded)) if sizes[k] == size]
            pixels = np.stack([to_model_array(loaded[k], size) for k in group])
            for k, array in zip(group, run_group(pixels, group), strict=True):
                results[k] = to_pil(array, loaded[k].size if keep_size else None)
        return results  # type: ignore[return-value]


class EditPipeline(LatentPipeline):
    """InstructPix2Pix editing with the Flax UNet, VAE and CLIP text encoder."""

    @staticmethod
    def check_components(unet: LoadedComponent, vae: LoadedComponent) -> None:
        latent = vae.config.latent_channels
        if unet.config.in_channels != 2 * latent:
            raise ValueError(
                f"the UNet takes {unet.config.in_channels} input channels; InstructPix2Pix "
                f"needs {2 * latent} (noisy + image latent). Convert an SD model with "
                "`ip2p convert --in-channels 8` and fine-tune it first"
            )

    # -- the pieces -------------------------------------------------------------------------

    def edit_arrays(
        self,
        pixels: np.ndarray,
        instructions: Sequence[str],
        *,
        steps: int = 100,
        text_scale: float | Sequence[float] = 7.5,
        image_scale: float | Sequence[float] = 1.5,
        seeds: Sequence[int] | None = None,
        sampler: str | Sampler = "euler_ancestral",
        negative_prompt: str | Sequence[str] = "",
        init_noise: np.ndarray | None = None,
        step_noise: np.ndarray | None = None,
        progress: bool | None = None,
    ) -> np.ndarray:
        """[B, H, W, 3] in [-1, 1] -> edited [B, H, W, 3] in about [-1, 1].

        ``init_noise`` [B, h, w, 4] and ``step_noise`` [steps, B, h, w, 4] replace the draws
        from the seeds (parity tests against diffusers' generator).
        """
        batch = pixels.shape[0]
        instructions = list(instructions)
        negatives = per_example(negative_prompt, batch, "negative_prompt")
        s_t = np.asarray(per_example(text_scale, batch, "text_scale"), np.float32)
        s_i = np.asarray(per_example(image_scale, batch, "image_scale"), np.float32)
        seeds = list(range(batch)) if seeds is None else list(seeds)
        if len(instructions) != batch or len(seeds) != batch:
            raise ValueError(
                f"{batch} images need {batch} instructions and seeds, got "
                f"{len(instructions)} and {len(seeds)}"
            )
        if isinstance(sampler, str):
            sampler = get_sampler(sampler)
        plan = sampler.plan(self.schedule, steps)

        padded = self._padding(batch)
        texts, nulls = self._encode_prompt_pairs(instructions, negatives, padded)
        keys = jax.vmap(jax.random.key)(jnp.asarray(seeds + seeds[-1:] * padded, jnp.uint32))
        pixels_d, s_t_d, s_i_d, init_d = self._shard(
            *(pad_batch(a, padded) for a in (pixels, s_t, s_i, init_noise))
        )
        texts, nulls, keys = self._shard(texts, nulls, keys)
        image_latent = _encode_image(self.vae.module, self.vae.params, pixels_d)
        latents = self._sample(
            sampler,
            plan,
            steps,
            three_rows=bool((s_i != 1.0).any()),
            progress=progress,
            text=texts,
            null_text=nulls,
            image_latent=image_latent,
            text_scale=s_t_d,
            image_scale=s_i_d,
            keys=keys,
            init_noise=init_d,
            step_noise=pad_batch(step_noise, padded, axis=1),
        )
        return self._decode_latents(latents, batch)

    # -- the user's entry point ------------------------------------------------------------

    def edit(
        self,
        images: Image.Image | str | os.PathLike | Sequence[Image.Image | str | os.PathLike],
        instructions: str | Sequence[str],
        *,
        steps: int = 100,
        text_scale: float | Sequence[float] = 7.5,
        image_scale: float | Sequence[float] = 1.5,
        seed: int | Sequence[int] = 0,
        sampler: str = "euler_ancestral",
        negative_prompt: str | Sequence[str] = "",
        resolution: int = 512,
        multiple_of: int = 8,
        keep_size: bool = True,
        progress: bool | None = None,
    ) -> list[Image.Image]:
        """Edits images by instruction; returns PIL images (at the inputs' sizes by default).

        Each image is resized so its long side is ``resolution`` and both sides are multiples
        of ``multiple_of``. A batch may mix instructions, scales and seeds; an int ``seed``
        gives image k the seed ``seed + k``. Images of different shapes run in groups.
        """
        single = isinstance(images, (str, os.PathLike, Image.Image))
        images = [images] if single else list(images)
        batch = len(images)
        instructions = per_example(instructions, batch, "instructions")
        for k, text in enumerate(instructions):
            if not text or not text.strip():
                raise ValueError(f"instruction {k} is empty; say what to change")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        sampler_obj = get_sampler(sampler)  # unknown names fail here, before any compile
        seeds = [seed + k for k in range(batch)] if isinstance(seed, int) else list(seed)
        options = {
            "text_scale": per_example(text_scale, batch, "text_scale"),
            "image_scale": per_example(image_scale, batch, "image_scale"),
            "negative_prompt": per_example(negative_prompt, batch, "negative_prompt"),
        }
        if len(seeds) != batch:
            raise ValueError(f"{batch} images need {batch} seeds, got {len(seeds)}")

        def run_group(pixels: np.ndarray, group: list[int]) -> np.ndarray:
            pick = lambda values: [values[k] for k in group]
            return self.edit_arrays(
                pixels,
                pick(instructions),
                steps=steps,
                seeds=pick(seeds),
                sampler=sampler_obj,
                progress=progress,
                **{name: pick(v) for name, v in options.items()},
            )

        return self._run_by_shape(images, resolution, multiple_of, run_group, keep_size)


def pad_batch(array: np.ndarray | None, padded: int, axis: int = 0) -> np.ndarray | None:
    """`array` with its last row along `axis` repeated `padded` times (None stays None)."""
    if array is None or not padded:
        return array
    last = np.take(array, [-1], axis=axis)
    return np.concatenate([array, np.repeat(last, padded, axis)], axis)


def per_example(value, batch: int, name: str) -> list:
    """A scalar repeated ``batch`` times, or a sequence that must have ``batch`` entries."""
    if isinstance(value, (str, int, float)):
        return [value] * batch
    values = list(value)
    if len(values) != batch:
        raise ValueError(f"{name} has {len(values)} entries for {batch} images")
    return values
