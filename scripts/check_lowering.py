"""Proves, on any machine (this CPU too), that ip2p-jax's programs lower for TPU and CUDA:
the SD-1.5-architecture sampling program (512 px, batch 2, the three guidance rows, bf16) and
train step (256 px, bf16, over a ('data', 'fsdp') mesh of simulated devices, 4 x 2 by
default: the FSDP-sharded weights and their collectives are in the program), traced with
shapes only (no weights) and
lowered with ``lowering_platforms``. For each it asserts that no CPU-only custom call is in
the program and that the chosen attention kernel is (Pallas' ``tpu_custom_call`` on TPU,
cuDNN's fused attention on CUDA where cuDNN is present), and prints its FLOPs.

    .venv/bin/python scripts/check_lowering.py --platforms tpu cuda
    .venv/bin/python scripts/check_lowering.py --platforms tpu --programs sample --size tiny

Exit 0 when every program lowers and passes its checks. cuDNN's kernel lowers only where JAX
detects cuDNN (a CUDA machine): elsewhere the 'cuda' programs are lowered with XLA's
attention, said on the line, and the cuDNN kernel is checked by scripts/device_check.sh.
``--size tiny`` lowers the same programs on the tiny random-weight architecture (seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def _simulated_devices(argv: list[str]) -> None:
    """This CPU shows --devices N devices (default 8), for a mesh like a pod slice's. It must
    be set before JAX starts its backend, so it is read here, before jax is imported."""
    import os

    count = DEFAULT_DEVICES
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "--devices":
            count = int(value)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}"


DEFAULT_DEVICES = 8
if __name__ == "__main__":
    _simulated_devices(sys.argv[1:])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ip2p_jax.diffusion.samplers import get_sampler  # noqa: E402
from ip2p_jax.diffusion.schedules import SD_SCHEDULER_CONFIG, NoiseSchedule  # noqa: E402
from ip2p_jax.models import accelerator_attention, attention  # noqa: E402
from ip2p_jax.models.tokenizer import CLIPTokenizer  # noqa: E402
from ip2p_jax.pipelines.base import GuidedBatch, sample_latents  # noqa: E402
from ip2p_jax.runtime.mesh import make_mesh  # noqa: E402
from ip2p_jax.runtime.profile import profile_for  # noqa: E402
from ip2p_jax.testing.reference_models import PRESETS  # noqa: E402
from ip2p_jax.train.config import ModelConfig, TrainConfig  # noqa: E402
from ip2p_jax.train.models import ModelSet  # noqa: E402
from ip2p_jax.train.step import abstract_trainer, profile_runtime  # noqa: E402
from ip2p_jax.weights.model_folder import (  # noqa: E402
    abstract_component,
)

# The backend profile each lowering platform runs under (runtime.profile's names).
PROFILE_OF = {"tpu": "tpu", "cuda": "gpu", "rocm": "gpu"}
# Custom calls that only a CPU runtime implements: none may appear in a TPU or GPU program.
CPU_ONLY = re.compile(r"^(lapack_|ducc_|xla_python_cpu_callback|xla_ffi_python_cpu_callback|cpu_)")
# The custom call each accelerator kernel lowers to, and its rule for the calls it takes.
KERNEL_CALLS = {"pallas_tpu": re.compile(r"^tpu_custom_call$"), "cudnn": re.compile(r"cudnn")}
REFUSALS = {
    "pallas_tpu": accelerator_attention.pallas_tpu_refusal,
    "cudnn": accelerator_attention.cudnn_refusal,
}


@contextlib.contextmanager
def attention_calls(kernel: str) -> Iterator[list[bool]]:
    """Records, while a program is traced, whether ``kernel`` takes each attention call (its
    refusal rule says none) or hands it to XLA's: one bool per call."""
    taken: list[bool] = []
    original = attention.KERNELS[kernel]
    refusal = REFUSALS.get(kernel)

    def recorded(q, k, v, *, causal, mask):
        taken.append(refusal is not None and refusal(q, k, v, causal=causal, mask=mask) is None)
        return original(q, k, v, causal=causal, mask=mask)

    attention.KERNELS[kernel] = recorded
    try:
        yield taken
    finally:
        attention.KERNELS[kernel] = original


