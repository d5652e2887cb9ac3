"""make demo's pieces: the bundled scenes, the grid, and a run with a given model."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from ip2p_jax.apps.demo import CELL, DEMO_SCENES, demo_grid, load_demo_edits, run_demo
from ip2p_jax.worlds.shapes import render
from ip2p_jax.worlds.shapes.score import score_edit


def test_bundled_scenes_hold_several_valid_edits_per_scene():
    edits = load_demo_edits()
    entries = json.loads(DEMO_SCENES.read_text())
    assert len(entries) >= 3 and len(edits) == sum(len(e["edits"]) for e in entries)
    for edit in edits:  # every edit changes its scene and the truth scores as a success
        before, after = render(edit.before, 64), render(edit.after, 64)
        assert not np.array_equal(before, after), edit.instruction
        score = score_edit(after, edit.before, edit.after, edit.instruction)
        assert score.success, edit.instruction
    kinds = {e["edit"]["kind"] for entry in entries for e in entry["edits"]}
    assert len(kinds) >= 6  # the demo shows most edit kinds


def test_grid_puts_inputs_edits_and_truths_in_place():
    edits = [e for e in load_demo_edits() if e.scene_index < 2]
    truths = [Image.fromarray(render(e.after, 64)) for e in edits]
    scores = [
        score_edit(np.asarray(t), e.before, e.after) for t, e in zip(truths, edits, strict=True)
    ]
    sheet = np.asarray(demo_grid(edits, truths, scores, 64))
    per_scene = sum(e.scene_index == 0 for e in edits)
    assert sheet.shape[1] == (1 + per_scene) * CELL
    first_input = Image.fromarray(render(edits[0].before, 64)).resize((CELL, CELL), Image.NEAREST)
    np.testing.assert_array_equal(sheet[:CELL, :CELL], np.asarray(first_input))
    first_edit = np.asarray(truths[0].resize((CELL, CELL), Image.NEAREST))
    np.testing.assert_array_equal(sheet[:CELL, CELL : 2 * CELL], first_edit)


def test_demo_runs_a_given_model_and_reports_the_scores(tiny_folder, tmp_path, capsys):
    assert run_demo(tmp_path, model=str(tiny_folder), steps=2) == 0
    out = capsys.readouterr().out
    grid = Image.open(tmp_path / "demo_grid.png")
    assert grid.width == 5 * CELL
    assert f"{tmp_path / 'demo_grid.png'}" in out
    assert f"/{len(load_demo_edits())} edits match the true result" in out
    assert (tmp_path / "scene_0.png").is_file()
