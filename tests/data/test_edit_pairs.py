"""The TFDS edit-pair dataset: exact round trips, splits, atomic writes, errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ip2p_jax.data.edit_pairs import (
    EditPairSource,
    find_dataset,
    split_sizes,
    write_dataset,
)
from ip2p_jax.data.schema import FIELDS, ExampleError, make_example
from ip2p_jax.pipelines.images import decode_png, encode_png
from tests.data.conftest import jpeg_bytes, pair_examples

ROOT = Path(__file__).resolve().parents[2]


def _mixed_examples():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    return [
        make_example(
            encode_png(a),
            encode_png(b),
            "make it snowy ❄",
            key="0000001/42",
            input_caption="a house",
            edited_caption="a house in snow",
            annotations=json.dumps({"before": [1, 2]}),
            seed=42,
            p2p_threshold=0.35,
            cfg_scale=9.25,
            clip_sim_0=0.25,
            clip_sim_1=0.26,
            clip_sim_dir=0.31,
            clip_sim_image=0.8,
        ),
        make_example(jpeg_bytes(a), jpeg_bytes(b), "turn the sky pink", key="hub/7"),
    ]


def _same(x, y) -> bool:
    if isinstance(x, float) and math.isnan(x):
        return isinstance(y, float) and math.isnan(y)
    if isinstance(x, float):
        return np.float32(x) == np.float32(y)  # stored as float32
    return x == y


def test_write_read_is_byte_and_pixel_exact(tmp_path):
    examples = _mixed_examples()
    path = write_dataset(tmp_path, {"train": examples}, metadata={"source": "test"})
    source = EditPairSource(tmp_path, "train")
    assert path == find_dataset(tmp_path) and len(source) == 2
    assert source.metadata == {"source": "test"}
    for i, written in enumerate(examples):
        read = source[i]
        assert set(read) == set(FIELDS)
        for name in FIELDS:
            assert _same(written[name], read[name]), name
        for name in ("input_image", "edited_image"):
            assert np.array_equal(decode_png(read[name]), decode_png(written[name]))
    assert math.isnan(source[1]["clip_sim_dir"]) and source[1]["seed"] == -1


def test_splits_keep_their_examples_in_written_order(pairs_dataset):
    assert split_sizes(pairs_dataset) == {"train": 36, "validation": 5}
    train = EditPairSource(pairs_dataset, "train")
    assert [train[i]["key"] for i in range(36)] == [f"ex/{i:04d}" for i in range(36)]
    assert EditPairSource(pairs_dataset, "validation")[4]["key"] == "val/0004"
    with pytest.raises(ValueError, match="no split 'test'.*'train', 'validation'"):
        EditPairSource(pairs_dataset, "test")


def test_missing_dataset_names_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="edit_pairs/<version>/dataset_info.json"):
        EditPairSource(tmp_path, "train")


def test_existing_dataset_is_not_replaced_silently(tmp_path):
    write_dataset(tmp_path, {"train": pair_examples(2)})
    with pytest.raises(FileExistsError, match="overwrite"):
        write_dataset(tmp_path, {"train": pair_examples(3)})
    write_dataset(tmp_path, {"train": pair_examples(3)}, overwrite=True)
    assert split_sizes(tmp_path) == {"train": 3}


def test_failed_build_keeps_the_old_dataset_and_leaves_no_staging(tmp_path):
    write_dataset(tmp_path, {"train": pair_examples(4)})

    def failing():
        yield from pair_examples(2)
        raise RuntimeError("generator died")

    with pytest.raises(RuntimeError, match="generator died"):
        write_dataset(tmp_path, {"train": failing()}, overwrite=True)
    assert split_sizes(tmp_path) == {"train": 4}
    assert EditPairSource(tmp_path, "train")[3]["key"] == "ex/0003"
    assert not list(tmp_path.glob(".staging-*"))


def test_bad_example_is_an_error_naming_its_key(tmp_path):
    good = list(pair_examples(1))[0]
    bad = dict(good, key="000123/9", edited_image=b"GIF89a...")
    with pytest.raises(ExampleError, match=r"'000123/9': edited_image must be PNG or JPEG"):
        write_dataset(tmp_path, {"train": [good, bad]})
    with pytest.raises(FileNotFoundError):
        find_dataset(tmp_path)
    with pytest.raises(ExampleError, match="empty instruction"):
        make_example(good["input_image"], good["edited_image"], "  ", key="k")
    with pytest.raises(ExampleError, match="unknown metadata.*'clip_sim'"):
        make_example(good["input_image"], good["edited_image"], "x", key="k", clip_sim=1.0)


def test_killed_build_leaves_nothing_that_loads(tmp_path):
    """SIGKILL in the middle of writing: no dataset appears, not even a partial one."""
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from tests.data.conftest import pair_examples
        from ip2p_jax.data.edit_pairs import write_dataset

        def slow():
            for i, example in enumerate(pair_examples(1000)):
                if i == 5:
                    open({str(tmp_path / "writing")!r}, "w").close()
                    time.sleep(60)
                yield example

        write_dataset({str(tmp_path)!r}, {{"train": slow()}})
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "writing").exists():
            assert process.poll() is None and time.monotonic() < deadline, "writer never started"
            time.sleep(0.05)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    with pytest.raises(FileNotFoundError):
        find_dataset(tmp_path)
    assert not (tmp_path / "edit_pairs").exists()
