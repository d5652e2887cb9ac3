"""LoRA training (train.lora, `--config.lora.rank`), run as a pod runs it: 2 processes x 2 CPU
devices, the frozen base split over each host's devices (fsdp=2). The run trains only the
adapters (the checkpoints hold nothing else), process 0 alone writes, and it exports the base
with them merged and the adapters alone in PEFT's layout (`ip2p export --lora` too, at any
saved step). That file is the same LoRA to diffusers: an edit by its pipeline with
``load_lora_weights`` equals ours (tiny models, float32: 1e-5), UNet and text-encoder
adapters, an alpha that is not the rank, convolutions among the targets. (That 2 processes
train as one does: tests/train/test_multihost.py.)"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from PIL import Image

from ip2p_jax.apps.cli.main import main
from ip2p_jax.train.config import DataConfig, LoraConfig, ModelConfig, OptimConfig, TrainConfig
from ip2p_jax.weights.lora import read_lora
from ip2p_jax.weights.model_folder import load_component

RANK, ALPHA = 4, 6.0
UNET_TARGETS = "to_q,to_k,to_v,to_out.0,conv1"
TEXT_TARGETS = "q_proj,v_proj"
TOLERANCE = 1e-5


def lora_config(data_path, init_from, **changes) -> TrainConfig:
    config = TrainConfig(
        model=ModelConfig(init_from=str(init_from)),
        data=DataConfig(path=str(data_path), resolution=32, flip_prob=0.0, workers=0),
        # a high rate: three steps move the adapters far enough to change every edit
        optim=OptimConfig(learning_rate=3e-2, weight_decay=0.0),
        lora=LoraConfig(
            rank=RANK, alpha=ALPHA, targets=UNET_TARGETS, text_encoder_targets=TEXT_TARGETS
        ),
        batch_size=4,
        steps=3,
        ema_decay=0.5,
        log_every=1,
        checkpoint_every=2,
    )
    return dataclasses.replace(config, **changes)


@pytest.fixture(scope="module")
def lora_run(shapes32, tiny_folder, tmp_path_factory):
    """The workdir of `lora_config` trained on 2 processes x 2 devices (fsdp=2)."""
    from tests.train.conftest import write_config_file
    from tests.train.processes import finish, train_pair

    folder = tmp_path_factory.mktemp("lora_run")
    config = write_config_file(
        folder / "config.py",
        "from tests.train.test_lora_train import lora_config",
        f"lora_config({str(shapes32)!r}, {str(tiny_folder)!r}, fsdp=2)",
    )
    workdir = folder / "run"
    outputs = finish(train_pair(config, workdir))
    assert all("finished at step 3" in out for out in outputs)
    return workdir


def test_the_state_and_checkpoints_hold_only_the_adapters(lora_run, tiny_folder):
    import torch
    from diffusers import UNet2DConditionModel

    from ip2p_jax.train.snapshot import restore_run
    from ip2p_jax.weights.lora import adapter_pairs, module_name

    workdir = lora_run
    # One set of files, process 0's (no validation: validate_every is 0)
    assert sorted(p.name for p in workdir.iterdir()) == [
        "checkpoints",
        "config.json",
        "metrics.jsonl",
        "model",
        "tensorboard",
    ]
    _, _, state = restore_run(workdir)
    # the modules PEFT would adapt in diffusers' UNet: its rule, its module names
    reference = UNet2DConditionModel.from_pretrained(tiny_folder / "unet")
    expected = {
        name
        for name, module in reference.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
        and any(name == t or name.endswith(f".{t}") for t in UNET_TARGETS.split(","))
    }
    adapted = {module_name((*m, "kernel")) for m in adapter_pairs(state.params["unet"])}
    assert adapted == expected and any("conv1" in name for name in adapted)
    for tree in (state.params, state.ema_params, state.opt_state[0].mu):
        assert set(tree) == {"unet", "text_encoder"}
        assert {path[-1] for path in flatten_dict(tree)} == {"down", "up"}
    ups = [leaf for path, leaf in flatten_dict(state.params).items() if path[-1] == "up"]
    assert all(np.abs(np.asarray(up)).max() > 0 for up in ups)  # trained off their zeros
    _, _, restored = restore_run(workdir, step=2)  # the checkpoint: adapters, nothing else
    assert int(restored.step) == 2
    saved, final = flatten_dict(restored.params), flatten_dict(state.params)
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in final.items()}


def test_the_model_is_the_base_with_the_exported_lora_merged(lora_run, tiny_folder):
    from ip2p_jax.weights.lora import merge_lora

    workdir = lora_run
    file = workdir / "model" / "lora" / "pytorch_lora_weights.safetensors"
    adapters = read_lora(file)
    assert {a.component for a in adapters} == {"unet", "text_encoder"}
    assert {a.rank for a in adapters} == {RANK} and {a.alpha for a in adapters} == {ALPHA}
    for name in ("unet", "text_encoder"):
        base = load_component(tiny_folder, name).params
        merged = flatten_dict(load_component(workdir / "model", name).params)
        expected = flatten_dict(
            merge_lora(base, [a for a in adapters if a.component == name], 1.0, source="t")
        )
        changed = [
            path
            for path in expected
            if not np.array_equal(expected[path], flatten_dict(base)[path])
        ]
        assert changed, name
        for path, value in expected.items():
            if path in changed:
                np.testing.assert_allclose(merged[path], value, atol=1e-6, err_msg=str(path))
            else:  # what no adapter touches is the base, bit for bit
                np.testing.assert_array_equal(merged[path], value, err_msg=str(path))


def test_export_lora_writes_a_saved_step(lora_run, tmp_path, capsys):
    workdir = lora_run
    final = workdir / "model" / "lora" / "pytorch_lora_weights.safetensors"
    assert main(["export", "--lora", str(workdir), str(tmp_path / "last")]) == 0
    exported = tmp_path / "last" / "pytorch_lora_weights.safetensors"
    assert _tensors(exported) == pytest.approx(_tensors(final))
    step2 = tmp_path / "step2.safetensors"
    assert main(["export", "--lora", str(workdir), str(step2), "--step", "2"]) == 0
    assert _tensors(step2).keys() == _tensors(final).keys()
    assert _tensors(step2) != pytest.approx(_tensors(final))
    capsys.readouterr()
    assert main(["export", "--lora", str(workdir), str(step2)]) != 0
    assert "exists; pass --overwrite" in capsys.readouterr().err


def _arrays(path) -> dict[str, np.ndarray]:
    from ip2p_jax.weights.safetensors_io import iter_safetensors

    return dict(iter_safetensors(path))


def _tensors(path) -> dict[str, float]:
    """Each tensor's sum (a fingerprint that pytest.approx compares)."""
    return {key: float(np.asarray(value, np.float64).sum()) for key, value in _arrays(path).items()}


