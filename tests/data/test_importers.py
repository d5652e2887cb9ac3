"""The importers of the original folder format and the hub parquet sets, on small local samples
written the way the original scripts and Hugging Face `datasets` write them."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ip2p_jax.data.importers import (
    DataImportWarning,
    ImportReport,
    import_original,
    import_parquet,
    original_split_names,
    split_bounds,
    split_by_key,
    write_seeds_json,
)
from ip2p_jax.data.schema import FIELDS, UNKNOWN_SEED

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image type


def _encode(seed: int, fmt: str) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def jpeg(seed: int) -> bytes:
    return _encode(seed, "JPEG")


def png(seed: int) -> bytes:
    return _encode(seed, "PNG")


def original_metadata(seed: int) -> dict:
    """A metadata.jsonl line as generate_img_dataset.py writes it: seed plus p2p params."""
    return {
        "seed": seed,
        "p2p_threshold": 0.1 + seed % 7 / 10,
        "cfg_scale": 7.5,
        "clip_sim_0": 0.21 + seed / 1e4,
        "clip_sim_1": 0.22,
        "clip_sim_dir": 0.25,
        "clip_sim_image": 0.81,
    }


def write_original(root: Path, n_prompts: int, seeds_per_prompt: int = 2) -> dict:
    """An original-format folder; returns {(prompt dir, seed str): (prompt, bytes0, bytes1)}."""
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    listing = []
    for i in range(n_prompts):
        name = f"{i:07d}"
        prompt_dir = root / name
        prompt_dir.mkdir()
        prompt = {
            "input": f"a photo of thing {i}",
            "edit": f"make thing {i} red",
            "output": f"a photo of red thing {i}",
            "url": f"https://example.com/{i}.jpg",
        }
        (prompt_dir / "prompt.json").write_text(json.dumps(prompt))
        seeds = [str(1000 * i + 37 * k + 5) for k in range(seeds_per_prompt)]
        with open(prompt_dir / "metadata.jsonl", "a") as fp:
            for seed in seeds:
                image_0, image_1 = jpeg(int(seed)), jpeg(int(seed) + 1)
                (prompt_dir / f"{seed}_0.jpg").write_bytes(image_0)
                (prompt_dir / f"{seed}_1.jpg").write_bytes(image_1)
                fp.write(f"{json.dumps(original_metadata(int(seed)))}\n")
                written[(name, seed)] = (prompt, image_0, image_1)
        listing.append((name, sorted(seeds)))
    with open(root / "seeds.json", "w") as fp:
        json.dump(sorted(listing), fp)
    return written


def write_seeds_only(root: Path, n_prompts: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    names = [f"{i:07d}" for i in range(n_prompts)]
    (root / "seeds.json").write_text(json.dumps([[name, ["1"]] for name in names]))
    return names


def original_edit_dataset_slice(seeds: list, split: str, splits=(0.9, 0.05, 0.05)) -> list:
    """edit_dataset.py's own split code, kept verbatim in spirit."""
    split_0, split_1 = {
        "train": (0.0, splits[0]),
        "val": (splits[0], splits[0] + splits[1]),
        "test": (splits[0] + splits[1], 1.0),
    }[split]
    idx_0 = math.floor(split_0 * len(seeds))
    idx_1 = math.floor(split_1 * len(seeds))
    return seeds[idx_0:idx_1]


# --------------------------------------------------------------------------------------------
# Original folder format
# --------------------------------------------------------------------------------------------


def test_split_boundaries_n20_are_18_1_1(tmp_path):
    names = write_seeds_only(tmp_path, 20)
    split = original_split_names(tmp_path)
    assert [len(split[s]) for s in ("train", "validation", "test")] == [18, 1, 1]
    assert split["validation"] == [names[18]] and split["test"] == [names[19]]
    assert split_bounds(20) == {"train": (0, 18), "validation": (18, 19), "test": (19, 20)}


@pytest.mark.parametrize("n", [20, 37, 1, 3, 101])
def test_split_matches_original_formula_and_partitions_prompts(tmp_path, n):
    names = write_seeds_only(tmp_path, n)
    split = original_split_names(tmp_path)
    for ours, theirs in (("train", "train"), ("validation", "val"), ("test", "test")):
        assert split[ours] == original_edit_dataset_slice(names, theirs)
    every = split["train"] + split["validation"] + split["test"]
    assert sorted(every) == names and len(set(every)) == n  # each prompt exactly once


