"""Writes ip2p_jax/assets/demo/scenes.json: the scenes and instructions ``make demo`` edits.

    python scripts/make_demo_scenes.py

Scenes come from the shapes world's held-out split (scenes the shapes model never saw); each
gets one edit of several different kinds, worded with a training phrasing, so the demo shows
the kinds of edit the model was taught on new scenes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ip2p_jax.weights.atomic import write_text_atomically
from ip2p_jax.worlds.shapes import EDIT_KINDS, TRAIN_TEMPLATES, instruction_text, make_record, refer
from ip2p_jax.worlds.shapes.sample import edit_options

OUT = Path(__file__).resolve().parents[1] / "ip2p_jax" / "assets" / "demo" / "scenes.json"
SCENES = 4
EDITS_PER_SCENE = 4


def demo_scenes(seed: int = 0) -> list[dict]:
    """SCENES scenes of 3-4 shapes, each with EDITS_PER_SCENE edits of distinct kinds."""
    rng = np.random.default_rng(seed)
    chosen, index, kind_turn = [], 0, 0
    while len(chosen) < SCENES:
        scene = make_record(index, split="heldout", seed=seed).before
        index += 1
        if len(scene.shapes) < 3:
            continue
        refs = [refer(scene, i) for i in range(len(scene.shapes))]
        edits = []
        for offset in range(len(EDIT_KINDS)):
            kind = EDIT_KINDS[(kind_turn + offset) % len(EDIT_KINDS)]
            options = edit_options(scene, kind, refs, rng, lambda combo: True)
            if options and len(edits) < EDITS_PER_SCENE:
                edit = options[int(rng.integers(len(options)))]
                text = instruction_text(edit, TRAIN_TEMPLATES[kind][0])
                edits.append({"instruction": text, "edit": edit.to_dict()})
        kind_turn += EDITS_PER_SCENE  # the next scene starts with other kinds
        chosen.append({"scene": scene.to_dict(), "edits": edits})
    return chosen


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(OUT, json.dumps(demo_scenes(), indent=1) + "\n")
    print(f"wrote {OUT}")
