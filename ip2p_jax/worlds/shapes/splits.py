"""The splits, the (colour, kind) pairs only the heldout split shows, and each example's seed."""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "validation", "heldout")

# Never in train/validation (neither scene, nor the instruction); only in "heldout".
HELDOUT_COMBOS: tuple[tuple[str, str], ...] = (
    ("purple", "circle"),
    ("orange", "star"),
    ("blue", "triangle"),
    ("green", "square"),
)
HELDOUT_COMBO_SET = frozenset(HELDOUT_COMBOS)


def split_index(split: str) -> int:
    """The split's position in SPLITS; ValueError for an unknown split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return SPLITS.index(split)


def example_seed(seed: int, split: str, index: int) -> int:
    """The 32-bit seed of example `index`: a function of (seed, split, index) only."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed} and {index}")
    state = np.random.SeedSequence([seed, split_index(split), index]).generate_state(1)
    return int(state[0])
