"""``ip2p edit --manifest --buckets``: images of many sizes edited at their aspect-ratio
buckets, each bucket's batches of one shape (one sampler program per bucket), every output
at its input's size, and a rerun resuming."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from ip2p_jax.apps.bucket_edits import bucket_batches
from ip2p_jax.apps.cli.main import main
from ip2p_jax.apps.manifest import EditJob
from ip2p_jax.data.buckets import Bucket, bucket_list
from ip2p_jax.pipelines.base import _sample_latents
from ip2p_jax.pipelines.images import image_size

# (width, height) -> the bucket at 32**2 pixels, step 16 (the shapes model's factor):
# 16x64 16x48 32x32 48x16 64x16.
SIZES = {
    (40, 40): Bucket(32, 32),
    (36, 30): Bucket(32, 32),
    (33, 33): Bucket(32, 32),
    (90, 30): Bucket(48, 16),
    (100, 34): Bucket(48, 16),
}


def _images(folder) -> list[str]:
    rng = np.random.default_rng(0)
    names = []
    for width, height in SIZES:
        name = f"in_{width}x{height}.png"
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
        names.append(name)
    return names


def test_a_mixed_size_manifest_keeps_every_size_and_compiles_once_per_bucket(tmp_path, capsys):
    names = _images(tmp_path)
    manifest = tmp_path / "edits.jsonl"
    manifest.write_text(
        "".join(json.dumps({"image": name, "instruction": "make it blue"}) + "\n" for name in names)
    )
    out_dir = tmp_path / "out"
    args = ["edit", "--manifest", str(manifest), "--out-dir", str(out_dir), "--steps", "2"]
    args += ["--batch-size", "2", "--bucket-area", str(32 * 32)]  # the shipped shapes model
    _sample_latents.jitted.clear_cache()
    assert main(args) == 0
    # Two buckets: 32x32 (3 images: a batch of 2 and one padded to 2) and 48x16.
    assert _sample_latents.jitted._cache_size() == 2
    out = capsys.readouterr().out
    assert "32x32: 3 images in 2 batches of 2; 48x16: 2 images in 1 batches of 2" in out
    for number, (name, size) in enumerate(zip(names, SIZES, strict=True), start=1):
        assert Image.open(out_dir / f"{number:05d}_{name[:-4]}.png").size == size

    wide = [out_dir / "00004_in_90x30.png", out_dir / "00005_in_100x34.png"]
    first = [path.read_bytes() for path in wide]
    for path in wide:
        path.unlink()
    assert main(args) == 0
    assert "skipped 3 done" in capsys.readouterr().out
    assert [path.read_bytes() for path in wide] == first  # the same edits
    assert _sample_latents.jitted._cache_size() == 2  # in the program already compiled


def test_batches_hold_one_bucket_in_list_order(tmp_path):
    names = _images(tmp_path)
    jobs = [
        EditJob(k, tmp_path / name, "x", tmp_path / f"{k}.png", k, 7.5, 1.5)
        for k, name in enumerate(names)
    ]
    batches = bucket_batches(jobs, bucket_list(32 * 32, 16), 4)
    assert [(str(b.bucket), len(b.jobs), b.padding) for b in batches] == [
        ("32x32", 3, 0),
        ("48x16", 2, 0),
    ]
    assert [len(b.rows) for b in bucket_batches(jobs, bucket_list(32 * 32, 16), 2)] == [2, 2, 2]
    for batch in batches:
        assert all(SIZES[image_size(job.image)] == batch.bucket for job in batch.jobs)
        assert all(image.size == batch.bucket for image in batch.inputs())


def test_image_size_reads_the_exif_orientation(tmp_path):
    image = Image.new("RGB", (40, 30))
    exif = image.getexif()
    exif[0x0112] = 6  # turned a quarter: load_image gives 30x40
    image.save(tmp_path / "turned.jpg", exif=exif)
    assert image_size(tmp_path / "turned.jpg") == (30, 40)
