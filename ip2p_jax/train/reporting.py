"""Where training reports go: TensorBoard event files (tensorboardX, no TensorFlow), a
JSON-lines copy that tests and scripts read, and a progress bar on a terminal."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tqdm import tqdm


class Reporter:
    """Scalars per step to `workdir/tensorboard` and `workdir/metrics.jsonl`; a progress bar.

    A run resumed at `first_step` drops the rows of later steps first (a killed run logged
    them after its last checkpoint, and logs them again now), so each step is in the file
    once. `write=False` (every process but the first of a multi-process run) reports
    nothing."""

    def __init__(
        self, workdir: str | os.PathLike, total_steps: int, first_step: int, *, write: bool = True
    ):
        self.workdir = Path(workdir)
        self.enabled = write
        if not write:
            return
        from tensorboardX import SummaryWriter

        purge = first_step + 1 if first_step else None  # TensorBoard's own way to drop them
        self.writer = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=purge)
        _drop_rows_after(self.workdir / "metrics.jsonl", first_step)
        self.jsonl = open(self.workdir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close)
        self.bar = tqdm(
            total=total_steps,
            initial=first_step,
            unit="step",
            disable=not sys.stderr.isatty(),
            dynamic_ncols=True,
        )
        self.quiet = self.bar.disable

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        text = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        if self.quiet:
            print(f"step {step}: {text}", flush=True)
        else:
            self.bar.set_postfix_str(text, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self.bar.update(steps)

    def image(self, step: int, name: str, pixels) -> None:
        """A uint8 [H, W, 3] image (the validation grid)."""
        if self.enabled:
            self.writer.add_image(name, pixels, step, dataformats="HWC")

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if not self.quiet else print)(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.writer.close()
        self.jsonl.close()


def _drop_rows_after(path: Path, step: int) -> None:
    """Rewrites `path` (atomically) without the rows of steps after `step`, if it has any."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) < len(lines):
        staging = path.with_suffix(".jsonl.tmp")
        staging.write_text("".join(line + "\n" for line in kept))
        staging.replace(path)


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The rows `Reporter.scalars` wrote, in order."""
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
