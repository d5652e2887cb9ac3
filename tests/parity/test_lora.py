"""LoRA files as diffusers reads them (ip2p_jax.weights.lora), merged by
`EditPipeline.load_lora`: an edit with a LoRA equals diffusers' with the same file, fused or
not, in its own layout and PEFT's (tiny models, float32: 1e-5); kohya's layout and diffusers'
older processor layout merge to the same weights as diffusers' layout; a text-encoder LoRA
equals PEFT's on transformers' CLIPTextModel; and files that do not fit are refused before
any weight changes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from PIL import Image
from safetensors.torch import save_file

from ip2p_jax.pipelines.edit import EditPipeline
from ip2p_jax.testing.parity import edit_both
from ip2p_jax.weights.lora import LoraError

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

RANK, ALPHA = 4, 6.0
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"]
TOLERANCE = 1e-5


def _adapted(module, targets: list[str], seed: int):
    """``module`` with random LoRA adapters (lora_B not zero, so each changes the output)."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False
    )
    module = peft.inject_adapter_in_model(config, module)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return module, config


def _peft_state(module) -> dict:
    from peft.utils import get_peft_model_state_dict

    return {k: v.contiguous() for k, v in get_peft_model_state_dict(module).items()}


@pytest.fixture(scope="module")
def unet_lora(tiny_folder, tmp_path_factory):
    """One UNet LoRA in four layouts: PEFT's and kohya's (alpha tensors) with every target;
    diffusers' as its training scripts save it (attention only, as they train: their
    conversion leaves other modules in PEFT's names, a mix diffusers' loader misreads) and
    its older processor layout (q, k, v)."""
    from diffusers import StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers

    unet = UNet2DConditionModel.from_pretrained(tiny_folder / "unet")
    unet, config = _adapted(unet, UNET_TARGETS, seed=1)
    state = _peft_state(unet)
    attention = {k: v for k, v in state.items() if ".attn" in k}
    folder = tmp_path_factory.mktemp("lora")
    save = StableDiffusionInstructPix2PixPipeline.save_lora_weights
    save(folder / "peft", unet_lora_layers=state, unet_lora_adapter_metadata=config.to_dict())
    metadata = {**config.to_dict(), "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
    save(
        folder / "diffusers",
        unet_lora_layers=convert_state_dict_to_diffusers(attention),
        unet_lora_adapter_metadata=metadata,
    )
    files = {
        name: folder / name / "pytorch_lora_weights.safetensors" for name in ("peft", "diffusers")
    }
    kohya, processor = {}, {}
    for key, value in state.items():
        module, _, part = key.partition(".lora_")
        which = "down" if part.startswith("A") else "up"
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{which}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(ALPHA)
        attention_module, _, target = module.rpartition(".")
        if target in ("to_q", "to_k", "to_v"):
            processor[f"unet.{attention_module}.processor.{target}_lora.{which}.weight"] = value
    files["kohya"] = folder / "kohya.safetensors"
    save_file(kohya, files["kohya"])
    files["processor"] = folder / "processor.safetensors"
    alpha = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": ALPHA, "unet.r": RANK})}
    save_file(processor, files["processor"], metadata=alpha)
    return files


IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8))
EDIT = dict(steps=3, text_scale=5.0, image_scale=1.5, seed=3)


@pytest.fixture(scope="module")
def plain_edit(tiny_folder) -> np.ndarray:
    """Our edit without a LoRA (diffusers' is the same within 2e-6)."""
    return edit_both(tiny_folder, "euler", IMAGE, ["add a hat"], **EDIT)[0]


@pytest.mark.parametrize(
    ("layout", "fuse"), [("diffusers", False), ("peft", False), ("peft", True)]
)
def test_an_edit_with_a_lora_matches_diffusers(tiny_folder, unet_lora, plain_edit, layout, fuse):
    ours, expected = edit_both(
        tiny_folder,
        "euler",
        IMAGE,
        ["add a hat"],
        lora=unet_lora[layout],
        lora_scale=0.7,
        fuse_lora=fuse,
        **EDIT,
    )
    assert np.abs(ours - expected).max() < TOLERANCE
    # the LoRA moves the edit: the comparison is not between two unchanged models
    assert np.abs(plain_edit - expected).mean() > 50 * TOLERANCE  # 1.2e-3 to 3.2e-3


def _unet_params(pipe: EditPipeline) -> dict:
    return {k: np.asarray(v) for k, v in flatten_dict(pipe.unet.params).items()}


