"""Component parity against the real diffusers/transformers classes on identical weights.

Tolerances (fp32 on CPU): tiny configs 1e-4 max abs error on outputs of order 1; the full
SD-1.5 architecture and SDXL UNet 1e-3 (measured figures are in docs/parity.md).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ip2p_jax.testing.parity import run_parity

TINY_TOLERANCE = 1e-4
FULL_TOLERANCE = 1e-3


def _check(results, tolerance):
    assert {r.component for r in results} == {"unet", "vae", "text_encoder"}
    for r in results:
        # The reference must be of order 1 for an absolute tolerance to mean something.
        assert 0.05 < r.reference_max_abs < 100, r
        assert r.max_abs_error <= tolerance, r


def test_tiny_sd1_components_match(tiny_folder):
    _check(run_parity(tiny_folder, resolution=64, tolerance=TINY_TOLERANCE), TINY_TOLERANCE)


def test_tiny_sd2_components_match(tiny_sd2_folder):
    results = run_parity(tiny_sd2_folder, resolution=64, tolerance=TINY_TOLERANCE)
    _check(results, TINY_TOLERANCE)
    assert any(r.output == "hidden_states[-2]" for r in results)  # SD-2 reads the penultimate


def test_unet_with_odd_latent_sides_matches(tiny_folder):
    """Latent sides that halve to odd sizes: the up path must resize to the skip's size."""
    import jax.numpy as jnp
    import torch
    from diffusers import UNet2DConditionModel

    from ip2p_jax.weights.model_folder import load_component

    reference = UNet2DConditionModel.from_pretrained(tiny_folder / "unet").eval()
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 8, 10, 6, generator=g)
    context = torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        expected = reference(sample, torch.tensor([321.0]), context).sample.numpy()
    ours = load_component(tiny_folder, "unet")
    out = ours.module.apply(
        {"params": ours.params},
        jnp.asarray(sample.numpy().transpose(0, 2, 3, 1)),
        jnp.asarray([321.0]),
        jnp.asarray(context.numpy()),
    )
    error = np.abs(np.asarray(out).transpose(0, 3, 1, 2) - expected).max()
    assert error <= TINY_TOLERANCE


@pytest.mark.full_size
def test_full_size_sd15_components_match(sd15_folder, capsys):
    """The real SD-1.5 IP2P architecture at 256 px, batch 1 (docs/parity.md's figures are
    batch 2), through the user-facing command."""
    from ip2p_jax.apps.cli.main import main
    from ip2p_jax.testing.parity import Comparison

    args = ["parity", str(sd15_folder), "--json", "--tolerance", str(FULL_TOLERANCE)]
    status = main(args + ["--batch", "1"])
    rows = json.loads(capsys.readouterr().out)
    print(rows)  # the measured figures, for the README table (pytest -s)
    assert status == 0
    results = [Comparison(**{k: v for k, v in row.items() if k != "passed"}) for row in rows]
    _check(results, FULL_TOLERANCE)


@pytest.mark.full_size
def test_full_size_sdxl_unet_matches():
    """SDXL base's UNet architecture (2.57 B parameters, conv_in widened to 8 channels: 10.3 GB
    in float32) at 256 px, batch 1, as docs/parity.md's row. The reference runs, then
    its weights are converted to ours as it lets go of them (peak 12.3 GB)."""
    from ip2p_jax.testing.parity import compare_unet_in_memory
    from ip2p_jax.testing.reference_models import SDXL_UNET, random_unet

    result = compare_unet_in_memory(
        lambda: random_unet(SDXL_UNET), resolution=256, batch=1, seed=0, tolerance=FULL_TOLERANCE
    )
    print(result)
    assert result.passed and 0.05 < result.reference_max_abs < 100, result
