"""The training input pipeline: a grain DataLoader over an edit-pair split, with a seeded
deterministic order, paired augmentation and tokenization in worker processes, one shard per
JAX process, and a state that goes into the training checkpoint to resume mid-epoch exactly.

Batches are dicts of numpy arrays (images uint8 NHWC, token ids int32), this process's part
of the global batch, ready for `jax.make_array_from_process_local_data`.

    loader = EditPairLoader(EditPairSource(path, "train"), InputConfig(batch_size=64))
    batches = iter(loader)
    batch = next(batches)
    state = batches.get_state()        # JSON-able; batches.set_state(state) resumes after it
"""

from __future__ import annotations

import collections
import json
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
    decode_pair,
    drop_words,
)

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
    # Each word of an instruction is left out with this probability before tokenizing
    # (augment.drop_words): a text encoder trained from scratch then learns what each word
    # says on its own, which is what a phrasing it never read needs.
    word_dropout: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.word_dropout < 1.0:
            raise ValueError(f"word_dropout must be in [0, 1), got {self.word_dropout}")


class _DecodeAugmentTokenize(grain.transforms.RandomMap):
    """One example -> training arrays, or a skip marker that the batcher counts."""

    def __init__(
        self, augmentation: Augmentation, tokenizer: Tokenizer | None, word_dropout: float
    ):
        self.augmentation = augmentation
        self.tokenizer = tokenizer
        self.word_dropout = word_dropout

    def random_map(self, example: Mapping[str, Any], rng: np.random.Generator) -> dict:
        try:
            _check_instruction(example)
            before, after = decode_pair(example)
            before, after = augment_pair(before, after, self.augmentation, rng)
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
            _check_instruction(example)
        except BadExample as bad:
            return _skip(example, bad)
        element = {name: example[name] for name in ("input_moments", "edited_moments")}
        return _with_text(element, example, self.tokenizer, self.word_dropout, rng)


def _check_instruction(example: Mapping[str, Any]) -> None:
    if not example["instruction"].strip():
        raise BadExample("empty_instruction", "instruction is empty")


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


class EditPairLoader:
    """Batches of one split for one JAX process (shard `shard_index` of `shard_count`)."""

    def __init__(
        self,
        source,
        config: InputConfig,
        *,
        tokenizer: Tokenizer | None = None,
        shard_index: int | None = None,
        shard_count: int | None = None,
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
        self.source = source
        self.config = config
        self.tokenizer = tokenizer
        self.shard_options = grain.sharding.ShardOptions(
            shard_index=shard_index, shard_count=shard_count, drop_remainder=True
        )
        self.local_batch_size = config.batch_size // shard_count

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self)

    def _grain_loader(self) -> grain.DataLoader:
        config = self.config
        if config.worker_count:
            _mark_absl_flags_parsed()
        sampler = grain.samplers.IndexSampler(
            num_records=len(self.source),
            shard_options=self.shard_options,
            shuffle=config.shuffle,
            num_epochs=config.num_epochs,
            seed=config.seed,
        )
        return grain.DataLoader(
            data_source=self.source,
            sampler=sampler,
            operations=[self._prepare()],
            worker_count=config.worker_count,
            worker_buffer_size=config.worker_buffer_size,
        )

    def _prepare(self) -> grain.transforms.Map | grain.transforms.RandomMap:
        # A latent cache (train.latent_cache) holds encoded, un-augmented examples.
        if getattr(self.source, "holds_latents", False):
            return _TokenizeLatents(self.tokenizer, self.config.word_dropout)
        return _DecodeAugmentTokenize(
            self.config.augmentation, self.tokenizer, self.config.word_dropout
        )


class BatchIterator(Iterator[dict[str, np.ndarray]]):
    """Yields batches; counts (and warns once per reason about) skipped bad examples.

    Batches are assembled here, one element at a time, so after each batch grain's state
    points exactly past its last example and nothing is buffered that a resume would lose.
    """

    def __init__(self, loader: EditPairLoader):
        self.loader = loader
        self._elements = iter(loader._grain_loader())
        self.skipped: collections.Counter[str] = collections.Counter()
        self.batches = 0

    def __next__(self) -> dict[str, np.ndarray]:
        rows: list[dict] = []
        while len(rows) < self.loader.local_batch_size:
            try:
                element = next(self._elements)
            except StopIteration:
                if rows and not self.loader.config.drop_remainder:
                    break
                raise
            if SKIPPED in element:
                self._count_skip(element)
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
        """JSON-able position: where grain is, how many batches and skips so far."""
        grain_state = self._elements.get_state()  # JSON, as bytes
        return {
            "grain": json.loads(grain_state),
            "batches": self.batches,
            "skipped": dict(self.skipped),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues right after the batch at which `state` was taken."""
        self._elements.set_state(json.dumps(state["grain"]).encode())
        self.batches = int(state["batches"])
        self.skipped = collections.Counter(state["skipped"])


def _stack(rows: list[dict]) -> dict[str, np.ndarray]:
    return {name: np.stack([row[name] for row in rows]) for name in rows[0]}


def _mark_absl_flags_parsed() -> None:
    # grain's worker processes read absl flags; an application without absl never parses them.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
