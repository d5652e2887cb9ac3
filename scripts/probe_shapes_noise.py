"""Where in the sampling chain a shapes model makes its edits, and where it loses them.

    python scripts/probe_shapes_noise.py --num 96 --starts 2,4,6,8,10,13

The chain (deterministic Euler, so only the start differs) is started part way, at step k of
``--steps``, from a latent noised to that step's sigma, as img2img starts: once from the
input scene's latent and once from the true after-scene's. Both are scored against the true
edit, per kind. Read it so:

- From the after-scene, the model only has to keep a right edit it is handed. What it still
  fails there is lost in the steps after k: fidelity, not the decision to edit.
- From the input scene, the gap to a full run (k = 0) is what the steps before k decide.

The first row is the full chain from unit noise, for reference. Validation split (training
phrasings) by default.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from ip2p_jax.apps.cli.arguments import comma_floats
from ip2p_jax.apps.shipped import SHAPES_SAMPLING, shipped_model
from ip2p_jax.diffusion.samplers import Euler, initial_noise
from ip2p_jax.pipelines.base import GuidedBatch
from ip2p_jax.pipelines.edit import EditPipeline, encode_image
from ip2p_jax.pipelines.images import to_pil
from ip2p_jax.pipelines.sdedit import img2img_plan
from ip2p_jax.worlds.shapes import generate_records, render
from ip2p_jax.worlds.shapes.score import score_edit, summarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="default: the bundled shapes model")
    parser.add_argument("--num", type=int, default=96)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--steps", type=int, default=SHAPES_SAMPLING.steps)
    parser.add_argument("--text-scale", type=float, default=SHAPES_SAMPLING.text_scale)
    parser.add_argument("--image-scale", type=float, default=SHAPES_SAMPLING.image_scale)
    parser.add_argument("--starts", type=comma_floats, default=[2, 4, 6, 8, 10, 13])
    args = parser.parse_args()
    if any(not 0 < k < args.steps or k != int(k) for k in args.starts):
        parser.error(f"--starts must be whole steps between 1 and {args.steps - 1}")
    pipe = EditPipeline.from_pretrained(args.model or shipped_model())
    if pipe._padding(args.num):
        parser.error(f"--num must split evenly over the {pipe.mesh.devices.size} devices")
    records = list(generate_records(args.num, split=args.split, seed=0))
    size = SHAPES_SAMPLING.resolution
    pixels = {
        name: np.stack([render(getattr(r, name), size) for r in records]) / 127.5 - 1.0
        for name in ("before", "after")
    }
    latents = {
        name: encode_image(pipe.vae.module, pipe.vae.params, jnp.asarray(p, jnp.float32))
        for name, p in pixels.items()
    }
    batch = len(records)
    texts, nulls = pipe._encode_prompt_pairs([r.instruction for r in records], [""] * batch, 0)
    keys = jax.vmap(jax.random.key)(jnp.arange(batch, dtype=jnp.uint32))
    noise = initial_noise(keys, latents["before"].shape[1:])
    scaling = pipe.vae.config.scaling_factor

    def run(plan: dict, start: jax.Array, steps: int) -> dict[str, dict[str, float]]:
        # EditPipeline's own jitted chain and decoder, so each run samples as `ip2p edit` does.
        conditions = GuidedBatch(
            text=texts,
            null_text=nulls,
            image_latent=latents["before"],
            text_scale=jnp.full((batch,), args.text_scale, jnp.float32),
            image_scale=jnp.full((batch,), args.image_scale, jnp.float32),
            keys=keys,
            init_noise=start,
        )
        sampled = pipe._sample(Euler(), plan, steps, conditions, three_rows=True, progress=False)
        # Rounded to uint8 as `ip2p edit` and `ip2p eval shapes` hand images over.
        images = [np.asarray(to_pil(a)) for a in pipe._decode_latents(sampled, batch)]
        return summarize(
            (r.edit.kind, score_edit(image, r.before, r.after, r.instruction))
            for r, image in zip(records, images, strict=True)
        )

    def line(label: str, table: dict[str, dict[str, float]]) -> str:
        kinds = "  ".join(
            f"{kind} {100 * row['success']:3.0f}"
            for kind, row in table.items()
            if kind != "overall"
        )
        return f"{label:<34} {100 * table['overall']['success']:5.1f} %   {kinds}"

    full = Euler().plan(pipe.schedule, args.steps)
    print(line("full chain from unit noise", run(full, noise, args.steps)), flush=True)
    for k in map(int, args.starts):
        # The half step keeps int(steps * strength) = steps - k clear of rounding.
        strength = (args.steps - k + 0.5) / args.steps
        plan, alpha, sigma = img2img_plan(Euler(), pipe.schedule, args.steps, strength)
        t = float(plan["timesteps"][0])
        for name in ("before", "after"):
            start = alpha * latents[name] * scaling + sigma * noise
            label = f"k={k:2d} t={t:5.0f} sigma={sigma:6.3f} {name}"
            print(line(label, run(plan, start, args.steps - k)), flush=True)


if __name__ == "__main__":
    main()
