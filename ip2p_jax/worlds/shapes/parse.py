"""Reading an instruction back: which template wrote it, with which fillers."""

from __future__ import annotations

import re
from typing import Any

from ip2p_jax.worlds.shapes.edits import DIRECTIONS
from ip2p_jax.worlds.shapes.palette import COLOURS, SHAPE_KINDS, SIZES
from ip2p_jax.worlds.shapes.referring import POSITION_WORDS
from ip2p_jax.worlds.shapes.templates import (
    DIR_TO,
    HELDOUT_TEMPLATES,
    REGION_PHRASES,
    RESIZE_WORDS,
    TRAIN_TEMPLATES,
)


def _alternatives(words: Any) -> str:
    return "(?:" + "|".join(re.escape(word) for word in words) + ")"


_REF_PATTERN = (
    f"the (?:{_alternatives(POSITION_WORDS.values())} )?(?:{_alternatives(SIZES)} )?"
    f"(?:{_alternatives(COLOURS)} )?{_alternatives(SHAPE_KINDS)}"
)
_COLOUR_KIND = f"{_alternatives(COLOURS)} {_alternatives(SHAPE_KINDS)}"
_FIELD_PATTERNS = {
    "ref": _REF_PATTERN,
    "ref2": _REF_PATTERN,
    "colour": _alternatives(COLOURS),
    "obj": f"an? {_COLOUR_KIND}",
    "obj_sized": f"an? {_alternatives(SIZES)} {_COLOUR_KIND}",
    "where": _alternatives(phrase for row in REGION_PHRASES for phrase in row),
    "dir": _alternatives(DIRECTIONS),
    "dir_to": _alternatives(DIR_TO.values()),
    **{
        name: _alternatives(words[name] for words in RESIZE_WORDS.values())
        for name in ("comparative", "verb", "change")
    },
}


def _template_regex(template: str) -> re.Pattern[str]:
    pieces = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    pattern = "".join(
        re.escape(piece) if i % 2 == 0 else f"(?P<{piece}>{_FIELD_PATTERNS[piece]})"
        for i, piece in enumerate(pieces)
    )
    return re.compile(pattern)


_TEMPLATE_REGEXES = [
    (kind, template, _template_regex(template))
    for table in (TRAIN_TEMPLATES, HELDOUT_TEMPLATES)
    for kind, templates in table.items()
    for template in templates
]


def parse_instruction(text: str) -> list[tuple[str, str, dict[str, str]]]:
    """Every (edit kind, template, filled fields) whose template matches all of `text`;
    exactly one for any instruction that instruction_text writes."""
    found = []
    for kind, template, regex in _TEMPLATE_REGEXES:
        match = regex.fullmatch(text)
        if match is not None:
            found.append((kind, template, match.groupdict()))
    return found
