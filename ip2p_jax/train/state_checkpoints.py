"""Training checkpoints with orbax: the train state (params, optimizer, EMA, step, RNG) and the
data iterator's position, saved asynchronously and atomically (orbax writes a temporary
folder and renames it when complete), the last N kept."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from ip2p_jax.train.step import TrainState


class Checkpoints:
    """`workdir/checkpoints/<step>/{state, data}`, the last `keep` kept (None: all)."""

    def __init__(self, workdir: str | os.PathLike, keep: int | None = 3, async_save: bool = True):
        self.directory = Path(workdir).resolve() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """The saved steps, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data_state: dict[str, Any]) -> None:
        """Starts saving in the background (training goes on); `wait()` blocks until done."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            ),
            force=True,
        )

    def restore(self, abstract_state: TrainState, step: int | None = None):
        """(state, data_state) of `step` (default the latest), laid out as `abstract_state`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory} to resume from")
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
