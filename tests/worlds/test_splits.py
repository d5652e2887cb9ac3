"""Splits: held-out combinations and phrasings appear only in the heldout split, and there
always."""

from __future__ import annotations

import string

from ip2p_jax.worlds import shapes as S
from tests.worlds.conftest import records


def heldout_phrases() -> list[str]:
    """'purple circle' style strings for the held-out pairs."""
    return [f"{colour} {kind}" for colour, kind in S.HELDOUT_COMBOS]


def test_train_and_validation_never_show_heldout_combos_or_phrasings():
    assert len(S.HELDOUT_COMBOS) == 4
    assert all(1 <= len(templates) <= 2 for templates in S.HELDOUT_TEMPLATES.values())
    assert set(S.HELDOUT_TEMPLATES) == set(S.EDIT_KINDS)
    held = set(S.HELDOUT_COMBOS)
    for record in records("train", 3000) + records("validation", 1500):
        before, after, edit = S.decode_annotations(record.annotations(64))
        combos = {shape.combo for shape in before.shapes + after.shapes}
        if edit.shape is not None:
            combos.add(edit.shape.combo)
        assert not combos & held, record.key
        assert not S.is_heldout_template(record.template), record.key
        ((_, template, _),) = S.parse_instruction(record.instruction)
        assert not S.is_heldout_template(template)
        texts = (record.instruction, record.input_caption, record.edited_caption)
        for text in texts:
            assert not any(phrase in text for phrase in heldout_phrases()), text


def test_heldout_split_uses_heldout_combos_and_phrasings():
    sample = records("heldout", 600)
    held = set(S.HELDOUT_COMBOS)
    seen_combos, seen_templates, touching = set(), set(), 0
    for record in sample:
        assert S.is_heldout_template(record.template), record.instruction
        ((kind, template, _),) = S.parse_instruction(record.instruction)
        assert (kind, template) == (record.edit.kind, record.template)
        in_before = {shape.combo for shape in record.before.shapes} & held
        assert in_before, record.key
        seen_combos |= in_before
        seen_templates.add(record.template)
        touching += bool(S.touched_combos(record.before, record.edit) & held)
    assert seen_combos == held
    assert seen_templates == {t for ts in S.HELDOUT_TEMPLATES.values() for t in ts}
    assert touching >= 0.7 * len(sample)  # the edit itself mostly acts on a held-out pair


def test_heldout_phrasings_are_new_orders_of_words_the_train_split_uses():
    """A model trained from scratch can't know a word it never read: the held-out phrasings
    recombine training words, and none of their instructions is a training instruction."""
    train = records("train", 3000)
    train_words = {word for r in train for word in r.instruction.split()}
    train_instructions = {r.instruction for r in train}
    heldout = records("heldout", 600)
    for record in heldout:
        assert set(record.instruction.split()) <= train_words, record.instruction
        assert record.instruction not in train_instructions
    train_templates = {t for ts in S.TRAIN_TEMPLATES.values() for t in ts}
    assert not train_templates & {t for ts in S.HELDOUT_TEMPLATES.values() for t in ts}


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def test_each_heldout_phrasing_has_a_training_counterpart_with_the_same_fields():
    heldout = {t: kind for kind, ts in S.HELDOUT_TEMPLATES.items() for t in ts}
    assert set(S.TRAIN_COUNTERPARTS) == set(heldout)
    for template, counterpart in S.TRAIN_COUNTERPARTS.items():
        assert counterpart in S.TRAIN_TEMPLATES[heldout[template]], template
        assert _fields(counterpart) == _fields(template), template


def test_train_phrasing_rewords_a_heldout_edit_and_keeps_its_scenes():
    for record in records("heldout", 300):
        reworded = S.in_train_phrasing(record)
        assert reworded.template == S.TRAIN_COUNTERPARTS[record.template]
        assert (reworded.before, reworded.after, reworded.edit) == (
            record.before,
            record.after,
            record.edit,
        )
        ((kind, template, _),) = S.parse_instruction(reworded.instruction)
        assert (kind, template) == (record.edit.kind, reworded.template)
    train = records("train", 50)
    assert [S.in_train_phrasing(record) for record in train] == list(train)
