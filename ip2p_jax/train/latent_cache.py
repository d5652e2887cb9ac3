"""Latents encoded once: the frozen VAE's posterior moments of every pair of a split, on disk,
read by training in place of the images (`--config.data.cache_latents=True`).

The VAE is frozen, so encoding the same images every epoch repeats work: on the shapes
world the encoder is 0.44 s of a 0.96 s step. The cache keeps the moments (mean, clipped
logvar), not latents, so the step still draws a fresh posterior sample of the edited image
and takes the mode of the input image, exactly as it does from pixels. It holds no
augmentation, so a run that caches must not flip, resize or crop.

A cache is a folder: `input_moments.npy` and `edited_moments.npy` (float32, [N, h, w, 2c]),
`examples.json` (instruction and key per example, and why an example was skipped), and
`manifest.json`, which names the VAE (a hash of its config and weights) and the split it
was made from; a cache that no longer matches either is made again.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ip2p_jax.data.augment import BadExample, decode_pair
from ip2p_jax.data.edit_pairs import EditPairSource
from ip2p_jax.data.loader import SKIPPED
from ip2p_jax.models.vae import DiagonalGaussian
from ip2p_jax.runtime.distributed import barrier, host_copy, is_primary
from ip2p_jax.train.config import DataConfig
from ip2p_jax.weights.atomic import atomic_folder
from ip2p_jax.weights.model_folder import LoadedComponent

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
MOMENT_FILES = {"input_moments": "input_moments.npy", "edited_moments": "edited_moments.npy"}


def check_cacheable(data: DataConfig) -> None:
    """A cache holds each pair encoded once, as stored: the config must not augment."""
    augmenting = [
        f"data.{name}={getattr(data, name)}"
        for name in ("min_resize", "max_resize")
        if getattr(data, name) not in (0, data.resolution)
    ]
    if data.flip_prob:
        augmenting.append(f"data.flip_prob={data.flip_prob}")
    if augmenting:
        raise ValueError(
            f"data.cache_latents=True trains on pairs encoded once, without augmentation, "
            f"but {', '.join(augmenting)} asks for it: set data.flip_prob=0 and "
            f"data.min_resize, data.max_resize to 0, or turn the cache off"
        )


def encode_images(vae_module: Any, vae_params: Any, images: jax.Array) -> DiagonalGaussian:
    """uint8 images [B, H, W, 3] -> the VAE posterior: the one encoding the train step and
    the cache share, so a cached run sees the numbers a pixel run computes."""
    pixels = images.astype(jnp.float32) / 127.5 - 1.0
    return vae_module.apply({"params": vae_params}, pixels, method=vae_module.encode)


def vae_fingerprint(vae: LoadedComponent) -> str:
    """A hash of the VAE's config and every weight: a cache is only valid for this VAE."""
    digest = hashlib.sha256(json.dumps(vae.config, sort_keys=True, default=str).encode())
    for path, leaf in jax.tree_util.tree_leaves_with_path(host_copy(vae.params)):  # key order
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def split_fingerprint(source: EditPairSource) -> str:
    """A hash of the split's record files (names and sizes) and the dataset's info file."""
    digest = hashlib.sha256((source.path / "dataset_info.json").read_bytes())
    for record in sorted(source.path.glob(f"*-{source.split}.*")):
        digest.update(f"{record.name}:{record.stat().st_size}".encode())
    return digest.hexdigest()


class LatentSplit:
    """Random access to a cache: `split[i]` is example i's moments, instruction and key, or a
    skip marker for an example the encoder could not use (the loader counts those).

    Its repr is the split's own: the examples and their order are the same, so a run can
    turn caching on or off and still resume at the same example (grain checks the repr)."""

    holds_latents = True

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / MANIFEST).read_text())
        self.examples = json.loads((self.folder / "examples.json").read_text())
        self.moments = {
            name: np.load(self.folder / file, mmap_mode="r") for name, file in MOMENT_FILES.items()
        }

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        if SKIPPED in example:
            return dict(example)
        element = {name: np.array(array[index]) for name, array in self.moments.items()}
        element.update(instruction=example["instruction"], key=example["key"])
        return element

    def __repr__(self) -> str:
        return self.manifest["source"]


