"""scripts/check_lowering.py: ip2p-jax's programs lower for TPU and CUDA on this CPU, with the
right attention kernel in them and no CPU-only custom call."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_lowering.py"


@pytest.fixture(scope="module")
def check_lowering():
    spec = importlib.util.spec_from_file_location("check_lowering", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_lowering"] = module
    spec.loader.exec_module(module)
    return module


def test_the_sd15_sampling_program_lowers_for_tpu_with_pallas_and_for_cuda(check_lowering, capsys):
    # 512 px, batch 2, three guidance rows, bf16: the 4096-token self-attention goes to
    # Pallas' splash kernel on TPU (a tpu_custom_call), the rest to XLA's attention.
    args = ["--platforms", "tpu", "cuda", "--programs", "sample", "--fsdp", "1"]
    assert check_lowering.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    tpu = next(line for line in lines if line.startswith("sample tpu"))
    assert "5/32 attention calls" in tpu and "tpu_custom_call" in tpu and tpu.endswith("ok")
    cuda = next(line for line in lines if line.startswith("sample cuda"))
    assert "tpu_custom_call" not in cuda and "ok" in cuda
    assert lines[-1] == "2 of 2 programs lowered and passed"


def test_the_train_step_lowers_for_both_platforms_over_a_sharded_mesh():
    # Run as a script: 8 simulated devices, a 4 data x 2 fsdp mesh (this process has one);
    # SD-1.5 at 256 px, batch 8, bf16 compute on fp32 master weights.
    args = ["--platforms", "tpu", "cuda", "--programs", "train"]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "8 devices: the train step over a mesh of 4 data x 2 fsdp"
    trains = [line for line in lines if line.startswith("train ")]
    assert len(trains) == 2 and all("on 8 device(s)" in line for line in trains)
    assert lines[-1] == "2 of 2 programs lowered and passed"


def test_cpu_only_and_stray_kernel_calls_fail_the_check(check_lowering):
    import jax.numpy as jnp

    from ip2p_jax.models.attention import attention

    class Lowered:
        def __init__(self, text: str):
            self.text = text

        def as_text(self) -> str:
            return self.text

        def cost_analysis(self) -> dict:
            return {"flops": 1.0}

    def lower_with(text: str):
        def lower():
            # A short attention, which splash leaves to XLA's kernel (runs on this CPU).
            q = jnp.ones((1, 16, 1, 8), jnp.float32)
            attention(q, q, q, kernel="pallas_tpu")
            return Lowered(text)

        return lower

    cpu_call = "stablehlo.custom_call @lapack_sgetrf(%0)"
    report = check_lowering.check("sample", "tpu", "pallas_tpu", lower_with(cpu_call))
    assert report.problems == ["CPU-only custom call lapack_sgetrf"] and report.partitions == 1
    assert (report.attention_calls, report.kernel_calls) == (1, 0)
    tpu_call = "stablehlo.custom_call @tpu_custom_call(%0)"
    report = check_lowering.check("sample", "tpu", "pallas_tpu", lower_with(tpu_call))
    assert report.problems == ["a pallas_tpu custom call where its rule took no attention call"]
    report = check_lowering.check("sample", "cuda", "dot_product", lower_with(tpu_call))
    assert report.problems == ["a custom call of the pallas_tpu kernel in a dot_product program"]
    # A train step that lost its mesh (one partition where eight were asked for) fails too.
    report = check_lowering.check("train", "tpu", "pallas_tpu", lower_with(""), partitions=8)
    assert report.problems == ["partitioned over 1 devices, not 8"]
