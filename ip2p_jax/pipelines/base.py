"""LatentPipeline: what every latent-diffusion pipeline here shares (EditPipeline, SDEdit).

Text encoding, VAE encoding, the sampling loop (with two-condition guidance) and VAE decoding
are each one jitted function, compiled once per (resolution, batch size, sampler, steps).
Seeds, scales and instructions are data, so changing them never recompiles. The batch is
split over the 'data' axis of a device mesh; params are replicated.
"""

from __future__ import annotations

import dataclasses
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

from ip2p_jax.diffusion.guidance import guided_denoiser
from ip2p_jax.diffusion.samplers import Sampler, initial_noise, sample
from ip2p_jax.diffusion.schedules import NoiseSchedule
from ip2p_jax.models.tokenizer import CLIPTokenizer
from ip2p_jax.models.vae import AutoencoderKL
from ip2p_jax.pipelines.images import load_image, target_size, to_model_array, to_pil
from ip2p_jax.runtime import memory
from ip2p_jax.runtime.compilation import enable_compilation_cache, jit
from ip2p_jax.runtime.mesh import data_mesh
from ip2p_jax.runtime.profile import current_profile
from ip2p_jax.weights.lora import LoraError, merge_lora, read_lora
from ip2p_jax.weights.model_folder import LoadedComponent, load_component, resolve_model


class StepProgress:
    """The sampling loop's step counter, fed by a host callback from inside the jitted loop.

    Each pipeline owns one and restarts it for every run; the jitted loop is handed the
    pipeline's counter as a static argument, so a run reports to its own pipeline and nothing
    recompiles between runs."""

    def __init__(self) -> None:
        self.total = self.done = 0

    def start(self, total: int) -> None:
        self.total, self.done = total, 0

    def __call__(self, i) -> None:
        # Under a mesh the callback can fire once per device: report the furthest step.
        step = int(i) + 1
        if step > self.done:
            self.done = step
            end = "\n" if step == self.total else ""
            sys.stderr.write(f"\rsampling: step {step}/{self.total}{end}")
            sys.stderr.flush()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GuidedBatch:
    """What one sampling run is conditioned on, a row per example (padded, sharded over
    'data'): the text states and their null (negative) text (for SDXL, dicts of the UNet's
    encoder_hidden_states, text_embeds and time_ids), the image latent (zero channels for
    text-only guidance), the two guidance scales and the per-example keys.
    ``init_noise`` [B, h, w, 4] and ``step_noise`` [steps, B, h, w, 4] replace the draws from
    the keys (parity tests against diffusers' generator)."""

    text: jax.Array | dict
    null_text: jax.Array | dict
    image_latent: jax.Array
    text_scale: jax.Array
    image_scale: jax.Array
    keys: jax.Array
    init_noise: jax.Array | None = None
    step_noise: jax.Array | None = None
    guidance_rescale: jax.Array | None = None  # [B], SDXL's (None: off, a smaller program)


def sample_latents(
    unet_module,
    sampler: Sampler,
    three_rows: bool,
    prediction_type: str,
    on_step: StepProgress | None,
    unet_params,
    plan,
    batch: GuidedBatch,
    *,
    end: int | None = None,
):
    """The sampling program: the guided sampling loop from the batch's initial noise to clean
    latents (float32), or to the plan's step ``end`` (``denoising_end``). The first five
    arguments and ``end`` are static (jitted as ``_sample_latents``; scripts/check_lowering.py
    lowers it for other platforms)."""

    def unet(x, t, context):
        if isinstance(context, dict):  # SDXL: the text states and the added conditioning
            return unet_module.apply({"params": unet_params}, x, t, **context)
        return unet_module.apply({"params": unet_params}, x, t, context)

    denoise = guided_denoiser(
        unet,
        text=batch.text,
        null_text=batch.null_text,
        image_latent=batch.image_latent,
        text_scale=batch.text_scale,
        image_scale=batch.image_scale,
        three_rows=three_rows,
        guidance_rescale=batch.guidance_rescale,
    )
    init_noise = batch.init_noise
    if init_noise is None:
        init_noise = initial_noise(batch.keys, batch.image_latent.shape[1:])
    return sample(
        sampler,
        denoise,
        plan,
        init_noise,
        prediction_type=prediction_type,
        keys=batch.keys,
        noise=batch.step_noise,
        on_step=on_step,
        end=end,
    )


_sample_latents = jit(sample_latents, static_argnums=(0, 1, 2, 3, 4), static_argnames="end")


