"""8 simulated CPU devices give the same images as 1 (the batch split over the data axis)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np

from ip2p_jax.pipelines.edit import EditPipeline

SCRIPT = textwrap.dedent(
    """
    import sys
    import jax
    import numpy as np
    from ip2p_jax.pipelines.edit import EditPipeline

    assert jax.device_count() == 8, jax.devices()
    pipe = EditPipeline.from_pretrained(sys.argv[1])
    assert pipe.mesh.devices.size == 8
    pixels = np.load(sys.argv[2])
    out = pipe.edit_arrays(pixels, ["make it red", "add snow", "night"], steps=3,
                           seeds=[1, 2, 3], image_scale=[1.5, 1.2, 1.0])
    np.save(sys.argv[3], out)
    """
)


def test_eight_devices_equal_one(tiny_folder, tmp_path):
    pixels = np.random.default_rng(0).uniform(-1, 1, (3, 16, 24, 3)).astype(np.float32)
    np.save(tmp_path / "pixels.npy", pixels)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(tiny_folder),
            str(tmp_path / "pixels.npy"),
            str(tmp_path / "eight.npy"),
        ],
        check=True,
        env=env,
        timeout=600,
    )
    pipe = EditPipeline.from_pretrained(tiny_folder)
    assert pipe.mesh.devices.size == 1
    one = pipe.edit_arrays(
        pixels,
        ["make it red", "add snow", "night"],
        steps=3,
        seeds=[1, 2, 3],
        image_scale=[1.5, 1.2, 1.0],
    )
    eight = np.load(tmp_path / "eight.npy")
    assert eight.shape == one.shape == (3, 16, 24, 3)
    np.testing.assert_allclose(eight, one, atol=1e-5)
