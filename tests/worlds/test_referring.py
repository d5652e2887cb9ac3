"""Referring expressions: unambiguous and as short as possible."""

from __future__ import annotations

import itertools

from ip2p_jax.worlds import shapes as S
from tests.worlds.conftest import records


def test_references_are_unambiguous_and_shortest():
    for record in records("train", 3000)[:2000] + records("heldout", 600):
        edit = record.edit
        fields = S.parse_instruction(record.instruction)[0][2]
        pairs = [(edit.ref, edit.target, "ref"), (edit.other_ref, edit.other, "ref2")]
        for ref, index, field in pairs:
            if index is None:
                assert ref is None
                continue
            assert S.resolve(record.before, ref) == (index,), record.instruction
            assert fields[field] == ref.text()
            # No description with fewer attributes names the shape alone.
            shape = record.before.shapes[index]
            count = sum(value is not None for value in (ref.colour, ref.size, ref.position))
            for colour, size, position in itertools.product(
                (None, shape.colour), (None, shape.size), (None, *S.POSITIONS)
            ):
                if sum(value is not None for value in (colour, size, position)) < count:
                    shorter = S.Ref(shape.kind, colour, size, position)
                    assert S.resolve(record.before, shorter) != (index,), record.instruction


def test_referring_expressions_on_hand_made_scenes():
    red = S.Shape("circle", "red", "small", 0.25, 0.5)
    blue = S.Shape("circle", "blue", "small", 0.75, 0.5)
    twin = S.Shape("circle", "red", "small", 0.75, 0.5)
    assert S.refer(S.Scene((red, blue), "white"), 0) == S.Ref("circle", "red")
    assert S.refer(S.Scene((red, twin), "white"), 1) == S.Ref("circle", position="right")
    assert S.refer(S.Scene((red, twin), "white"), 1).text() == "the right circle"
    close = S.Shape("circle", "red", "small", 0.4, 0.65)  # within POSITION_GAP both ways
    assert S.refer(S.Scene((red, close), "white"), 0) is None
    lone = S.Scene((S.Shape("star", "green", "large", 0.5, 0.5),), "white")
    assert S.refer(lone, 0).text() == "the star"
