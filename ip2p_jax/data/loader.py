"""The training input pipeline: a grain DataLoader over an edit-pair split, with a seeded
deterministic order, paired augmentation and tokenization in worker processes, one block of
each global batch per JAX process, and a state that goes into the training checkpoint to
resume mid-epoch exactly (on another process count too, see :func:`resume_position`).

Batches are dicts of numpy arrays (images uint8 NHWC, token ids int32), this process's part
of the global batch, ready for `jax.make_array_from_process_local_data`.

    loader = EditPairLoader(EditPairSource(path, "train"), InputConfig(batch_size=64))
    batches = iter(loader)
    batch = next(batches)
    state = batches.get_state()        # JSON-able; batches.set_state(state) resumes after it

Global batch b is the sampler's examples [b * batch_size, (b + 1) * batch_size), whatever
the process count: process p of n reads the block [b * B + p * m, b * B + (p + 1) * m) of it
(m = B / n). A run on 2 hosts therefore trains on the same batches, row for row, as on one
(as long as no example is skipped), and the global array's rows are the sampler's order.

With aspect-ratio buckets (a data.bucket_sampler.BucketPlan) the sampler is a BucketSampler:
each global batch is one bucket's pairs, each cropped to that bucket's size, so batches are
of a few shapes; the state names the buckets, and resuming under other buckets is refused.
"""

from __future__ import annotations

import collections
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grain
import numpy as np

from ip2p_jax.data.augment import (
    Augmentation,
    BadExample,
    augment_pair,
    check_instruction,
    decode_pair,
    drop_words,
)
from ip2p_jax.data.bucket_sampler import BucketPlan, BucketSampler
from ip2p_jax.data.buckets import Bucket, nearest_bucket

SKIPPED = "skipped"  # an element that stands for a skipped example: {SKIPPED: reason, ...}


