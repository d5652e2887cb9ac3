"""folder_fingerprint: the same for the same content wherever it lies, different when a weight
or a config value changes, and cheap: weight files are sampled, not read."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from datagen import fingerprint
from datagen.fingerprint import folder_fingerprint

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def model(sd_folder, tmp_path):
    """A private copy of the tiny SD folder, free to edit."""
    return shutil.copytree(sd_folder, tmp_path / "model")


def _perturb_one_value(file, name=None):
    """Re-saves a safetensors file with one element of one tensor changed (the same header:
    names, dtypes, shapes and offsets stay)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(file), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(file))
    name = name or sorted(tensors)[len(tensors) // 2]
    tensors[name].view(-1)[0] += 0.5
    save_file(tensors, str(file), metadata=metadata)


def _header(file):
    data = file.read_bytes()
    return data[8 : 8 + int.from_bytes(data[:8], "little")]


def test_a_copy_under_another_name_has_the_same_fingerprint(sd_folder, tmp_path):
    start = time.perf_counter()
    original = folder_fingerprint(sd_folder)
    assert time.perf_counter() - start < 2
    copy = shutil.copytree(sd_folder, tmp_path / "elsewhere" / "renamed-model")
    assert folder_fingerprint(copy) == original
    assert folder_fingerprint(str(copy)) == original
    assert len(original) == 64 and int(original, 16) >= 0  # sha256 hex


def test_one_weight_value_changes_it(sd_folder, model):
    before = _header(model / UNET_WEIGHTS)
    _perturb_one_value(model / UNET_WEIGHTS)
    assert _header(model / UNET_WEIGHTS) == before  # only the tensor bytes tell them apart
    assert folder_fingerprint(model) != folder_fingerprint(sd_folder)


def test_a_config_value_changes_it(sd_folder, model):
    config_file = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["beta_end"] = 0.02
    config_file.write_text(json.dumps(config, indent=2))
    assert folder_fingerprint(model) != folder_fingerprint(sd_folder)


def test_renaming_a_file_changes_it(sd_folder, model):
    (model / "vae").rename(model / "vae_renamed")
    assert folder_fingerprint(model) != folder_fingerprint(sd_folder)


def test_hidden_files_and_folders_are_skipped(sd_folder, model):
    (model / ".DS_Store").write_bytes(b"junk")
    (model / ".cache" / "huggingface").mkdir(parents=True)
    (model / ".cache" / "huggingface" / "unet.safetensors.lock").write_text("1")
    (model / "unet" / ".gitattributes").write_text("*.safetensors filter=lfs")
    assert folder_fingerprint(model) == folder_fingerprint(sd_folder)


def test_a_single_weight_file(sd_folder, model, tmp_path):
    alone = shutil.copy(sd_folder / UNET_WEIGHTS, tmp_path / "unet-copy.safetensors")
    assert folder_fingerprint(alone) == folder_fingerprint(sd_folder / UNET_WEIGHTS)
    assert folder_fingerprint(alone) != folder_fingerprint(sd_folder)
    _perturb_one_value(model / UNET_WEIGHTS)
    assert folder_fingerprint(model / UNET_WEIGHTS) != folder_fingerprint(alone)


def test_symlinked_files_are_followed(sd_folder, tmp_path):
    """As in a huggingface_hub snapshot, whose files link to its blobs."""
    linked = tmp_path / "snapshot"
    for file in sd_folder.rglob("*"):
        if file.is_file():
            target = linked / file.relative_to(sd_folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(file)
    assert folder_fingerprint(linked) == folder_fingerprint(sd_folder)
    (linked / "broken.json").symlink_to(tmp_path / "missing-blob")
    with pytest.raises(FileNotFoundError, match="broken.json"):
        folder_fingerprint(linked)


def test_a_missing_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        folder_fingerprint(tmp_path / "no-such-model")


@pytest.mark.parametrize("name", ["sd.ckpt", "weights.unknown"])
def test_large_weight_files_are_sampled_not_read(tmp_path, name):
    """A 4 GiB checkpoint (sparse: no disk used) fingerprints at once: its sampled bytes
    (the first and last MiB among them) count, the rest is not read. A file of an unknown
    kind is sampled too once it is larger than any config file."""
    size = 4 * 2**30
    assert size > fingerprint.LARGE_FILE
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    weights = folder / name
    with open(weights, "wb") as stream:
        stream.truncate(size)

    def poke(offset):
        with open(weights, "r+b") as stream:
            stream.seek(offset)
            stream.write(b"\x01")

    start = time.perf_counter()
    original = folder_fingerprint(folder)
    assert time.perf_counter() - start < 1
    poke(size // 2 - 12345)  # between two samples: unseen, the price of not reading 4 GiB
    assert folder_fingerprint(folder) == original
    poke(size - 1)  # in the last MiB
    last = folder_fingerprint(folder)
    assert last != original
    poke(100)  # in the first MiB
    assert folder_fingerprint(folder) not in (original, last)
