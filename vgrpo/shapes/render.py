"""Draws GenEval-Shapes scenes (docs/geneval-shapes.md "Images"): flat shapes on the grey background,
anti-aliased by supersampling, and random scenes that respect the spec's size, gap and border rules."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from vgrpo.reward_servers.shapes.spec import (
    BACKGROUND,
    COLORS,
    MAX_SIDE,
    MIN_BORDER,
    MIN_GAP,
    MIN_SIDE,
    SHAPES,
    Scene,
    SceneObject,
    inside,
    scale,
)

# a placement check: (candidate, objects placed so far, index of the candidate) -> accept?
PlacementCheck = Callable[[SceneObject, list[SceneObject], int], bool]


def coverage(obj: SceneObject, x0: int, y0: int, w: int, h: int, supersample: int = 4) -> np.ndarray:
    """Fraction of each pixel of the window [x0, x0+w) x [y0, y0+h) that `obj` covers (h x w floats),
    estimated on a supersample x supersample grid of sub-pixel centres."""
    ss = supersample
    sub = (np.arange(ss) + 0.5) / ss
    xs = (np.arange(x0, x0 + w)[:, None] + sub[None, :]).reshape(-1) - obj.cx
    ys = (np.arange(y0, y0 + h)[:, None] + sub[None, :]).reshape(-1) - obj.cy
    hit = inside(obj.shape, xs[None, :], ys[:, None], obj.size)
    return hit.reshape(h, ss, w, ss).mean(axis=(1, 3))


def render_scene(scene: Scene, supersample: int = 4) -> np.ndarray:
    """The scene as a uint8 H x W x 3 image: each object's colour blended over the grey background by its
    pixel coverage (objects never overlap, so the order does not matter)."""
    n = scene.size
    img = np.empty((n, n, 3), np.float64)
    img[:] = BACKGROUND
    for obj in scene.objects:
        bx0, by0, bx1, by1 = obj.bbox
        x0, y0 = max(int(np.floor(bx0)), 0), max(int(np.floor(by0)), 0)
        x1, y1 = min(int(np.ceil(bx1)), n), min(int(np.ceil(by1)), n)
        if x1 <= x0 or y1 <= y0:
            continue
        cov = coverage(obj, x0, y0, x1 - x0, y1 - y0, supersample)[..., None]
        win = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = win * (1 - cov) + np.asarray(COLORS[obj.color], np.float64) * cov
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def place_objects(
    rng: np.random.Generator,
    items: Sequence[tuple[str, str]],
    size: int = 64,
    check: PlacementCheck | None = None,
    tries: int = 400,
    sides: tuple[float, float] = (MIN_SIDE, MAX_SIDE),
) -> list[SceneObject]:
    """Places (shape, colour) items one by one at random: box side uniform in the spec's 12-28 px (scaled;
    `sides` narrows the range, e.g. larger objects for pretraining), the box at least 1 px from the border,
    and every object at least 2 px (pixel distance) from the shapes already placed; `check` may veto a
    candidate (e.g. a required relation). Sides shrink towards the minimum as tries fail, so crowded scenes
    (four objects and a distractor) still fit. Raises RuntimeError if the items cannot be placed."""
    k = scale(size)
    lo, hi = sides[0] * k, sides[1] * k
    border = MIN_BORDER * k
    ss = max(1, int(np.ceil(4 / k)))  # sub-pixel grid: a quarter of a 64 px image's pixel, or finer
    gap = MIN_GAP * k * ss  # the spec's gap in sub-pixels
    pad = int(np.ceil(gap))
    for _ in range(20):  # restarts of the whole scene
        taken = np.zeros((size * ss + 2 * pad, size * ss + 2 * pad), bool)  # dilated footprints, padded
        placed: list[SceneObject] = []
        for i, (shape, color) in enumerate(items):
            for t in range(tries):
                side = rng.uniform(lo, hi - (hi - lo) * min(1.0, t / (0.5 * tries)))
                half = side / 2
                cx = rng.uniform(border + half, size - border - half)
                cy = rng.uniform(border + half, size - border - half)
                obj = SceneObject(shape, color, float(cx), float(cy), float(side))
                x0, y0 = int(np.floor(cx - half)), int(np.floor(cy - half))
                w, h = int(np.ceil(cx + half)) - x0, int(np.ceil(cy + half)) - y0
                sub = inside(  # the candidate on the sub-pixel grid of its box window
                    shape,
                    (x0 + (np.arange(w * ss) + 0.5) / ss - cx)[None, :],
                    (y0 + (np.arange(h * ss) + 0.5) / ss - cy)[:, None],
                    side,
                )
                if not sub.any():
                    continue
                win = (slice(y0 * ss + pad, (y0 + h) * ss + pad), slice(x0 * ss + pad, (x0 + w) * ss + pad))
                if (taken[win] & sub).any() or (check is not None and not check(obj, placed, i)):
                    continue
                grown = ndimage.distance_transform_edt(~np.pad(sub, pad)) <= gap
                taken[y0 * ss : (y0 + h) * ss + 2 * pad, x0 * ss : (x0 + w) * ss + 2 * pad] |= grown
                placed.append(obj)
                break
            else:
                break
        if len(placed) == len(items):
            return placed
    raise RuntimeError(f"could not place {len(items)} objects in a {size} px image")


def random_scene(
    rng: np.random.Generator,
    n_objects: int,
    size: int = 64,
    shapes: Sequence[str] = SHAPES,
    colors: Sequence[str] = tuple(COLORS),
) -> Scene:
    """A scene of `n_objects` shapes and colours drawn uniformly from `shapes` and `colors`, placed by
    `place_objects` (non-overlapping, >= 2 px apart, >= 1 px from the border, sides 12-28 px at 64 px)."""
    items = [(str(rng.choice(shapes)), str(rng.choice(colors))) for _ in range(n_objects)]
    return Scene(place_objects(rng, items, size), size)


# slot layouts (at 64 px): one centred object, a pair side by side or one above the other, or three or
# four in the quadrants. Per layout: slot centres, box-side range and jitter (px) per arrangement, chosen so
# that every pair stays >= 2 px apart and every box >= 1 px from the border. "slots" makes objects as large
# as the spec allows where they fit (a tiny model draws a cross or a ring more cleanly over more latent
# pixels); "slots_compact" is smaller and nearer the centre (an intermediate stage of the shipped model).
SlotLayout = tuple[dict[str, list[tuple[float, float]]], dict[str, tuple[float, float]], dict[str, float]]
SLOT_LAYOUTS: dict[str, SlotLayout] = {
    "slots": (
        {
            "single": [(32.0, 32.0)],
            "h": [(16.0, 32.0), (48.0, 32.0)],  # left, right
            "v": [(32.0, 16.0), (32.0, 48.0)],  # top, bottom
            "quad": [(16.0, 16.0), (48.0, 16.0), (16.0, 48.0), (48.0, 48.0)],
        },
        {"single": (22.0, 28.0), "h": (20.0, 27.0), "v": (20.0, 27.0), "quad": (20.0, 27.0)},
        {"single": 4.0, "h": 1.0, "v": 1.0, "quad": 1.0},
    ),
    "slots_compact": (
        {
            "single": [(32.0, 32.0)],
            "h": [(18.0, 32.0), (46.0, 32.0)],
            "v": [(32.0, 18.0), (32.0, 46.0)],
            "quad": [(17.0, 17.0), (47.0, 17.0), (17.0, 47.0), (47.0, 47.0)],
        },
        {"single": (20.0, 28.0), "h": (16.0, 22.0), "v": (16.0, 22.0), "quad": (16.0, 22.0)},
        {"single": 4.0, "h": 2.0, "v": 2.0, "quad": 2.0},
    ),
}
LAYOUTS = ("random", *SLOT_LAYOUTS)  # scene_for_prompt's layouts: anywhere the spec allows, or in slots


def place_in_slots(
    rng: np.random.Generator,
    items: Sequence[tuple[str, str]],
    size: int = 64,
    arrangement: str | None = None,
    layout: str = "slots",
) -> list[SceneObject]:
    """Places 1-4 (shape, colour) items in a slot layout (``SLOT_LAYOUTS[layout]``) instead of anywhere: a
    low-entropy scene distribution that a tiny model learns to draw cleanly (pretraining data; the spec's
    rules hold: boxes within 12-28 px, >= 2 px apart, >= 1 px from the border). ``arrangement`` ("h":
    items[0] left of items[1]; "v": items[0] above items[1]) is for a required relation; otherwise a pair is
    side by side or stacked, in random order, and three items take three random quadrants."""
    n = len(items)
    if not 1 <= n <= 4:
        raise ValueError(f"slot layouts hold 1-4 objects, not {n}")
    if n == 1:
        kind, slots = "single", [0]
    elif n == 2:
        kind = arrangement or ("h" if rng.random() < 0.5 else "v")
        slots = [0, 1] if arrangement or rng.random() < 0.5 else [1, 0]
    else:
        kind, slots = "quad", [int(i) for i in rng.permutation(4)[:n]]
    k = scale(size)
    centres, sides, jitters = SLOT_LAYOUTS[layout]
    lo, hi = sides[kind]
    placed = []
    for (shape, color), slot in zip(items, slots, strict=True):
        cx, cy = centres[kind][slot]
        dx, dy = rng.uniform(-jitters[kind], jitters[kind], 2)
        side = rng.uniform(lo, hi)
        placed.append(SceneObject(shape, color, float((cx + dx) * k), float((cy + dy) * k), float(side * k)))
    return placed
