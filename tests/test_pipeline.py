"""EditPipeline behaviour: compile hygiene, the two-row shortcut, seeds, sizes, bad input."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ip2p_jax.diffusion.guidance import guided_denoiser
from ip2p_jax.pipelines.edit import EditPipeline
from ip2p_jax.pipelines.images import ImageError
from ip2p_jax.runtime.compilation import jit


@pytest.fixture(scope="module")
def pipe(tiny_folder):
    return EditPipeline.from_pretrained(tiny_folder)


@pytest.fixture
def sampling_traces(monkeypatch):
    """How often the sampling loop is traced (= compiled) while a test runs: the guided
    denoiser is built once per trace, so a counting wrapper around it counts traces."""
    import ip2p_jax.pipelines.base as base

    traces = {"count": 0}
    original = base.guided_denoiser

    def counted(*args, **kwargs):
        traces["count"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(base, "guided_denoiser", counted)
    return traces


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (40, 56, 3), np.uint8))


def test_new_seeds_scales_and_instructions_never_recompile(pipe, scene, sampling_traces):
    kwargs = {"steps": 3, "resolution": 32}
    first = pipe.edit([scene, scene], ["make it red", "add a hat"], seed=1, **kwargs)
    before = sampling_traces["count"]
    second = pipe.edit(
        [scene, scene],
        ["paint it gold", "remove the sky"],
        seed=[7, 8],
        text_scale=[3.0, 9.0],
        image_scale=[1.2, 2.0],
        **kwargs,
    )
    assert sampling_traces["count"] == before
    assert not np.array_equal(np.asarray(first[0]), np.asarray(second[0]))
    pipe.edit([scene, scene], ["make it red", "add a hat"], steps=3, resolution=24)
    assert sampling_traces["count"] == before + 1  # a new shape does compile (the hook counts)


def test_progress_reports_each_step_of_its_own_run(pipe, scene, capsys):
    pipe.edit(scene, "make it red", steps=3, resolution=32, progress=True)
    assert capsys.readouterr().err.endswith("sampling: step 3/3\n")
    pipe.edit(scene, "make it red", steps=2, resolution=32, progress=True)
    assert capsys.readouterr().err.endswith("sampling: step 2/2\n")
    pipe.edit(scene, "make it red", steps=3, resolution=32, progress=False)
    assert capsys.readouterr().err == ""


def test_the_constructor_leaves_the_components_handed_to_it_alone(tiny_folder):
    from ip2p_jax.diffusion.schedules import NoiseSchedule
    from ip2p_jax.models.tokenizer import CLIPTokenizer
    from ip2p_jax.weights.model_folder import load_component

    parts = [load_component(tiny_folder, name) for name in ("unet", "vae", "text_encoder")]
    before = [(part.params, jax.tree.leaves(part.params)) for part in parts]
    pipe = EditPipeline(
        *parts,
        CLIPTokenizer.from_folder(tiny_folder / "tokenizer"),
        NoiseSchedule.from_folder(tiny_folder),
    )
    for part, (tree, leaves) in zip(parts, before, strict=True):
        assert part.params is tree
        assert all(a is b for a, b in zip(jax.tree.leaves(part.params), leaves, strict=True))
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(pipe.unet.params))


def test_two_rows_at_image_scale_one_give_the_same_eps(pipe):
    unet = pipe.unet
    rng = np.random.default_rng(0)
    text, null = (jnp.asarray(rng.normal(size=(2, 77, 32)), jnp.float32) for _ in range(2))
    image_latent = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
    apply = lambda x, t, c: unet.module.apply({"params": unet.params}, x, t, c)
    common = dict(
        text=text,
        null_text=null,
        image_latent=image_latent,
        text_scale=jnp.asarray([7.5, 3.0]),
        image_scale=jnp.ones(2),
    )
    # compiled as the pipeline compiles them; the rows' convolutions differ in batch size, so
    # they round differently, and s_T = 7.5 scales that up to a few 1e-6
    three = jit(guided_denoiser(apply, three_rows=True, **common))(x, jnp.asarray(500.0))
    two = jit(guided_denoiser(apply, three_rows=False, **common))(x, jnp.asarray(500.0))
    np.testing.assert_allclose(np.asarray(two), np.asarray(three), atol=1e-5)


def test_image_scale_one_edits_equal_the_three_row_result(pipe, scene, monkeypatch):
    """The whole edit with the u row skipped equals the edit with it computed."""
    import ip2p_jax.pipelines.base as pipeline_module

    two = pipe.edit(scene, "make it blue", steps=3, image_scale=1.0, resolution=32)[0]
    original = pipeline_module._sample_latents

    def forced_three_rows(unet, sampler, three_rows, *rest, **options):
        return original(unet, sampler, True, *rest, **options)

    monkeypatch.setattr(pipeline_module, "_sample_latents", forced_three_rows)
    three = pipe.edit(scene, "make it blue", steps=3, image_scale=1.0, resolution=32)[0]
    difference = np.abs(np.asarray(two, float) - np.asarray(three, float))
    assert difference.max() <= 1  # at most one uint8 level from float rounding
    assert difference.mean() < 0.01


def test_an_image_depends_on_its_own_seed_only(pipe, scene):
    other = Image.fromarray(np.full((40, 56, 3), 90, np.uint8))
    alone = pipe.edit(scene, "make it red", seed=5, steps=3, resolution=32)[0]
    batched = pipe.edit(
        [other, scene], ["add snow", "make it red"], seed=[9, 5], steps=3, resolution=32
    )[1]
    assert np.array_equal(np.asarray(alone), np.asarray(batched))


def test_output_keeps_the_input_size_and_mixed_sizes_run_in_groups(pipe, scene):
    tall = Image.fromarray(np.zeros((70, 30, 3), np.uint8))
    out = pipe.edit([scene, tall, scene], ["a", "b", "c"], steps=2, resolution=32)
    assert [im.size for im in out] == [(56, 40), (30, 70), (56, 40)]
    native = pipe.edit(scene, "a", steps=2, resolution=32, keep_size=False)[0]
    assert native.size == (32, 24)  # long side 32, multiples of 8


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"instructions": ""}, "instruction 0 is empty"),
        ({"instructions": "   "}, "instruction 0 is empty"),
        ({"steps": 0}, "steps must be at least 1"),
        ({"sampler": "heun"}, "unknown sampler 'heun'"),
        ({"text_scale": [1.0, 2.0]}, "text_scale has 2 entries for 1 images"),
        ({"seed": [1, 2]}, "1 images need 1 seeds"),
    ],
)
def test_bad_arguments_fail_before_any_compile(pipe, scene, kwargs, match, sampling_traces):
    before = sampling_traces["count"]
    args = {"instructions": "make it red", **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe.edit(scene, args.pop("instructions"), resolution=32, **args)
    assert sampling_traces["count"] == before


def test_bad_images_are_clear_errors(pipe, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageError, match=r"corrupt\.png: not a readable image"):
        pipe.edit(corrupt, "make it red")
    with pytest.raises(ImageError, match="image not found"):
        pipe.edit(tmp_path / "missing.jpg", "make it red")
    with pytest.raises(ImageError, match="zero size"):
        pipe.edit(Image.new("RGB", (0, 5)), "make it red")


def test_overlong_instruction_is_truncated_with_a_warning(pipe, scene):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.edit(scene, "make it red " * 40, steps=1, resolution=32)
    assert any("truncated" in str(w.message) for w in caught)


def test_a_four_channel_unet_is_refused_with_advice(tmp_path):
    from ip2p_jax.testing.reference_models import build_pipeline_folder

    folder = build_pipeline_folder(tmp_path / "sd", "tiny", overrides={"unet": {"in_channels": 4}})
    with pytest.raises(ValueError, match="--in-channels 8"):
        EditPipeline.from_pretrained(folder)


def test_a_folder_without_a_component_is_a_clear_error(tiny_folder, tmp_path):
    import shutil

    broken = shutil.copytree(tiny_folder, tmp_path / "broken")
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(FileNotFoundError, match="lacks tokenizer/"):
        EditPipeline.from_pretrained(broken)


def test_progress_reports_every_step_from_inside_the_loop(pipe, scene, capsys):
    pipe.edit(scene, "make it red", steps=3, resolution=32, progress=True)
    err = capsys.readouterr().err
    assert "sampling: step 3/3" in err and "step 1/3" in err
    pipe.edit(scene, "make it red", steps=3, resolution=32, progress=False)
    assert "sampling" not in capsys.readouterr().err


def test_switching_the_attention_kernel_retraces_and_calls_the_new_kernel(
    tiny_folder, scene, sampling_traces, monkeypatch
):
    from ip2p_jax.models import attention

    pipe = EditPipeline.from_pretrained(tiny_folder, attention="dot_product")
    calls = {"dot_product": 0, "blockwise": 0}
    for name in calls:  # count the traced calls of each kernel (a registry entry each)
        original = attention.KERNELS[name]

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setitem(attention.KERNELS, name, counted)
    # A shape no other test samples: no program of either kernel is cached for it yet.
    kwargs = {"steps": 2, "resolution": 40}
    first = pipe.edit(scene, "make it red", **kwargs)
    traced, dot_calls = sampling_traces["count"], calls["dot_product"]
    assert traced == 1 and dot_calls > 0 and calls["blockwise"] == 0
    pipe.use_attention("blockwise")
    second = pipe.edit(scene, "make it red", **kwargs)
    assert sampling_traces["count"] == traced + 1  # the kernel is static: a new trace
    assert calls["blockwise"] > 0 and calls["dot_product"] == dot_calls
    # Both kernels are exact attention: the same edit to float rounding.
    np.testing.assert_allclose(np.asarray(first), np.asarray(second), atol=2)
    with pytest.raises(ValueError, match="unknown attention kernel 'flash9'"):
        pipe.use_attention("flash9")


def test_a_bf16_pipeline_computes_in_bf16_and_keeps_the_sampler_in_fp32(tiny_folder):
    pipe = EditPipeline.from_pretrained(tiny_folder, dtype="bfloat16")
    unet = pipe.unet
    assert unet.module.execution.dtype == "bfloat16"
    assert pipe.vae.module.execution.dtype == "float32"  # the VAE: float32 by default
    assert {leaf.dtype for leaf in jax.tree.leaves(unet.params)} == {jnp.dtype(jnp.bfloat16)}
    x = jnp.zeros((1, 8, 8, 4), jnp.float32)
    denoise = guided_denoiser(
        lambda x, t, c: unet.module.apply({"params": unet.params}, x, t, c),
        text=jnp.zeros((1, 77, 32), jnp.bfloat16),
        null_text=jnp.zeros((1, 77, 32), jnp.bfloat16),
        image_latent=jnp.zeros((1, 8, 8, 4), jnp.float32),
        text_scale=jnp.ones((1,)),
        image_scale=jnp.ones((1,)),
    )
    jaxpr = jax.make_jaxpr(denoise)(x, jnp.float32(500.0))
    dots = [
        eqn
        for eqn in _equations(jaxpr.jaxpr)
        if eqn.primitive.name in ("dot_general", "conv_general_dilated")
    ]
    assert dots and all(eqn.invars[0].aval.dtype == jnp.bfloat16 for eqn in dots)
    assert jaxpr.out_avals[0].dtype == jnp.float32  # the guidance combination in float32


def _equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in it (jit, remat, custom rules)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)
