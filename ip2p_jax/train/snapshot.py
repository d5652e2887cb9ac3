"""The model of a training run at any saved step, not only the one it writes when it ends:
`ip2p export-run runs/shapes_tiny out/model_4500 --step 4500`.

The run's own config.json (what the loop wrote when it started) rebuilds its task, so the
model comes out exactly as the run would have exported it: EMA weights when the run keeps
an EMA (`raw_weights=True` takes the optimizer's), with the frozen parts and the scheduler.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import Any

from ip2p_jax.runtime.mesh import fsdp_at_hand, make_mesh
from ip2p_jax.train.config import TrainConfig
from ip2p_jax.train.loop import LORA_FILE, Task, export_lora, unet_task
from ip2p_jax.train.state_checkpoints import Checkpoints


def run_task(workdir: str | os.PathLike) -> Task:
    """The task of the run in `workdir`, from its config.json (UNet or VAE run)."""
    from ip2p_jax.train.vae import VAETrainConfig, vae_task

    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {workdir} is not an `ip2p train` workdir")
    fields = json.loads(path.read_text())
    for config_class, make_task in ((TrainConfig, unet_task), (VAETrainConfig, vae_task)):
        # A subset: a run written before a field existed gets that field's default.
        if set(fields) <= {field.name for field in dataclasses.fields(config_class)}:
            return make_task(config_from_dict(config_class, fields))
    raise ValueError(
        f"{path} matches neither a TrainConfig nor a VAETrainConfig (fields: {sorted(fields)})"
    )


def config_from_dict(config_class: type, fields: dict[str, Any]) -> Any:
    """`dataclasses.asdict` undone: nested config dataclasses are rebuilt from their dicts.
    A field missing from `fields` (added after the run was written) keeps its default."""
    hints = typing.get_type_hints(config_class)
    values = {}
    for field in dataclasses.fields(config_class):
        if field.name not in fields:
            continue
        value = fields[field.name]
        if dataclasses.is_dataclass(hints[field.name]):
            value = config_from_dict(hints[field.name], value)
        values[field.name] = value
    return config_class(**values)


def restore_run(
    workdir: str | os.PathLike, *, step: int | None = None, raw_weights: bool = False
) -> tuple[Task, Any, Any]:
    """(task, trainer, state) of `workdir`'s checkpoint `step` (default: the latest), on this
    machine's devices; `raw_weights` drops the EMA, so the optimizer's weights are used."""
    task = run_task(workdir)
    checkpoints = Checkpoints(workdir, keep=None, async_save=False)
    try:
        saved = checkpoints.steps()
        if not saved:
            raise FileNotFoundError(f"{checkpoints.directory} holds no checkpoint")
        if step is not None and step not in saved:
            raise ValueError(f"{workdir} has no checkpoint of step {step}; it has {saved}")
        # This machine's devices, whatever the run was trained on: orbax lays the saved
        # arrays out on the mesh at hand.
        trainer = task.build(make_mesh(fsdp_at_hand(task.config.fsdp)))
        state, _ = checkpoints.restore(trainer.abstract_state(), step)
    finally:
        checkpoints.close()
    if raw_weights:
        state = state.replace(ema_params=None)
    return task, trainer, state


def export_run(
    workdir: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    step: int | None = None,
    raw_weights: bool = False,
) -> Path:
    """Writes the model of `workdir`'s checkpoint `step` (default: the latest) to
    `destination` (our checkpoint layout, as the run's own export); returns it."""
    task, trainer, state = restore_run(workdir, step=step, raw_weights=raw_weights)
    return task.export(trainer, state, Path(destination))


def export_run_lora(
    workdir: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    step: int | None = None,
    raw_weights: bool = False,
    overwrite: bool = False,
) -> Path:
    """Writes the LoRA adapters of `workdir`'s checkpoint `step` (a run with lora.rank set)
    to the safetensors file `destination`, or to `destination`/pytorch_lora_weights.safetensors
    when it names a folder, in PEFT's layout (train.loop.export_lora); returns the file."""
    task = run_task(workdir)
    if not getattr(task.config, "lora", None) or not task.config.lora.rank:
        raise ValueError(
            f"{workdir} trained whole weights (its config.json has no lora.rank): it has no "
            "LoRA adapters to export; `ip2p export-run` writes its model"
        )
    destination = Path(destination)
    if destination.suffix != ".safetensors":
        destination = destination / LORA_FILE
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination} exists; pass --overwrite to replace it")
    _, trainer, state = restore_run(workdir, step=step, raw_weights=raw_weights)
    return export_lora(trainer, state, destination)
