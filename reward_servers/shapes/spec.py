"""The GenEval-Shapes vocabulary and geometry (docs/geneval-shapes.md, "Vocabulary" and
"Images"). The renderer, the prompt generator, the detector and the reward all read their constants and
their one geometric rule (GenEval's position rule) from here, so that they cannot drift apart."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 60),
    "orange": (255, 140, 0),
    "yellow": (255, 215, 0),
    "green": (34, 139, 34),
    "blue": (30, 80, 220),
    "purple": (128, 0, 160),
    "pink": (255, 105, 180),
    "brown": (139, 69, 19),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
}
COUNTS: dict[str, int] = {"two": 2, "three": 3, "four": 4}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
FAMILIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
BACKGROUND = (128, 128, 128)

REFERENCE_SIZE = 64  # the image size the pixel figures of the spec are given at
MIN_SIDE, MAX_SIDE = 12.0, 28.0  # bounding-box side range at REFERENCE_SIZE
MIN_GAP, MIN_BORDER = 2.0, 1.0  # px between objects' pixels, and from the image border


def scale(size: int) -> float:
    """Spec figures are given at 64 px and scale proportionally with the image size."""
    return size / REFERENCE_SIZE


@dataclass(frozen=True)
class SceneObject:
    """One filled shape: `cx, cy` the centre of its bounding box and `size` the box side, in pixels
    (x right, y down; pixel (i, j) covers [i, i+1) x [j, j+1))."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass
class Scene:
    objects: list[SceneObject] = field(default_factory=list)
    size: int = REFERENCE_SIZE


def inside(shape: str, dx: np.ndarray, dy: np.ndarray, side: float) -> np.ndarray:
    """Whether points at offset (dx, dy) from the box centre lie in `shape` of box side `side` (spec
    "Geometry")."""
    h = side / 2
    if shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape == "ring":
        r2 = dx * dx + dy * dy
        return (r2 <= h * h) & (r2 >= (h / 2) ** 2)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= h
    if shape == "triangle":  # apex at the top middle, base = height = side along the bottom edge
        return (dy <= h) & (np.abs(dx) <= (dy + h) / 2)
    if shape == "cross":  # two arms spanning the box, side/3 wide
        a = side / 6
        return ((np.abs(dx) <= a) & (np.abs(dy) <= h)) | ((np.abs(dy) <= a) & (np.abs(dx) <= h))
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


POSITION_MARGIN = 0.1  # GenEval's position threshold: 0.1 x the summed box sizes, per axis


def relation_direction(
    c1: tuple[float, float],
    d1: tuple[float, float],
    c2: tuple[float, float],
    d2: tuple[float, float],
    margin: float = POSITION_MARGIN,
) -> tuple[float, float] | None:
    """GenEval's position rule (docs/algorithms.md §7.1): `off = c1 - c2`, per axis
    `rev = max(|off| - margin (d1 + d2), 0) sign(off)` with the box widths on x and heights on y;
    None when both are ~0 (no relation), else `rev / ||off||` (y grows downwards). The one implementation
    of the rule: the shapes reward and GenEval's (`reward_servers/geneval.py`) both call it."""
    off = (c1[0] - c2[0], c1[1] - c2[1])
    rev = [max(abs(off[i]) - margin * (d1[i] + d2[i]), 0.0) * math.copysign(1.0, off[i]) for i in (0, 1)]
    norm = math.hypot(*off)
    if (abs(rev[0]) < 1e-3 and abs(rev[1]) < 1e-3) or norm == 0:
        return None
    return rev[0] / norm, rev[1] / norm


def relations(
    c1: tuple[float, float],
    d1: tuple[float, float],
    c2: tuple[float, float],
    d2: tuple[float, float],
    margin: float = POSITION_MARGIN,
) -> set[str]:
    """The relations of object 1 to object 2 under GenEval's rule (several may hold at once)."""
    d = relation_direction(c1, d1, c2, d2, margin)
    if d is None:
        return set()
    dx, dy = d
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


def with_article(word: str) -> str:
    """GenEval's `with_article`: `an` before a vowel, `a` otherwise."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def plural(shape: str) -> str:
    """`crosses`; every other shape adds `s`."""
    return shape + "es" if shape.endswith("s") else shape + "s"
