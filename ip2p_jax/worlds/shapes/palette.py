"""What a shape can be: its colour, kind and size names."""

from __future__ import annotations

# Far apart in RGB, and no 2-way blend (k/16 of one, the rest another) comes near a third.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 50),
    "green": (40, 160, 70),
    "blue": (40, 90, 220),
    "purple": (140, 60, 180),
    "pink": (250, 150, 200),
    "cyan": (40, 200, 220),
    "brown": (130, 80, 40),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPE_KINDS = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross")
SIZES: dict[str, float] = {"small": 0.08, "medium": 0.11, "large": 0.15}  # radius / side
SIZE_ORDER = tuple(SIZES)
