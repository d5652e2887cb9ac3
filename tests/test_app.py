"""``ip2p app``: the request logic, and the page end to end in a real headless Chromium."""

from __future__ import annotations

import dataclasses
import io
import os
import random
import socket

import numpy as np
import pytest
from PIL import Image

from ip2p_jax.apps.app import (
    IMAGE_SCALE_RANGE,
    MAX_RANDOM_SEED,
    TEXT_SCALE_RANGE,
    build_app,
    check_inputs,
    resolve_request,
)
from ip2p_jax.apps.shipped import SHAPES_SAMPLING

CHROMIUM = "/usr/bin/chromium"
# Headless flags for this sandbox: no background connections (the network is closed).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_fixed_request_keeps_the_given_seed_and_scales():
    request = resolve_request(
        randomize_seed=False,
        seed=42,
        randomize_scales=False,
        text_scale=5.0,
        image_scale=1.1,
        rng=random.Random(0),
    )
    assert (request.seed, request.text_scale, request.image_scale) == (42, 5.0, 1.1)


def test_randomised_request_draws_in_the_original_apps_ranges():
    rng = random.Random(0)
    requests = [
        resolve_request(
            randomize_seed=True,
            seed=42,
            randomize_scales=True,
            text_scale=5.0,
            image_scale=1.1,
            rng=rng,
        )
        for _ in range(50)
    ]
    assert len({r.seed for r in requests}) > 40
    assert all(0 <= r.seed <= MAX_RANDOM_SEED for r in requests)
    assert all(TEXT_SCALE_RANGE[0] <= r.text_scale <= TEXT_SCALE_RANGE[1] for r in requests)
    assert all(IMAGE_SCALE_RANGE[0] <= r.image_scale <= IMAGE_SCALE_RANGE[1] for r in requests)


@pytest.mark.parametrize(
    ("image", "instruction", "steps", "outputs", "message"),
    [
        (None, "make it red", 10, 1, "upload an input image"),
        (Image.new("RGB", (8, 8)), "  ", 10, 1, "write an instruction"),
        (Image.new("RGB", (8, 8)), "make it red", 0, 1, "steps must be at least 1"),
        (Image.new("RGB", (8, 8)), "make it red", 10, 9, "outputs must be 1 to 4"),
    ],
)
def test_bad_inputs_are_refused_with_what_to_fix(image, instruction, steps, outputs, message):
    with pytest.raises(ValueError, match=message):
        check_inputs(image, instruction, steps, outputs)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def served_app(tiny_folder, monkeypatch):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    from ip2p_jax.pipelines.edit import EditPipeline

    pipeline = EditPipeline.from_pretrained(tiny_folder)
    defaults = dataclasses.replace(SHAPES_SAMPLING, steps=3)
    page = build_app(pipeline, defaults)
    port = _free_port()
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield pipeline, f"http://127.0.0.1:{port}", defaults
    page.close()


def test_browser_uploads_an_image_and_receives_the_edit(served_app, tmp_path):
    """Upload, instruction, seed and two outputs in Chromium; the images the page shows are
    the pipeline's own edits with those settings, pixel for pixel."""
    assert os.path.exists(CHROMIUM), (
        f"{CHROMIUM} is missing: install Debian's chromium (`make browser` does)"
    )
    from playwright.sync_api import sync_playwright

    pipeline, url, defaults = served_app
    scene = np.zeros((64, 64, 3), np.uint8)
    scene[16:48, 8:40] = (220, 30, 30)
    path = tmp_path / "scene.png"
    Image.fromarray(scene).save(path)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(url)
        page.locator("input[type=file]").first.set_input_files(str(path))
        page.get_by_label("Edit instruction").fill("turn the square blue")
        page.get_by_label("Seed value").fill("7")
        page.get_by_label("Text scale s_T").fill("6.5")
        page.get_by_label("number input for Outputs").fill("2")
        page.get_by_role("button", name="Generate").click()
        images = page.locator("#edited-images img")
        images.nth(1).wait_for(timeout=180_000)
        sources = [images.nth(k).get_attribute("src") for k in range(2)]
        received = [
            np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))
            for src in sources
        ]
        browser.close()
    expected = pipeline.edit(
        [Image.open(path)] * 2,
        ["turn the square blue"] * 2,
        steps=3,
        text_scale=6.5,
        image_scale=defaults.image_scale,  # the page's own default
        sampler=defaults.sampler,
        seed=7,
        resolution=defaults.resolution,
        progress=False,
    )
    for got, want in zip(received, expected, strict=True):
        assert got.shape == (64, 64, 3)
        np.testing.assert_array_equal(got, np.asarray(want))
    assert not np.array_equal(received[0], received[1])  # seeds 7 and 8
