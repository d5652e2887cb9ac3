"""The grain input pipeline: deterministic order, exact resume, process shards, paired
augmentation, word dropout, bad data skipped and counted, worker processes."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from ip2p_jax.data.augment import Augmentation, drop_words
from ip2p_jax.data.edit_pairs import EditPairSource, write_dataset
from ip2p_jax.data.loader import EditPairLoader, InputConfig, resume_position
from ip2p_jax.data.schema import make_example
from ip2p_jax.models.tokenizer import CLIPTokenizer
from ip2p_jax.pipelines.images import decode_png, encode_png
from tests.data.conftest import assert_same_batches, global_batches, random_pair

SMALL = Augmentation(crop=32, min_resize=32, max_resize=44, flip_prob=0.5)


def _loader(dataset, split="train", *, shard=(0, 1), tokenizer=None, **config):
    config = {"batch_size": 4, "augmentation": SMALL, "seed": 7, **config}
    return EditPairLoader(
        EditPairSource(dataset, split),
        InputConfig(**config),
        tokenizer=tokenizer,
        shard_index=shard[0],
        shard_count=shard[1],
    )


def _keys(batches) -> list[list[str]]:
    return [batch["key"].tolist() for batch in batches]


def test_batches_are_numpy_ready_for_placement(pairs_dataset):
    tokenizer = CLIPTokenizer.bundled()
    batch = next(iter(_loader(pairs_dataset, tokenizer=tokenizer)))
    assert batch["input_image"].shape == batch["edited_image"].shape == (4, 32, 32, 3)
    assert batch["input_image"].dtype == np.uint8
    assert batch["input_ids"].shape == (4, 77) and batch["input_ids"].dtype == np.int32
    for ids, text in zip(batch["input_ids"], batch["instruction"], strict=True):
        assert np.array_equal(ids, tokenizer([str(text)])[0])


def test_same_seed_same_order_other_seed_other_order(pairs_dataset):
    first = _keys(itertools.islice(iter(_loader(pairs_dataset)), 9))
    again = _keys(itertools.islice(iter(_loader(pairs_dataset)), 9))
    other = _keys(itertools.islice(iter(_loader(pairs_dataset, seed=8)), 9))
    assert first == again and first != other
    epoch = sorted(key for batch in first for key in batch)
    assert epoch == [f"ex/{i:04d}" for i in range(36)]  # one epoch = 9 batches of 4


def test_resume_mid_epoch_gives_exactly_the_remaining_batches(pairs_dataset):
    def run(loader):
        return [(b["key"].tolist(), b["input_image"], b["edited_image"]) for b in loader]

    whole = run(_loader(pairs_dataset, num_epochs=2))
    batches = iter(_loader(pairs_dataset, num_epochs=2))
    for _ in range(5):
        next(batches)
    state = batches.get_state()
    resumed = iter(_loader(pairs_dataset, num_epochs=2))
    resumed.set_state(state)
    rest = run(resumed)
    assert len(whole) == 18 and len(rest) == 13 and resumed.batches == 18
    for (keys, before, after), (keys2, before2, after2) in zip(whole[5:], rest, strict=True):
        assert keys == keys2
        assert np.array_equal(before, before2) and np.array_equal(after, after2)


def test_process_shards_are_disjoint_and_cover_the_data(pairs_dataset):
    shards = []
    for index in range(3):
        loader = _loader(pairs_dataset, shard=(index, 3), batch_size=6, num_epochs=1)
        assert loader.local_batch_size == 2
        shards.append({key for batch in _keys(loader) for key in batch})
    assert all(len(shard) == 12 for shard in shards)
    assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])
    assert set().union(*shards) == {f"ex/{i:04d}" for i in range(36)}
    with pytest.raises(ValueError, match="batch_size 4 does not split over 3 processes"):
        _loader(pairs_dataset, shard=(0, 3))


def _global_batches(dataset, processes: int, count: int, states=None, **config):
    """`count` global batches of `processes` loaders of 12 (conftest.global_batches)."""

    def loader(index: int, processes: int) -> EditPairLoader:
        return _loader(dataset, shard=(index, processes), batch_size=12, **config)

    return global_batches(loader, processes, count, 12, states)


@pytest.mark.parametrize("processes", [2, 3])
def test_global_batches_are_the_same_on_any_process_count(pairs_dataset, processes):
    one, _ = _global_batches(pairs_dataset, 1, 7)
    many, _ = _global_batches(pairs_dataset, processes, 7)
    assert_same_batches(one, many)


@pytest.mark.parametrize(("saved", "resumed"), [(2, 1), (1, 3), (3, 2)])
def test_resume_on_another_process_count_continues_the_same_batches(pairs_dataset, saved, resumed):
    whole, _ = _global_batches(pairs_dataset, 1, 8)
    _, states = _global_batches(pairs_dataset, saved, 5)
    rest, after = _global_batches(pairs_dataset, resumed, 3, states=states)
    assert_same_batches(whole[5:], rest)
    assert [state["batches"] for state in after] == [8] * resumed


def test_resume_on_another_process_count_reads_again_rather_than_leaves_out():
    """Skips make processes drift: the resumed run starts where the slowest one was."""
    states = [
        {"consumed": 8, "local_batch_size": 4, "batches": 2, "skipped": {}},
        {"consumed": 10, "local_batch_size": 4, "batches": 2, "skipped": {"corrupt_image": 2}},
    ]
    # Global batch 2 is [16, 24): process 0's block 16-19 is unread, process 1 had read 20
    # and 21 of its block 20-23 (it skipped two examples before). One process resumes at 16.
    one = resume_position(states, 0, 1, 8)
    assert one["consumed"] == 16 and one["skipped"] == {"corrupt_image": 2}
    # Four processes (blocks of 2): global batch 2 starts at 16, each has read 2 blocks.
    assert [resume_position(states, p, 4, 2)["consumed"] for p in range(4)] == [4, 4, 4, 4]
    assert resume_position(states, 1, 4, 2)["skipped"] == {}
    assert one["batches"] == 2


def test_a_checkpoint_of_the_grain_era_resumes(pairs_dataset):
    """Checkpoints written before ProcessBlocks hold grain's own state."""
    whole = list(itertools.islice(iter(_loader(pairs_dataset)), 7))
    for workers, seen in ((0, {"0": 19}), (2, {"0": 18, "1": 19})):
        legacy = {
            "grain": {"worker_count": workers, "last_seen_indices": seen},
            "batches": 5,
            "skipped": {},
        }
        resumed = iter(_loader(pairs_dataset))
        resumed.set_state(legacy)
        assert resumed.consumed == 20
        assert_same_batches(whole[5:], [next(resumed), next(resumed)])


