"""The training loop, top to bottom: models, mesh, data, state (fresh or resumed), steps with
logging, checkpoints and validation edits, a clean stop on SIGTERM, the model written out."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from ip2p_jax.compilation import enable_compilation_cache
from ip2p_jax.data.augment import Augmentation
from ip2p_jax.data.edit_pairs import EditPairSource
from ip2p_jax.data.loader import EditPairLoader, InputConfig
from ip2p_jax.train.checkpoints import Checkpoints
from ip2p_jax.train.config import TrainConfig
from ip2p_jax.train.models import ModelSet, load_models
from ip2p_jax.train.reporting import Reporter
from ip2p_jax.train.sharding import global_batch, make_mesh
from ip2p_jax.train.step import Trainer, TrainState, host_metrics, is_finite, make_trainer


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN or inf; the last checkpoint is the last good one."""


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step: save, then exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def make_loader(config: TrainConfig, models: ModelSet) -> EditPairLoader:
    data = config.data
    augmentation = Augmentation(
        crop=data.resolution,
        min_resize=data.min_resize or data.resolution,
        max_resize=data.max_resize or data.min_resize or data.resolution,
        flip_prob=data.flip_prob,
    )
    input_config = InputConfig(
        batch_size=config.batch_size,
        augmentation=augmentation,
        seed=config.seed,
        worker_count=data.workers,
    )
    source = EditPairSource(data.path, data.train_split)
    return EditPairLoader(source, input_config, tokenizer=models.tokenizer)


def train(config: TrainConfig, workdir: str | os.PathLike, *, resume: bool = False) -> TrainState:
    """Trains to `config.steps`; returns the final state. See the module docstring."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoints = Checkpoints(workdir, keep=config.keep_checkpoints)
    if checkpoints.latest_step() is not None and not resume:
        raise FileExistsError(
            f"{workdir} already has checkpoints (latest step {checkpoints.latest_step()}); "
            "pass --resume to continue, or use a new --workdir"
        )
    (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))

    enable_compilation_cache()
    models = load_models(config.model, config.seed)
    mesh = make_mesh(config.fsdp)
    trainer = make_trainer(config, models, mesh)
    batches = iter(make_loader(config, models))
    if resume and checkpoints.latest_step() is not None:
        state, data_state = checkpoints.restore(trainer.abstract_state())
        batches.set_state(data_state)
    else:
        state = trainer.init_state()
    step = int(state.step)

    reporter = Reporter(workdir, config.steps, step)
    preemption = _Preemption()
    try:
        window_start, window_steps = time.perf_counter(), 0
        while step < config.steps:
            batch = global_batch(next(batches), mesh)
            state, metrics = trainer.step(state, batch)
            step += 1
            window_steps += 1
            reporter.advance()
            stopping = preemption.requested  # read once: a signal may land mid-iteration
            last = step == config.steps or stopping
            if step % config.log_every == 0 or last:
                values = host_metrics(metrics)  # waits for the step: the timing is honest
                if not is_finite(values):
                    raise TrainingDiverged(
                        f"step {step}: {values}; stopped. The last checkpoint "
                        f"({checkpoints.latest_step()}) is intact: lower the learning rate "
                        "or check the data, then --resume"
                    )
                seconds = (time.perf_counter() - window_start) / window_steps
                values.update(step_time=seconds, examples_per_s=config.batch_size / seconds)
                reporter.scalars(step, values)
                window_start, window_steps = time.perf_counter(), 0
            if step % config.checkpoint_every == 0 or last:
                if not is_finite(host_metrics(metrics)):
                    raise TrainingDiverged(f"step {step}: non-finite metrics; not saved")
                checkpoints.save(step, state, batches.get_state())
            if config.validate_every and step % config.validate_every == 0:
                validation_grid(trainer, state, workdir, step, reporter)
            if stopping:
                reporter.message(f"SIGTERM: saved step {step}; resume with --resume")
                break
        checkpoints.wait()
        if step >= config.steps:
            export_model(trainer, state, workdir / "model")
    finally:
        preemption.restore()
        checkpoints.close()
        reporter.close()
    return state


def trained_unet(trainer: Trainer, state: TrainState):
    """The UNet component with the EMA weights (the ones to sample with), or the raw ones."""
    params = state.ema_params if state.ema_params is not None else state.params
    return dataclasses.replace(trainer.models.unet, params=jax.device_get(params))


def validation_grid(
    trainer: Trainer, state: TrainState, workdir: Path, step: int, reporter: Reporter
) -> Path:
    """Edits the first validation examples with the EMA weights; one row per example:
    input, edited, target. Saved as workdir/validation/step_N.png and to TensorBoard."""
    from ip2p_jax.images import decode_png
    from ip2p_jax.pipeline import EditPipeline

    config, models = trainer.config, trainer.models
    source = EditPairSource(config.data.path, config.data.validation_split)
    examples = [source[i] for i in range(min(config.validation_images, len(source)))]
    pipeline = EditPipeline(
        trained_unet(trainer, state),
        models.vae,
        models.text_encoder,
        models.tokenizer,
        models.schedule,
    )
    inputs = [Image.fromarray(decode_png(ex["input_image"])) for ex in examples]
    edited = pipeline.edit(
        inputs,
        [ex["instruction"] for ex in examples],
        steps=config.validation_steps,
        resolution=config.data.resolution,
        progress=False,
    )
    rows = [
        np.concatenate(
            [np.asarray(a), np.asarray(b.resize(a.size)), decode_png(ex["edited_image"])], axis=1
        )
        for a, b, ex in zip(inputs, edited, examples, strict=True)
    ]
    grid = np.concatenate(rows, axis=0)
    path = workdir / "validation" / f"step_{step:07d}.png"
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(grid).save(path)
    reporter.image(step, "validation/input_edited_target", grid)
    return path


def export_model(trainer: Trainer, state: TrainState, destination: Path) -> Path:
    """Our checkpoint folder with the EMA UNet and the frozen parts: `ip2p edit --model` and
    `ip2p export` (to diffusers) take it."""
    from ip2p_jax.checkpoint import write_checkpoint

    models = trainer.models
    components = {
        "unet": trained_unet(trainer, state),
        "vae": models.vae,
        "text_encoder": models.text_encoder,
    }
    return write_checkpoint(destination, components, models.tokenizer, models.schedule)
