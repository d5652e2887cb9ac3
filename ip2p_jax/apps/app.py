"""``ip2p app``: a Gradio page for editing by instruction, like the original's edit_app.py.

Upload an image (or load a bundled example scene), write an instruction, and get one or
several edits (seeds seed, seed + 1, ...). Seed and scales can be fixed or randomised per
click, as in the original; the values used are written back into the page so an edit can be
repeated. The model is loaded once and every edit runs through EditPipeline.edit.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ip2p_jax.apps.shipped import SamplingDefaults

# The original app's ranges: s_T uniform in [6, 9], s_I in [1.2, 1.8], seeds up to 100000.
TEXT_SCALE_RANGE = (6.0, 9.0)
IMAGE_SCALE_RANGE = (1.2, 1.8)
MAX_RANDOM_SEED = 100_000
MAX_OUTPUTS = 4


@dataclass(frozen=True)
class EditRequest:
    """What one click asks for, after randomising (what is shown back in the page)."""

    seed: int
    text_scale: float
    image_scale: float


def resolve_request(
    *,
    randomize_seed: bool,
    seed: int,
    randomize_scales: bool,
    text_scale: float,
    image_scale: float,
    rng: random.Random,
) -> EditRequest:
    """The seed and scales of one click: given ones, or drawn as the original app drew them."""
    if randomize_seed:
        seed = rng.randint(0, MAX_RANDOM_SEED)
    if randomize_scales:
        text_scale = round(rng.uniform(*TEXT_SCALE_RANGE), 2)
        image_scale = round(rng.uniform(*IMAGE_SCALE_RANGE), 2)
    return EditRequest(int(seed), float(text_scale), float(image_scale))


def check_inputs(image: Image.Image | None, instruction: str | None, steps: Any, outputs: Any):
    """The page's inputs, checked: ValueError with what to fix (shown as a Gradio error)."""
    if image is None:
        raise ValueError("upload an input image first (or press Load example)")
    if not instruction or not instruction.strip():
        raise ValueError("write an instruction: what should change in the image?")
    if steps is None or int(steps) < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if outputs is None or not 1 <= int(outputs) <= MAX_OUTPUTS:
        raise ValueError(f"outputs must be 1 to {MAX_OUTPUTS}, got {outputs}")


def build_app(pipeline: Any, defaults: SamplingDefaults, *, title: str = "ip2p-jax"):
    """The Gradio Blocks of the page, editing with ``pipeline`` (an EditPipeline) at
    ``defaults.resolution`` (long side) with its sampler; the page starts at its steps and
    scales."""
    import gradio as gr

    from ip2p_jax.apps.demo import load_demo_edits
    from ip2p_jax.worlds.shapes import render

    examples = load_demo_edits()
    rng = random.Random()

    def generate(image, instruction, steps_, randomize_seed, seed, randomize_scales, s_t, s_i, n):
        try:
            check_inputs(image, instruction, steps_, n)
        except ValueError as err:
            raise gr.Error(str(err)) from err
        request = resolve_request(
            randomize_seed=randomize_seed == "Randomize seed",
            seed=seed,
            randomize_scales=randomize_scales == "Randomize scales",
            text_scale=s_t,
            image_scale=s_i,
            rng=rng,
        )
        count = int(n)
        edited = pipeline.edit(
            [image.convert("RGB")] * count,
            [instruction] * count,
            steps=int(steps_),
            text_scale=request.text_scale,
            image_scale=request.image_scale,
            seed=request.seed,  # output k gets seed + k
            resolution=defaults.resolution,
            sampler=defaults.sampler,
            progress=False,
        )
        return request.seed, request.text_scale, request.image_scale, edited

    def load_example():
        example = rng.choice(examples)
        image = Image.fromarray(render(example.before, defaults.resolution))
        return image, example.instruction

    with gr.Blocks(title=title) as page:
        gr.Markdown(f"## {title}: edit an image by a written instruction")
        with gr.Row():
            generate_button = gr.Button("Generate", variant="primary")
            example_button = gr.Button("Load example")
            instruction = gr.Textbox(label="Edit instruction", lines=1, scale=3)
        with gr.Row():
            input_image = gr.Image(label="Input image", type="pil", format="png")
            gallery = gr.Gallery(
                label="Edited images", format="png", columns=2, elem_id="edited-images"
            )
        with gr.Row():
            steps_box = gr.Number(value=defaults.steps, precision=0, label="Steps")
            outputs_box = gr.Slider(1, MAX_OUTPUTS, value=1, step=1, label="Outputs")
            seed_mode = gr.Radio(["Fix seed", "Randomize seed"], value="Fix seed", label="Seed")
            seed_box = gr.Number(value=1371, precision=0, label="Seed value")
            scale_mode = gr.Radio(
                ["Fix scales", "Randomize scales"], value="Fix scales", label="Scales"
            )
            text_scale = gr.Number(value=defaults.text_scale, label="Text scale s_T")
            image_scale = gr.Number(value=defaults.image_scale, label="Image scale s_I")
        gr.Markdown(
            "Higher **s_I** keeps the edit closer to the input image; higher **s_T** follows "
            "the instruction more strongly. If the edit does too little, lower s_I or raise "
            "s_T; if it changes too much, do the opposite."
        )
        generate_button.click(
            generate,
            inputs=[
                input_image,
                instruction,
                steps_box,
                seed_mode,
                seed_box,
                scale_mode,
                text_scale,
                image_scale,
                outputs_box,
            ],
            outputs=[seed_box, text_scale, image_scale, gallery],
        )
        example_button.click(load_example, outputs=[input_image, instruction])
    page.queue(default_concurrency_limit=1)  # one edit at a time: it uses every core
    return page


def launch_app(
    model: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    resolution: int | None = None,
    steps: int | None = None,
    block: bool = True,
    dtype: str | None = None,
    attention: str | None = None,
    cosxl_edit: bool = False,
):
    """Loads the model (the bundled shapes model by default) in ``dtype`` with the
    ``attention`` kernel (None: the backend's, see EditPipeline.from_pretrained), as a CosXL
    Edit model when ``cosxl_edit``, and serves the page; returns the Gradio Blocks (already
    serving when ``block`` is False)."""
    from ip2p_jax.apps.shipped import sampling_defaults, shipped_model
    from ip2p_jax.pipelines.auto import load_edit_pipeline

    shipped = model is None
    pipeline = load_edit_pipeline(
        shipped_model() if shipped else model,
        dtype=dtype,
        attention=attention,
        cosxl_edit=cosxl_edit,
    )
    defaults = sampling_defaults(shipped, cosxl_edit)
    defaults = dataclasses.replace(
        defaults, resolution=resolution or defaults.resolution, steps=steps or defaults.steps
    )
    page = build_app(pipeline, defaults)
    page.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block)
    return page
