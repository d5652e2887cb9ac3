"""Writes that are whole or absent: a killed job never leaves a half-written file or folder."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_folder(destination: Path, overwrite: bool) -> Iterator[Path]:
    """Yields a temporary sibling folder that replaces ``destination`` only once complete."""
    destination = Path(destination)
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination} exists; pass overwrite=True (--overwrite) to replace")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}."))
    try:
        yield staging
        if destination.exists():
            trash = destination.with_name(f".{destination.name}.old")
            shutil.rmtree(trash, ignore_errors=True)
            destination.rename(trash)
            staging.rename(destination)
            shutil.rmtree(trash)
        else:
            staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to a sibling temporary file, then renames it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fp:
            fp.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` (UTF-8) to a sibling temporary file, then renames it over ``path``."""
    return write_bytes_atomically(path, text.encode("utf-8"))


def record_settings(path: str | os.PathLike, settings: dict[str, Any], *, fix: str) -> dict:
    """A resumable job's settings: written to ``path`` (JSON, atomically) the first time;
    afterwards they must equal the ones stored there, else ValueError naming each changed key
    (stored -> given) and ``fix``. Returns the settings as JSON reads them back (lists, not
    tuples)."""
    path = Path(path)
    settings = json.loads(json.dumps(settings))
    if not path.is_file():
        write_text_atomically(path, json.dumps(settings, indent=2, sort_keys=True))
        return settings
    stored = json.loads(path.read_text())
    changed = sorted(k for k in settings.keys() | stored.keys() if settings.get(k) != stored.get(k))
    if changed:
        details = ", ".join(f"{k}: {stored.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        raise ValueError(f"{path} was written with other settings ({details}); {fix}")
    return settings
