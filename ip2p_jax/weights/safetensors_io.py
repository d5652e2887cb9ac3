"""Reading and writing weight files without torch: safetensors (single or sharded) and,
when torch is installed, legacy ``.bin`` pickles. Writes stream tensor by tensor, atomically."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

_DTYPES = {
    np.dtype("float64"): "F64",
    np.dtype("float32"): "F32",
    np.dtype("float16"): "F16",
    np.dtype("int64"): "I64",
    np.dtype("int32"): "I32",
    np.dtype("int16"): "I16",
    np.dtype("int8"): "I8",
    np.dtype("uint8"): "U8",
    np.dtype("bool"): "BOOL",
}
try:  # bfloat16 through ml_dtypes, which jax always installs
    import ml_dtypes

    _DTYPES[np.dtype(ml_dtypes.bfloat16)] = "BF16"
except ImportError:  # pragma: no cover
    pass


class WeightsError(ValueError):
    """A weight file is missing, unreadable or truncated."""


def _raw_header(path: Path) -> tuple[dict, int]:
    """The header JSON as stored (``__metadata__`` included) and its length in bytes."""
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                raise ValueError(f"header length {length} exceeds the file size {size}")
            return json.loads(handle.read(length)), length
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as err:
        raise WeightsError(
            f"{path}: not a readable safetensors file ({err}); is the download truncated?"
        ) from err


def read_metadata(path: Path) -> dict[str, str]:
    """The file's ``__metadata__`` (string to string; empty when it has none)."""
    return dict(_raw_header(path)[0].get("__metadata__") or {})


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """The safetensors header (name -> dtype, shape, offsets) and where the data starts.

    Checks the file is long enough for every tensor, so a truncated download fails here,
    by name, rather than halfway through a conversion.
    """
    header, length = _raw_header(path)
    header.pop("__metadata__", None)
    size = path.stat().st_size
    data_start = 8 + length
    needed = max((info["data_offsets"][1] for info in header.values()), default=0)
    if data_start + needed > size:
        raise WeightsError(
            f"{path}: truncated: its header needs {data_start + needed} bytes, the file has "
            f"{size}; is the download truncated?"
        )
    return header, data_start


def iter_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) one tensor at a time, read into fresh buffers (no memory map),
    so a conversion holds about one source tensor beside what it has converted."""
    header, data_start = read_header(path)
    dtypes = {code: dtype for dtype, code in _DTYPES.items()}
    with open(path, "rb") as handle:
        for name, info in header.items():
            if info["dtype"] not in dtypes:
                raise WeightsError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            array = np.empty(info["shape"], dtypes[info["dtype"]])
            if array.nbytes != end - begin:
                raise WeightsError(
                    f"{path}: tensor {name!r} has {end - begin} bytes for "
                    f"shape {info['shape']} {info['dtype']}"
                )
            handle.seek(data_start + begin)
            handle.readinto(array.reshape(-1).view(np.uint8).data)
            yield name, array


def iter_torch_bin(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yields the tensors of a PyTorch ``.bin`` checkpoint (needs torch, imported here only)."""
    try:
        import torch
    except ImportError as err:
        raise WeightsError(
            f"{path} is a PyTorch pickle; reading it needs torch (pip install 'ip2p-jax[torch]'),"
            " or convert it to safetensors"
        ) from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a bad pickle
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({err})") from err
    for name in list(state):
        tensor = state.pop(name)
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        yield name, tensor.numpy()


def find_weights(folder: Path, stem: str) -> list[Path]:
    """The weight files of one component: ``stem.safetensors``, its sharded index, or ``.bin``."""
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    legacy = {
        "diffusion_pytorch_model": "diffusion_pytorch_model.bin",
        "model": "pytorch_model.bin",
    }
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise WeightsError(f"{index}: not a valid shard index ({err!r})") from err
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise WeightsError(f"{index} lists shards that are missing: {missing}")
        return [folder / s for s in shards]
    bin_file = folder / legacy.get(stem, f"{stem}.bin")
    if bin_file.is_file():
        return [bin_file]
    raise WeightsError(
        f"{folder} has no weights: expected {single.name}, {index.name} or {bin_file.name}"
    )


def iter_weights(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """Yields every tensor of the given weight files."""
    for path in files:
        reader = iter_torch_bin if path.suffix == ".bin" else iter_safetensors
        yield from reader(path)


def write_safetensors(
    path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Writes a safetensors file tensor by tensor (no whole-file buffer), atomically.

    ``tensors`` may hold views (a transposed kernel, say): each is made contiguous only while
    it is written, so peak memory stays near the size of the arrays given.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, array in tensors.items():
        if array.dtype not in _DTYPES:
            raise WeightsError(f"{path}: tensor {name!r} has unsupported dtype {array.dtype}")
        size = array.size * array.dtype.itemsize
        header[name] = {
            "dtype": _DTYPES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors does
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            for array in tensors.values():
                out.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
