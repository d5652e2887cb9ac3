"""Input pipeline speed at 256 px, ours (TFDS array_record + grain) side by side with the
original's PyTorch way (its EditDataset logic on the original folder format, torch DataLoader),
and the share of a training step's time that loading would take.

    .venv/bin/python scripts/bench_data.py                        # 256 pairs, batch 32
    .venv/bin/python scripts/bench_data.py --num 512 --batch 64 --unet sd15

The data: shapes-world scenes rendered at 512 px and saved as quality-100 JPEGs in the
original release's folder layout (its images are 512 px JPEGs), then imported into our
dataset. Both pipelines decode both images, resize to 256 (Lanczos), crop 256, flip at 0.5;
ours also tokenizes the instruction. The training step is a stand-in until the train loop
exists: our UNet's epsilon-MSE forward + backward on 32x32 latents (256 px), jitted.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

RESOLUTION = 256


def write_original_folder(root: Path, num: int) -> None:
    """`num` prompts of one seed each, 512 px quality-100 JPEGs, as the original generator."""
    from ip2p_jax.worlds.shapes import generate_records, render

    listing = []
    for i, record in enumerate(generate_records(num, seed=1)):
        name, seed = f"{i:07d}", str(record.seed)
        folder = root / name
        folder.mkdir(parents=True)
        prompt = {"input": record.input_caption, "edit": record.instruction}
        prompt["output"] = record.edited_caption
        (folder / "prompt.json").write_text(json.dumps(prompt))
        metadata = {"seed": record.seed, "p2p_threshold": 0.5, "cfg_scale": 7.5}
        (folder / "metadata.jsonl").write_text(json.dumps(metadata) + "\n")
        for index, scene in enumerate((record.before, record.after)):
            image = Image.fromarray(render(scene, 512))
            image.save(folder / f"{seed}_{index}.jpg", quality=100)
        listing.append((name, [seed]))
    (root / "seeds.json").write_text(json.dumps(sorted(listing)))


def time_batches(batches, count: int, batch_size: int) -> dict:
    """Seconds to the first batch (start-up), then examples/s over `count` more."""
    start = time.perf_counter()
    next(batches)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    seconds = time.perf_counter() - start
    return {"first_batch_s": first, "examples_per_s": count * batch_size / seconds}


def ours(dataset: Path, batch: int, workers: int, count: int) -> dict:
    from ip2p_jax.data.augment import Augmentation
    from ip2p_jax.data.edit_pairs import EditPairSource
    from ip2p_jax.data.loader import EditPairLoader, InputConfig
    from ip2p_jax.models.tokenizer import CLIPTokenizer

    config = InputConfig(
        batch_size=batch,
        augmentation=Augmentation(RESOLUTION, RESOLUTION, RESOLUTION, 0.5),
        worker_count=workers,
    )
    loader = EditPairLoader(
        EditPairSource(dataset, "train"),
        config,
        tokenizer=CLIPTokenizer.bundled(),
        shard_index=0,
        shard_count=1,
    )
    return time_batches(iter(loader), count, batch)


class OriginalEditDataset:
    """The original training loader's per-item work (instruct-pix2pix edit_dataset.py),
    written here in plain torch: read both JPEGs, Lanczos to 256, to [-1, 1] CHW, random
    crop and flip of the pair."""

    def __init__(self, root: Path):
        self.root = root
        self.seeds = json.loads((root / "seeds.json").read_text())

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, i: int):
        import torch

        name, seeds = self.seeds[i]
        seed = seeds[torch.randint(0, len(seeds), ()).item()]
        prompt = json.loads((self.root / name / "prompt.json").read_text())["edit"]
        images = []
        for index in (0, 1):
            image = Image.open(self.root / name / f"{seed}_{index}.jpg")
            image = image.resize((RESOLUTION, RESOLUTION), Image.Resampling.LANCZOS)
            array = torch.tensor(np.array(image)).float()
            images.append((2 * array / 255 - 1).permute(2, 0, 1))
        pair = torch.cat(images)
        top = torch.randint(0, pair.shape[1] - RESOLUTION + 1, ()).item()
        left = torch.randint(0, pair.shape[2] - RESOLUTION + 1, ()).item()
        pair = pair[:, top : top + RESOLUTION, left : left + RESOLUTION]
        if torch.rand(()) < 0.5:
            pair = pair.flip(-1)
        before, after = pair.chunk(2)
        return {"edited": after, "c_concat": before, "c_crossattn": prompt}


def torch_reference(root: Path, batch: int, workers: int, count: int) -> dict:
    import torch

    loader = torch.utils.data.DataLoader(
        OriginalEditDataset(root),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
    )

    def forever():
        while True:
            yield from loader

    return time_batches(forever(), count, batch)


def unet_step(preset: str, batch: int):
    """A jitted epsilon-MSE forward + backward of our UNet on 256 px latents; returns
    (seconds per step, compile seconds)."""
    import jax
    import jax.numpy as jnp

    from ip2p_jax.models.unet import UNetConfig
    from ip2p_jax.testing.reference_models import PRESETS
    from ip2p_jax.weights.model_folder import COMPONENTS, build_module

    config = UNetConfig.from_dict(PRESETS[preset]["unet"])
    model = build_module(COMPONENTS["unet"], config)  # lowered as the backend profile says
    latents = jnp.zeros((batch, RESOLUTION // 8, RESOLUTION // 8, config.in_channels))
    context = jnp.zeros((batch, 77, config.cross_attention_dim))
    t = jnp.zeros((batch,), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), latents, t, context)

    def loss(params, x, t, context):
        eps = model.apply(params, x, t, context)
        return jnp.mean(jnp.square(eps - x[..., : eps.shape[-1]]))

    step = jax.jit(jax.grad(loss))
    start = time.perf_counter()
    jax.block_until_ready(step(params, latents, t, context))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    runs = 3
    for _ in range(runs):
        jax.block_until_ready(step(params, latents + 1, t, context))
    return (time.perf_counter() - start) / runs, compile_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=256, help="image pairs to write")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=6, help="timed batches per run")
    parser.add_argument("--unet", default="tiny", choices=["tiny", "sd15", "none"])
    args = parser.parse_args()

    from ip2p_jax.data.build import import_original

    with tempfile.TemporaryDirectory() as tmp:
        root, dataset = Path(tmp) / "original", Path(tmp) / "dataset"
        write_original_folder(root, args.num)
        import_original(root, dataset)
        rows = []
        for workers in (0, 2):
            mine = ours(dataset, args.batch, workers, args.batches)
            theirs = torch_reference(root, args.batch, workers, args.batches)
            rows.append((workers, mine, theirs))

    print(f"\n{args.num} pairs of 512 px JPEGs -> {RESOLUTION} px, batch {args.batch}")
    print("workers | ours ex/s | torch ex/s | ours/torch speed | first batch ours / torch")
    for workers, mine, theirs in rows:
        print(
            f"{workers:7d} | {mine['examples_per_s']:9.1f} | {theirs['examples_per_s']:10.1f} | "
            f"{mine['examples_per_s'] / theirs['examples_per_s']:16.2f} | "
            f"{mine['first_batch_s']:.2f} s / {theirs['first_batch_s']:.2f} s"
        )
    if args.unet != "none":
        seconds, compile_s = unet_step(args.unet, args.batch)
        print(
            f"\ntraining-step stand-in ({args.unet} UNet fwd+bwd, batch {args.batch}, 256 px): "
            f"{seconds:.2f} s/step (compile {compile_s:.1f} s apart)"
        )
        for workers, mine, _ in rows:
            load = args.batch / mine["examples_per_s"]
            # In-process loading adds to the step; workers overlap it, up to the slower side.
            share = load / (load + seconds) if workers == 0 else max(0.0, load - seconds) / load
            print(
                f"  {workers} workers: loading {load:.2f} s/batch -> "
                f"{100 * share:.0f}% of step time spent waiting for data"
            )


if __name__ == "__main__":
    main()