def test_every_layout_merges_the_same_weights_and_unloads(tiny_folder, unet_lora):
    pipe = EditPipeline.from_pretrained(tiny_folder, dtype="float32")
    base = _unet_params(pipe)
    merged = {}
    for layout in ("peft", "kohya", "diffusers", "processor"):
        pipe.load_lora(unet_lora[layout], scale=0.5)
        merged[layout] = _unet_params(pipe)
        pipe.unload_lora()
        assert all(np.array_equal(v, base[k]) for k, v in _unet_params(pipe).items())
    changed = [k for k in base if not np.array_equal(merged["peft"][k], base[k])]
    # every target's kernel: q, k, v, out, proj_in and ff.net.2 of each transformer, conv1s
    for target in ("to_q", "to_out_0", "proj_in", "net_2", "conv1"):
        assert any(target in k for k in changed), target
    assert all(k[-1] == "kernel" for k in changed)
    # the same updates wherever a layout adapts a module, the weights as they were elsewhere
    adapted = {
        "kohya": None,
        "diffusers": ("to_q", "to_k", "to_v", "to_out_0"),
        "processor": ("to_q", "to_k", "to_v"),
    }
    for layout, modules in adapted.items():
        for key, value in merged[layout].items():
            wanted = merged["peft"] if modules is None or key[-2] in modules else base
            np.testing.assert_allclose(value, wanted[key], atol=1e-7, err_msg=f"{layout} {key}")
    # two merged on top of each other, then both gone
    pipe.load_lora(unet_lora["processor"], scale=0.5)
    pipe.load_lora(unet_lora["kohya"], scale=0.5)
    pipe.unload_lora()
    assert all(np.array_equal(v, base[k]) for k, v in _unet_params(pipe).items())


def test_a_text_encoder_lora_matches_peft_on_transformers(tiny_folder, tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    reference = CLIPTextModel.from_pretrained(tiny_folder / "text_encoder")
    reference, config = _adapted(reference, ["q_proj", "v_proj", "fc1"], seed=2)
    path = tmp_path / "text.safetensors"
    state = {f"text_encoder.{k}": v for k, v in _peft_state(reference).items()}
    save_file(
        state,
        path,
        metadata={
            "lora_adapter_metadata": json.dumps(
                {"text_encoder.lora_alpha": ALPHA, "text_encoder.r": RANK}
            )
        },
    )
    tokenizer = CLIPTokenizer.from_pretrained(tiny_folder / "tokenizer")
    prompts = ["make the sky purple", "add a hat"]
    ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(ids).last_hidden_state.numpy()
    pipe = EditPipeline.from_pretrained(tiny_folder, dtype="float32")
    plain = np.asarray(pipe.encode_prompts(prompts))
    pipe.load_lora(path)
    ours = np.asarray(pipe.encode_prompts(prompts))
    assert np.abs(ours - expected).max() < TOLERANCE
    assert np.abs(plain - expected).max() > 100 * TOLERANCE


def test_files_that_do_not_fit_are_refused_before_any_weight_changes(tiny_folder, tmp_path):
    pipe = EditPipeline.from_pretrained(tiny_folder, dtype="float32")
    base = _unet_params(pipe)
    down, up = torch.ones(2, 8), torch.ones(8, 2)
    cases = {
        "no_module": (
            {
                "unet.down_blocks.9.attentions.0.proj_in.lora.down.weight": down,
                "unet.down_blocks.9.attentions.0.proj_in.lora.up.weight": up,
            },
            "module down_blocks.9.attentions.0.proj_in, which this model's unet does not have",
        ),
        "shape": (
            {"unet.conv_in.lora.down.weight": down, "unet.conv_in.lora.up.weight": up},
            "module conv_in: the adapter's update is",
        ),
        "dora": (
            {"unet.conv_in.lora_magnitude_vector": torch.ones(3)},
            "is DoRA this loader does not merge",
        ),
        "no_prefix": (
            {"conv_in.lora_A.weight": down, "conv_in.lora_B.weight": up},
            "names no component",
        ),
        "half": ({"unet.conv_in.lora_A.weight": down}, "lacks its up tensor"),
    }
    for name, (tensors, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, path)
        with pytest.raises(LoraError, match=message):
            pipe.load_lora(path)
    assert all(np.array_equal(v, base[k]) for k, v in _unet_params(pipe).items())
    with pytest.raises(FileNotFoundError, match="LoRA file not found"):
        pipe.load_lora(tmp_path / "missing.safetensors")


def test_ip2p_edit_merges_a_lora_at_its_scale(tiny_folder, unet_lora, tmp_path):
    from ip2p_jax.apps.cli.main import main

    Image.new("RGB", (40, 30), (200, 40, 40)).save(tmp_path / "in.png")
    lora = ["--lora", str(unet_lora["kohya"]), "--lora-scale"]
    edits = {}
    for name, extra in {"plain": [], "zero": [*lora, "0"], "lora": [*lora, "0.7"]}.items():
        out = tmp_path / f"{name}.png"
        command = ["edit", "--model", str(tiny_folder), "--steps", "2", "--resolution", "32"]
        command += ["--image", str(tmp_path / "in.png"), "--instruction", "make it blue"]
        assert main([*command, "--out", str(out), *extra]) == 0
        edits[name] = np.asarray(Image.open(out))
    assert np.array_equal(edits["zero"], edits["plain"])
    assert not np.array_equal(edits["lora"], edits["plain"])
