"""Reading a component's config.json: every field is either used, pinned or refused.

A field that changes the math and that we don't implement must never be silently ignored:
it must hold the one value we implement (its ``pinned`` value), or loading stops with an
error that names the field, the file and what we support.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A component config asks for something this port does not implement."""


def load_json(path: Path) -> dict[str, Any]:
    """Reads a JSON file, naming it in the error when it is missing or malformed."""
    if not path.is_file():
        raise FileNotFoundError(f"missing config file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from err


def read_fields(
    raw: Mapping[str, Any],
    *,
    source: str,
    used: Mapping[str, Any],
    pinned: Mapping[str, Any] = {},
    harmless: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Returns the ``used`` fields of ``raw`` (missing ones take the given defaults).

    ``pinned`` fields must equal their value (missing is fine); ``harmless`` fields and
    ``_private`` keys are accepted and dropped; anything else is an unknown field.
    """
    for key, value in raw.items():
        if key.startswith("_") or key in used or key in harmless:
            continue
        if key in pinned:
            if value != pinned[key] and not _same_sequence(value, pinned[key]):
                raise ConfigError(
                    f"{source}: {key}={value!r} is not supported (only {pinned[key]!r})"
                )
            continue
        raise ConfigError(
            f"{source}: unknown config field {key!r}={value!r}; refusing to guess its meaning"
        )
    return {key: raw.get(key, default) for key, default in used.items()}


def _same_sequence(a: Any, b: Any) -> bool:
    return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)


def per_block(value: Any, blocks: int, name: str, source: str) -> tuple:
    """An int-or-list config value expanded to one entry per block."""
    if isinstance(value, (list, tuple)):
        if len(value) != blocks:
            raise ConfigError(f"{source}: {name} has {len(value)} entries for {blocks} blocks")
        return tuple(value)
    return (value,) * blocks
