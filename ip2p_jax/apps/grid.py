"""The paper's figure: one edit over a grid of text scales (columns) x image scales (rows)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

from ip2p_jax.pipelines.edit import EditPipeline


def scale_grid(
    pipe: EditPipeline,
    image: Image.Image,
    instruction: str,
    text_scales: Sequence[float],
    image_scales: Sequence[float],
    *,
    seed: int = 0,
    **edit_options,
) -> Image.Image:
    """All cells in one batch (one compile) with the same seed, labelled s_T and s_I."""
    cells = [
        (row, column) for row in range(len(image_scales)) for column in range(len(text_scales))
    ]
    edits = pipe.edit(
        [image] * len(cells),
        [instruction] * len(cells),
        text_scale=[text_scales[column] for _, column in cells],
        image_scale=[image_scales[row] for row, _ in cells],
        seed=[seed] * len(cells),
        **edit_options,
    )
    width, height = edits[0].size
    margin = 18
    sheet = Image.new(
        "RGB", (margin + width * len(text_scales), margin + height * len(image_scales)), "white"
    )
    draw = ImageDraw.Draw(sheet)
    for column, s_t in enumerate(text_scales):
        draw.text((margin + column * width + 2, 2), f"s_T={s_t:g}", fill="black")
    for row, s_i in enumerate(image_scales):
        draw.text((2, margin + row * height + 2), f"{s_i:g}", fill="black")
    for (row, column), edit in zip(cells, edits, strict=True):
        sheet.paste(edit, (margin + column * width, margin + row * height))
    return sheet
