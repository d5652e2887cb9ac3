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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from datagen.clip_filter import ClipSimilarity, FilterConfig, select
from datagen.pairs import PairSampler, to_uint8
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
class PairSummary:
    """What a job did: prompts rendered and resumed, samples, filter rejections, kept pairs."""

    prompts: int = 0
    resumed: int = 0
    samples: int = 0
    kept: int = 0
    prompts_without_pairs: int = 0
    rejected: collections.Counter = field(default_factory=collections.Counter)
    failed: collections.Counter = field(default_factory=collections.Counter)

    def describe(self) -> str:
        """A readable summary: generated, rejected by reason, kept."""
        rejected = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) or "none"
        text = (
            f"prompts rendered {self.prompts} (already done: {self.resumed}); samples "
            f"{self.samples}; rejected by the CLIP filter: {rejected}; kept {self.kept} pairs "
            f"({self.prompts_without_pairs} prompts kept none)"
        )
        if self.failed:
            text += "; prompts failed: " + ", ".join(f"{k} {v}" for k, v in self.failed.items())
        return text


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
    """Renders, filters and writes every prompt of the shard not yet in `out`."""
    filter_config = filter_config or FilterConfig()
    summary = PairSummary()
    indices = shard_indices(len(prompts), shard, num_shards)
    todo = [i for i in indices if not out.is_done(i)]
    summary.resumed = len(indices) - len(todo)
    bar = tqdm(total=len(todo) * samples, unit="sample", disable=not progress)
    for index in todo:
        prompt = prompts[index]
        try:
            kept = _render_prompt(
                prompt, index, sampler, clip, samples, filter_config, seed, summary, bar
            )
        except ValueError as err:  # e.g. 'replace' on captions of unequal token counts
            summary.failed[type(err).__name__] += 1
            bar.write(f"prompt {index}: {err}")
            bar.update(samples)
            kept = []
        out.write(index, prompt, kept)
        summary.prompts += 1
        summary.kept += len(kept)
        summary.prompts_without_pairs += not kept
        bar.set_postfix(kept=summary.kept)
    bar.close()
    return summary


def _render_prompt(
    prompt: dict[str, Any],
    index: int,
    sampler: PairSampler,
    clip: ClipSimilarity,
    samples: int,
    filter_config: FilterConfig,
    seed: int,
    summary: PairSummary,
    bar: tqdm,
) -> list[KeptPair]:
    """The kept pairs of one prompt; images are held as uint8 until the filter has chosen."""
    import torch

    draws = [sampler.config.draw(s) for s in sample_seeds(seed, index, samples)]
    images, scores = [], []
    for rendered in sampler.render_chunks(prompt["input"], prompt["output"], draws):
        count = len(rendered)
        scores += clip.scores(
            torch.from_numpy(rendered[:, 0]),
            torch.from_numpy(rendered[:, 1]),
            [prompt["input"]] * count,
            [prompt["output"]] * count,
        )
        images.append(to_uint8(rendered))
        summary.samples += count
        bar.update(count)
    images = np.concatenate(images)
    reasons = [filter_config.rejection(one) for one in scores]
    summary.rejected.update(reason for reason in reasons if reason is not None)
    chosen = select(scores, filter_config)
    summary.rejected["beyond_keep"] += reasons.count(None) - len(chosen)
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


def recipe(
    sampler_config: Any,
    filter_config: FilterConfig,
    *,
    samples: int,
    seed: int,
    model: str,
    clip: str,
) -> dict[str, Any]:
    """What fixes the pairs of a job (stored as generation.json): the rendering settings,
    the filter, samples per prompt, the job seed and the model names."""
    return {
        "sampler": dataclasses.asdict(sampler_config),
        "filter": dataclasses.asdict(filter_config),
        "samples": samples,
        "seed": seed,
        "model": Path(model).name,
        "clip": Path(clip).name,
    }
