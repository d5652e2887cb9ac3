"""Scoring an edited image against the shapes world's exact ground truth.

Every pixel of a rendered scene that no shape edge blends has one palette colour, known from
the scene. An edit succeeded when the pixels the edit changes (the target's new colour, its
new place or size, an added or removed shape, a new background) show the after-scene's
colours, and the pixels it leaves alone keep theirs. Edited pixels are read as their nearest
palette colour, so small colour noise does not count, a wrong colour does; a changed pixel
on a shape's edge must be nearer its true after-value than its before-value. PSNR and L1
to the ground-truth image are reported beside.

An add instruction fixes less than its ground truth: "put a red star at the top" names a
third of the image, not the point the generator drew, and "add a red star" not even that (nor
the size). Given the instruction, an added shape is scored where the model drew it: at the
centre of the largest new patch of its colour, which must lie in the third named, at the size
named or else the size that fits best; the rest of the scene is scored as for any edit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ip2p_jax.worlds.shapes.palette import COLOURS, SIZE_ORDER
from ip2p_jax.worlds.shapes.parse import parse_instruction
from ip2p_jax.worlds.shapes.raster import SUPERSAMPLE, render, shape_coverage
from ip2p_jax.worlds.shapes.scene import Scene, Shape
from ip2p_jax.worlds.shapes.wording import region_phrase

PALETTE_NAMES = tuple(COLOURS)
_PALETTE = np.asarray([COLOURS[name] for name in PALETTE_NAMES], np.float64)
BLENDED = -1  # a pixel a shape edge or the two-tone seam blends: not scored

# Shares of pixels that must show the expected colour: of those the edit changes, of those
# it keeps, and of the kept ones near the change (a shape shrunk must keep its inside: this
# tells "make it smaller" from "remove it" where a small shape is a few dozen pixels).
# Calibrated on the shapes VAE (scripts/calibrate_shapes_score.py): each held-out after-scene
# sent through the autoencoder (a right edit, as well as the model could draw it) passes
# 94 %, the same for a different valid edit of the scene (a wrong edit) passes 0.7 %, the
# unedited input 0.3 % (300 examples). The earlier 0.8 / 0.97 failed 17 % of right edits,
# mostly small shapes whose changed pixels all lie within a pixel or two of an edge.
CHANGED_AGREEMENT = 0.6
KEPT_AGREEMENT = 0.95
NEAR_AGREEMENT = 0.9
NEAR_RADIUS = 1 / 32  # of the image side: 2 px at 64
# Share of an added shape's patch that must lie within the shape placed at its centre.
ADDED_FIT = 0.8
PSNR_CAP = 100.0  # dB, for an exact match
# Pixels this close (in pixels, 8-neighbourhood) to a blended edge pixel are not scored
# either: a model working in an 8x smaller latent space may soften an edge by a pixel
# without getting the edit wrong.
EDGE_MARGIN = 1


def colour_labels(scene: Scene, size: int) -> np.ndarray:
    """(size, size) palette indices of the rendered scene, BLENDED where an edge mixes two."""
    rows = (np.arange(size * SUPERSAMPLE) + 0.5) / (size * SUPERSAMPLE) < 0.5
    top_share = rows.reshape(size, SUPERSAMPLE).mean(axis=1)
    top, bottom = (PALETTE_NAMES.index(c) for c in (scene.background, scene.background_at(1.0)))
    labels = np.where(top_share == 1, top, np.where(top_share == 0, bottom, BLENDED))
    labels = np.repeat(labels[:, None], size, axis=1)
    for shape in scene.shapes:
        coverage = shape_coverage(shape, size)
        labels[coverage == 1] = PALETTE_NAMES.index(shape.colour)
        labels[(coverage > 0) & (coverage < 1)] = BLENDED
    return labels


def _grow(mask: np.ndarray, steps: int) -> np.ndarray:
    """The mask grown by `steps` pixels in all 8 directions."""
    for _ in range(steps):
        padded = np.pad(mask, 1)
        h, w = mask.shape
        mask = np.any([padded[i : i + h, j : j + w] for i in range(3) for j in range(3)], 0)
    return mask


def nearest_colours(image: np.ndarray) -> np.ndarray:
    """(H, W) index of the nearest palette colour of each pixel of an RGB image."""
    pixels = np.asarray(image, np.float64)[..., :3]
    distances = ((pixels[..., None, :] - _PALETTE) ** 2).sum(axis=-1)
    return distances.argmin(axis=-1)


@dataclass(frozen=True)
class EditScore:
    """One edit's score: success, the three agreements behind it, PSNR (dB) and L1 (0-1)."""

    success: bool
    changed_agreement: float
    kept_agreement: float
    near_agreement: float
    psnr: float
    l1: float


