"""Training SDXL InstructPix2Pix (configs/sdxl.py), against diffusers'
examples/instruct_pix2pix/train_instruct_pix2pix_sdxl.py.

The UNet step's loss and gradients are compared in test_loss_parity.py. Here: the text
conditioning the step builds (the script's encode_prompt, compute_null_conditioning and
compute_time_ids, rewritten below from its source with the real transformers classes), and
`ip2p train --config configs/sdxl.py` on a tiny SDXL folder end to end: its model is an SDXL
folder that diffusers' StableDiffusionXLInstructPix2PixPipeline loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["make it snow", "turn the red square into a blue circle " * 12]  # one truncated
# float32 on both sides: the encoders' states differ by summation order only.
TEXT_ATOL = 1e-5


def _script_conditioning(folder: Path, prompts: list[str], resolution: int):
    """(prompt_embeds, add_text_embeds, null_conditioning, add_time_ids) as the script
    computes them, in numpy."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizers = [CLIPTokenizer.from_pretrained(folder / n) for n in ("tokenizer", "tokenizer_2")]
    encoders = [
        CLIPTextModel.from_pretrained(folder / "text_encoder"),
        CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2"),
    ]

    def encode(texts):
        states = []
        for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
            ids = tokenizer(
                texts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            output = encoder(ids, output_hidden_states=True)
            pooled = output[0]  # the last encoder's is kept: its projected pooled output
            states.append(output.hidden_states[-2])
        return torch.concat(states, dim=-1), pooled

    with torch.no_grad():
        prompt_embeds, pooled = encode(prompts)
        null_conditioning, _ = encode([""])
    time_ids = [resolution, resolution, 0, 0, resolution, resolution]  # crops (0, 0)
    return (
        prompt_embeds.numpy(),
        pooled.numpy(),
        null_conditioning.numpy(),
        np.asarray([time_ids], np.float32),
    )


def test_sdxl_text_conditioning_matches_the_script(tiny_sdxl_folder):
    import jax.numpy as jnp

    from ip2p_jax.train.conditioning import batch_tokenizer, encode_text, time_ids
    from ip2p_jax.train.config import ModelConfig
    from ip2p_jax.train.models import load_models

    models = load_models(ModelConfig(init_from=str(tiny_sdxl_folder)))
    params = {n: getattr(models, n).params for n in ("text_encoder", "text_encoder_2")}
    tokenize = batch_tokenizer(models)
    ids = tokenize(PROMPTS)
    assert ids.shape == (2, 2, 77)
    assert not np.array_equal(ids[:, 0], ids[:, 1])  # the second pads with "!", not EOS
    states, pooled = encode_text(models, params, jnp.asarray(ids))
    null_states, _ = encode_text(models, params, jnp.asarray(tokenize([""])))
    expected = _script_conditioning(tiny_sdxl_folder, PROMPTS, 256)
    assert states.shape == (2, 77, 32 + 48) and pooled.shape == (2, 24)
    for ours, theirs in zip((states, pooled, null_states), expected[:3], strict=True):
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=TEXT_ATOL)
    np.testing.assert_array_equal(time_ids(256), expected[3])
    # The run's validation edits go through SDXL's pipeline.
    from ip2p_jax.pipelines.sdxl_edit import SDXLEditPipeline
    from ip2p_jax.runtime.mesh import local_mesh
    from ip2p_jax.train.loop import edit_pipeline

    assert isinstance(edit_pipeline(models, local_mesh()), SDXLEditPipeline)


def test_ip2p_train_runs_the_sdxl_config(tiny_sdxl_folder, shapes32, tmp_path):
    """Two steps of configs/sdxl.py as it is (bfloat16 compute, posterior-sampled image
    condition, remat), on 32 px shapes; the model exports to a folder that diffusers' SDXL
    InstructPix2Pix pipeline loads, with the weights we trained."""
    import torch
    from diffusers import StableDiffusionXLInstructPix2PixPipeline

    from ip2p_jax.apps.cli.main import main
    from ip2p_jax.weights.model_folder import COMPONENTS, load_component

    workdir, exported = tmp_path / "run", tmp_path / "diffusers"
    overrides = {
        "model.init_from": tiny_sdxl_folder,
        "data.path": shapes32,
        "data.resolution": 32,
        "data.min_resize": 32,
        "data.max_resize": 32,
        "data.workers": 0,
        "batch_size": 2,
        "grad_accum": 1,
        "steps": 2,
        "checkpoint_every": 2,
        "validate_every": 0,  # the validation pipeline: test_sdxl_text_conditioning_...
    }
    args = [f"--config.{key}={value}" for key, value in overrides.items()]
    config = str(ROOT / "configs" / "sdxl.py")
    assert main(["train", "--config", config, "--workdir", str(workdir), *args]) == 0

    model = workdir / "model"
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLInstructPix2PixPipeline"
    assert (model / "text_encoder_2").is_dir() and (model / "tokenizer_2").is_dir()
    trained = load_component(model, "unet").params
    initial = load_component(tiny_sdxl_folder, "unet", in_channels=8).params
    assert not np.array_equal(trained["conv_in"]["kernel"], initial["conv_in"]["kernel"]), (
        "two steps at lr 5e-5 move the UNet"
    )

    assert main(["export", str(model), str(exported)]) == 0
    pipe = StableDiffusionXLInstructPix2PixPipeline.from_pretrained(exported)
    assert isinstance(pipe.text_encoder_2.text_projection, torch.nn.Linear)
    ours = COMPONENTS["unet"].state_dict(trained)
    theirs = pipe.unet.state_dict()
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        np.testing.assert_array_equal(tensor.numpy(), ours[name], err_msg=name)
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(metrics[-1]["loss"])
