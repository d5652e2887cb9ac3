"""GPU checks (marker ``gpu``): our models, pipeline and attention kernels on a GPU against the
PyTorch references on the same GPU. scripts/device_check.sh runs them on a lent machine.

They run where JAX's default backend is a GPU, or at tiny size on the CPU when
``IP2P_DEVICE_CHECK=cpu`` (``scripts/device_check.sh --cpu``, which tests/test_device_check.py
runs). Anywhere else they are deselected: ``make test`` on a CPU neither runs nor counts them.

Sizes: on a GPU the real SD-1.5 architecture with random weights, from the folder
``IP2P_DEVICE_FOLDER`` names when it holds one (device_check.sh builds it once for these tests
and the benchmark), else built here; on the CPU the "tiny" preset. The measured errors go to
the terminal summary and, as JSON, to the file ``IP2P_DEVICE_CHECK_RESULTS`` names.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

# torch and JAX share the GPU in these tests: JAX takes memory as it needs it, instead of 75%
# of the device at its first use. Set before JAX's backend starts.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

MODE_VARIABLE = "IP2P_DEVICE_CHECK"
FOLDER_VARIABLE = "IP2P_DEVICE_FOLDER"
RESULTS_VARIABLE = "IP2P_DEVICE_CHECK_RESULTS"


@dataclasses.dataclass(frozen=True)
class Sizes:
    mode: str  # "gpu" or "cpu"
    preset: str  # ip2p_jax.testing.reference_models.PRESETS
    torch_device: str
    component_resolution: int
    component_batch: int
    pipeline_resolution: int
    pipeline_steps: int
    # name -> (q shape [batch, length, heads, head_dim], key/value length, causal)
    attention: dict[str, tuple[tuple[int, int, int, int], int, bool]]


# SD-1.5 at 512 px: self- and cross-attention at the 64x64 latent level (head_dim 40), 32x32
# (80) and 8x8 (160, over cuDNN flash attention's 128 on some versions); CLIP's causal one.
GPU = Sizes(
    "gpu",
    "sd15",
    "cuda",
    component_resolution=256,
    component_batch=2,
    pipeline_resolution=256,
    pipeline_steps=10,
    attention={
        "self_64": ((2, 4096, 8, 40), 4096, False),
        "cross_64": ((2, 4096, 8, 40), 77, False),
        "self_32": ((2, 1024, 8, 80), 1024, False),
        "self_8": ((2, 64, 8, 160), 64, False),
        "text_causal": ((2, 77, 12, 64), 77, True),
    },
)
CPU = Sizes(
    "cpu",
    "tiny",
    "cpu",
    component_resolution=64,
    component_batch=2,
    pipeline_resolution=32,
    pipeline_steps=2,
    attention={  # one self-attention past the blockwise kernel's one block, one causal
        "self_64": ((1, 1024, 4, 8), 1024, False),
        "text_causal": ((1, 77, 4, 8), 77, True),
    },
)


def device_mode() -> str | None:
    """ "gpu" on a GPU backend, "cpu" when IP2P_DEVICE_CHECK=cpu asks, else None."""
    if os.environ.get(MODE_VARIABLE) == "cpu":
        return "cpu"
    import jax

    return "gpu" if jax.default_backend() == "gpu" else None


# The order the checks run in, the parity that matters first (a run stopped at its time limit
# on a lent GPU has done those).
ORDER = ("test_components.py", "test_pipeline_bf16.py", "test_attention_kernels.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    if device_mode():
        rank = {name: k for k, name in enumerate(ORDER)}
        checks = {id(item) for item in gpu}
        items.sort(key=lambda item: rank.get(item.path.name, -1) if id(item) in checks else -1)
        return
    config.hook.pytest_deselected(items=gpu)
    items[:] = [item for item in items if not item.get_closest_marker("gpu")]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``attention_case``: the names of this mode's attention shapes."""
    if "attention_case" in metafunc.fixturenames:
        cases = (CPU if os.environ.get(MODE_VARIABLE) == "cpu" else GPU).attention
        metafunc.parametrize("attention_case", list(cases))


@pytest.fixture(scope="session")
def sizes() -> Sizes:
    mode = device_mode()
    if mode is None:  # deselected above; reached only by running a test by hand elsewhere
        pytest.fail("GPU checks need a GPU backend or IP2P_DEVICE_CHECK=cpu")
    return GPU if mode == "gpu" else CPU


@pytest.fixture(scope="session")
def model_folder(sizes, tmp_path_factory) -> Path:
    """The preset's random-weight IP2P folder (diffusers layout)."""
    given = os.environ.get(FOLDER_VARIABLE)
    if given and (Path(given) / "model_index.json").is_file():
        return Path(given)
    from ip2p_jax.testing.reference_models import build_pipeline_folder

    return build_pipeline_folder(tmp_path_factory.mktemp(sizes.preset) / "model", sizes.preset)


@pytest.fixture(scope="session")
def torch_device(sizes):
    """The torch device of the references, with TF32 off (it breaks fp32 parity)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch.device(sizes.torch_device)


MEASURED: dict[str, dict] = {}


@pytest.fixture
def record(request):
    """record(**values): keeps this test's measured figures for the summary and the JSON."""

    def keep(**values) -> None:
        MEASURED.setdefault(request.node.name, {}).update(values)

    return keep


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get(RESULTS_VARIABLE)
    if path and MEASURED:
        Path(path).write_text(json.dumps(MEASURED, indent=1, default=float))


def pytest_terminal_summary(terminalreporter) -> None:
    if MEASURED:
        terminalreporter.section("device check: measured")
        for name, values in MEASURED.items():
            shown = ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()
            )
            terminalreporter.write_line(f"{name}: {shown}")