def test_augmentation_is_the_same_on_both_images(pairs_dataset):
    """Each edit reverses the channels, which commutes with resize, crop and flip: any
    difference in the crop, flip or size between the two images breaks the equality."""
    flips = 0
    for batch in itertools.islice(iter(_loader(pairs_dataset)), 9):
        assert np.array_equal(batch["edited_image"], batch["input_image"][..., ::-1])
    # Without resizing, a crop of the full image is the image itself or its mirror.
    exact = Augmentation(crop=40, min_resize=40, max_resize=40, flip_prob=0.5)
    source = EditPairSource(pairs_dataset, "train")
    for batch in iter(_loader(pairs_dataset, augmentation=exact, num_epochs=1)):
        for key, image in zip(batch["key"], batch["input_image"], strict=True):
            index = int(str(key).split("/")[1])
            before = decode_png(source[index]["input_image"])
            assert before.shape == (40, 48, 3)
            matches = [np.array_equal(image, before[:, left : left + 40]) for left in range(9)]
            mirrored = [
                np.array_equal(image, before[:, left : left + 40][:, ::-1]) for left in range(9)
            ]
            assert any(matches) or any(mirrored)
            flips += any(mirrored) and not any(matches)
    assert 5 < flips < 31  # about half of 36 at flip_prob 0.5


def test_bad_examples_are_skipped_counted_and_warned(tmp_path):
    rng = np.random.default_rng(0)

    def examples():
        for i in range(12):
            before, after = random_pair(rng, 40, 40)
            input_image, edited_image = encode_png(before), encode_png(after)
            if i in (2, 7):  # a PNG header and then garbage
                edited_image = edited_image[:8] + b"\x00garbage" * 10
            if i == 5:  # sizes that differ
                edited_image = encode_png(after[:30])
            yield make_example(input_image, edited_image, f"edit {i}", key=f"k{i}")

    write_dataset(tmp_path, {"train": examples()})
    loader = _loader(tmp_path, num_epochs=1, batch_size=3, shuffle=False)
    batches = iter(loader)
    with pytest.warns(UserWarning, match=r"skipping bad examples \(corrupt_image\); first: k2"):
        keys = _keys(batches)
    assert keys == [["k0", "k1", "k3"], ["k4", "k6", "k8"], ["k9", "k10", "k11"]]
    assert batches.skipped == {"corrupt_image": 2, "size_mismatch": 1}
    assert batches.get_state()["skipped"] == {"corrupt_image": 2, "size_mismatch": 1}