@jit(static_argnums=0)
def _encode_text(module, params, ids):
    return module.apply({"params": params}, ids).last_hidden_state


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
        self.mesh = mesh or data_mesh()
        # Copies placed on the mesh: the components handed in keep their own params (arrays
        # already placed this way, as from_pretrained's, are not copied again).
        replicated = NamedSharding(self.mesh, P())
        self.unet, self.vae, self.text_encoder = (
            dataclasses.replace(c, params=jax.device_put(c.params, replicated))
            for c in (unet, vae, text_encoder)
        )
        self.tokenizer, self.schedule = tokenizer, schedule
        self._progress = StepProgress()
        self._before_lora: dict[str, dict] = {}  # each component's params before load_lora

    @staticmethod
    def check_components(unet: LoadedComponent, vae: LoadedComponent) -> None:
        """Raises ValueError when the UNet does not fit the pipeline (subclasses)."""

    # The model components a folder of this pipeline has (loaded by from_pretrained), and
    # the other subfolders it needs.
    COMPONENTS: tuple[str, ...] = ("unet", "vae", "text_encoder")
    SIDE_FOLDERS: tuple[str, ...] = ("tokenizer",)

    @classmethod
    def model_folder(cls, model: str | os.PathLike) -> Path:
        """The model's folder, once it has every component's subfolder."""
        folder = resolve_model(model)
        needed = cls.COMPONENTS + cls.SIDE_FOLDERS
        missing = [c for c in needed if not (folder / c).is_dir()]
        if missing:
            raise FileNotFoundError(f"{folder} lacks {', '.join(m + '/' for m in missing)}")
        return folder

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        *,
        dtype: str | None = None,
        vae_dtype: str = "float32",
        attention: str | None = None,
        mesh: Mesh | None = None,
    ):
        """Loads a diffusers folder, a hub id (when online) or an ip2p-jax checkpoint.

        ``dtype``: the UNet's and text encoder's params and compute dtype ("float32",
        "bfloat16", "float16"; default: the backend's, float32 on a CPU and bfloat16 on GPUs
        and TPUs). Normalisation statistics, softmax, the timestep features and the sampler
        state (latents, sigmas, the guidance combination) stay float32 whatever it is.
        ``vae_dtype``: the VAE's (float32 by default: SDXL-class VAEs overflow in float16).
        ``attention``: the attention kernel (models.attention.KERNELS; default: the
        backend's, runtime.profile).
        """
        folder = cls.model_folder(model)
        enable_compilation_cache()
        profile = current_profile(attention_kernel=attention)
        dtype = dtype or profile.compute_dtype
        if profile.tune_malloc:  # until the first edit has compiled (see memory.py)
            memory.release_large_blocks()
        mesh = mesh or data_mesh()
        dtypes = {name: vae_dtype if name == "vae" else dtype for name in cls.COMPONENTS}
        components = {
            name: load_component(
                folder, name, dtype=dtypes[name], profile=profile, compute_dtype=dtypes[name]
            )
            for name in dtypes
        }
        for component in components.values():  # ours: each host array freed once placed
            memory.move_to_devices(component, NamedSharding(mesh, P()))
        return cls.assemble(folder, components, mesh)

    @classmethod
    def assemble(cls, folder: Path, components: dict[str, LoadedComponent], mesh: Mesh):
        """The pipeline from its loaded components and the folder's other parts."""
        return cls(
            components["unet"],
            components["vae"],
            components["text_encoder"],
            CLIPTokenizer.from_folder(folder / "tokenizer"),
            NoiseSchedule.from_folder(folder),
            mesh,
        )

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0) -> None:
        """Merges the LoRA file at ``path`` into the weights, each adapter's update times
        ``scale``, as diffusers' ``load_lora_weights`` then ``fuse_lora(lora_scale=scale)``
        do. The layouts diffusers reads for SD-1.x are read (its own, PEFT's, kohya's; see
        weights.lora). Every adapter is checked against the model before any weight changes;
        a second call merges another LoRA on top, and :meth:`unload_lora` gives back the
        weights from before the first. The programs do not recompile."""
        adapters = read_lora(path)
        merged = {}
        for name in dict.fromkeys(adapter.component for adapter in adapters):
            component = getattr(self, name, None)
            if component is None:
                raise LoraError(f"{path} adapts {name}, which this pipeline does not have")
            own = [adapter for adapter in adapters if adapter.component == name]
            merged[name] = merge_lora(component.params, own, scale, source=str(path))
        for name, params in merged.items():
            component = getattr(self, name)
            self._before_lora.setdefault(name, component.params)
            setattr(self, name, dataclasses.replace(component, params=params))

    def unload_lora(self) -> None:
        """The weights from before the first :meth:`load_lora` (no-op without one)."""
        for name, params in self._before_lora.items():
            setattr(self, name, dataclasses.replace(getattr(self, name), params=params))
        self._before_lora = {}

    def use_attention(self, kernel: str) -> None:
        """Runs every model's attention with the kernel named ``kernel``
        (models.attention.KERNELS) from the next call on: the programs retrace for it."""
        for component in (self.unet, self.vae, self.text_encoder):
            component.use_attention(kernel)

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

    def check_added_conditioning(self, options: dict) -> None:
        """Refuses conditioning options the model does not take (SDXL's pipeline takes its
        size conditioning: original_size, crops_coords_top_left, target_size)."""
        if options:
            raise TypeError(
                f"{type(self).__name__} takes no {', '.join(sorted(options))}: the size "
                "conditioning is SDXL's (a folder with text_encoder_2/)"
            )

    def _encode_prompt_pairs(
        self,
        prompts: list[str],
        negatives: list[str] | None,
        padded: int,
        size: tuple[int, int] | None = None,
    ):
        """What ``encode_prompts`` gives for the prompts and for their null (negative)
        prompts, "" where ``negatives`` is None, each padded by repeating the last row: one
        text-encoder call for both. ``size`` is the (height, width) edited (SDXL's time ids
        take it)."""
        negatives = [""] * len(prompts) if negatives is None else negatives
        encoded = self.encode_prompts(pad_texts(prompts, padded) + pad_texts(negatives, padded))
        rows = len(prompts) + padded
        return jax.tree.map(lambda a: a[:rows], encoded), jax.tree.map(lambda a: a[rows:], encoded)

    def _sample(
        self,
        sampler: Sampler,
        plan: dict,
        steps: int,
        batch: GuidedBatch,
        *,
        three_rows: bool,
        progress: bool | None,
        end: int | None = None,
    ) -> jax.Array:
        """The jitted sampling loop (`_sample_latents`) on a padded, sharded batch, reporting
        its `steps` steps (or the first `end` of them) when `progress` (default: when stderr
        is a terminal)."""
        if sys.stderr.isatty() if progress is None else progress:
            self._progress.start(steps if end is None else end)
            on_step = self._progress
        else:
            on_step = None
        return _sample_latents(
            self.unet.module,
            sampler,
            three_rows,
            self.schedule.prediction_type,
            on_step,
            self.unet.params,
            {k: jnp.asarray(v) for k, v in plan.items()},
            batch,
            end=end,
        )

    def _decode_latents(self, latents: jax.Array, batch: int) -> np.ndarray:
        """Sampled latents -> the first `batch` images [B, H, W, 3] in about [-1, 1]."""
        scaled = latents / self.vae.config.scaling_factor
        images = np.asarray(_decode(self.vae.module, self.vae.params, scaled))[:batch]
        if current_profile().tune_malloc:
            memory.keep_blocks_for_reuse()
        return images

    def _edit_by_shape(
        self,
        images: Sequence[Image.Image | str | os.PathLike],
        per_image: dict[str, list],
        shared: dict,
        resolution: int,
        multiple_of: int,
        keep_size: bool,
    ) -> list[Image.Image]:
        """``edit_arrays`` once per group of equal shapes: each group gets its own entries of
        the ``per_image`` arguments and all of the ``shared`` ones."""

        def run_group(pixels: np.ndarray, group: list[int]) -> np.ndarray:
            picked = {name: [values[k] for k in group] for name, values in per_image.items()}
            return self.edit_arrays(pixels, **picked, **shared)

        return self._run_by_shape(images, resolution, multiple_of, run_group, keep_size)

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


