"""Writes that are whole or absent: a killed job never leaves a half-written file or folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
