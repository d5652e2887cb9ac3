"""The instruction phrasings of each edit kind (train and held-out), and the words that
fill their placeholders."""

from __future__ import annotations

# Placeholders: ref/ref2 (a referring expression), colour, obj ("a red
# circle"), obj_sized ("a large red circle"), where ("in the top left"), dir (left/up/...),
# dir_to ("to the left"/"up"), comparative/verb/change (bigger/enlarge/increase or
# smaller/shrink/reduce). Every instruction matches exactly one template (tested).
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
# New phrasings built only from words the train phrasings and fillers use: a model trained
# from scratch knows no word it never read, so "erase" could test only luck. These test
# whether it learned the words' roles (a verb with a new object or order, "the colour of"
# moved from shapes to the background), as a pretrained text encoder would let real models.
HELDOUT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolour": ("make the colour of {ref} {colour}", "turn the colour of {ref} to {colour}"),
    "add": ("put {obj_sized} {where}",),
    "remove": ("take {ref} away",),
    "move": ("take {ref} {dir_to}",),
    "resize": ("make the size of {ref} {comparative}",),
    "background": ("change the colour of the background to {colour}",),
    "swap": ("switch {ref} and {ref2}",),
}

# Each held-out phrasing's nearest training phrasing: the same words for the same fields, with
# the held-out twist undone. `ip2p eval shapes --train-phrasing` says the held-out edits this
# way, so the held-out score splits into what new phrasings cost and what new pairs cost.
TRAIN_COUNTERPARTS: dict[str, str] = {
    "make the colour of {ref} {colour}": "make {ref} {colour}",
    "turn the colour of {ref} to {colour}": "turn {ref} {colour}",
    "put {obj_sized} {where}": "add {obj_sized} {where}",
    "take {ref} away": "take away {ref}",
    "take {ref} {dir_to}": "move {ref} {dir_to}",
    "make the size of {ref} {comparative}": "make {ref} {comparative}",
    "change the colour of the background to {colour}": "change the background to {colour}",
    "switch {ref} and {ref2}": "swap {ref} and {ref2}",
}

DIR_TO = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
RESIZE_WORDS = {
    "bigger": {"comparative": "bigger", "verb": "enlarge", "change": "increase"},
    "smaller": {"comparative": "smaller", "verb": "shrink", "change": "reduce"},
}
REGION_PHRASES = (  # 3 x 3 regions by thirds of the image, row-major from the top left
    ("in the top left", "at the top", "in the top right"),
    ("on the left", "in the middle", "on the right"),
    ("in the bottom left", "at the bottom", "in the bottom right"),
)


def is_heldout_template(template: str) -> bool:
    """True for the phrasings reserved for the heldout split."""
    return any(template in templates for templates in HELDOUT_TEMPLATES.values())