def test_worker_processes_give_the_same_batches(pairs_dataset):
    in_process = list(itertools.islice(iter(_loader(pairs_dataset)), 4))
    batches = iter(_loader(pairs_dataset, worker_count=2))
    with_workers = [next(batches) for _ in range(2)]
    state = batches.get_state()
    resumed = iter(_loader(pairs_dataset, worker_count=2))
    resumed.set_state(state)
    with_workers += [next(resumed) for _ in range(2)]
    for a, b in zip(in_process, with_workers, strict=True):
        assert a["key"].tolist() == b["key"].tolist()
        assert np.array_equal(a["input_image"], b["input_image"])


def test_read_ahead_threads_give_the_same_batches(pairs_dataset):
    # grain's reading threads (for remote storage) change the speed, not the batches
    plain = list(itertools.islice(iter(_loader(pairs_dataset)), 3))
    threaded = list(itertools.islice(iter(_loader(pairs_dataset, read_threads=3)), 3))
    for a, b in zip(plain, threaded, strict=True):
        assert a["key"].tolist() == b["key"].tolist()
        assert np.array_equal(a["edited_image"], b["edited_image"])
    with pytest.raises(ValueError, match="read_threads must be 0 or more"):
        InputConfig(batch_size=2, read_threads=-1)


def test_augmentation_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="crop <= min_resize"):
        Augmentation(crop=64, min_resize=32, max_resize=32)


def _is_subsequence(words: list[str], of: list[str]) -> bool:
    rest = iter(of)
    return all(word in rest for word in words)


def test_drop_words_keeps_the_order_and_never_empties_the_text():
    rng = np.random.default_rng(0)
    text = "change the colour of the star to blue"
    assert drop_words(text, 0.0, rng) == text
    outs = [drop_words(text, 0.25, rng) for _ in range(400)]
    assert all(_is_subsequence(out.split(), text.split()) for out in outs)
    kept = np.mean([len(out.split()) for out in outs]) / len(text.split())
    assert 0.7 < kept < 0.8  # about 1 - 0.25 of the words stay
    assert {drop_words(text, 0.999, rng) for _ in range(20)} == {text}  # never ""


class _Latents:
    """A stand-in latent cache: what train.latent_cache.LatentSplit yields."""

    holds_latents = True

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> dict:
        moments = np.full((2, 2, 8), index, np.float32)
        return {
            "input_moments": moments,
            "edited_moments": moments,
            "instruction": f"make the small red star number {index} blue",
            "key": f"lat/{index}",
        }


@pytest.mark.parametrize("latents", [False, True], ids=["pixels", "latent_cache"])
def test_word_dropout_changes_the_tokenized_text_the_same_way_each_run(pairs_dataset, latents):
    tokenizer = CLIPTokenizer.bundled()
    config = InputConfig(batch_size=8, augmentation=SMALL, seed=3, word_dropout=0.3)
    source = _Latents() if latents else EditPairSource(pairs_dataset, "train")

    def texts(word_dropout: float) -> list[tuple[str, str, np.ndarray]]:
        loader = EditPairLoader(
            source,
            dataclasses.replace(config, word_dropout=word_dropout),
            tokenizer=tokenizer,
            shard_index=0,
            shard_count=1,
        )
        batches = itertools.islice(iter(loader), 4)
        return [
            (str(key), str(text), ids)
            for batch in batches
            for key, text, ids in zip(
                batch["key"], batch["instruction"], batch["input_ids"], strict=True
            )
        ]

    full = {key: text for key, text, _ in texts(0.0)}
    dropped = texts(0.3)
    for key, text, ids in dropped:
        assert _is_subsequence(text.split(), full[key].split())
        assert np.array_equal(ids, tokenizer([text])[0])  # the ids are the dropped text's
    assert sum(text != full[key] for key, text, _ in dropped) > len(dropped) // 2
    assert [text for _, text, _ in texts(0.3)] == [text for _, text, _ in dropped]


def test_word_dropout_must_be_a_probability_below_one():
    with pytest.raises(ValueError, match=r"word_dropout must be in \[0, 1\), got 1.0"):
        InputConfig(batch_size=4, word_dropout=1.0)
