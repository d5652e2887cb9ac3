"""Before/after image pairs from a caption and its edited caption: Stable Diffusion (diffusers
components) with Prompt-to-Prompt and Euler ancestral sampling, as the original generator.

Each sample is fixed by its seed alone: the seed gives the initial noise and every step's noise
(one torch.Generator, drawn in the order diffusers' StableDiffusionPipeline draws them), and
the Prompt-to-Prompt fraction p ~ U(min_p2p, max_p2p) and guidance scale ~ U(min_cfg, max_cfg)
(a numpy generator on the same seed). Both images of a pair share all noise, as the original.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from datagen import prompt2prompt


@dataclass(frozen=True)
class SampleDraw:
    """The random choices of one sample, all derived from `seed`."""

    seed: int
    p2p_threshold: float
    cfg_scale: float


@dataclass(frozen=True)
class PairConfig:
    """How pairs are rendered. Defaults are the original generator's (generate_img_dataset.py):
    100 Euler ancestral steps at 512 px, p ~ U(0.1, 0.9), guidance ~ U(7.5, 15), shared
    self-attention."""

    steps: int = 100
    resolution: int = 512
    min_p2p: float = 0.1
    max_p2p: float = 0.9
    min_cfg: float = 7.5
    max_cfg: float = 15.0
    mode: str = "self"

    def __post_init__(self) -> None:
        if self.steps < 2:
            raise ValueError(f"steps must be at least 2, got {self.steps}")
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}")
        if not 0 <= self.min_p2p <= self.max_p2p <= 1:
            raise ValueError(
                f"need 0 <= min_p2p <= max_p2p <= 1, got {self.min_p2p}, {self.max_p2p}"
            )
        if not 0 < self.min_cfg <= self.max_cfg:
            raise ValueError(f"need 0 < min_cfg <= max_cfg, got {self.min_cfg}, {self.max_cfg}")
        if self.mode not in prompt2prompt.MODES:
            raise ValueError(f"mode must be one of {prompt2prompt.MODES}, got {self.mode!r}")

    def draw(self, seed: int) -> SampleDraw:
        """p and the guidance scale of sample `seed` (its noise comes from torch, see above)."""
        rng = np.random.default_rng(seed)
        p2p = self.min_p2p + rng.random() * (self.max_p2p - self.min_p2p)
        cfg = self.min_cfg + rng.random() * (self.max_cfg - self.min_cfg)
        return SampleDraw(int(seed), float(p2p), float(cfg))


def p2p_active(threshold: float, step: int, steps: int) -> bool:
    """Whether step `step` of `steps` borrows attention maps: the original's
    `threshold > i / (len(sigmas) - 2)`, i.e. the first `threshold` of the steps."""
    return threshold > step / (steps - 1)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] floats to 8 bits the way the original saved its pairs (255 * x, truncated)."""
    return (255.0 * images).astype(np.uint8)


