"""The pair-generation job: prompts (input caption, instruction, edited caption) in, kept
image pairs out, in the original's way (generate_img_dataset.py): N samples per prompt, the
CLIP filter, the best k by direction similarity.

Sharding follows the original's `np.array_split` over prompt indices, so `--shard i
--num-shards n` jobs on n machines cover every prompt once. Sample seeds derive from (job seed,
prompt index), so a rerun, a restart or another machine renders the same samples.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from datagen.clip_filter import ClipSimilarity, FilterConfig, select
from datagen.fingerprint import folder_fingerprint
from datagen.pairs import PairConfig, PairSampler, to_uint8
from datagen.writer import KeptPair, PairFolder


def shard_indices(count: int, shard: int, num_shards: int) -> list[int]:
    """Prompt indices of shard `shard` of `num_shards`: contiguous blocks, as the original's
    np.array_split over the prompt list."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"need 0 <= shard < num_shards, got shard {shard} of {num_shards}")
    return [int(i) for i in np.array_split(np.arange(count), num_shards)[shard]]


def sample_seeds(seed: int, prompt_index: int, count: int) -> list[int]:
    """`count` distinct 32-bit sample seeds of a prompt, fixed by (job seed, prompt index)."""
    state = np.random.SeedSequence([seed, prompt_index])
    seeds: list[int] = []
    while len(seeds) < count:
        for value in state.generate_state(count + len(seeds)):
            if int(value) not in seeds and len(seeds) < count:
                seeds.append(int(value))
        state = state.spawn(1)[0]
    return seeds


@dataclass
class PromptResult:
    """What one prompt came to: samples rendered, pairs kept, filter rejections by reason; or
    the error it raised ("TypeName: message"), in which case nothing was written for it."""

    index: int
    samples: int = 0
    kept: int = 0
    rejected: collections.Counter = field(default_factory=collections.Counter)
    error: str | None = None


@dataclass
class PairSummary:
    """What a job did: prompts rendered and resumed, samples, filter rejections, kept pairs,
    and the prompts that failed with their reasons (not marked done: a rerun retries them)."""

    prompts: int = 0
    resumed: int = 0
    samples: int = 0
    kept: int = 0
    prompts_without_pairs: int = 0
    rejected: collections.Counter = field(default_factory=collections.Counter)
    failures: dict[int, str] = field(default_factory=dict)

    def add(self, result: PromptResult) -> None:
        """Counts one prompt's result in."""
        self.samples += result.samples
        if result.error is not None:
            self.failures[result.index] = result.error
            return
        self.prompts += 1
        self.kept += result.kept
        self.prompts_without_pairs += not result.kept
        self.rejected.update(result.rejected)

    @property
    def failed_fraction(self) -> float:
        """Failed prompts among those this run attempted (0 when it attempted none)."""
        attempted = self.prompts + len(self.failures)
        return len(self.failures) / attempted if attempted else 0.0

    def describe(self) -> str:
        """A readable summary: generated, rejected by reason, kept, failed with reasons."""
        rejected = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) or "none"
        text = (
            f"prompts rendered {self.prompts} (already done: {self.resumed}); samples "
            f"{self.samples}; rejected by the CLIP filter: {rejected}; kept {self.kept} pairs "
            f"({self.prompts_without_pairs} prompts kept none)"
        )
        if self.failures:
            reasons = collections.Counter(error.split(":")[0] for error in self.failures.values())
            shown = ", ".join(f"{k} {v}" for k, v in reasons.most_common())
            first = min(self.failures)
            text += (
                f"; prompts failed: {len(self.failures)} ({shown}; e.g. prompt {first}: "
                f"{self.failures[first]}), left undone for a rerun"
            )
        return text

    def to_json(self) -> dict[str, Any]:
        """The summary as JSON data (the job's summary file)."""
        data = dataclasses.asdict(self)
        data["rejected"] = dict(self.rejected)
        data["failures"] = {str(k): v for k, v in sorted(self.failures.items())}
        return data


