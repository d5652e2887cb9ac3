"""Language: every phrasing appears and parses back to its template; captions and
instructions read as intended."""

from __future__ import annotations

from ip2p_jax.worlds import shapes as S
from tests.worlds.conftest import records


def test_every_kind_and_train_phrasing_appears_and_parses_back():
    sample = records("train", 3000)
    assert {record.edit.kind for record in sample} == set(S.EDIT_KINDS)
    used = {record.template for record in sample}
    for kind, templates in S.TRAIN_TEMPLATES.items():
        for template in templates:
            assert template in used, (kind, template)
    for record in sample:
        # The text alone tells the template, and the template fits the edit kind.
        matches = S.parse_instruction(record.instruction)
        assert [(kind, template) for kind, template, _ in matches] == [
            (record.edit.kind, record.template)
        ], record.instruction
        assert record.template in S.TRAIN_TEMPLATES[record.edit.kind]
        assert record.instruction == record.instruction.strip().lower()


def test_captions_and_instruction_wording():
    scene = S.Scene(
        (
            S.Shape("square", "blue", "large", 0.7, 0.3),
            S.Shape("circle", "orange", "small", 0.2, 0.8),
        ),
        "white",
        "black",
    )
    assert S.caption(scene) == (
        "a small orange circle and a large blue square on a background that is white "
        "at the top and black at the bottom"
    )
    add = S.Edit("add", shape=S.Shape("star", "orange", "small", 0.2, 0.2))
    assert S.instruction_text(add, "put {obj} {where}") == "put an orange star in the top left"
    swap = S.Edit("swap", target=0, ref=S.Ref("square"), other=1, other_ref=S.Ref("circle"))
    assert S.instruction_text(swap, "swap {ref} and {ref2}") == "swap the square and the circle"
    grow = S.Edit("resize", target=0, ref=S.Ref("square"), direction="smaller")
    assert S.instruction_text(grow, "{verb} {ref}") == "shrink the square"