def test_n37_boundaries_hard(tmp_path):
    write_seeds_only(tmp_path, 37)
    split = original_split_names(tmp_path)
    assert [len(split[s]) for s in ("train", "validation", "test")] == [33, 2, 2]


def test_import_original_exact_examples(tmp_path):
    written = write_original(tmp_path, n_prompts=3)  # n=3: train 2 prompts, val 0, test 1
    report = ImportReport()
    train = list(import_original(tmp_path, "train", report=report))
    test = list(import_original(tmp_path, "test"))
    assert list(import_original(tmp_path, "validation")) == []
    assert [e["key"] for e in train] == ["0000000/42", "0000000/5", "0000001/1005", "0000001/1042"]
    assert [e["key"] for e in test] == ["0000002/2005", "0000002/2042"]
    assert report.imported == 4 and report.skipped == {} and report.unknown_metadata == 0
    for example in train + test:
        name, seed = example["key"].split("/")
        prompt, image_0, image_1 = written[(name, seed)]
        assert set(example) == set(FIELDS)
        assert example["input_image"] == image_0 and example["edited_image"] == image_1
        assert example["instruction"] == prompt["edit"]
        assert example["input_caption"] == prompt["input"]
        assert example["edited_caption"] == prompt["output"]
        assert example["seed"] == int(seed)
        metadata = original_metadata(int(seed))
        for field in ("p2p_threshold", "cfg_scale", "clip_sim_0", "clip_sim_dir"):
            assert example[field] == metadata[field]
        assert example["annotations"] == ""