class Tokenizer(Protocol):
    def __call__(self, texts: list[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class InputConfig:
    """How batches are made. `batch_size` is the global batch over all processes."""

    batch_size: int
    augmentation: Augmentation = field(default_factory=Augmentation)
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever, a new order each epoch
    drop_remainder: bool = True  # a last partial batch would change the step's shapes
    worker_count: int = 0  # decoding processes; 0 decodes in this process
    worker_buffer_size: int = 2
    # Threads reading examples ahead in each process (grain's ReadOptions.num_threads, whose
    # default is 16 with 500 read ahead). For a local dataset or a latent cache none is
    # fastest: the threads contend for the GIL and grain polls every read-ahead future per
    # example (64 px, one core: 1540 examples/s against 590; a cache's latents 6980 against
    # 1310). Remote storage, where a read waits on the network, wants them.
    read_threads: int = 0
    # Each word of an instruction is left out with this probability before tokenizing
    # (augment.drop_words): a text encoder trained from scratch then learns what each word
    # says on its own, which is what a phrasing it never read needs.
    word_dropout: float = 0.0

    def __post_init__(self):
        if self.read_threads < 0:
            raise ValueError(f"read_threads must be 0 or more, got {self.read_threads}")
        if not 0.0 <= self.word_dropout < 1.0:
            raise ValueError(f"word_dropout must be in [0, 1), got {self.word_dropout}")


class _DecodeAugmentTokenize(grain.transforms.RandomMap):
    """One example -> training arrays, or a skip marker that the batcher counts."""

    def __init__(
        self,
        augmentation: Augmentation,
        tokenizer: Tokenizer | None,
        word_dropout: float,
        buckets: tuple[Bucket, ...] = (),
    ):
        self.augmentation = augmentation
        self.tokenizer = tokenizer
        self.word_dropout = word_dropout
        self.buckets = buckets  # none: square crops

    def random_map(self, example: Mapping[str, Any], rng: np.random.Generator) -> dict:
        try:
            check_instruction(example)
            before, after = decode_pair(example)
            # The sampler batched the pair by this same rule on this same decoded size.
            size = nearest_bucket(*before.size, self.buckets) if self.buckets else None
            before, after = augment_pair(before, after, self.augmentation, rng, size)
        except BadExample as bad:
            return _skip(example, bad)
        element = {"input_image": before, "edited_image": after}
        return _with_text(element, example, self.tokenizer, self.word_dropout, rng)


class _TokenizeLatents(grain.transforms.RandomMap):
    """One example of a latent cache (moments already encoded) -> training arrays."""

    def __init__(self, tokenizer: Tokenizer | None, word_dropout: float):
        self.tokenizer = tokenizer
        self.word_dropout = word_dropout

    def random_map(self, example: Mapping[str, Any], rng: np.random.Generator) -> dict:
        if SKIPPED in example:
            return dict(example)
        try:
            check_instruction(example)
        except BadExample as bad:
            return _skip(example, bad)
        element = {name: example[name] for name in ("input_moments", "edited_moments")}
        return _with_text(element, example, self.tokenizer, self.word_dropout, rng)


def _skip(example: Mapping[str, Any], bad: BadExample) -> dict:
    return {SKIPPED: bad.reason, "detail": str(bad), "key": example.get("key", "?")}


def _with_text(
    element: dict,
    example: Mapping[str, Any],
    tokenizer: Tokenizer | None,
    word_dropout: float,
    rng: np.random.Generator,
) -> dict:
    """The example's instruction (words dropped as `word_dropout` says: the text trained
    on), key and (with a tokenizer) token ids added to `element`."""
    instruction = example["instruction"]
    if word_dropout:
        instruction = drop_words(instruction, word_dropout, rng)
    element.update(instruction=instruction, key=example.get("key", "?"))
    if tokenizer is not None:
        element["input_ids"] = np.asarray(tokenizer([instruction])[0], np.int32)
    return element


def block_global_index(local: int, shard_index: int, shard_count: int, local_batch: int) -> int:
    """The whole-split index of process `shard_index`'s `local`-th example, when each of
    `shard_count` processes reads blocks of `local_batch` of every global batch."""
    batch, row = divmod(local, local_batch)
    return batch * local_batch * shard_count + shard_index * local_batch + row


class ProcessBlocks:
    """A grain sampler: this process's rows of every global batch, from `start` on.

    Global batch b holds the indices [b * B, (b + 1) * B) of the whole-split `sampler`;
    process `shard_index` of `shard_count` takes its block of `local_batch` of them. The
    metadata (record and augmentation seed) is the global index's, so an example is the same
    pixels on every process count."""

    def __init__(self, sampler, shard_index: int, shard_count: int, local_batch: int, start=0):
        self.sampler = sampler
        self.shard_index, self.shard_count = shard_index, shard_count
        self.local_batch, self.start = local_batch, start

    def global_index(self, local: int) -> int:
        """The whole-split sampler index of this process's `local`-th example."""
        return block_global_index(local, self.shard_index, self.shard_count, self.local_batch)

    def __len__(self) -> int:
        total = len(self.sampler)
        if total == sys.maxsize:  # repeats forever
            return total
        whole_batches = total // (self.local_batch * self.shard_count)
        return max(0, whole_batches * self.local_batch - self.start)

    def __getitem__(self, index: int):
        if index < 0 or index >= len(self):
            raise IndexError(f"index {index} is past this process's {len(self)} examples")
        return self.sampler[self.global_index(self.start + index)]

    def __repr__(self) -> str:
        return (
            f"ProcessBlocks({self.sampler!r}, shard={self.shard_index}/{self.shard_count}, "
            f"local_batch={self.local_batch}, start={self.start})"
        )


class EditPairLoader:
    """Batches of one split for one JAX process (block `shard_index` of `shard_count` of
    every global batch; see the module docstring), bucketed by aspect ratio when `buckets`
    (the split's BucketPlan) is given."""

    def __init__(
        self,
        source,
        config: InputConfig,
        *,
        tokenizer: Tokenizer | None = None,
        shard_index: int | None = None,
        shard_count: int | None = None,
        buckets: BucketPlan | None = None,
    ):
        if shard_index is None or shard_count is None:
            import jax

            shard_index, shard_count = jax.process_index(), jax.process_count()
        if config.batch_size % shard_count:
            raise ValueError(
                f"batch_size {config.batch_size} does not split over {shard_count} processes"
            )
        if len(source) < shard_count:
            raise ValueError(f"{source!r} has fewer examples than the {shard_count} shards")
        if buckets is not None:
            if getattr(source, "holds_latents", False):
                raise ValueError(
                    "aspect-ratio buckets crop each pair to its bucket's size; a latent cache "
                    "holds latents of one size: set data.cache_latents=False or "
                    "data.buckets=False"
                )
            if len(buckets.assignment) != len(source):
                raise ValueError(
                    f"the bucket plan covers {len(buckets.assignment)} pairs; {source!r} "
                    f"has {len(source)}"
                )
        self.buckets = buckets
        self.source = source
        self.config = config
        self.tokenizer = tokenizer
        self.shard_index, self.shard_count = shard_index, shard_count
        self.local_batch_size = config.batch_size // shard_count
        if buckets is not None:
            self.sampler()  # a plan with no whole batch fails here, before any compile

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self)

    def sampler(self, start: int = 0) -> ProcessBlocks:
        """This process's examples in order, from its `start`-th on."""
        config = self.config
        if self.buckets is None:
            whole = grain.samplers.IndexSampler(
                num_records=len(self.source),
                shuffle=config.shuffle,
                num_epochs=config.num_epochs,
                seed=config.seed,
            )
        else:
            whole = BucketSampler(
                self.buckets,
                config.batch_size,
                seed=config.seed,
                shuffle=config.shuffle,
                num_epochs=config.num_epochs,
            )
        return ProcessBlocks(
            whole, self.shard_index, self.shard_count, self.local_batch_size, start
        )

    def _grain_loader(self, start: int) -> grain.DataLoader:
        config = self.config
        if config.worker_count:
            _mark_absl_flags_parsed()
        return grain.DataLoader(
            data_source=self.source,
            sampler=self.sampler(start),
            operations=[self._prepare()],
            worker_count=config.worker_count,
            worker_buffer_size=config.worker_buffer_size,
            shard_options=grain.sharding.NoSharding(),  # ProcessBlocks picks our examples
            read_options=grain.ReadOptions(
                num_threads=config.read_threads,
                prefetch_buffer_size=500 if config.read_threads else 0,
            ),
        )

    def _prepare(self) -> grain.transforms.Map | grain.transforms.RandomMap:
        # A latent cache (train.latent_cache) holds encoded, un-augmented examples.
        if getattr(self.source, "holds_latents", False):
            return _TokenizeLatents(self.tokenizer, self.config.word_dropout)
        buckets = () if self.buckets is None else self.buckets.buckets
        return _DecodeAugmentTokenize(
            self.config.augmentation, self.tokenizer, self.config.word_dropout, buckets
        )

    def bucket_names(self) -> list[str] | None:
        """The buckets as the state records them ('256x256', ...); None without buckets."""
        return None if self.buckets is None else [str(b) for b in self.buckets.buckets]


class BatchIterator(Iterator[dict[str, np.ndarray]]):
    """Yields batches; counts (and warns once per reason about) skipped bad examples.

    Batches are assembled here, one element at a time, so after each batch the count of
    examples read points exactly past its last example and nothing is buffered that a
    resume would lose.
    """

    def __init__(self, loader: EditPairLoader):
        self.loader = loader
        self.consumed = 0  # examples of this process read so far (skipped ones too)
        self._elements: Iterator[dict] | None = None  # started on the first batch
        self.skipped: collections.Counter[str] = collections.Counter()
        self.batches = 0

    def __next__(self) -> dict[str, np.ndarray]:
        if self._elements is None:  # (set_state before any batch starts grain only once)
            self._elements = iter(self.loader._grain_loader(self.consumed))
        rows: list[dict] = []
        while len(rows) < self.loader.local_batch_size:
            try:
                element = next(self._elements)
            except StopIteration:
                if rows and not self.loader.config.drop_remainder:
                    break
                raise
            self.consumed += 1
            if SKIPPED in element:
                self._count_skip(element)
                if self.loader.buckets is not None:  # the next example is another batch's
                    raise ValueError(
                        f"{element['key']} could be trained on when the bucket plan was made "
                        f"and now cannot ({element['detail']}); a bucketed batch cannot "
                        "skip it: make the plan again (delete workdir/buckets)"
                    )
                continue
            rows.append(element)
        self.batches += 1
        return _stack(rows)

    def _count_skip(self, element: dict) -> None:
        reason = element[SKIPPED]
        if not self.skipped[reason]:
            warnings.warn(
                f"skipping bad examples ({reason}); first: {element['key']}: "
                f"{element['detail']}. Counts so far are in the iterator's .skipped",
                stacklevel=3,
            )
        self.skipped[reason] += 1

    def get_state(self) -> dict[str, Any]:
        """JSON-able position of this process: examples read, batches, skips so far."""
        state = {
            "consumed": self.consumed,
            "local_batch_size": self.loader.local_batch_size,
            "batches": self.batches,
            "skipped": dict(self.skipped),
        }
        if self.loader.buckets is not None:
            state["buckets"] = self.loader.bucket_names()
        return state

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues right after the batch at which `state` was taken (this process's own
        state; :func:`resume_position` makes one from every process's of another run)."""
        if state.get("buckets") != self.loader.bucket_names():
            raise ValueError(
                f"the checkpoint's input order was made with buckets {state.get('buckets')} "
                f"and this run's has {self.loader.bucket_names()}: the examples read so far "
                "would not be the same ones. Resume with the run's data.buckets settings"
            )
        if "grain" in state:
            state = {**state, "consumed": _consumed_from_grain_state(state["grain"])}
        self.consumed = int(state["consumed"])
        self._elements = None
        self.batches = int(state["batches"])
        self.skipped = collections.Counter(state["skipped"])


def resume_position(
    states: list[Mapping[str, Any]], shard_index: int, shard_count: int, local_batch: int
) -> dict[str, Any]:
    """Process `shard_index` of `shard_count`'s state from the states of every process of a
    run (`BatchIterator.get_state`, in process order), on the same or another process count.

    The same count: the process's own state. Another: every process starts at the first
    example some process of the saved run had not read yet, so nothing is left out; examples
    the faster processes had read past it (skips make processes drift) are read again. Skip
    counts go to process 0."""
    if len(states) == shard_count and all(
        int(s.get("local_batch_size", local_batch)) == local_batch for s in states
    ):
        return dict(states[shard_index])
    global_batch = local_batch * shard_count
    frontier = min(
        _next_global_index(state, p, len(states), global_batch) for p, state in enumerate(states)
    )
    batch, offset = divmod(frontier, global_batch)
    into_block = min(max(offset - shard_index * local_batch, 0), local_batch)
    skipped: collections.Counter[str] = collections.Counter()
    if shard_index == 0:
        for state in states:
            skipped.update(state["skipped"])
    position = {
        "consumed": batch * local_batch + into_block,
        "local_batch_size": local_batch,
        "batches": int(states[0]["batches"]),
        "skipped": dict(skipped),
    }
    if "buckets" in states[0]:
        position["buckets"] = states[0]["buckets"]
    return position


def _next_global_index(
    state: Mapping[str, Any], shard_index: int, shard_count: int, global_batch: int
) -> int:
    """The whole-split index of the next example the process of `state` would have read
    (states from before `local_batch_size` was kept are of one-process runs: the batch)."""
    local_batch = int(state.get("local_batch_size", global_batch // shard_count))
    if "grain" in state:
        state = {**state, "consumed": _consumed_from_grain_state(state["grain"])}
    return block_global_index(int(state["consumed"]), shard_index, shard_count, local_batch)


def _consumed_from_grain_state(grain_state: Mapping[str, Any]) -> int:
    """Examples read, from the grain DataLoader state that checkpoints of one process held
    before ProcessBlocks (their worker w's last index i means (i + W - w) // W reads)."""
    workers = max(int(grain_state["worker_count"]), 1)
    return sum(
        (int(index) + workers - int(worker)) // workers
        for worker, index in grain_state["last_seen_indices"].items()
    )


def _stack(rows: list[dict]) -> dict[str, np.ndarray]:
    return {name: np.stack([row[name] for row in rows]) for name in rows[0]}


def _mark_absl_flags_parsed() -> None:
    # grain's worker processes read absl flags; an application without absl never parses them.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