def test_diffusers_edits_with_the_exported_lora_as_we_do(lora_run, tiny_folder):
    from ip2p_jax.testing.parity import edit_both

    workdir = lora_run
    file = workdir / "model" / "lora" / "pytorch_lora_weights.safetensors"
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    options = dict(steps=3, seed=3)
    ours, reference = edit_both(
        tiny_folder, "euler_ancestral", image, ["make it red"], lora=file, **options
    )
    plain, _ = edit_both(tiny_folder, "euler_ancestral", image, ["make it red"], **options)
    assert np.abs(ours - plain).mean() > 1e-3  # the LoRA changes the edit
    assert np.abs(ours - reference).max() < TOLERANCE


def test_lora_settings_are_checked_before_any_compile(shapes32, tiny_folder, tmp_path, capsys):
    from ip2p_jax.train.loop import train

    bad = [
        ({"lora": LoraConfig(rank=4, targets="no_such_module")}, "match no unet module"),
        ({"lora": LoraConfig(rank=4, targets="")}, "lora.targets and lora.text_encoder_targets"),
        (
            {"model": ModelConfig(init_from=str(tiny_folder), train_text_encoder=True)},
            "lora.text_encoder_targets",
        ),
    ]
    for k, (changes, message) in enumerate(bad):
        with pytest.raises(ValueError, match=message):
            train(lora_config(shapes32, tiny_folder, **changes), tmp_path / str(k))
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.json").write_text(json.dumps(dataclasses.asdict(TrainConfig())))
    assert main(["export", "--lora", str(full), str(tmp_path / "x.safetensors")]) != 0
    assert "no LoRA adapters" in capsys.readouterr().err