def test_import_original_skips_and_counts_bad_data(tmp_path):
    write_original(tmp_path, n_prompts=1, seeds_per_prompt=5)  # n=1: floors put it in test
    prompt_dir = tmp_path / "0000000"
    (prompt_dir / "42_1.jpg").unlink()  # missing edited image
    (prompt_dir / "79_0.jpg").write_bytes(b"<html>not an image</html>")  # corrupt
    lines = (prompt_dir / "metadata.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["seed"] != 116]
    (prompt_dir / "metadata.jsonl").write_text("\n".join(kept) + "\n")  # 116 has no line

    report = ImportReport()
    with pytest.warns(DataImportWarning) as caught:
        examples = list(import_original(tmp_path, "test", report=report))
    assert [e["key"] for e in examples] == ["0000000/116", "0000000/153", "0000000/5"]
    assert report.imported == 3
    assert report.skipped == {"missing_image": 1, "not_an_image": 1}
    assert report.examples_of_skips["missing_image"] == [str(prompt_dir / "42_1.jpg")]
    assert report.examples_of_skips["not_an_image"] == [str(prompt_dir / "79_0.jpg")]
    assert report.unknown_metadata == 1
    unknown = examples[0]
    assert unknown["seed"] == 116 and math.isnan(unknown["clip_sim_dir"])
    assert unknown["input_image"] == (prompt_dir / "116_0.jpg").read_bytes()
    assert examples[1]["clip_sim_dir"] == 0.25
    assert len(caught) == 1  # one summary at the end, not one warning per example
    message = str(caught[0].message)
    assert "missing_image: 1" in message and "42_1.jpg" in message and "79_0.jpg" in message


def test_import_original_bad_prompt_json_and_missing_metadata_file(tmp_path):
    write_original(tmp_path, n_prompts=2)  # n=2: prompt 0 in train, prompt 1 in test
    (tmp_path / "0000000" / "prompt.json").write_text("{not json")
    (tmp_path / "0000001" / "metadata.jsonl").unlink()
    train_report, test_report = ImportReport(), ImportReport()
    with pytest.warns(DataImportWarning, match="bad_prompt_json: 2"):
        assert list(import_original(tmp_path, "train", report=train_report)) == []
    assert train_report.skipped == {"bad_prompt_json": 2} and train_report.imported == 0
    with pytest.warns(DataImportWarning, match="metadata left unknown"):
        examples = list(import_original(tmp_path, "test", report=test_report))
    assert [e["key"] for e in examples] == ["0000001/1005", "0000001/1042"]
    assert test_report.skipped == {} and test_report.unknown_metadata == 2
    assert all(e["seed"] > 1000 and math.isnan(e["cfg_scale"]) for e in examples)


def test_missing_seeds_json_says_how_to_create_it(tmp_path):
    written = write_original(tmp_path, n_prompts=3)
    seeds_json = tmp_path / "seeds.json"
    expected = json.loads(seeds_json.read_text())
    seeds_json.unlink()
    with pytest.raises(FileNotFoundError, match=r"seeds\.json.*write_seeds_json"):
        import_original(tmp_path, "train")
    (tmp_path / "empty_dir").mkdir()  # no *_0.jpg: left out, as prepare_dataset.py does
    assert write_seeds_json(tmp_path) == seeds_json
    assert json.loads(seeds_json.read_text()) == expected
    assert len(list(import_original(tmp_path, "train"))) == 4 and len(written) == 6
    assert len(list(import_original(tmp_path, "test"))) == 2


def test_import_original_argument_errors(tmp_path):
    (tmp_path / "seeds.json").write_text('["0000000", "0000001"]')
    with pytest.raises(ValueError, match=r"seeds\.json.*bad entry '0000000'"):
        import_original(tmp_path, "train")
    write_seeds_only(tmp_path, 3)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        import_original(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="'val'.*validation"):
        import_original(tmp_path, "val")
    with pytest.raises(ValueError, match="sum"):
        import_original(tmp_path, "train", splits=(0.9, 0.05, 0.1))


# --------------------------------------------------------------------------------------------
# Hub parquet sets
# --------------------------------------------------------------------------------------------


def image_column(values: list) -> pa.Array:
    """An image column the way `datasets` stores it: struct<bytes, path>."""
    return pa.array(
        [None if v is None else {"bytes": v[0], "path": v[1]} for v in values], type=HF_IMAGE
    )


def write_clip_filtered(path: Path, rows: list[dict]) -> None:
    table = pa.table(
        {
            "original_prompt": pa.array([r["original_prompt"] for r in rows], pa.string()),
            "original_image": image_column([r["original_image"] for r in rows]),
            "edit_prompt": pa.array([r["edit_prompt"] for r in rows], pa.string()),
            "edited_prompt": pa.array([r["edited_prompt"] for r in rows], pa.string()),
            "edited_image": image_column([r["edited_image"] for r in rows]),
        }
    )
    pq.write_table(table, path, row_group_size=3)


def write_samples_1000(path: Path, rows: list[dict]) -> None:
    table = pa.table(
        {
            "input_image": image_column([r["input_image"] for r in rows]),
            "edit_prompt": pa.array([r["edit_prompt"] for r in rows], pa.string()),
            "edited_image": image_column([r["edited_image"] for r in rows]),
        }
    )
    pq.write_table(table, path)


def clip_rows(n: int, offset: int = 0) -> list[dict]:
    return [
        {
            "original_prompt": f"a cat {i}",
            "original_image": (png(offset + i), None),
            "edit_prompt": f"turn cat {i} into a dog",
            "edited_prompt": f"a dog {i}",
            "edited_image": (jpeg(offset + 100 + i), f"edited_{i}.jpg"),
        }
        for i in range(n)
    ]


def test_import_parquet_clip_filtered_exact(tmp_path):
    rows = clip_rows(7)
    path = tmp_path / "train-00000-of-00001.parquet"
    write_clip_filtered(path, rows)
    report = ImportReport()
    # batch_size 2 over row groups of 3: row indices must run on across batches and groups
    examples = list(import_parquet(path, batch_size=2, report=report))
    assert [e["key"] for e in examples] == [f"train-00000-of-00001/{i}" for i in range(7)]
    assert report.imported == 7 and report.skipped == {}
    for example, row in zip(examples, rows, strict=True):
        assert example["input_image"] == row["original_image"][0]
        assert example["edited_image"] == row["edited_image"][0]
        assert example["instruction"] == row["edit_prompt"]
        assert example["input_caption"] == row["original_prompt"]
        assert example["edited_caption"] == row["edited_prompt"]
        assert example["seed"] == UNKNOWN_SEED and math.isnan(example["clip_sim_0"])


def test_import_parquet_skips_bad_rows_and_reads_image_paths(tmp_path):
    rows = clip_rows(6)
    (tmp_path / "on_disk.png").write_bytes(png(999))
    rows[0]["original_image"] = (None, "on_disk.png")  # bytes null, file next to the parquet
    rows[1]["original_image"] = (None, "gone.png")  # bytes null, file absent
    rows[2]["edited_image"] = (b"GIF89a....", None)  # not JPEG/PNG
    rows[3]["edit_prompt"] = "   "  # empty instruction
    rows[4]["edited_image"] = None  # null struct
    write_clip_filtered(tmp_path / "shard.parquet", rows)
    report = ImportReport()
    with pytest.warns(DataImportWarning) as caught:
        examples = list(import_parquet(tmp_path / "shard.parquet", report=report))
    assert [e["key"] for e in examples] == ["shard/0", "shard/5"]
    assert examples[0]["input_image"] == png(999)
    assert report.skipped == {"missing_image": 2, "not_an_image": 1, "empty_instruction": 1}
    assert any("shard.parquet#1" in where for where in report.examples_of_skips["missing_image"])
    assert len(caught) == 1 and "empty_instruction: 1" in str(caught[0].message)


def test_import_parquet_1000_samples_schema(tmp_path):
    rows = [
        {
            "input_image": (jpeg(i), None),
            "edit_prompt": f"add snow {i}",
            "edited_image": (png(50 + i), None),
        }
        for i in range(4)
    ]
    write_samples_1000(tmp_path / "samples.parquet", rows)
    examples = list(import_parquet(str(tmp_path / "samples.parquet")))
    assert [e["key"] for e in examples] == [f"samples/{i}" for i in range(4)]
    for example, row in zip(examples, rows, strict=True):
        assert example["input_image"] == row["input_image"][0]
        assert example["edited_image"] == row["edited_image"][0]
        assert example["instruction"] == row["edit_prompt"]
        assert example["input_caption"] == "" and example["edited_caption"] == ""


def test_import_parquet_folder_of_two_files_in_sorted_order(tmp_path):
    write_clip_filtered(tmp_path / "b-00001.parquet", clip_rows(3, offset=10))
    write_clip_filtered(tmp_path / "a-00000.parquet", clip_rows(4))
    (tmp_path / "notes.txt").write_text("not parquet")
    report = ImportReport()
    examples = list(import_parquet(tmp_path, batch_size=3, report=report))
    keys = [e["key"] for e in examples]
    assert keys == [f"a-00000/{i}" for i in range(4)] + [f"b-00001/{i}" for i in range(3)]
    assert examples[4]["input_image"] == png(10) and examples[0]["input_image"] == png(0)
    assert report.imported == 7
    listed = list(import_parquet([tmp_path / "b-00001.parquet", tmp_path / "a-00000.parquet"]))
    assert [e["key"] for e in listed] == keys[4:] + keys[:4]  # a list keeps its order


def test_import_parquet_split_partitions_rows(tmp_path):
    write_clip_filtered(tmp_path / "s.parquet", clip_rows(30))
    by_split = {
        name: [e["key"] for e in import_parquet(tmp_path / "s.parquet", split=name)]
        for name in ("train", "validation", "test")
    }
    every = [key for keys in by_split.values() for key in keys]
    assert sorted(every) == sorted(f"s/{i}" for i in range(30)) and len(set(every)) == 30
    for name, keys in by_split.items():
        assert all(split_by_key(key) == name for key in keys)


def test_unknown_parquet_schema_names_the_columns(tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"image": [b"x"], "text": ["hi"]}), path)
    with pytest.raises(ValueError) as err:
        import_parquet(path)
    message = str(err.value)
    assert "other.parquet" in message and "['image', 'text']" in message
    assert "original_prompt" in message and "input_image" in message
    with pytest.raises(FileNotFoundError):
        import_parquet(tmp_path / "missing.parquet")


def test_split_by_key_deterministic_and_proportional():
    keys = [f"train-{i // 1000:05d}/{i}" for i in range(10_000)]
    first = [split_by_key(key) for key in keys]
    assert first == [split_by_key(key) for key in keys]
    counts = {name: first.count(name) / len(keys) for name in ("train", "validation", "test")}
    assert abs(counts["train"] - 0.9) < 0.01
    assert abs(counts["validation"] - 0.05) < 0.01 and abs(counts["test"] - 0.05) < 0.01
    halves = [split_by_key(key, {"a": 0.5, "b": 0.5}) for key in keys]
    assert 0.47 < halves.count("a") / len(keys) < 0.53
    assert split_by_key("k", {"only": 1.0}) == "only"
    with pytest.raises(ValueError, match="sum to 1"):
        split_by_key("k", {"a": 0.5, "b": 0.6})