@dataclasses.dataclass
class Report:
    """One program lowered for one platform."""

    program: str
    platform: str
    kernel: str
    seconds: float
    flops: float | None
    custom_calls: dict[str, int]
    attention_calls: int
    kernel_calls: int  # the attention calls the kernel takes (the rest: XLA's)
    partitions: int  # the devices the program is partitioned over
    problems: list[str]
    note: str = ""

    def line(self) -> str:
        flops = "?" if self.flops is None else f"{self.flops / 1e9:,.1f} GFLOP"
        calls = ", ".join(f"{k} x{v}" for k, v in sorted(self.custom_calls.items())) or "none"
        status = "ok" if not self.problems else "FAILED: " + "; ".join(self.problems)
        note = f" ({self.note})" if self.note else ""
        return (
            f"{self.program:<6} {self.platform:<5} {self.kernel:<11} "
            f"{self.kernel_calls}/{self.attention_calls} attention calls  {flops:>15}  "
            f"on {self.partitions} device(s)  "
            f"lowered in {self.seconds:5.1f} s  custom calls: {calls}  {status}{note}"
        )


def custom_calls(text: str) -> dict[str, int]:
    """The custom-call targets of a StableHLO module's text, with their counts."""
    counts: dict[str, int] = {}
    for target in re.findall(r"stablehlo\.custom_call @([\w$.]+)", text) + re.findall(
        r'call_target_name = "([^"]+)"', text
    ):
        counts[target] = counts.get(target, 0) + 1
    return counts


def check(
    program: str,
    platform: str,
    kernel: str,
    lower: Callable,
    note: str = "",
    partitions: int = 1,
) -> Report:
    """Lowers one program (``lower()`` returns a jax Lowered) and checks its custom calls: none
    CPU-only, the kernel's wherever its rule takes an attention call, no other kernel's; and
    that it is partitioned over ``partitions`` devices."""
    start = time.perf_counter()
    with attention_calls(kernel) as taken:
        lowered = lower()
    seconds = time.perf_counter() - start
    text = lowered.as_text()
    calls = custom_calls(text)
    problems = [f"CPU-only custom call {name}" for name in calls if CPU_ONLY.match(name)]
    found = re.search(r"mhlo\.num_partitions = (\d+)", text)
    lowered_partitions = int(found.group(1)) if found else 1
    if lowered_partitions != partitions:
        problems.append(f"partitioned over {lowered_partitions} devices, not {partitions}")
    expected = KERNEL_CALLS.get(kernel)
    present = expected is not None and any(expected.search(name) for name in calls)
    if any(taken) and not present:
        problems.append(f"no custom call of the {kernel} kernel")
    if present and not any(taken):
        problems.append(f"a {kernel} custom call where its rule took no attention call")
    for other, pattern in KERNEL_CALLS.items():
        if other != kernel and any(pattern.search(name) for name in calls):
            problems.append(f"a custom call of the {other} kernel in a {kernel} program")
    try:
        flops = (lowered.cost_analysis() or {}).get("flops")
    except Exception:  # some platforms' lowerings offer no cost analysis
        flops = None
    return Report(
        program,
        platform,
        kernel,
        seconds,
        flops,
        calls,
        len(taken),
        sum(taken),
        lowered_partitions,
        problems,
        note,
    )


def _kernel_for(platform: str, attention: str | None) -> tuple[str, str]:
    """The attention kernel a platform's programs are lowered with, and why it differs from
    the profile's, if it does."""
    kernel = attention or profile_for(PROFILE_OF[platform]).attention_kernel
    if kernel == "cudnn" and not _cudnn_available():
        return "dot_product", "cuDNN not detected here: XLA attention; cudnn is device_check's"
    return kernel, ""


def _cudnn_available() -> bool:
    try:
        return any(device.platform == "gpu" for device in jax.devices("gpu"))
    except RuntimeError:
        return False


def lower_sampling(
    platform: str, kernel: str, size: str, resolution: int, batch: int, dtype: str
) -> Callable:
    """The sampling loop (``pipelines.base``'s program) for ``platform``: three guidance rows,
    Euler ancestral, 50 steps, UNet params in ``dtype``."""
    profile = profile_for(PROFILE_OF[platform], attention_kernel=kernel)
    unet = abstract_component(
        "unet", PRESETS[size]["unet"], profile, compute_dtype=dtype, param_dtype=dtype
    )
    sampler = get_sampler("euler_ancestral")
    plan = sampler.plan(NoiseSchedule.from_dict(SD_SCHEDULER_CONFIG), 50)
    vae_blocks = PRESETS[size]["vae"]["block_out_channels"]
    side = resolution // 2 ** (len(vae_blocks) - 1)
    text_dim = unet.config.cross_attention_dim
    shape = lambda *dims, dtype=jnp.float32: jax.ShapeDtypeStruct(dims, jnp.dtype(dtype))
    batch_spec = GuidedBatch(
        text=shape(batch, 77, text_dim, dtype=dtype),
        null_text=shape(batch, 77, text_dim, dtype=dtype),
        image_latent=shape(batch, side, side, 4),
        text_scale=shape(batch),
        image_scale=shape(batch),
        keys=jax.eval_shape(lambda: jax.vmap(jax.random.key)(jnp.zeros(batch, jnp.uint32))),
    )
    plan_spec = {
        k: jax.ShapeDtypeStruct(jnp.shape(v), jnp.asarray(v).dtype) for k, v in plan.items()
    }
    program = jax.jit(sample_latents, static_argnums=(0, 1, 2, 3, 4))
    args = (unet.module, sampler, True, "epsilon", None, unet.params, plan_spec, batch_spec)
    return lambda: program.trace(*args).lower(lowering_platforms=(platform,))


