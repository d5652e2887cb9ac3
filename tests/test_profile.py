"""The backend profile (runtime.profile): what each backend picks, built from the name alone;
overrides, from code and from a training config; the modules built from it."""

from __future__ import annotations

import dataclasses

import jax
import pytest

from ip2p_jax.models.execution import Execution
from ip2p_jax.models.unet import UNetConfig
from ip2p_jax.runtime.profile import (
    CPU_COMPILER_OPTIONS,
    CPU_PATCHES_MAX_ROWS,
    BackendProfile,
    current_profile,
    overridable_fields,
    profile_for,
)
from ip2p_jax.train.config import RuntimeConfig, TrainConfig, apply_override
from ip2p_jax.weights.model_folder import COMPONENTS, LoadedComponent, build_module


def test_the_cpu_profile_makes_the_cpus_choices():
    cpu = profile_for("cpu")
    assert cpu.xla_options() == CPU_COMPILER_OPTIONS  # YNNPACK off
    assert cpu.conv_patches_max_rows == CPU_PATCHES_MAX_ROWS == 64
    assert cpu.tune_malloc and cpu.unroll_grad_accum
    assert cpu.optimizer_update == "leafwise"


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_accelerator_profiles_are_built_without_their_device(backend):
    profile = profile_for(backend)  # on this CPU machine: no device of that kind needed
    kernel = {"gpu": "cudnn", "tpu": "pallas_tpu"}[backend]
    assert profile == BackendProfile(backend, attention_kernel=kernel, compute_dtype="bfloat16")
    assert profile.xla_options() is None and profile.compiler_options == ()
    assert profile.conv_patches_max_rows == 0  # every convolution native
    assert not profile.tune_malloc and not profile.unroll_grad_accum
    assert profile.optimizer_update == "fused"


def test_current_profile_is_the_running_backends():
    assert current_profile() == profile_for(jax.default_backend())
    assert current_profile(optimizer_update="fused").optimizer_update == "fused"


def test_overrides_replace_fields_and_none_keeps_the_backends_choice():
    gpu = profile_for("gpu", optimizer_update="leafwise", conv_patches_max_rows=32)
    assert (gpu.optimizer_update, gpu.conv_patches_max_rows) == ("leafwise", 32)
    assert not gpu.tune_malloc  # not overridden
    assert profile_for("cpu", **{name: None for name in overridable_fields()}) == profile_for("cpu")
    # compiler options come as a dict and are kept as sorted pairs: the profile stays hashable
    options = profile_for("cpu", compiler_options={"b": "2", "a": "1"})
    assert options.compiler_options == (("a", "1"), ("b", "2"))
    assert options.xla_options() == {"a": "1", "b": "2"} and hash(options)
    assert profile_for("cpu", compiler_options={}).xla_options() is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"optimiser_update": "fused"},
            r"unknown backend profile override\(s\) \['optimiser_update'\]",
        ),
        ({"optimizer_update": "treewide"}, r"optimizer_update='treewide' must be one of"),
        ({"conv_patches_max_rows": -1}, r"conv_patches_max_rows=-1 must be an int >= 0"),
        ({"conv_patches_max_rows": True}, r"conv_patches_max_rows=True must be an int"),
        ({"tune_malloc": "yes"}, r"tune_malloc='yes' must be True or False"),
        ({"unroll_grad_accum": 2}, r"unroll_grad_accum=2 must be True or False"),
        ({"compiler_options": {"xla_flag": 1}}, r"compiler_options=.* must map option names"),
    ],
)
def test_bad_overrides_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        profile_for("cpu", **overrides)


def test_unknown_override_lists_the_fields():
    with pytest.raises(ValueError, match="the fields are .*'optimizer_update'"):
        profile_for("tpu", fast=True)


def test_a_training_config_overrides_the_profile_from_the_command_line():
    from ip2p_jax.train.step import training_profile

    config = apply_override(TrainConfig(), "--config.runtime.optimizer_update=fused")
    config = apply_override(config, "--config.runtime.conv_patches_max_rows=0")
    config = apply_override(config, "--config.runtime.compiler_options={}")
    assert config.runtime == RuntimeConfig(
        compiler_options={}, conv_patches_max_rows=0, optimizer_update="fused"
    )
    profile = training_profile(config.runtime)
    assert profile.optimizer_update == "fused" and profile.conv_patches_max_rows == 0
    assert profile.xla_options() is None
    assert profile.tune_malloc == current_profile().tune_malloc  # left as the backend's
    assert training_profile(RuntimeConfig()) == current_profile()
    bad = dataclasses.replace(config.runtime, optimizer_update="treewide")
    with pytest.raises(ValueError, match="optimizer_update='treewide'"):
        training_profile(bad)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_modules_are_built_with_the_profiles_execution(backend):
    profile = profile_for(backend)
    for name in ("unet", "vae", "text_encoder"):
        component = COMPONENTS[name]
        module = build_module(component, component.config_class(), profile)
        assert module.execution == Execution(
            profile.compute_dtype, profile.attention_kernel, profile.conv_patches_max_rows
        )
    assert build_module(COMPONENTS["unet"], UNetConfig(), profile, "float16").execution.dtype == (
        "float16"
    )
    # A trainer re-runs a loaded component in place when its config overrides the profile;
    # the compute dtype stays unless it names one.
    unet = build_module(COMPONENTS["unet"], UNetConfig(), profile, "bfloat16")
    loaded = LoadedComponent(UNetConfig(), {}, unet, params={})
    loaded.use_profile(profile_for(backend, conv_patches_max_rows=16))
    assert loaded.module.execution.conv_patches_max_rows == 16
    assert loaded.module.execution.dtype == "bfloat16" and loaded.module.config == unet.config
    loaded.use_attention("dot_product")
    assert loaded.module.execution.attention == "dot_product"


def test_accelerators_compute_in_bf16_and_the_cpu_in_fp32():
    assert profile_for("cpu").compute_dtype == "float32"
    assert profile_for("gpu").compute_dtype == profile_for("tpu").compute_dtype == "bfloat16"
    with pytest.raises(ValueError, match="compute_dtype='int8'"):
        profile_for("gpu", compute_dtype="int8")
    with pytest.raises(ValueError, match="attention_kernel='flash9'"):
        profile_for("gpu", attention_kernel="flash9")
