"""fp32 component parity on the device: our UNet, VAE and CLIP text encoder against the
diffusers / transformers classes on the same device (CUDA on a GPU), same weights and inputs.

Both sides in full fp32: JAX under ``jax.default_matmul_precision("highest")`` with the models
computing in float32 (the GPU profile's default compute dtype is bf16), torch with TF32 off for
matmuls and cuDNN convolutions (conftest's ``torch_device``); TF32 on either side breaks fp32
parity (measured before: tiny UNet max abs 7.6e-4 to 9.8e-4 at JAX's default precision).
Tolerance: 1e-3 max abs error on outputs of order 1, the CPU suite's SD-1.5 bound.
"""

from __future__ import annotations

import jax
import pytest

from ip2p_jax.testing.parity import (
    DEFAULT_PROMPTS,
    Comparison,
    compare_text_encoder,
    compare_unet,
    compare_vae,
    format_table,
)

pytestmark = pytest.mark.gpu

TOLERANCE = 1e-3


def _check(results: list[Comparison], record) -> None:
    record(
        **{f"{r.component}.{r.output} max abs": r.max_abs_error for r in results},
        tolerance=TOLERANCE,
    )
    for r in results:
        assert 0.05 < r.reference_max_abs < 100, r  # an absolute bound needs outputs of order 1
    assert all(r.passed for r in results), "\n" + format_table(results)


@pytest.mark.parametrize("compare", [compare_unet, compare_vae], ids=["unet", "vae"])
def test_fp32_matches_torch(compare, model_folder, sizes, torch_device, record):
    resolution, batch = sizes.component_resolution, sizes.component_batch
    with jax.default_matmul_precision("highest"):
        results = compare(model_folder, resolution, batch, 0, TOLERANCE, device=torch_device)
    _check(results, record)


def test_text_encoder_fp32_matches_torch(model_folder, torch_device, record):
    with jax.default_matmul_precision("highest"):
        results = compare_text_encoder(
            model_folder, DEFAULT_PROMPTS, TOLERANCE, device=torch_device
        )
    _check(results, record)
