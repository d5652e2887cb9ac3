"""The pair-generation job over a Ray cluster: `ip2p datagen pairs --ray [ADDRESS]`.

One Ray actor per GPU (or per CPU worker where the cluster has none) loads the models once and
runs prompts as the driver hands them out, each written whole into the shared output folder
(`PairFolder`), so the folder is exactly what a local job writes. The driver keeps every worker
busy, shows prompts done and failed and samples per second, and hands a prompt whose worker
died to another one (replacing the dead worker). A prompt that raised is reported as failed and
left undone; a rerun skips what is done and tries the rest again.

Ray is an optional dependency (`pip install -e .[ray]`), imported only here.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from datagen.pair_job import JobSpec, PairSummary, PromptResult, build_runner
from datagen.writer import PairFolder

# A prompt whose worker died this often is reported as failed instead of handed out again (a
# prompt that kills every worker it meets must not eat the cluster).
MAX_WORKER_LOSSES = 3


class PairWorker:
    """The actor: a `PromptRunner` built once in the worker process from the job's spec."""

    def __init__(self, spec: JobSpec):
        import ray

        gpus = ray.get_gpu_ids()
        # Ray shows an actor only the GPU it reserved for it, as device 0.
        self.runner = build_runner(spec, device="cuda" if gpus else spec.device)

    def ready(self) -> int:
        """The worker's process id, once the models are loaded."""
        return os.getpid()

    def run(self, index: int, prompt: dict[str, Any]) -> PromptResult:
        """Renders and writes one prompt (see `PromptRunner`)."""
        return self.runner(index, prompt)


def import_ray() -> Any:
    """The ray module, or an ImportError saying how to install it."""
    try:
        import ray
    except ImportError as err:
        raise ImportError(
            "--ray needs Ray: pip install 'ray[data]' (or the project's extra: "
            "pip install -e '.[ray]')"
        ) from err
    return ray


def worker_layout(resources: dict[str, float], nodes: int, workers: int | None) -> tuple[int, dict]:
    """How many workers and what each reserves: one GPU each where the cluster has GPUs, else
    one per node with that node's share of the CPUs; `workers` overrides the count."""
    if int(resources.get("GPU", 0)):
        return workers or int(resources["GPU"]), {"num_gpus": 1, "num_cpus": 1}
    count = workers or max(1, nodes)
    return count, {"num_gpus": 0, "num_cpus": max(1, int(resources.get("CPU", 1)) // count)}


def run_on_ray(
    spec: JobSpec,
    prompts: Sequence[dict[str, Any]],
    indices: Sequence[int],
    *,
    address: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> PairSummary:
    """Runs the prompts `indices` not yet done in `spec.out` on a Ray cluster: `address`
    ("auto", "ray://head:10001", ...) joins a running one, None starts one on this machine
    (or joins $RAY_ADDRESS). Returns the job's summary."""
    ray = import_ray()
    out = PairFolder(spec.out)
    todo = out.start(indices)
    summary = PairSummary(resumed=len(indices) - len(todo))
    if not todo:
        return summary
    ray.init(address=address, include_dashboard=False, logging_level="warning")
    try:
        return _dispatch(ray, spec, prompts, todo, out, summary, workers, progress)
    finally:
        ray.shutdown()


def _dispatch(
    ray: Any,
    spec: JobSpec,
    prompts: Sequence[dict[str, Any]],
    todo: list[int],
    out: PairFolder,
    summary: PairSummary,
    workers: int | None,
    progress: bool,
) -> PairSummary:
    """Hands prompts to idle workers until every one is done or failed."""
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    count, reserve = worker_layout(ray.cluster_resources(), nodes, workers)
    actor_class = ray.remote(PairWorker).options(**reserve)
    idle = [actor_class.remote(spec) for _ in range(min(count, len(todo)))]
    ray.get([actor.ready.remote() for actor in idle])  # a worker that cannot start fails here
    queue = collections.deque(todo)
    running: dict[Any, tuple[Any, int]] = {}  # result ref -> (worker, prompt index)
    losses: collections.Counter = collections.Counter()
    bar = tqdm(total=len(todo), unit="prompt", disable=not progress)
    bar.write(f"{len(idle)} Ray workers, each with {reserve}; {len(todo)} prompts to render")
    start = time.perf_counter()
    while queue or running:
        while queue and idle:
            index = queue.popleft()
            actor = idle.pop()
            running[actor.run.remote(index, prompts[index])] = (actor, index)
        (ref,), _ = ray.wait(list(running), num_returns=1)
        actor, index = running.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as err:
            losses[index] += 1
            out.clean_staging([index])  # what the dead worker was writing
            idle.append(actor_class.remote(spec))
            if out.is_done(index):  # it died between writing the prompt and reporting it
                bar.write(f"worker lost after it wrote prompt {index}")
                summary.resumed += 1
                bar.update(1)
                continue
            if losses[index] < MAX_WORKER_LOSSES:
                bar.write(f"worker lost on prompt {index} ({type(err).__name__}); retrying it")
                queue.appendleft(index)
                continue
            result = PromptResult(index, error=f"WorkerLost: its worker died {losses[index]} times")
        else:
            idle.append(actor)
        if result.error is not None:
            bar.write(f"prompt {index} failed: {result.error}")
        summary.add(result)
        bar.update(1)
        rate = summary.samples / (time.perf_counter() - start)
        bar.set_postfix(done=summary.prompts, failed=len(summary.failures), samples_s=f"{rate:.2f}")
    bar.close()
    return summary