def score_edit(
    image: np.ndarray, before: Scene, after: Scene, instruction: str | None = None
) -> EditScore:
    """Scores an edited image (H, W, 3 uint8, square, at the size the scenes are rendered
    at) against the ground truth: the before-scene and the after-scene (a valid edit of it,
    so some pixel changes). With the `instruction` (a shapes-world phrasing), an added shape
    may lie anywhere the instruction allows (see the module docstring); without it, it must
    lie where `after` has it."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != image.shape[1] or image.shape[2] < 3:
        raise ValueError(f"expected a square RGB image (S, S, 3), got shape {image.shape}")
    pixels = image[..., :3].astype(np.float64)
    exact = _score_against(pixels, before, after)
    added = _added_shape(before, after)
    if instruction is None or added is None:
        return exact
    return _score_addition(pixels, before, after, added, instruction, exact)


def _added_shape(before: Scene, after: Scene) -> Shape | None:
    """The shape an add edit appended (apply_edit puts it last), else None."""
    if after.shapes[:-1] == before.shapes and len(after.shapes) == len(before.shapes) + 1:
        return after.shapes[-1]
    return None


def _score_addition(
    pixels: np.ndarray,
    before: Scene,
    after: Scene,
    added: Shape,
    instruction: str,
    exact: EditScore,
) -> EditScore:
    """The best score of the added shape placed where the image shows it, at each size the
    instruction allows; a failure if it lies outside the third the instruction names. PSNR
    and L1 stay those to the ground-truth image."""
    parsed = parse_instruction(instruction)
    if len(parsed) != 1 or parsed[0][0] != "add":
        raise ValueError(f"{instruction!r} is not one add instruction of the shapes world")
    fields = parsed[0][2]
    size = pixels.shape[0]
    colour = PALETTE_NAMES.index(added.colour)
    fresh = (nearest_colours(pixels) == colour) & (colour_labels(before, size) != colour)
    patches, count = ndimage.label(fresh)
    if count == 0:
        return exact
    patch = patches == 1 + int(np.argmax(np.bincount(patches.ravel())[1:]))
    ys, xs = np.nonzero(patch)
    x, y = (xs.mean() + 0.5) / size, (ys.mean() + 0.5) / size
    if "where" in fields and region_phrase(x, y) != fields["where"]:
        return dataclasses.replace(exact, success=False)
    candidates = []
    for name in [added.size] if "obj_sized" in fields else SIZE_ORDER:
        placed = dataclasses.replace(added, size=name, x=x, y=y)
        score = _score_against(
            pixels, before, dataclasses.replace(after, shapes=(*before.shapes, placed))
        )
        # The patch must also fit in the shape: a star drawn a size too large colours pixels
        # the near ring (2 px) does not reach.
        if patch[shape_coverage(placed, size) > 0].sum() < ADDED_FIT * patch.sum():
            score = dataclasses.replace(score, success=False)
        candidates.append(score)
    best = max(
        candidates,
        key=lambda c: (c.success, c.changed_agreement + c.kept_agreement + c.near_agreement),
    )
    return dataclasses.replace(best, psnr=exact.psnr, l1=exact.l1)


def _score_against(pixels: np.ndarray, before: Scene, after: Scene) -> EditScore:
    """score_edit with `after` taken as the one right result; pixels (S, S, 3) float."""
    size = pixels.shape[0]
    truth, start = (render(scene, size).astype(np.float64) for scene in (after, before))
    want, was = colour_labels(after, size), colour_labels(before, size)
    pure = (want != BLENDED) & (was != BLENDED)
    # Changed: every pixel the edit changes. A pure one must show the new palette colour; an
    # edge one must be nearer the true after-pixel than the before-pixel (a resize's
    # changed ring can be all edge pixels at 64 px).
    changed = np.any(truth != start, axis=-1)
    if not changed.any():
        raise ValueError(f"the before- and after-scene render the same at {size} px")
    right = nearest_colours(pixels) == want
    nearer = ((pixels - truth) ** 2).sum(-1) < ((pixels - start) ** 2).sum(-1)
    changed_agreement = float(np.where(pure, right, nearer)[changed].mean())
    kept = ~changed & ~_grow(~pure, EDGE_MARGIN)
    kept_agreement = float(right[kept].mean()) if kept.any() else 1.0
    near = kept & _grow(changed, max(1, round(NEAR_RADIUS * size)))
    near_agreement = float(right[near].mean()) if near.any() else 1.0
    error = pixels - truth
    mse = float((error**2).mean())
    psnr = PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(255.0**2 / mse))
    return EditScore(
        success=changed_agreement >= CHANGED_AGREEMENT
        and kept_agreement >= KEPT_AGREEMENT
        and near_agreement >= NEAR_AGREEMENT,
        changed_agreement=changed_agreement,
        kept_agreement=kept_agreement,
        near_agreement=near_agreement,
        psnr=psnr,
        l1=float(np.abs(error).mean() / 255.0),
    )


def summarize(scored: Iterable[tuple[str, EditScore]]) -> dict[str, dict[str, float]]:
    """Per edit kind and "overall": count, success rate, mean PSNR and mean L1."""
    groups: dict[str, list[EditScore]] = {}
    for kind, score in scored:
        groups.setdefault(kind, []).append(score)
        groups.setdefault("overall", []).append(score)
    return {
        kind: {
            "count": len(scores),
            "success": float(np.mean([s.success for s in scores])),
            "psnr": float(np.mean([s.psnr for s in scores])),
            "l1": float(np.mean([s.l1 for s in scores])),
        }
        for kind, scores in sorted(groups.items(), key=lambda item: item[0] == "overall")
    }
