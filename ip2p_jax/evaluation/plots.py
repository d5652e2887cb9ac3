"""The paper's figures for an evaluation sweep: the CLIP trade-off plot and an edit grid."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ip2p_jax.evaluation.sweep import IP2P, SweepPoint
from ip2p_jax.weights.atomic import write_bytes_atomically

PLOT_SIZE = (8.0, 6.0)  # inches; at PLOT_DPI the PNG is 800 x 600
PLOT_DPI = 100


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Saves a PIL image as PNG, atomically."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return write_bytes_atomically(path, buffer.getvalue())


def _series(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped into lines: InstructPix2Pix per s_T (over s_I), SDEdit per guidance scale
    (over strength), each in the order swept."""
    lines: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["method"] == IP2P:
            name = f"InstructPix2Pix (s_T={row['text_scale']:g}, over s_I)"
        else:
            name = f"SDEdit (s_T={row['text_scale']:g}, over strength)"
        lines.setdefault(name, []).append(row)
    return lines


def plot_tradeoff(
    rows: Sequence[dict[str, Any]], path: str | os.PathLike, *, title: str | None = None
) -> Path:
    """The paper's plot as a PNG (PLOT_SIZE at PLOT_DPI): x = CLIP text-image direction
    similarity, y = CLIP image similarity, one line per method, each point labelled with its
    scale (s_I or strength)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # not a core dependency of ip2p-jax
        raise ImportError("the evaluation plot needs matplotlib: pip install matplotlib") from err

    # A bare Figure renders with the Agg canvas: no pyplot, no global backend state.
    figure = Figure(figsize=PLOT_SIZE, dpi=PLOT_DPI, layout="constrained")
    axes = figure.add_subplot()
    for name, line in _series(rows).items():
        x = [row["clip_direction"] for row in line]
        y = [row["clip_image"] for row in line]
        axes.plot(x, y, marker="o", linewidth=2, markersize=4, label=name)
        for row, xi, yi in zip(line, x, y, strict=True):
            scale = row.get("image_scale", row.get("strength"))
            axes.annotate(
                f"{scale:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8
            )
    axes.set_xlabel("CLIP Text-Image Direction Similarity")
    axes.set_ylabel("CLIP Image Similarity")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize=9)
    if title:
        axes.set_title(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PLOT_DPI)
    return write_bytes_atomically(path, buffer.getvalue())


def edit_grid(
    inputs: Sequence[np.ndarray],
    columns: Sequence[tuple[str, Sequence[np.ndarray]]],
    targets: Sequence[np.ndarray] | None = None,
    *,
    header: int = 16,
) -> Image.Image:
    """Rows = examples; columns = the input, each labelled column of edits, then the target.
    All images uint8 (S, S, 3) of one size; a ``header`` strip holds the labels."""
    if not len(inputs):
        raise ValueError("no examples for the grid")
    cells = [("input", list(inputs))] + [(label, list(images)) for label, images in columns]
    if targets is not None:
        cells.append(("target", list(targets)))
    for label, images in cells:
        if len(images) != len(inputs):
            raise ValueError(f"column {label!r} has {len(images)} images for {len(inputs)} rows")
    height, width = np.asarray(inputs[0]).shape[:2]
    sheet = Image.new("RGB", (width * len(cells), header + height * len(inputs)), "white")
    draw = ImageDraw.Draw(sheet)
    for column, (label, images) in enumerate(cells):
        draw.text((column * width + 2, 2), label, fill="black")
        for row, image in enumerate(images):
            sheet.paste(Image.fromarray(np.asarray(image)), (column * width, header + row * height))
    return sheet


def sweep_grid(
    inputs: Sequence[np.ndarray],
    grid_edits: dict[SweepPoint, list[np.ndarray]],
    targets: Sequence[np.ndarray] | None = None,
) -> Image.Image:
    """The edit grid of a sweep: input, the InstructPix2Pix edit at each s_I (labelled with
    s_T too when several were swept), SDEdit at each strength, then the target."""
    text_scales = {p.text_scale for p in grid_edits if p.method == IP2P}

    def label(point: SweepPoint) -> str:
        if point.method != IP2P:
            return f"SDEdit {point.strength:g}"
        prefix = f"s_T={point.text_scale:g} " if len(text_scales) > 1 else ""
        return f"{prefix}s_I={point.image_scale:g}"

    rows = len(inputs)
    columns = [(label(p), edits[:rows]) for p, edits in grid_edits.items()]
    return edit_grid(inputs, columns, targets)
