"""Vocabulary of the GenEval-Shapes world (DESIGN section 3).

Eight shape classes with clearly different silhouettes, GenEval's ten colours, its
four relations and counts 2 to 4. Colours are sRGB triples (uint8, 0-255).
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "diamond",
    "star",
    "cross",
    "heart",
    "crescent",
)

#: GenEval's ten colours, in GenEval's order (``prompts/create_prompts.py``).
COLORS: tuple[str, ...] = (
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
)

#: Canonical sRGB value of each colour as the renderer draws it (before jitter).
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 50),
    "blue": (30, 70, 220),
    "purple": (130, 40, 180),
    "pink": (250, 140, 200),
    "brown": (120, 70, 25),
    "black": (15, 15, 15),
    "white": (250, 250, 250),
}

#: GenEval's four relations, in GenEval's order.
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

#: Number words GenEval uses for counting prompts (index = count).
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four")

MIN_COUNT, MAX_COUNT = 2, 4

#: Plain background of every scene (sRGB uint8); none of the ten colours is grey.
BACKGROUND_RGB: tuple[int, int, int] = (128, 128, 128)

#: Side of a rendered scene, pixels.
IMAGE_SIZE = 64
