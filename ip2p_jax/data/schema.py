"""One edit-pair example: the fields every source (our generator, the original release, the
hub parquet sets, the shapes world) hands to the dataset writer, checked at the boundary.

An example is a plain dict. Images stay encoded (PNG or JPEG bytes) all the way into the
dataset, so a write -> read round trip is byte-exact and TFDS needs no TensorFlow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

IMAGE_FIELDS = ("input_image", "edited_image")
TEXT_FIELDS = ("instruction", "input_caption", "edited_caption", "key", "annotations")
INT_FIELDS = ("seed",)
# The original generator's metadata.jsonl: Prompt-to-Prompt share fraction, CFG scale and the
# four CLIP similarities of its filter (caption 0/1 vs image 0/1, direction, image-image).
FLOAT_FIELDS = (
    "p2p_threshold",
    "cfg_scale",
    "clip_sim_0",
    "clip_sim_1",
    "clip_sim_dir",
    "clip_sim_image",
)
FIELDS = IMAGE_FIELDS + TEXT_FIELDS + INT_FIELDS + FLOAT_FIELDS
UNKNOWN_SEED = -1  # metadata a source does not have: seed -1, floats NaN, text ""

_MAGIC = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpeg"}


class ExampleError(ValueError):
    """An example that cannot go into a dataset, naming the example and the field."""


def image_format(data: bytes) -> str | None:
    """'png' or 'jpeg' from the leading bytes, None for anything else."""
    for magic, name in _MAGIC.items():
        if data[: len(magic)] == magic:
            return name
    return None


def make_example(
    input_image: bytes,
    edited_image: bytes,
    instruction: str,
    *,
    key: str,
    input_caption: str = "",
    edited_caption: str = "",
    annotations: str = "",
    seed: int = UNKNOWN_SEED,
    **metadata: float,
) -> dict[str, Any]:
    """An example with every field present and typed; raises ExampleError naming `key` and
    the field for anything the dataset cannot hold (non-image bytes, empty instruction,
    unknown metadata). `annotations` is free JSON (the shapes world's before/after scenes)."""
    unknown = set(metadata) - set(FLOAT_FIELDS)
    if unknown:
        raise ExampleError(
            f"example {key!r}: unknown metadata {sorted(unknown)}; expected some of "
            f"{list(FLOAT_FIELDS)}"
        )
    example: dict[str, Any] = {
        "input_image": input_image,
        "edited_image": edited_image,
        "instruction": instruction,
        "input_caption": input_caption,
        "edited_caption": edited_caption,
        "key": key,
        "annotations": annotations,
        "seed": seed,
    }
    for name in FLOAT_FIELDS:
        value = metadata.get(name)
        example[name] = math.nan if value is None else float(value)
    return validate_example(example)


def validate_example(example: Mapping[str, Any]) -> dict[str, Any]:
    """Checks a complete example dict; returns it as a new dict of exact types."""
    key = example.get("key", "?")
    missing = [name for name in FIELDS if name not in example]
    if missing:
        raise ExampleError(f"example {key!r}: missing fields {missing}")
    out = dict(example)
    for name in IMAGE_FIELDS:
        data = out[name]
        if not isinstance(data, bytes | bytearray) or image_format(bytes(data)) is None:
            shown = bytes(data[:8]) if isinstance(data, bytes | bytearray) else type(data)
            raise ExampleError(f"example {key!r}: {name} must be PNG or JPEG bytes, got {shown!r}")
        out[name] = bytes(data)
    for name in TEXT_FIELDS:
        if not isinstance(out[name], str):
            raise ExampleError(f"example {key!r}: {name} must be str, got {type(out[name])}")
    if not out["instruction"].strip():
        raise ExampleError(f"example {key!r}: empty instruction")
    try:
        out["seed"] = int(out["seed"])
        for name in FLOAT_FIELDS:
            out[name] = float(out[name])
    except (TypeError, ValueError) as err:
        raise ExampleError(f"example {key!r}: bad metadata ({err})") from err
    return out
