"""The edit-pair dataset on disk: a TFDS dataset in array_record files, written from any
iterator of examples and read back by index, all without TensorFlow.

    DIR/edit_pairs/1.0.0/{dataset_info.json, features.json, edit_pairs-train.array_record-*}

Images are stored as the encoded PNG/JPEG bytes they came in (TFDS decodes numpy images with
tf.image, and re-encoding would change JPEG pixels), and read back the same way: decoding
belongs to the input pipeline's workers, where a corrupt image can be skipped and counted.
Writes are atomic: the dataset is built in a hidden staging folder and renamed into place, so
a killed build leaves nothing that loads as a dataset.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ip2p_jax.data.schema import (
    FLOAT_FIELDS,
    IMAGE_FIELDS,
    INT_FIELDS,
    TEXT_FIELDS,
    validate_example,
)

DATASET_NAME = "edit_pairs"
VERSION = "1.0.0"
RELEASE_NOTES = {"1.0.0": "Edit pairs with captions, generator metadata and annotations."}


def _tfds():
    # Imported on first use: TFDS takes ~2 s to import and most commands never need it.
    import tensorflow_datasets as tfds

    return tfds


def features():
    """The TFDS feature dict of one example (see ip2p_jax.data.schema for the meaning)."""
    tfds = _tfds()
    spec: dict[str, Any] = {
        name: tfds.features.Image(shape=(None, None, 3), doc="encoded PNG or JPEG")
        for name in IMAGE_FIELDS
    }
    spec.update({name: tfds.features.Text() for name in TEXT_FIELDS})
    spec.update({name: tfds.features.Scalar(np.int64) for name in INT_FIELDS})
    spec.update({name: tfds.features.Scalar(np.float32) for name in FLOAT_FIELDS})
    return tfds.features.FeaturesDict(spec)


@functools.cache
def _builder_class():
    tfds = _tfds()

    # Not registered: it is built from our iterators, never looked up by name.
    class EditPairs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Instruction-edit pairs: input image, edited image, instruction, captions."""

        name = DATASET_NAME
        VERSION = tfds.core.Version(VERSION)
        RELEASE_NOTES = RELEASE_NOTES

        def __init__(self, *, splits, description, metadata, **kwargs):
            self._splits = splits
            self._description = description
            self._metadata = metadata
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=self._description,
                features=features(),
                metadata=tfds.core.MetadataDict(self._metadata),
                # Keep the order examples were written in: index i is the i-th example of its
                # split, so sources stay traceable; shuffling is the input pipeline's job.
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            return {name: _keyed(examples) for name, examples in self._splits.items()}

        def _generate_examples(self):  # unused: _split_generators hands the generators over
            raise NotImplementedError

    return EditPairs


def _keyed(examples: Iterable[Mapping[str, Any]]) -> Iterator[tuple[int, dict]]:
    for index, example in enumerate(examples):
        yield index, validate_example(example)


def write_dataset(
    out_dir: str | os.PathLike,
    splits: Mapping[str, Iterable[Mapping[str, Any]]],
    *,
    description: str = "",
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes each split's examples (dicts as ip2p_jax.data.schema.make_example builds them)
    as a TFDS dataset under `out_dir`; returns the dataset's version folder.

    Examples stream through (any iterator works); a bad example raises ExampleError naming
    its key before anything is in place. `metadata` (JSON-able) is stored with the dataset.
    """
    out_dir = Path(out_dir)
    target = out_dir / DATASET_NAME / VERSION
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{target} already holds a dataset; pass overwrite=True (--overwrite) to replace it"
        )
    if not splits:
        raise ValueError("no splits to write")
    for name in splits:
        if not name.isidentifier():
            raise ValueError(f"split name {name!r} must be a word (letters, digits, _)")
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    try:
        builder = _builder_class()(
            splits=splits,
            description=description,
            metadata=dict(metadata or {}),
            data_dir=str(staging),
            file_format="array_record",
        )
        # TFDS prints 'Downloading and preparing ... to <staging>': misleading here. Its
        # progress bars (examples written per split) go to stderr and stay.
        with contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare()
        built = staging / DATASET_NAME / VERSION
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # overwrite: move the old one aside only once the new one is whole
            old = staging / "replaced"
            os.replace(target, old)
        os.replace(built, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def find_dataset(path: str | os.PathLike) -> Path:
    """The version folder of a dataset given it, its parent (newest version) or the folder
    write_dataset wrote into."""
    path = Path(path)
    for candidate in (path, path / DATASET_NAME):
        if (candidate / "dataset_info.json").is_file():
            return candidate
        versions = sorted(
            (p for p in candidate.glob("*.*.*") if (p / "dataset_info.json").is_file()),
            key=lambda p: tuple(int(part) for part in p.name.split(".") if part.isdigit()),
        )
        if versions:
            return versions[-1]
    raise FileNotFoundError(
        f"no edit-pair dataset at {path}: expected {path}/{DATASET_NAME}/<version>/"
        "dataset_info.json (write one with `ip2p datagen` or ip2p_jax.data.write_dataset)"
    )


class EditPairSource:
    """Random access to one split: `source[i]` is example i as a dict of python values, images
    still encoded. Picklable, so grain's worker processes can each open it."""

    def __init__(self, path: str | os.PathLike, split: str):
        self.path = find_dataset(path)
        self.split = split
        builder = _tfds().builder_from_directory(str(self.path))
        available = list(builder.info.splits)
        if split not in available:
            raise ValueError(f"{self.path} has no split {split!r}; it has {available}")
        skip = {name: _tfds().decode.SkipDecoding() for name in IMAGE_FIELDS}
        self._source = builder.as_data_source(split=split, decoders=skip)
        self.metadata = dict(builder.info.metadata or {})

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return _to_python(self._source[index])

    def __repr__(self) -> str:
        # No absolute path: grain checks this string on resume, and mounts differ by host.
        name = f"{self.path.parent.name}/{self.path.name}"
        return f"EditPairSource({name!r}, split={self.split!r}, len={len(self)})"


def _to_python(record: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in record.items():
        if name in TEXT_FIELDS:
            out[name] = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        elif name in IMAGE_FIELDS:
            out[name] = bytes(value)
        elif name in INT_FIELDS:
            out[name] = int(value)
        else:
            out[name] = float(value)
    return out


def split_sizes(path: str | os.PathLike) -> dict[str, int]:
    """Number of examples per split, from the dataset's info file alone."""
    info = json.loads((find_dataset(path) / "dataset_info.json").read_text())
    return {
        split["name"]: sum(int(n) for n in split.get("shardLengths", []))
        for split in info.get("splits", [])
    }
