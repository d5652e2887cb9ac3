"""A content fingerprint of a model folder (or a single checkpoint file), cheap on multi-GB
checkpoints: it says which weights a dataset was generated with without reading them all.

Config-like files (JSON configs, tokenizer files, scheduler configs: everything that is not a
weight file) are hashed in full. Weight files are hashed by their size, their safetensors
header when they have one (tensor names, dtypes, shapes, offsets), and a sample of their
bytes: `SAMPLES` chunks of `CHUNK` bytes spread evenly from the first to the last (the whole
file when it is that small). Two checkpoints of one architecture with different weights
differ in the sampled bytes unless they differ nowhere the samples fall; every fine-tune of
a whole model does, an edit of a few values in the middle of a large file may not.

Files are taken in sorted relative-path order; hidden files and folders (a leading ".", such
as .git or huggingface_hub's .cache) are skipped; the folder's own path and name are not
part of the fingerprint, so a copy elsewhere under another name has the same one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# Weight files, sampled rather than read in full. Beyond the PyTorch, safetensors and Flax
# formats, other large binary formats a hub folder may carry (Keras, ONNX, GGUF, numpy).
WEIGHT_SUFFIXES = frozenset(
    {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack"}
    | {".h5", ".onnx", ".gguf", ".npz", ".npy"}
)
# Any other file this large is sampled too: no config or tokenizer file comes near it, and
# a weight file with an unforeseen suffix must not make the fingerprint read gigabytes.
LARGE_FILE = 256 * 2**20
CHUNK = 2**20
SAMPLES = 8
# safetensors headers are a few hundred KiB at most; a larger "length" means not safetensors
_MAX_SAFETENSORS_HEADER = 100 * 2**20
_VERSION = b"ip2p-folder-fingerprint/1"


def folder_fingerprint(path: str | os.PathLike) -> str:
    """The sha256 hex digest identifying the model folder or single weight/config file at
    `path` by content (see the module docstring for what is read). Raises FileNotFoundError
    when `path` does not exist."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"cannot fingerprint {root}: no such file or folder")
    digest = hashlib.sha256(_VERSION)
    if root.is_file():
        # a single file is identified by its content, not its name; its suffix still says
        # how it is read
        _add_file(digest, root, "")
    else:
        for relative in _files(root):
            _add_file(digest, root / relative, relative)
    return digest.hexdigest()


def _files(root: Path) -> list[str]:
    """Relative POSIX paths of the non-hidden files under `root`, sorted. Symlinks are
    followed (huggingface_hub snapshots link their files to blobs), each folder once."""
    found: list[str] = []
    seen: set[str] = set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in names:
            full = Path(folder, name)
            if name.startswith("."):
                continue
            if full.is_symlink() and not full.exists():  # e.g. a blob missing from a snapshot
                raise FileNotFoundError(f"cannot fingerprint {root}: {full} is a broken link")
            if full.is_file():
                found.append(full.relative_to(root).as_posix())
    return sorted(found)


def _field(digest, data: bytes) -> None:
    """Length-prefixed, so that no two different sequences of fields hash alike."""
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def _add_file(digest, file: Path, relative: str) -> None:
    size = file.stat().st_size
    suffix = file.suffix.lower()
    _field(digest, relative.encode())
    _field(digest, str(size).encode())
    with open(file, "rb") as stream:
        if suffix not in WEIGHT_SUFFIXES and size <= LARGE_FILE:
            _field(digest, b"full")
            for block in iter(lambda: stream.read(CHUNK), b""):
                digest.update(block)
            return
        header = _safetensors_header(stream, size) if suffix == ".safetensors" else None
        if header is not None:
            _field(digest, b"safetensors")
            _field(digest, header)
        else:
            _field(digest, b"sampled")
        start = 0 if header is None else 8 + len(header)  # the tensors' bytes
        for offset, length in _sample_spans(start, size):
            stream.seek(offset)
            _field(digest, stream.read(length))


def _safetensors_header(stream, size: int) -> bytes | None:
    """The JSON header of a safetensors file (little-endian u64 length, then the JSON), or
    None when the file is not laid out as one (it is then sampled as any weight file)."""
    stream.seek(0)
    prefix = stream.read(8)
    if len(prefix) < 8:
        return None
    length = int.from_bytes(prefix, "little")
    if length > min(size - 8, _MAX_SAFETENSORS_HEADER):
        return None
    header = stream.read(length)
    return header if header.lstrip().startswith(b"{") else None


def _sample_spans(start: int, end: int) -> list[tuple[int, int]]:
    """(offset, length) of the bytes sampled from [start, end): all of them when they fit in
    SAMPLES chunks, else SAMPLES chunks evenly spread, the first at `start` and the last
    ending at `end`."""
    if end - start <= SAMPLES * CHUNK:
        return [(start, end - start)]
    step = (end - start - CHUNK) / (SAMPLES - 1)
    return [(start + round(k * step), CHUNK) for k in range(SAMPLES)]
