"""scripts/device_check.sh --cpu: the lent GPU's one command, run at tiny size on this CPU,
passes every part (the GPU tests of tests/gpu, the benchmark's four parts) and writes the log,
the benchmark's JSON and the tests' figures under $OUT. About 90 s on one core."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ElementTree

from tests.conftest import run_device_script


def test_device_check_runs_every_part_on_the_cpu(tmp_path):
    output = run_device_script("device_check.sh", tmp_path, "--cpu")
    for part in ("folder", "tests", "bench"):
        assert f"=== {part}: ok" in output, output[-6000:]
    assert "device check (cpu): all parts passed" in output
    # The table on stdout, one row per side and batch.
    assert "edit: tiny IP2P, 32 px, 2 Euler-ancestral steps" in output
    assert "train: tiny UNet step" in output
    assert "matmul peak:" in output
    assert "device check (cpu): all parts passed" in (tmp_path / "device_check.log").read_text()

    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["mode"] == "cpu"
    assert report["errors"] == {} and report["skipped"] == {}
    assert set(report["edit"]) == {"ours", "diffusers"}
    for side in report["edit"].values():
        assert set(side) == {"1"}
        for row in side.values():
            assert row["s_per_image"] > 0 and row["images_per_s"] > 0
            assert row["first_s"] >= 0 and "compile_s" in row and "peak_gb" in row
    assert set(report["train"]) == {"ours", "torch"}
    ours, torch = report["train"]["ours"], report["train"]["torch"]
    assert ours["flops"] > 0 and ours["compile_s"] > 0
    assert report["matmul_peak"]["tflops"] > 0
    for row in (ours, torch):
        assert row["step_s"] > 0 and row["images_per_s"] > 0 and row["mfu"] > 0
        assert math.isfinite(row["metrics"]["loss"]), row["metrics"]

    figures = json.loads((tmp_path / "gpu_tests.json").read_text())
    assert {
        "test_fp32_matches_torch[unet]",
        "test_fp32_matches_torch[vae]",
        "test_text_encoder_fp32_matches_torch",
        "test_bf16_edit_matches_diffusers_fp16",
    } <= set(figures)
    assert any(name.startswith("test_kernel_matches_xla[") for name in figures)
    suite = ElementTree.parse(tmp_path / "gpu_tests.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) >= 6
    assert suite.get("failures") == "0" and suite.get("errors") == "0"
