"""The training loop, one for every kind of run: mesh, data, state (fresh or resumed), steps
with logging, checkpoints and validation, a clean stop on SIGTERM, a stop on NaN, the model
written out.

What is trained comes from a `Task`: it builds the trainer (the models and the compiled step,
a `Stepper`: `init_state`, `abstract_state`, `step`), draws the validation images, exports
the result, and says which tokenizer the loader uses. `train` runs the InstructPix2Pix UNet's
task (`unet_task`); `ip2p_jax.train.vae.train_vae` runs the autoencoder's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh
from PIL import Image

from ip2p_jax.data.augment import Augmentation
from ip2p_jax.data.bucket_sampler import BucketPlan
from ip2p_jax.data.edit_pairs import EditPairSource
from ip2p_jax.data.loader import EditPairLoader, InputConfig, Tokenizer, resume_position
from ip2p_jax.runtime.compilation import enable_compilation_cache
from ip2p_jax.runtime.distributed import (
    StopRequest,
    addressable,
    barrier,
    gather_json,
    host_copy,
    is_primary,
)
from ip2p_jax.runtime.mesh import fsdp_at_hand, local_mesh, make_mesh
from ip2p_jax.train.bucketing import StepPrograms, bucket_plan
from ip2p_jax.train.conditioning import batch_tokenizer
from ip2p_jax.train.config import TrainConfig
from ip2p_jax.train.latent_cache import LatentSplit, cached_latents
from ip2p_jax.train.models import ModelSet, load_models
from ip2p_jax.train.reporting import Reporter
from ip2p_jax.train.sharding import global_batch
from ip2p_jax.train.state_checkpoints import Checkpoints
from ip2p_jax.train.step import Trainer, TrainState, host_metrics, is_finite, make_trainer
from ip2p_jax.weights.model_folder import LoadedComponent

if TYPE_CHECKING:  # the pipelines import jax programs a training run may never need
    from ip2p_jax.pipelines.edit import EditPipeline


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN or inf; the last checkpoint is the last good one."""


class Stepper(Protocol):
    """The compiled train step and the layout of its state (step.Trainer, vae.VAETrainer)."""

    def init_state(self) -> TrainState: ...

    def abstract_state(self) -> TrainState: ...

    def release_loaded_weights(self) -> None: ...

    def step(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]: ...


@dataclasses.dataclass(frozen=True)
class Task:
    """One kind of training run, as `run` needs it. `config` has the fields the loop reads:
    `steps`, `batch_size` (edit pairs per step), `seed`, `fsdp`, `data` (a DataConfig),
    `log_every`, `checkpoint_every`, `keep_checkpoints` and `validate_every`."""

    config: Any
    build: Callable[[Mesh], Stepper]  # loads or initialises the models; compiles lazily
    # (trainer, state, workdir, step, reporter) -> workdir/validation/step_N.png
    # Both are called by every process (they gather the weights); process 0 writes.
    validate: Callable[[Any, TrainState, Path, int, Reporter], Path | None]
    export: Callable[[Any, TrainState, Path], Path]  # (trainer, state, folder) -> folder
    model_folder: str = "model"  # in the workdir
    # The tokenizer of the batches' `input_ids` (from the trainer); None leaves them out.
    tokenizer: Callable[[Any], Tokenizer | None] = lambda trainer: None
    # (trainer, workdir) -> the training split the loader reads (an EditPairSource or cache)
    train_source: Callable[[Any, Path], Any] = lambda trainer, workdir: train_split(trainer.config)
    images_per_pair: int = 1  # what examples_per_s counts: pairs, or their images


def train_split(config: Any) -> EditPairSource:
    """The training split that `config.data` names."""
    return EditPairSource(config.data.path, config.data.train_split)


def make_loader(
    config: Any, tokenizer: Tokenizer | None, source: Any, buckets: BucketPlan | None = None
) -> EditPairLoader:
    """Batches of `source` (a split or its latent cache, from `Task.train_source`) as
    `config.data` and `config.batch_size` say, of one aspect-ratio bucket each when
    `buckets` (train.bucketing.bucket_plan) is given."""
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
        read_threads=data.read_threads,
        word_dropout=data.word_dropout,
    )
    return EditPairLoader(source, input_config, tokenizer=tokenizer, buckets=buckets)


def train(config: TrainConfig, workdir: str | os.PathLike, *, resume: bool = False) -> TrainState:
    """Trains the InstructPix2Pix UNet to `config.steps`; returns the final state. The model
    goes to workdir/model. See the module docstring."""
    return run(unet_task(config), workdir, resume=resume)


