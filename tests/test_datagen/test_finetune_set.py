"""``ip2p datagen finetune-set``: hand-written examples -> prompt/completion JSONL."""

from __future__ import annotations

import json

import pytest

from datagen.finetune_set import finetune_record, write_finetune_set
from datagen.instructions import DELIMITER_0, parse_completion
from ip2p_jax.apps.cli.main import main

EXAMPLES = [
    ("a photo of a dog on the beach", "make it a cat", "a photo of a cat on the beach"),
    ("a café at night", "add snow", "a café at night, covered in snow"),
]


def _write(path, examples=EXAMPLES):
    # The original release's "caption" key on the first line, a blank line, then "input".
    (c0, e0, o0), (c1, e1, o1) = examples
    path.write_text(
        json.dumps({"caption": c0, "edit": e0, "output": o0, "url": "x"})
        + "\n\n"
        + json.dumps({"input": c1, "edit": f" {e1} ", "output": o1}, ensure_ascii=False)
        + "\n"
    )
    return path


def test_the_command_writes_the_papers_format(tmp_path, capsys):
    examples, out = _write(tmp_path / "human.jsonl"), tmp_path / "ft" / "train.jsonl"
    assert main(["datagen", "finetune-set", "--examples", str(examples), "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == (
        '{"prompt": "a photo of a dog on the beach\\n##\\n", "completion": " make it a cat'
        '\\n%%\\na photo of a cat on the beach\\nEND"}\n'
        '{"prompt": "a café at night\\n##\\n", "completion": " add snow\\n%%\\na café at '
        'night, covered in snow\\nEND"}\n'
    )
    assert f"wrote 2 example(s) to {out}" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["train.jsonl"]  # no temporary left


def test_completions_parse_back_to_the_examples():
    for caption, instruction, edited in EXAMPLES:
        record = finetune_record(caption, instruction, edited)
        assert record["prompt"] == caption + DELIMITER_0
        assert record["completion"].startswith(" ")  # OpenAI's legacy fine-tuning format
        assert parse_completion(caption, record["completion"]) == (instruction, edited)


def test_refuses_to_overwrite_unless_asked(tmp_path, capsys):
    examples, out = _write(tmp_path / "human.jsonl"), tmp_path / "train.jsonl"
    out.write_text("keep me\n")
    argv = ["datagen", "finetune-set", "--examples", str(examples), "--out", str(out)]
    assert main(argv) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "keep me\n"
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_finetune_set(EXAMPLES, out)
    assert main([*argv, "--overwrite"]) == 0
    assert len(out.read_text().splitlines()) == 2


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"input": "a dog", "output": "a cat"}', "needs non-empty string fields"),
        ("[1, 2]", "expected a JSON object"),
        ('{"input": "a dog", "edit": "x\\nEND", "output": "a cat"}', "holds the format's STOP"),
    ],
)
def test_a_bad_examples_line_names_file_and_line(tmp_path, capsys, line, message):
    examples, out = _write(tmp_path / "human.jsonl"), tmp_path / "train.jsonl"
    with open(examples, "a") as f:
        f.write(line + "\n")  # line 4: the two examples are on lines 1 and 3
    assert main(["datagen", "finetune-set", "--examples", str(examples), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"{examples}:4:" in error and message in error
    assert not out.exists()
