"""The instruction phrasings of each edit kind (train and held-out), and the words that
fill their placeholders."""

from __future__ import annotations

# Placeholders: ref/ref2 (a referring expression), colour, a_colour ("an orange"), obj ("a red
# circle"), obj_sized ("a large red circle"), where ("in the top left"), dir (left/up/...),
# dir_to ("to the left"/"up"), comparative/verb/change/updown (bigger/enlarge/increase/up or
# smaller/shrink/reduce/down). Every instruction matches exactly one template (tested).
TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolour": (
        "make {ref} {colour}",
        "turn {ref} {colour}",
        "paint {ref} {colour}",
        "change the colour of {ref} to {colour}",
        "recolor {ref} {colour}",
    ),
    "add": ("add {obj}", "add {obj_sized} {where}", "put {obj} {where}", "draw {obj} {where}"),
    "remove": ("remove {ref}", "delete {ref}", "take away {ref}", "get rid of {ref}"),
    "move": ("move {ref} {dir_to}", "shift {ref} {dir}", "nudge {ref} {dir}"),
    "resize": ("make {ref} {comparative}", "{verb} {ref}", "{change} the size of {ref}"),
    "background": (
        "make the background {colour}",
        "change the background to {colour}",
        "paint the background {colour}",
        "turn the background {colour}",
    ),
    "swap": (
        "swap {ref} and {ref2}",
        "switch the positions of {ref} and {ref2}",
        "swap the positions of {ref} and {ref2}",
        "make {ref} and {ref2} change places",
    ),
}
# Each uses a word no train phrasing has (dye, should be, insert, erase, slide, scale,
# picture, backdrop, trade).
HELDOUT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolour": ("dye {ref} {colour}", "{ref} should be {colour} instead"),
    "add": ("insert {obj} {where}",),
    "remove": ("erase {ref}",),
    "move": ("slide {ref} {dir}",),
    "resize": ("scale {ref} {updown}",),
    "background": ("give the picture {a_colour} background", "use {a_colour} backdrop"),
    "swap": ("let {ref} and {ref2} trade places",),
}

DIR_TO = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
RESIZE_WORDS = {
    "bigger": {"comparative": "bigger", "verb": "enlarge", "change": "increase", "updown": "up"},
    "smaller": {"comparative": "smaller", "verb": "shrink", "change": "reduce", "updown": "down"},
}
REGION_PHRASES = (  # 3 x 3 regions by thirds of the image, row-major from the top left
    ("in the top left", "at the top", "in the top right"),
    ("on the left", "in the middle", "on the right"),
    ("in the bottom left", "at the bottom", "in the bottom right"),
)


def is_heldout_template(template: str) -> bool:
    """True for the phrasings reserved for the heldout split."""
    return any(template in templates for templates in HELDOUT_TEMPLATES.values())