def cached_latents(
    source: EditPairSource,
    vae: LoadedComponent,
    folder: str | Path,
    *,
    resolution: int,
    batch_size: int = 64,
    report: Callable[[str], None] = print,
) -> LatentSplit:
    """The cache of `source` under `folder`: reused when it was made from the same split with
    the same VAE, else encoded now (atomically: a killed run leaves no half cache)."""
    folder = Path(folder)
    if is_primary():  # one process encodes and writes; the others wait, then read it
        _make_cache(source, vae, folder, resolution, batch_size, report)
    barrier(f"latent cache {folder}")
    return LatentSplit(folder)


def _make_cache(
    source: EditPairSource,
    vae: LoadedComponent,
    folder: Path,
    resolution: int,
    batch_size: int,
    report: Callable[[str], None],
) -> None:
    """Encodes `source` into `folder` unless a cache made from it with `vae` is there."""
    wanted = {
        "format": FORMAT_VERSION,
        "source": repr(source),
        "split_fingerprint": split_fingerprint(source),
        "vae_fingerprint": vae_fingerprint(vae),
        "resolution": resolution,
    }
    manifest = folder / MANIFEST
    if manifest.is_file():
        found = json.loads(manifest.read_text())
        if all(found.get(name) == value for name, value in wanted.items()):
            return
        stale = [name for name, value in wanted.items() if found.get(name) != value]
        report(f"latent cache {folder} is stale ({', '.join(stale)} changed); encoding again")
    with atomic_folder(folder, overwrite=True) as staging:
        _encode_split(source, vae, staging, resolution, batch_size, report)
        (staging / MANIFEST).write_text(json.dumps(wanted, indent=2))


def _encode_split(
    source: EditPairSource,
    vae: LoadedComponent,
    folder: Path,
    resolution: int,
    batch_size: int,
    report: Callable[[str], None],
) -> None:
    from tqdm import tqdm

    encode = jax.jit(functools.partial(encode_images, vae.module))
    # On this process's first device: the trainer's copy may span every process's devices.
    params = jax.device_put(host_copy(vae.params), jax.local_devices()[0])
    count = len(source)
    outputs: dict[str, np.lib.format.open_memmap] = {}
    examples: list[dict] = []
    report(f"encoding {count} pairs of {source!r} with the frozen VAE into {folder.name}")
    for start in tqdm(range(0, count, batch_size), unit="batch", desc="latent cache"):
        indices = range(start, min(start + batch_size, count))
        pixels = {name: [] for name in MOMENT_FILES}
        for index in indices:
            example = source[index]
            try:
                before, after = decode_pair(example)
            except BadExample as bad:
                examples.append({SKIPPED: bad.reason, "detail": str(bad), "key": example["key"]})
                before = after = None
            else:
                if before.size != (resolution, resolution):
                    raise ValueError(
                        f"{source!r} example {index} ({example['key']}): images are "
                        f"{before.size[0]}x{before.size[1]}, and a latent cache holds no "
                        f"resize or crop: data.resolution {resolution} needs "
                        f"{resolution}x{resolution} images"
                    )
                examples.append({"instruction": example["instruction"], "key": example["key"]})
            for name, image in (("input_moments", before), ("edited_moments", after)):
                pixels[name].append(
                    np.zeros((resolution, resolution, 3), np.uint8)
                    if image is None
                    else np.asarray(image.convert("RGB"))
                )
        for name, images in pixels.items():
            posterior = encode(params, jnp.asarray(np.stack(images)))
            moments = np.asarray(jnp.concatenate([posterior.mean, posterior.logvar], axis=-1))
            if name not in outputs:
                outputs[name] = np.lib.format.open_memmap(
                    folder / MOMENT_FILES[name], "w+", np.float32, (count, *moments.shape[1:])
                )
            outputs[name][start : start + len(indices)] = moments
    for array in outputs.values():
        array.flush()
    skipped = sum(SKIPPED in example for example in examples)
    if skipped == count:
        raise ValueError(
            f"no example of {source!r} could be cached; first: {examples[0]['detail']}"
        )
    (folder / "examples.json").write_text(json.dumps(examples))
