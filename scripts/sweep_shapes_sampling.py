"""How the bundled shapes model's sampling defaults (shipped.SHAPES_SAMPLING) were chosen: its
edit success on the validation split over s_T, s_I and the sampler.

    python scripts/sweep_shapes_sampling.py --num 200 --text-scales 2,3,4.5,7.5 \
        --image-scales 1.2,1.5,2 --samplers euler_ancestral,euler

Every setting edits the same examples with the same seeds. The validation split (unseen
scenes, training phrasings) chooses; the held-out split, which `ip2p eval shapes` reports,
stays out of the choice. Prints one row per setting as it goes, then all of them sorted
(best last) and the per-kind table of the best.
"""

from __future__ import annotations

import argparse
import itertools
import time

from ip2p_jax.apps.cli.arguments import comma_floats
from ip2p_jax.apps.shipped import SHAPES_SAMPLING, shipped_model
from ip2p_jax.evaluation.shapes import evaluate_shapes, format_table
from ip2p_jax.pipelines.edit import EditPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="default: the bundled shapes model")
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--steps", type=int, default=SHAPES_SAMPLING.steps)
    parser.add_argument("--text-scales", type=comma_floats, default=[2.0, 3.0, 4.5, 7.5])
    parser.add_argument("--image-scales", type=comma_floats, default=[1.5])
    parser.add_argument("--samplers", default="euler_ancestral")
    args = parser.parse_args()
    pipe = EditPipeline.from_pretrained(args.model or shipped_model())
    rows = []
    settings = itertools.product(args.samplers.split(","), args.text_scales, args.image_scales)
    for sampler, text_scale, image_scale in settings:
        start = time.perf_counter()
        table, _ = evaluate_shapes(
            pipe,
            num=args.num,
            split=args.split,
            batch_size=32,
            steps=args.steps,
            text_scale=text_scale,
            image_scale=image_scale,
            sampler=sampler,
            progress=False,
        )
        row = (f"{sampler:<16} s_T {text_scale:<5} s_I {image_scale:<5}", table)
        print(f"{_summary(*row)}  ({time.perf_counter() - start:.0f} s)", flush=True)
        rows.append(row)
    rows.sort(key=lambda row: (row[1]["overall"]["success"], row[1]["overall"]["psnr"]))
    print("\nbest last:\n" + "\n".join(_summary(*row) for row in rows))
    print(f"\n{args.split}, {rows[-1][0]}:\n{format_table(rows[-1][1])}")


def _summary(setting: str, table: dict) -> str:
    overall = table["overall"]
    return f"{setting} success {100 * overall['success']:5.1f} %  PSNR {overall['psnr']:5.2f} dB"


if __name__ == "__main__":
    main()
