"""How the shapes score's thresholds were chosen: right edits drawn by a VAE must pass, wrong
ones must fail.

    python scripts/calibrate_shapes_score.py --vae runs/shapes_vae/vae_model --num 300

For each held-out example it sends three scenes through the autoencoder (encode, decode) and
scores them against the true edit: the true after-scene (a right edit, as well as a model
with this VAE can draw it), a different valid edit of the same scene (a wrong edit) and the
unedited input, each scored with the instruction (which leaves an added shape's exact place
open). It prints the pass rate of each at the thresholds in worlds/shapes/score.py, and per
kind the right edits that fail.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from ip2p_jax.models.vae import AutoencoderKL
from ip2p_jax.weights.model_folder import load_component
from ip2p_jax.worlds.shapes import EDIT_KINDS, Scene, apply_edit, generate_records, refer, render
from ip2p_jax.worlds.shapes.sample import edit_options
from ip2p_jax.worlds.shapes.score import score_edit, summarize


def a_wrong_edit(before: Scene, after: Scene, rng: np.random.Generator) -> Scene:
    """Another valid edit of `before`, of any kind, that renders differently from `after`."""
    refs = [refer(before, i) for i in range(len(before.shapes))]
    truth = render(after, 64).tobytes()
    options = [
        edit
        for kind in EDIT_KINDS
        for edit in edit_options(before, kind, refs, rng, lambda combo: True)
        if render(apply_edit(before, edit), 64).tobytes() != truth
    ]
    return apply_edit(before, options[int(rng.integers(len(options)))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vae", required=True, help="a model folder with vae/")
    parser.add_argument("--num", type=int, default=300)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    vae = load_component(args.vae, "vae")

    @jax.jit
    def round_trip(pixels):
        latent = vae.module.apply({"params": vae.params}, pixels, method=AutoencoderKL.encode)
        return vae.module.apply({"params": vae.params}, latent.mode(), method=AutoencoderKL.decode)

    def drawn(scenes: list[Scene]) -> np.ndarray:
        pixels = np.stack([render(s, args.size) for s in scenes]).astype(np.float32) / 127.5 - 1
        out = np.asarray(round_trip(jnp.asarray(pixels)))
        return np.clip((out + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)

    records = list(generate_records(args.num, split="heldout"))
    rng = np.random.default_rng(0)
    cases = {
        "right edit": [r.after for r in records],
        "wrong edit": [a_wrong_edit(r.before, r.after, rng) for r in records],
        "no edit": [r.before for r in records],
    }
    for name, scenes in cases.items():
        scores = [
            (r.edit.kind, score_edit(image, r.before, r.after, r.instruction))
            for r, image in zip(records, drawn(scenes), strict=True)
        ]
        table = summarize(scores)
        print(f"{name:<11} passes {100 * table['overall']['success']:5.1f} %")
        if name == "right edit":
            for kind, row in table.items():
                print(f"    {kind:<11} {100 * row['success']:5.1f} % of {row['count']}")


if __name__ == "__main__":
    main()