def pad_batch(array: np.ndarray | None, padded: int, axis: int = 0) -> np.ndarray | None:
    """`array` with its last row along `axis` repeated `padded` times (None stays None)."""
    if array is None or not padded:
        return array
    last = np.take(array, [-1], axis=axis)
    return np.concatenate([array, np.repeat(last, padded, axis)], axis)


def pad_texts(texts: list[str], padded: int) -> list[str]:
    """`texts` with its last entry repeated `padded` times (`pad_batch` for prompts)."""
    return texts + texts[-1:] * padded


def per_example(value, batch: int, name: str) -> list:
    """A scalar repeated ``batch`` times, or a sequence that must have ``batch`` entries."""
    if isinstance(value, (str, int, float)):
        return [value] * batch
    values = list(value)
    if len(values) != batch:
        raise ValueError(f"{name} has {len(values)} entries for {batch} images")
    return values


def batch_seeds(seed: int | Sequence[int], batch: int) -> list[int]:
    """One seed per image: an int gives image k the seed ``seed + k``."""
    seeds = [seed + k for k in range(batch)] if isinstance(seed, int) else list(seed)
    if len(seeds) != batch:
        raise ValueError(f"{batch} images need {batch} seeds, got {len(seeds)}")
    return seeds


def row_seeds(
    batch: int, texts: Sequence[str], seeds: Sequence[int] | None, what: str
) -> list[int]:
    """The seeds of an array batch (default 0..B-1), checked to have a text and a seed per row."""
    seeds = list(range(batch)) if seeds is None else list(seeds)
    if len(texts) != batch or len(seeds) != batch:
        raise ValueError(
            f"{batch} images need {batch} {what} and seeds, got {len(texts)} and {len(seeds)}"
        )
    return seeds