class PairSampler:
    """Renders (input, edited) image pairs with a diffusers text-to-image Stable Diffusion.

    `pairs_per_call` samples share one UNet call (4 rows each: unconditional and conditional
    for both captions). `vae`, a diffusers AutoencoderKL folder (e.g. stabilityai/sd-vae-ft-mse,
    which the original generator decoded with), replaces the model's own `vae` subfolder: it
    changes the decoded pixels only, the latents are the same."""

    def __init__(
        self,
        model: str | os.PathLike,
        config: PairConfig = PairConfig(),
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        pairs_per_call: int = 1,
        vae: str | os.PathLike | None = None,
    ):
        from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = _model_folder(model)
        # checked before any weights load, so a wrong --vae fails at once
        vae_folder = folder / "vae" if vae is None else _vae_folder(vae)
        load = {"torch_dtype": dtype}
        self.config = config
        self.device = torch.device(device)
        self.pairs_per_call = max(1, int(pairs_per_call))
        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(
            str(folder), subfolder="text_encoder", **load
        )
        self.unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", **load)
        if self.unet.config.in_channels != 4:
            raise ValueError(
                f"{folder}/unet has in_channels={self.unet.config.in_channels}: pairs need a "
                "text-to-image Stable Diffusion (4 channels), not an InstructPix2Pix model"
            )
        self.vae = AutoencoderKL.from_pretrained(str(vae_folder), **load)
        if self.vae.config.latent_channels != self.unet.config.in_channels:
            raise ValueError(
                f"the VAE at {vae_folder} has latent_channels={self.vae.config.latent_channels} "
                f"but {folder}/unet has in_channels={self.unet.config.in_channels}; they must "
                "match"
            )
        if vae is not None:
            _check_vae_scale(self.vae, folder)
        self.scheduler = EulerAncestralDiscreteScheduler.from_pretrained(
            str(folder), subfolder="scheduler"
        )
        for module in (self.text_encoder, self.unet, self.vae):
            module.to(self.device).eval().requires_grad_(False)
        self.controller = prompt2prompt.P2PController(config.mode)
        prompt2prompt.install(self.unet, self.controller)
        self.unet_seconds = 0.0
        with torch.no_grad():
            self._null = self._encode([""])

    def _tokens(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def _encode(self, texts: Sequence[str]) -> torch.Tensor:
        return self.text_encoder(self._tokens(texts).to(self.device))[0]

    def _set_mapper(self, input_caption: str, edited_caption: str) -> None:
        """Token maps for the cross-attention modes; 'replace' refuses unequal token counts."""
        if self.config.mode == "self":
            return
        source, target = (
            self.tokenizer(
                text, truncation=True, max_length=self.tokenizer.model_max_length
            ).input_ids
            for text in (input_caption, edited_caption)
        )
        length = self.tokenizer.model_max_length
        if self.config.mode == "replace":
            if len(source) != len(target):
                raise prompt2prompt.TokenCountMismatch(
                    f"'replace' swaps maps token for token, but {input_caption!r} has "
                    f"{len(source)} tokens and {edited_caption!r} {len(target)}; use 'refine'"
                )
            return
        mapper, alphas = prompt2prompt.refinement_mapper(source, target, length)
        # built on the CPU from token ids; moved here once per prompt, not per attention call
        self.controller.mapper = mapper.to(self.device)
        self.controller.alphas = alphas.to(self.device, self.unet.dtype)

    def render(
        self, input_caption: str, edited_caption: str, draws: Sequence[SampleDraw]
    ) -> np.ndarray:
        """Images (len(draws), 2, H, W, 3) in [0, 1], float32: [:, 0] the input caption's,
        [:, 1] the edited caption's."""
        return np.concatenate(list(self.render_chunks(input_caption, edited_caption, draws)))

    @torch.no_grad()
    def render_chunks(
        self, input_caption: str, edited_caption: str, draws: Sequence[SampleDraw]
    ) -> Iterator[np.ndarray]:
        """`render`, one UNet batch (`pairs_per_call` draws) at a time, so a caller can score
        and shrink each chunk before the next is drawn. The captions are encoded once."""
        self._set_mapper(input_caption, edited_caption)
        text = self._encode([input_caption, edited_caption])
        for start in range(0, len(draws), self.pairs_per_call):
            yield self._render_chunk(text, draws[start : start + self.pairs_per_call])

    def _render_chunk(self, text: torch.Tensor, draws: Sequence[SampleDraw]) -> np.ndarray:
        pairs = len(draws)
        steps = self.config.steps
        scheduler = self.scheduler
        scheduler.set_timesteps(steps, device=self.device)
        side = self.config.resolution // self.vae_scale
        channels = self.unet.config.in_channels
        generators = [torch.Generator().manual_seed(draw.seed) for draw in draws]
        noise_shape = (1, channels, side, side)
        dtype = self.unet.dtype
        # diffusers draws the initial latents first (pipeline.prepare_latents), then one noise
        # tensor per step (scheduler.step); both images of a pair share each draw.
        x = torch.cat([_pair(_randn(noise_shape, g, self.device, dtype)) for g in generators])
        x = x * scheduler.init_noise_sigma
        cond = torch.cat([self._null.expand(2 * pairs, -1, -1), text.repeat(pairs, 1, 1)])
        cfg = torch.tensor([d.cfg_scale for d in draws], device=self.device)
        cfg = cfg.repeat_interleave(2)[:, None, None, None]
        thresholds = [d.p2p_threshold for d in draws]
        sigmas = scheduler.sigmas
        for i, t in enumerate(scheduler.timesteps):
            active = [p2p_active(th, i, steps) for th in thresholds]
            self.controller.active = torch.tensor(active, dtype=torch.bool)
            scaled = x / ((sigmas[i] ** 2 + 1) ** 0.5)
            model_in = torch.cat([scaled, scaled]).to(dtype)
            eps = self._unet(model_in, t, cond)
            uncond, conditional = eps.chunk(2)
            guided = uncond + cfg * (conditional - uncond)
            noise = torch.cat(
                [_pair(_randn(noise_shape, g, self.device, dtype)) for g in generators]
            )
            x = _euler_ancestral_step(
                x, guided, sigmas[i], sigmas[i + 1], noise, scheduler.config.prediction_type
            )
        self.controller.active = None
        latents = x.to(self.vae.dtype) / self.vae.config.scaling_factor
        images = self.vae.decode(latents).sample
        images = (images / 2 + 0.5).clamp(0, 1).float().cpu().permute(0, 2, 3, 1).numpy()
        return images.reshape(pairs, 2, *images.shape[1:])

    def _unet(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.unet(x, t, encoder_hidden_states=cond).sample
        self.unet_seconds += time.perf_counter() - start
        return out

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def check_folders(model: str | os.PathLike, vae: str | os.PathLike | None = None) -> None:
    """Raises FileNotFoundError, saying what was expected, when `model` is not a diffusers SD
    folder or `vae` not an AutoencoderKL folder: a job checks before it starts any worker."""
    _model_folder(model)
    if vae is not None:
        _vae_folder(vae)


def _model_folder(model: str | os.PathLike) -> Path:
    folder = Path(model)
    if not (folder / "unet").is_dir():
        raise FileNotFoundError(
            f"{folder} is not a diffusers Stable Diffusion folder: expected {folder}/unet, "
            "vae, text_encoder, tokenizer and scheduler subfolders"
        )
    return folder


def _vae_folder(vae: str | os.PathLike) -> Path:
    """`vae` if it is a diffusers AutoencoderKL folder (config.json and weights), else a
    FileNotFoundError that says what was expected."""
    folder = Path(vae)
    expected = (
        "expected a diffusers AutoencoderKL folder (config.json and "
        "diffusion_pytorch_model.safetensors or .bin), e.g. stabilityai/sd-vae-ft-mse or a "
        "Stable Diffusion folder's vae subfolder"
    )
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"VAE {folder}: no {config}; {expected}")
    try:
        class_name = json.loads(config.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as error:
        message = f"VAE {folder}: {config} is not a JSON config; {expected}"
        raise FileNotFoundError(message) from error
    # a UNet or text encoder folder also has a config.json; refuse it here, not mid-load
    if class_name != "AutoencoderKL":
        raise FileNotFoundError(
            f"VAE {folder}: {config} describes {class_name!r}, not 'AutoencoderKL'; {expected}"
        )
    weights = [*folder.glob("diffusion_pytorch_model*.safetensors")]
    weights += [*folder.glob("diffusion_pytorch_model*.bin")]
    if not weights:
        raise FileNotFoundError(f"VAE {folder}: no weights file; {expected}")
    return folder


def _check_vae_scale(vae, folder: Path) -> None:
    """A replacement VAE must downsample as the model's own did: the UNet was trained on
    latents of that size (every SD VAE is 8x; checked when the model still has its vae)."""
    own = folder / "vae" / "config.json"
    if not own.is_file():
        return
    own_blocks = len(json.loads(own.read_text())["block_out_channels"])
    new_blocks = len(vae.config.block_out_channels)
    if own_blocks != new_blocks:
        raise ValueError(
            f"the VAE downsamples by {2 ** (new_blocks - 1)} but {folder}/vae by "
            f"{2 ** (own_blocks - 1)}: the UNet would sample latents of another size"
        )


def _randn(shape, generator: torch.Generator, device: torch.device, dtype) -> torch.Tensor:
    """diffusers' randn_tensor for a CPU generator: drawn on the CPU, then moved."""
    return torch.randn(shape, generator=generator, dtype=dtype).to(device)


def _pair(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x])


def _euler_ancestral_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    noise: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """EulerAncestralDiscreteScheduler.step with the noise given (shared within each pair)."""
    sample = x.to(torch.float32)
    if prediction_type == "epsilon":
        denoised = sample - sigma * model_output
    elif prediction_type == "v_prediction":
        denoised = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    else:
        raise ValueError(f"prediction_type {prediction_type!r} is not supported")
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    derivative = (sample - denoised) / sigma
    sample = sample + derivative * (sigma_down - sigma)
    return (sample + noise * sigma_up).to(model_output.dtype)
