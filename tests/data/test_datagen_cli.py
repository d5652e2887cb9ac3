"""`ip2p datagen`: build the shapes world and import a dataset end to end, read it back."""

from __future__ import annotations

import json

from ip2p_jax.apps.cli.main import main
from ip2p_jax.data.edit_pairs import EditPairSource, split_sizes
from ip2p_jax.worlds import shapes
from tests.data.test_importers import write_original


def test_shapes_dataset_through_the_cli(tmp_path, capsys):
    out = tmp_path / "shapes"
    argv = ["datagen", "shapes", "--num", "40", "--num-heldout", "6", "--out", str(out)]
    assert main(argv) == 0
    assert "train: 40 examples" in capsys.readouterr().out
    assert split_sizes(out) == {"train": 40, "validation": 2, "heldout": 6}
    source = EditPairSource(out, "heldout")
    assert source.metadata["size"] == 64
    expected = list(shapes.generate_examples(6, split="heldout", seed=0, size=64))
    for i, example in enumerate(expected):
        read = source[i]
        assert read["input_image"] == example["input_image"]
        assert read["instruction"] == example["instruction"]
        assert json.loads(read["annotations"]) == json.loads(example["annotations"])
    assert main(argv) == 2  # exists: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_import_original_through_the_cli(tmp_path, capsys):
    written = write_original(tmp_path / "release", n_prompts=20)
    out = tmp_path / "imported"
    argv = ["datagen", "import", "original", str(tmp_path / "release"), "--out", str(out)]
    assert main(argv) == 0
    assert split_sizes(out) == {"train": 36, "validation": 2, "test": 2}
    printed = capsys.readouterr().out
    assert "(train): imported 36, skipped 0" in printed
    test = EditPairSource(out, "test")
    name, seed = test[0]["key"].split("/")
    prompt, image_0, image_1 = written[(name, seed)]
    assert name == "0000019" and test[0]["instruction"] == prompt["edit"]
    assert test[0]["input_image"] == image_0 and test[0]["edited_image"] == image_1


def test_import_original_leaves_out_empty_splits_with_a_warning(tmp_path):
    import pytest

    from ip2p_jax.data import build
    from ip2p_jax.data.importers import DataImportWarning

    write_original(tmp_path / "release", n_prompts=5)  # 0.9/0.05/0.05 of 5: 4, 0, 1
    with pytest.warns(DataImportWarning, match=r"\['validation'\] empty"):
        build.import_original(tmp_path / "release", tmp_path / "imported")
    assert split_sizes(tmp_path / "imported") == {"train": 8, "test": 2}
