"""``ip2p eval shapes``: examples, edits and scores line up; the command writes its report."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from ip2p_jax.apps.cli.main import main
from ip2p_jax.evaluation.shapes import evaluate_shapes, format_table
from ip2p_jax.worlds.shapes import (
    EDIT_KINDS,
    TRAIN_COUNTERPARTS,
    generate_records,
    in_train_phrasing,
    parse_instruction,
    render,
)


class TruthEditor:
    """Answers every edit with the exact after-scene, and records the seeds it was given."""

    def __init__(self, num: int, seed: int, reword=lambda record: record):
        self.records = [reword(r) for r in generate_records(num, split="heldout", seed=seed)]
        self.done, self.seeds = 0, []

    def edit(self, images, instructions, *, seed, resolution, **options):
        batch = self.records[self.done : self.done + len(images)]
        assert [r.instruction for r in batch] == list(instructions)
        assert all(image.size == (resolution, resolution) for image in images)
        self.done += len(images)
        self.seeds += seed
        return [Image.fromarray(render(r.after, resolution)) for r in batch]


def test_exact_edits_score_full_marks_in_every_kind():
    editor = TruthEditor(40, seed=3)
    table, results = evaluate_shapes(editor, num=40, seed=3, batch_size=7, steps=5)
    assert editor.seeds == list(range(3, 43))  # example i: seed + i, whatever the batch size
    assert table["overall"] == {"count": 40, "success": 1.0, "psnr": 100.0, "l1": 0.0}
    assert set(table) <= {*EDIT_KINDS, "overall"} and len(table) > 4
    assert [r.key for r, _ in results] == [r.key for r in editor.records]
    assert "overall" in format_table(table).splitlines()[-1]


def test_train_phrasing_asks_for_the_same_edits_in_training_words():
    editor = TruthEditor(24, seed=0, reword=in_train_phrasing)
    table, results = evaluate_shapes(editor, num=24, batch_size=8, train_phrasing=True)
    assert editor.done == 24 and table["overall"]["success"] == 1.0
    assert all(record.template in TRAIN_COUNTERPARTS.values() for record, _ in results)


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="at least 1"):
        evaluate_shapes(TruthEditor(1, 0), num=0)


def test_eval_shapes_command_writes_table_and_report(tiny_folder, tmp_path, capsys):
    report = tmp_path / "eval.json"
    argv = ["eval", "shapes", "--model", str(tiny_folder), "--num", "4", "--steps", "2"]
    assert main([*argv, "--batch-size", "3", "--train-phrasing", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["edit", "kind", "n", "success", "PSNR", "dB", "L1"]
    data = json.loads(report.read_text())
    assert data["table"]["overall"]["count"] == 4 and len(data["examples"]) == 4
    assert data["settings"]["steps"] == 2 and data["settings"]["train_phrasing"] is True
    for example in data["examples"]:
        ((_, template, _),) = parse_instruction(example["instruction"])
        assert template in TRAIN_COUNTERPARTS.values()
        assert 0 <= example["changed_agreement"] <= 1 and math.isfinite(example["psnr"])