def run(task: Task, workdir: str | os.PathLike, *, resume: bool = False) -> TrainState:
    """Runs `task` to `task.config.steps`; returns the final state.

    In a multi-process run every process calls it with the same arguments: each feeds its
    block of every global batch, all agree on stopping, and only process 0 writes the
    config, reports, validation images and the model (orbax writes the checkpoints)."""
    config = task.config
    workdir = Path(workdir)
    primary = is_primary()
    checkpoints = Checkpoints(workdir, keep=config.keep_checkpoints)
    if checkpoints.latest_step() is not None and not resume:
        raise FileExistsError(
            f"{workdir} already has checkpoints (latest step {checkpoints.latest_step()}); "
            "pass --resume to continue, or use a new --workdir"
        )
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))

    enable_compilation_cache()
    restoring = resume and checkpoints.latest_step() is not None
    # A resumed run takes the devices at hand: a checkpoint restores onto any layout.
    mesh = make_mesh(fsdp_at_hand(config.fsdp) if restoring else config.fsdp)
    trainer = task.build(mesh)
    source = task.train_source(trainer, workdir)
    plan = bucket_plan(config, trainer, source, workdir)
    loader = make_loader(config, task.tokenizer(trainer), source, plan)
    batches = iter(loader)
    if restoring:
        state, data_state = checkpoints.restore(trainer.abstract_state())
        trainer.release_loaded_weights()  # the restored state has its own
        saved = data_state.get("processes", [data_state])  # one-process runs saved one
        batches.set_state(
            resume_position(saved, loader.shard_index, loader.shard_count, loader.local_batch_size)
        )
    else:
        state = trainer.init_state()
    step = int(state.step)

    reporter = Reporter(workdir, config.steps, step, write=primary)
    programs = None if plan is None else StepPrograms(plan.trained(config.batch_size), reporter)
    stop = StopRequest()
    try:
        window_start, window_steps = time.perf_counter(), 0
        in_flight = None
        while step < config.steps:
            batch = global_batch(next(batches), mesh)
            if programs is not None:
                programs.see(batch, step)
            state, metrics = trainer.step(state, batch)
            # At most one step queued behind the running one: the next batch is still made
            # while a step runs, and a SIGTERM is seen a step later, not log_every steps.
            jax.block_until_ready(in_flight)
            in_flight = metrics
            step += 1
            window_steps += 1
            reporter.advance()
            stopping = stop.due(step)  # the same step on every process
            last = step == config.steps or stopping
            values = None  # fetched from the device at most once per step
            if step % config.log_every == 0 or last:
                values = _finite_metrics(step, metrics, checkpoints)  # waits for the step
                seconds = (time.perf_counter() - window_start) / window_steps
                examples = config.batch_size * task.images_per_pair
                values.update(step_time=seconds, examples_per_s=examples / seconds)
                reporter.scalars(step, values)
                window_start, window_steps = time.perf_counter(), 0
            if step % config.checkpoint_every == 0 or last:
                if values is None:  # never save a diverged state
                    _finite_metrics(step, metrics, checkpoints)
                data_states = gather_json(batches.get_state())
                checkpoints.save(step, state, {"processes": data_states})
            if config.validate_every and step % config.validate_every == 0:
                task.validate(trainer, state, workdir, step, reporter)
            if stopping:
                reporter.message(f"SIGTERM: saved step {step}; resume with --resume")
                break
        checkpoints.wait()
        if step >= config.steps:
            task.export(trainer, state, workdir / task.model_folder)
    finally:
        stop.close()
        checkpoints.close()
        reporter.close()
    return state


def _finite_metrics(step: int, metrics: dict, checkpoints: Checkpoints) -> dict[str, float]:
    """The step's metrics on the host; TrainingDiverged if any is NaN or inf."""
    values = host_metrics(metrics)  # replicated: every process reads the same values
    if not is_finite(values):
        raise TrainingDiverged(
            f"step {step}: {values}; stopped. The last checkpoint "
            f"({checkpoints.latest_step()}) is intact: lower the learning rate "
            "or check the data, then --resume"
        )
    return values


def trained_params(state: TrainState):
    """The weights to use: the EMA ones when the run keeps an EMA, else the raw ones."""
    return state.ema_params if state.ema_params is not None else state.params


def trained_component(component: LoadedComponent, params: Any) -> LoadedComponent:
    """`component` (one a run trains) with `params` (from :func:`trained_params`), copied
    to this host. *Collective* in a multi-process run: every process gathers them."""
    return dataclasses.replace(component, params=host_copy(params))


def save_grid(
    rows: list[np.ndarray], workdir: Path, step: int, reporter: Reporter, name: str
) -> Path:
    """Stacks uint8 image rows into workdir/validation/step_N.png and TensorBoard's `name`."""
    grid = np.concatenate(rows, axis=0)
    path = workdir / "validation" / f"step_{step:07d}.png"
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(grid).save(path)
    reporter.image(step, name, grid)
    return path


def unet_task(config: TrainConfig) -> Task:
    """The InstructPix2Pix UNet (and the text encoder when the config trains it) on the
    frozen VAE (step.Trainer)."""
    return Task(
        config,
        build=lambda mesh: make_trainer(config, load_models(config.model, config.seed), mesh),
        validate=validation_grid,
        export=export_model,
        tokenizer=lambda trainer: batch_tokenizer(trainer.models),
        train_source=unet_train_source,
    )


