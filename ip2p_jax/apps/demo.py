"""``make demo``: the bundled shapes model edits the bundled example scenes.

Each scene of ip2p_jax/assets/demo/scenes.json is edited with each of its instructions; the
edits are scored against the exact after-scenes (worlds.shapes.score) and laid out as one
PNG: per scene, a row of the input and the model's edits (the instruction under each), and a
row of the true after-scenes.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ip2p_jax.assets import ASSETS
from ip2p_jax.worlds.shapes import Edit, Scene, apply_edit, render
from ip2p_jax.worlds.shapes.score import EditScore, score_edit

DEMO_SCENES = ASSETS / "demo" / "scenes.json"
CELL = 128  # pixels per image in the grid (64 px scenes, shown at 2x)
CAPTION_LINES = 3
LINE_HEIGHT = 12
CHARS_PER_LINE = 21  # Pillow's default bitmap font is 6 px wide


@dataclass(frozen=True)
class DemoEdit:
    scene_index: int
    before: Scene
    instruction: str
    after: Scene


def load_demo_edits(path: Path = DEMO_SCENES) -> list[DemoEdit]:
    """Every (scene, instruction) of the bundled file, with its true after-scene."""
    entries = json.loads(Path(path).read_text())
    edits = []
    for index, entry in enumerate(entries):
        before = Scene.from_dict(entry["scene"])
        for item in entry["edits"]:
            after = apply_edit(before, Edit.from_dict(item["edit"]))
            edits.append(DemoEdit(index, before, item["instruction"], after))
    return edits


def _cell(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels).resize((CELL, CELL), Image.NEAREST)


def _caption(draw: ImageDraw.ImageDraw, x: int, y: int, text: str, ok: bool | None) -> None:
    lines = textwrap.wrap(text, CHARS_PER_LINE)[:CAPTION_LINES]
    colour = {None: (0, 0, 0), True: (0, 110, 0), False: (180, 0, 0)}[ok]
    font = ImageFont.load_default()
    for k, line in enumerate(lines):
        draw.text((x + 2, y + 1 + k * LINE_HEIGHT), line, fill=colour, font=font)


def demo_grid(
    edits: list[DemoEdit], outputs: list[Image.Image], scores: list[EditScore], size: int
) -> Image.Image:
    """Per scene: input and edits over their instructions (green: scored a success, red: not),
    then a row of the true results."""
    scenes = sorted({e.scene_index for e in edits})
    columns = 1 + max(sum(e.scene_index == s for e in edits) for s in scenes)
    caption = CAPTION_LINES * LINE_HEIGHT + 2
    band = 2 * CELL + caption + 8
    sheet = Image.new("RGB", (columns * CELL, len(scenes) * band), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for row, scene in enumerate(scenes):
        top = row * band
        group = [
            (e, o, s)
            for e, o, s in zip(edits, outputs, scores, strict=True)
            if e.scene_index == scene
        ]
        sheet.paste(_cell(render(group[0][0].before, size)), (0, top))
        _caption(draw, 0, top + CELL, "input", None)
        _caption(draw, 0, top + CELL + caption, "true result ->", None)
        for col, (edit, output, score) in enumerate(group, start=1):
            sheet.paste(_cell(np.asarray(output.convert("RGB"))), (col * CELL, top))
            _caption(draw, col * CELL, top + CELL, edit.instruction, score.success)
            truth = render(edit.after, size)
            sheet.paste(_cell(truth), (col * CELL, top + CELL + caption))
    return sheet


def run_demo(
    out: Path,
    *,
    model: str | None = None,
    steps: int | None = None,
    seed: int = 0,
) -> int:
    """Edits the bundled scenes with the bundled (or given) model; writes and prints the grid."""
    from ip2p_jax.apps.shipped import SHAPES_SAMPLING, shipped_model
    from ip2p_jax.pipelines.edit import EditPipeline

    edits = load_demo_edits()
    folder = model or shipped_model()
    print(
        f"editing {len(edits)} instructions on {len(set(e.scene_index for e in edits))} "
        f"bundled scenes with {folder}"
    )
    pipe = EditPipeline.from_pretrained(folder)
    sampling = SHAPES_SAMPLING
    size = sampling.resolution
    outputs = pipe.edit(
        [Image.fromarray(render(e.before, size)) for e in edits],
        [e.instruction for e in edits],
        steps=steps or sampling.steps,
        text_scale=sampling.text_scale,
        image_scale=sampling.image_scale,
        sampler=sampling.sampler,
        seed=seed,
        resolution=size,
    )
    scores = [
        score_edit(np.asarray(o.convert("RGB")), e.before, e.after, e.instruction)
        for o, e in zip(outputs, edits, strict=True)
    ]
    for edit, score in zip(edits, scores, strict=True):
        verdict = "ok  " if score.success else "MISS"
        print(f"  {verdict} {edit.instruction:<45} PSNR {score.psnr:5.1f} dB")
    succeeded = sum(s.success for s in scores)
    print(f"{succeeded}/{len(scores)} edits match the true result (worlds.shapes.score)")
    out.mkdir(parents=True, exist_ok=True)
    for edit in edits:  # the inputs, to try other instructions on (ip2p edit --image ...)
        Image.fromarray(render(edit.before, size)).save(out / f"scene_{edit.scene_index}.png")
    path = out / "demo_grid.png"
    demo_grid(edits, outputs, scores, size).save(path)
    print(f"wrote the before/after grid: {path}")
    return 0
