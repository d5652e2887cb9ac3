"""Config files and overrides; starting points (an SD folder widened to 8 channels, random
init); a trained model exported to diffusers loads in the InstructPix2Pix pipeline."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from ip2p_jax.runtime.mesh import make_mesh
from ip2p_jax.train.config import ConfigOverrideError, apply_override, load_config
from ip2p_jax.train.loop import make_loader
from ip2p_jax.train.models import load_models
from ip2p_jax.train.step import make_trainer
from tests.train.conftest import micro_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["sd15.py", "shapes_tiny.py"])
def test_config_files_load_and_take_overrides(name):
    config = load_config(
        CONFIGS / name,
        ["--config.steps=7", "--config.optim.learning_rate=2e-4", "--config.data.path=elsewhere"],
    )
    assert (config.steps, config.optim.learning_rate, config.data.path) == (7, 2e-4, "elsewhere")
    assert config.batch_size % config.grad_accum == 0


def test_sd15_is_the_papers_recipe():
    config = load_config(CONFIGS / "sd15.py")
    assert config.batch_size == 1024 and config.data.resolution == 256
    assert config.optim.learning_rate == 1e-4 and config.ema_decay == 0.9999
    assert config.data.flip_prob == 0.5 and config.model.in_channels == 8
    dropout = config.dropout
    assert (dropout.text_only, dropout.both, dropout.image_only) == (0.05, 0.05, 0.05)


def test_overrides_are_typed_and_checked():
    config = micro_config("data")
    assert apply_override(config, "--config.optim.warmup_steps=3").optim.warmup_steps == 3
    assert apply_override(config, "config.ema_decay=0").ema_decay == 0.0  # int -> float field
    assert apply_override(config, "--config.remat=dots_saveable").remat == "dots_saveable"
    widened = apply_override(config, "--config.model.unet.layers_per_block=2")
    assert (
        widened.model.unet["layers_per_block"] == 2 and config.model.unet["layers_per_block"] == 1
    )
    with pytest.raises(ConfigOverrideError, match="has no field 'lr'.*'learning_rate'"):
        apply_override(config, "--config.optim.lr=1e-3")
    with pytest.raises(ConfigOverrideError, match="steps='many': expected"):
        apply_override(config, "--config.steps=many")
    with pytest.raises(ConfigOverrideError, match="must look like"):
        apply_override(config, "--config.steps")


def test_bad_batch_layout_and_remat_policy_are_refused_before_compiling():
    config = micro_config("data", batch_size=6, grad_accum=4)
    models = load_models(config.model)
    with pytest.raises(ValueError, match="batch_size 6 must split into grad_accum 4"):
        make_trainer(config, models, make_mesh())
    with pytest.raises(ValueError, match=r"remat='dots' is not a remat policy.*'dots_saveable'"):
        make_trainer(micro_config("data", remat="dots"), models, make_mesh())


def test_a_config_json_from_before_named_remat_policies_and_the_runtime_section_loads():
    from ip2p_jax.train.config import RuntimeConfig, TrainConfig
    from ip2p_jax.train.snapshot import config_from_dict

    for written, policy in ((True, "nothing_saveable"), (False, "")):
        config = config_from_dict(TrainConfig, {"steps": 5, "remat": written})
        assert (config.remat, config.steps, config.runtime) == (policy, 5, RuntimeConfig())
    fields = {"runtime": {"optimizer_update": "fused", "compiler_options": {}}}
    runtime = config_from_dict(TrainConfig, fields).runtime
    assert runtime == RuntimeConfig(optimizer_update="fused", compiler_options={})


def test_remat_per_block_keeps_the_param_paths_and_checkpoints_each_block():
    """Each ResNet block and transformer is one jax.checkpoint under a named policy; the
    params (paths and shapes) are those of the plain UNet."""
    from ip2p_jax.weights.model_folder import COMPONENTS, build_module

    component = COMPONENTS["unet"]
    config = component.config_class.from_dict(micro_config("data").model.unet)
    plain = build_module(component, config)
    inputs = component.example_inputs(config)
    shapes = jax.eval_shape(plain.init, jax.random.key(0), *inputs)["params"]
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)

    def checkpoints(module) -> int:  # jax.checkpoint's primitive: remat2 (checkpoint later)
        jaxpr = jax.make_jaxpr(lambda p: module.apply({"params": p}, *inputs))(params)
        return sum(e.primitive.name in ("remat2", "checkpoint") for e in jaxpr.jaxpr.eqns)

    down, mid, up = plain.block_specs()
    blocks = sum(s.resnets * (2 if s.heads else 1) for s in (*down, *up)) + 3  # mid: 2 + 1
    assert checkpoints(plain) == 0
    for policy in ("nothing_saveable", "dots_saveable"):
        rematted = plain.clone(remat_policy=policy)
        again = jax.eval_shape(rematted.init, jax.random.key(0), *inputs)["params"]
        assert jax.tree.structure(again) == jax.tree.structure(shapes)
        assert jax.tree.map(lambda s: s.shape, again) == jax.tree.map(lambda s: s.shape, shapes)
        assert checkpoints(rematted) == blocks, policy


def test_fine_tune_from_an_sd_folder_widens_conv_in(tmp_path):
    from ip2p_jax.testing.reference_models import build_pipeline_folder
    from ip2p_jax.train.config import ModelConfig
    from ip2p_jax.weights.model_folder import load_component

    folder = build_pipeline_folder(tmp_path / "sd", "tiny", overrides={"unet": {"in_channels": 4}})
    models = load_models(ModelConfig(init_from=str(folder), in_channels=8))
    kernel = np.asarray(models.unet.params["conv_in"]["kernel"])  # [kh, kw, in, out]
    original = load_component(folder, "unet").params["conv_in"]
    assert kernel.shape[2] == 8 and models.unet.config.in_channels == 8
    np.testing.assert_array_equal(kernel[:, :, :4], original["kernel"])
    assert not kernel[:, :, 4:].any()
    np.testing.assert_array_equal(models.unet.params["conv_in"]["bias"], original["bias"])


def test_missing_model_configs_are_named():
    from ip2p_jax.train.config import ModelConfig

    with pytest.raises(ValueError, match=r"model.\['vae'\] need config dicts"):
        load_models(ModelConfig(unet={}, text_encoder={}))


def _two_step_losses(**changes) -> list[float]:
    from ip2p_jax.train.sharding import global_batch
    from ip2p_jax.train.step import host_metrics
    from tests.train.conftest import fixed_batches

    config = micro_config("data", **changes)
    models = load_models(config.model, config.seed)
    mesh = make_mesh()
    trainer = make_trainer(config, models, mesh)
    state = trainer.init_state()
    losses = []
    for batch in fixed_batches(models.tokenizer, steps=2):
        state, metrics = trainer.step(state, global_batch(batch, mesh))
        losses.append(host_metrics(metrics)["loss"])
    return losses


@pytest.fixture(scope="module")
def reference_losses() -> list[float]:
    """The micro config's two step losses with two accumulated micro-batches, as this CPU's
    profile trains them (the accumulation scan unrolled)."""
    return _two_step_losses(grad_accum=2)


def test_a_rolled_accumulation_scan_and_remat_give_the_same_steps(reference_losses):
    """Two exact transformations at once (one compile, not two): the scan kept a loop (the
    GPU and TPU profiles' choice; the CPU's unrolls it) and each block rematerialised under
    nothing_saveable (every activation recomputed in the backward pass). (The two optimizer
    update styles are compared in tests/train/test_optim.py.)"""
    from ip2p_jax.train.config import RuntimeConfig

    rolled = RuntimeConfig(unroll_grad_accum=False)
    losses = _two_step_losses(grad_accum=2, runtime=rolled, remat="nothing_saveable")
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-6)


def test_a_bf16_step_is_close_to_the_fp32_one(reference_losses):
    # bf16 compute on the float32 master weights (the module's Execution): measured 2.3e-3
    # relative on both steps' losses; bf16 keeps about 3 significant digits.
    bf16 = _two_step_losses(grad_accum=2, compute_dtype="bfloat16")
    np.testing.assert_allclose(bf16, reference_losses, rtol=1e-2)
    assert bf16 != reference_losses


def test_the_state_takes_the_weights_over_and_no_host_copy_stays():
    config = micro_config("data")
    models = load_models(config.model, config.seed)
    host_kernel = np.asarray(models.unet.params["conv_in"]["kernel"]).copy()
    trainer = make_trainer(config, models, make_mesh())
    for frozen in (models.vae.params, models.text_encoder.params):  # placed where they were
        assert all(isinstance(p, jax.Array) for p in jax.tree.leaves(frozen))
    state = trainer.init_state()
    np.testing.assert_array_equal(
        np.asarray(state.params["unet"]["conv_in"]["kernel"]), host_kernel
    )
    shapes = jax.tree.leaves(models.unet.params)
    assert shapes and all(isinstance(p, jax.ShapeDtypeStruct) for p in shapes)
    assert trainer.abstract_state().params["unet"]["conv_in"]["kernel"].shape == host_kernel.shape
    with pytest.raises(RuntimeError, match="called before"):
        trainer.init_state()


def test_a_restored_run_releases_the_loaded_weights():
    config = micro_config("data")
    models = load_models(config.model, config.seed)
    trainer = make_trainer(config, models, make_mesh())
    abstract = trainer.abstract_state()  # what a checkpoint is restored into
    trainer.release_loaded_weights()
    shapes = jax.tree.leaves(models.unet.params)
    assert shapes and all(isinstance(p, jax.ShapeDtypeStruct) for p in shapes)
    assert trainer.abstract_state().params.keys() == abstract.params.keys()


def test_data_word_dropout_reaches_the_input_pipeline():
    config = apply_override(micro_config("data"), "--config.data.word_dropout=0.2")
    loader = make_loader(config, None, [{"instruction": "make it red"}] * config.batch_size)
    assert loader.config.word_dropout == 0.2