class PromptRunner:
    """Renders, filters and writes one prompt at a time into `out`; a prompt that raises is
    reported as failed (its reason kept), never written, so a rerun tries it again. The same
    object runs a local job and each Ray worker."""

    def __init__(
        self,
        sampler: PairSampler,
        clip: ClipSimilarity,
        out: PairFolder,
        *,
        samples: int,
        filter_config: FilterConfig,
        seed: int,
    ):
        self.sampler, self.clip, self.out = sampler, clip, out
        self.samples, self.filter_config, self.seed = samples, filter_config, seed

    def __call__(
        self,
        index: int,
        prompt: dict[str, Any],
        on_samples: Callable[[int], Any] | None = None,
    ) -> PromptResult:
        """Renders prompt `index` and writes its folder; `on_samples(n)` after each chunk."""
        result = PromptResult(index)
        try:
            kept = self._render(prompt, result, on_samples or (lambda n: None))
            self.out.write(index, prompt, kept)
        except Exception as err:  # any failure: recorded with its reason, retried on a rerun
            result.error = f"{type(err).__name__}: {err}"
            return result
        result.kept = len(kept)
        return result

    def _render(
        self, prompt: dict[str, Any], result: PromptResult, on_samples: Callable[[int], Any]
    ) -> list[KeptPair]:
        """The kept pairs of one prompt; images are held as uint8 until the filter has chosen."""
        import torch

        config = self.filter_config
        seeds = sample_seeds(self.seed, result.index, self.samples)
        draws = [self.sampler.config.draw(s) for s in seeds]
        images, scores = [], []
        for rendered in self.sampler.render_chunks(prompt["input"], prompt["output"], draws):
            count = len(rendered)
            scores += self.clip.scores(
                torch.from_numpy(rendered[:, 0]),
                torch.from_numpy(rendered[:, 1]),
                [prompt["input"]] * count,
                [prompt["output"]] * count,
            )
            images.append(to_uint8(rendered))
            result.samples += count
            on_samples(count)
        images = np.concatenate(images)
        reasons = [config.rejection(one) for one in scores]
        result.rejected.update(reason for reason in reasons if reason is not None)
        chosen = select(scores, config)
        result.rejected["beyond_keep"] += reasons.count(None) - len(chosen)
        return [
            KeptPair(
                seed=draws[i].seed,
                input_image=images[i, 0],
                edited_image=images[i, 1],
                metadata={
                    "p2p_threshold": draws[i].p2p_threshold,
                    "cfg_scale": draws[i].cfg_scale,
                    **scores[i],
                },
            )
            for i in chosen
        ]


def generate_pairs(
    prompts: Sequence[dict[str, Any]],
    sampler: PairSampler,
    clip: ClipSimilarity,
    out: PairFolder,
    *,
    samples: int = 100,
    filter_config: FilterConfig | None = None,
    shard: int = 0,
    num_shards: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> PairSummary:
    """Renders, filters and writes every prompt of the shard not yet in `out`, in this
    process; `datagen.ray_pairs` does the same over a Ray cluster."""
    runner = PromptRunner(
        sampler,
        clip,
        out,
        samples=samples,
        filter_config=filter_config or FilterConfig(),
        seed=seed,
    )
    return run_locally(runner, prompts, shard_indices(len(prompts), shard, num_shards), progress)


def run_locally(
    runner: PromptRunner,
    prompts: Sequence[dict[str, Any]],
    indices: Sequence[int],
    progress: bool = True,
) -> PairSummary:
    """Runs `runner` over the prompts `indices` not yet done, in this process."""
    todo = runner.out.start(indices)
    summary = PairSummary(resumed=len(indices) - len(todo))
    bar = tqdm(total=len(todo) * runner.samples, unit="sample", disable=not progress)
    for index in todo:
        result = runner(index, prompts[index], on_samples=bar.update)
        if result.error is not None:
            bar.write(f"prompt {index} failed: {result.error}")
            bar.update(runner.samples - result.samples)
        summary.add(result)
        bar.set_postfix(kept=summary.kept, failed=len(summary.failures))
    bar.close()
    return summary


@dataclass(frozen=True)
class JobSpec:
    """Everything a process needs to run prompts of a job (a Ray worker builds its runner
    from it): the models, the rendering and filter settings, the output folder."""

    model: str
    clip: str
    out: str
    config: PairConfig = PairConfig()
    filter_config: FilterConfig = FilterConfig()
    samples: int = 100
    seed: int = 0
    vae: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    pairs_per_call: int = 1

    def recipe(self) -> dict[str, Any]:
        """The job's recipe (see `recipe`)."""
        return recipe(
            self.config,
            self.filter_config,
            samples=self.samples,
            seed=self.seed,
            model=self.model,
            clip=self.clip,
            vae=self.vae,
        )


def build_runner(spec: JobSpec, device: str | None = None) -> PromptRunner:
    """Loads the job's models (on `device`, default the spec's) and opens its output folder,
    whose recipe the job's driver has written."""
    import torch

    device = device or spec.device
    sampler = PairSampler(
        spec.model,
        spec.config,
        device=device,
        dtype=getattr(torch, spec.dtype),
        pairs_per_call=spec.pairs_per_call,
        vae=spec.vae,
    )
    return PromptRunner(
        sampler,
        ClipSimilarity(spec.clip, device=device),
        PairFolder(spec.out),
        samples=spec.samples,
        filter_config=spec.filter_config,
        seed=spec.seed,
    )


def recipe(
    sampler_config: PairConfig,
    filter_config: FilterConfig,
    *,
    samples: int,
    seed: int,
    model: str | os.PathLike,
    clip: str | os.PathLike,
    vae: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """What fixes the pairs of a job (stored as generation.json): the rendering settings,
    the filter, samples per prompt, the job seed, and a fingerprint of each model's config
    and weights (`folder_fingerprint`: the same model at another path passes, another model
    at the same path does not)."""
    models = {"model": model, "clip": clip, "vae": vae}
    return {
        "sampler": dataclasses.asdict(sampler_config),
        "filter": dataclasses.asdict(filter_config),
        "samples": samples,
        "seed": seed,
        **{
            f"{name}_fingerprint": folder_fingerprint(path)
            for name, path in models.items()
            if path is not None
        },
    }