def unet_train_source(trainer: Trainer, workdir: Path) -> EditPairSource | LatentSplit:
    """The training split, or its latent cache under workdir/latents when the config asks."""
    source = train_split(trainer.config)
    data = trainer.config.data
    if not data.cache_latents:
        return source
    return cached_latents(
        source,
        trainer.models.vae,
        workdir / "latents" / data.train_split,
        resolution=data.resolution,
    )


def trained_models(trainer: Trainer, state: TrainState) -> ModelSet:
    """The trainer's models on this host, each trained one with the EMA weights (the ones to
    sample with), or the raw ones when the run keeps no EMA; a LoRA run's with its adapters
    merged. *Collective*."""
    params = trainer.model_weights(trained_params(state))
    frozen = {  # on the devices already, unless they span other processes' too
        name: dataclasses.replace(component, params=addressable(component.params))
        for name in ("vae", "text_encoder", "text_encoder_2")
        if (component := getattr(trainer.models, name)) is not None and name not in params
    }
    return dataclasses.replace(
        trainer.models,
        **frozen,
        **{
            name: trained_component(getattr(trainer.models, name), weights)
            for name, weights in params.items()
        },
    )


def validation_grid(
    trainer: Trainer, state: TrainState, workdir: Path, step: int, reporter: Reporter
) -> Path:
    """Edits the first validation examples with the EMA weights; one row per example:
    input, edited, target. Saved as workdir/validation/step_N.png and to TensorBoard.
    Process 0 edits on its own devices; the others return None once the weights are
    gathered."""
    from ip2p_jax.pipelines.images import decode_png

    config, models = trainer.config, trained_models(trainer, state)
    if not is_primary():
        return None
    source = EditPairSource(config.data.path, config.data.validation_split)
    examples = [source[i] for i in range(min(config.validation_images, len(source)))]
    pipeline = edit_pipeline(models, local_mesh())
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
    return save_grid(rows, workdir, step, reporter, "validation/input_edited_target")


def edit_pipeline(models: ModelSet, mesh: Mesh) -> EditPipeline:
    """The editing pipeline of a run's models: SDXL's when they have a second text encoder."""
    from ip2p_jax.pipelines.edit import EditPipeline
    from ip2p_jax.pipelines.sdxl_edit import SDXLEditPipeline

    sd = (models.unet, models.vae, models.text_encoder)
    if models.text_encoder_2 is None:
        return EditPipeline(*sd, models.tokenizer, models.schedule, mesh=mesh)
    return SDXLEditPipeline(
        *sd,
        models.text_encoder_2,
        models.tokenizer,
        models.tokenizer_2,
        models.schedule,
        mesh=mesh,
    )


def export_model(trainer: Trainer, state: TrainState, destination: Path) -> Path:
    """Our checkpoint folder with the EMA weights of what the run trained and the frozen
    parts: `ip2p edit --model` and `ip2p export` (to diffusers) take it. A LoRA run's has
    the adapters merged, and the adapters alone in its lora/ folder (:func:`export_lora`).
    Every process gathers the weights; process 0 writes."""
    from ip2p_jax.weights.model_folder import write_checkpoint

    models = trained_models(trainer, state)
    components = {
        "unet": models.unet,
        "vae": models.vae,
        "text_encoder": models.text_encoder,
    }
    if models.text_encoder_2 is not None:
        components["text_encoder_2"] = models.text_encoder_2
    written_by_primary(
        destination,
        lambda: write_checkpoint(
            destination,
            components,
            models.tokenizer,
            models.schedule,
            tokenizer_2=models.tokenizer_2,
        ),
    )
    if trainer.adapters is not None:  # into the finished folder (write_checkpoint replaces it)
        export_lora(trainer, state, destination / LORA_FOLDER / LORA_FILE)
    return destination


LORA_FOLDER = "lora"  # in a LoRA run's model folder
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for


def export_lora(trainer: Trainer, state: TrainState, destination: Path) -> Path:
    """A LoRA run's adapters (the EMA ones when it keeps an EMA) as a safetensors file in
    PEFT's layout, which diffusers' ``load_lora_weights`` and ``EditPipeline.load_lora``
    read (weights.lora.write_lora). *Collective*: every process gathers; process 0 writes."""
    from ip2p_jax.train.lora import alpha
    from ip2p_jax.weights.lora import write_lora

    if trainer.adapters is None:
        raise ValueError("this run trains whole weights, not LoRA adapters (lora.rank is 0)")
    adapters = host_copy(trained_params(state))
    lora = trainer.config.lora
    return written_by_primary(
        destination, lambda: write_lora(destination, adapters, rank=lora.rank, alpha=alpha(lora))
    )


def written_by_primary(destination: Path, write: Callable[[], Path]) -> Path:
    """`write()` on process 0, then every process waits until it is done: when they exit,
    `destination` is complete. *Collective*."""
    if is_primary():
        write()
    barrier(f"written {destination}")
    return destination
