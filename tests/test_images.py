"""Image preprocessing: orientation, modes, sizes, the [-1, 1] round trip."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ip2p_jax.pipelines.images import ImageError, load_image, target_size, to_model_array, to_pil


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert load_image(path).size == (20, 40)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16"])
def test_every_mode_becomes_rgb(mode):
    image = Image.new("RGB", (8, 8), (200, 100, 50)).convert(mode)
    assert load_image(image).mode == "RGB"


def test_transparency_is_laid_on_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(image).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    ("size", "resolution", "multiple", "expected"),
    [
        ((512, 512), 512, 8, (512, 512)),
        ((1024, 768), 512, 8, (512, 384)),
        ((768, 1024), 512, 64, (384, 512)),
        ((1000, 10), 256, 8, (256, 8)),
        ((333, 500), 512, 8, (344, 512)),
    ],
)
def test_target_size(size, resolution, multiple, expected):
    assert target_size(*size, resolution, multiple) == expected


def test_resolution_over_the_cap_warns():
    with pytest.warns(UserWarning, match="capped at 2048"):
        assert max(target_size(100, 100, 4096, 8)) == 2048


def test_pixels_round_trip_exactly():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (16, 24, 3), np.uint8))
    array = to_model_array(image, image.size)
    assert array.min() >= -1 and array.max() <= 1
    assert np.array_equal(np.asarray(to_pil(array)), np.asarray(image))


def test_enormous_images_are_refused(tmp_path, monkeypatch):
    import ip2p_jax.pipelines.images as images

    path = tmp_path / "big.png"
    Image.new("RGB", (300, 300)).save(path)
    monkeypatch.setattr(images, "MAX_INPUT_PIXELS", 100 * 100)
    with pytest.raises(ImageError, match=r"big\.png: 300x300 is too large"):
        load_image(path)