def lower_train_step(
    platform: str,
    kernel: str,
    size: str,
    resolution: int,
    batch: int,
    dtype: str,
    fsdp: int = 1,
) -> Callable:
    """One optimizer step (train.step) for ``platform`` over this process's devices as a
    ('data', 'fsdp') mesh with ``fsdp`` devices per FSDP group: bf16 compute on float32
    master weights, the frozen VAE and text encoder, AdamW and the EMA."""
    profile = profile_for(PROFILE_OF[platform], attention_kernel=kernel)
    preset = PRESETS[size]
    models = ModelSet(
        unet=abstract_component("unet", preset["unet"], profile, compute_dtype=dtype),
        vae=abstract_component("vae", preset["vae"], profile, compute_dtype="float32"),
        text_encoder=abstract_component(
            "text_encoder", preset["text_encoder"], profile, compute_dtype=dtype
        ),
        tokenizer=CLIPTokenizer.bundled(),
        schedule=NoiseSchedule.from_dict(SD_SCHEDULER_CONFIG),
    )
    config = TrainConfig(
        model=ModelConfig(),
        batch_size=batch,
        compute_dtype=dtype,
        steps=10,
        fsdp=fsdp,
        runtime=profile_runtime(profile),
    )
    mesh = make_mesh(fsdp)
    trainer = abstract_trainer(config, models, mesh)
    state = trainer.abstract_state()
    pixels = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.float32)
    batch_spec = {
        "input_image": pixels,
        "edited_image": pixels,
        "input_ids": jax.ShapeDtypeStruct((batch, 77), jnp.int32),
    }
    program = trainer.step_program().jitted
    return lambda: program.trace(state, trainer.frozen, batch_spec).lower(
        lowering_platforms=(platform,)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--platforms", nargs="+", default=["tpu", "cuda"], choices=PROFILE_OF)
    parser.add_argument("--programs", nargs="+", default=["sample", "train"])
    parser.add_argument("--size", default="sd15", choices=["sd15", "tiny"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--attention", help="a kernel for every platform (default: each one's)")
    parser.add_argument(
        "--devices",
        type=int,
        default=DEFAULT_DEVICES,
        help="simulated CPU devices of the train step's mesh (run as a script)",
    )
    parser.add_argument("--fsdp", type=int, default=2, help="devices per FSDP group")
    args = parser.parse_args(argv)
    if len(jax.devices()) % args.fsdp:
        parser.error(f"--fsdp {args.fsdp} does not divide the {len(jax.devices())} devices")
    tiny = args.size == "tiny"
    programs = {
        "sample": (lower_sampling, 32 if tiny else 512, 2, {}),
        "train": (lower_train_step, 32 if tiny else 256, len(jax.devices()), {"fsdp": args.fsdp}),
    }
    print(
        f"{len(jax.devices())} devices: the train step over a mesh of "
        f"{len(jax.devices()) // args.fsdp} data x {args.fsdp} fsdp"
    )
    if unknown := sorted(set(args.programs) - set(programs)):
        parser.error(f"unknown programs {unknown}; choose from {sorted(programs)}")
    reports = []
    for platform in args.platforms:
        kernel, note = _kernel_for(platform, args.attention)
        for name in args.programs:
            build, resolution, batch, options = programs[name]
            lower = build(platform, kernel, args.size, resolution, batch, args.dtype, **options)
            partitions = len(jax.devices()) if name == "train" else 1
            report = check(name, platform, kernel, lower, note, partitions)
            print(report.line(), flush=True)
            reports.append(report)
    failed = [r for r in reports if r.problems]
    print("FLOPs: XLA's count of the lowered program; the sampling loop's body (one step, one")
    print("UNet call over the guidance rows) is counted once, the train step whole.")
    print(f"{len(reports) - len(failed)} of {len(reports)} programs lowered and passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
