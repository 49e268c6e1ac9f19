"""GenEval-Shapes prompt generation (docs/geneval-shapes.md "Prompts"): random prompts, scenes that satisfy
them (and near misses that do not), and the fixed, disjoint training / held-out splits in GenEval's
metadata format. The grammar itself (wording, parsing) is the reward's: `reward_servers/shapes/grammar.py`."""

from __future__ import annotations

import json
from itertools import combinations, permutations
from pathlib import Path

import numpy as np

from vgrpo.reward_servers.shapes.grammar import (
    OPPOSITE,
    ParsedPrompt,
    parse_prompt,
    prompt_text,
)
from vgrpo.reward_servers.shapes.spec import (
    COLORS,
    COUNTS,
    MAX_SIDE,
    MIN_SIDE,
    RELATIONS,
    SHAPES,
    Scene,
    SceneObject,
    relation_direction,
    scale,
)
from vgrpo.shapes.render import LAYOUTS, SLOT_LAYOUTS, PlacementCheck, place_in_slots, place_objects

SPLIT_SEED = 20231017  # GenEval's arXiv date; the splits are a pure function of it
SPLITS_DIR = Path(__file__).resolve().parents[1] / "assets" / "shapes"


def make_prompt(family: str, rng: np.random.Generator) -> str:
    """A random prompt of `family` over the whole vocabulary (not restricted to a split)."""
    s = [str(x) for x in rng.choice(SHAPES, 2, replace=False)]
    c = [str(x) for x in rng.choice(list(COLORS), 2, replace=False)]
    return prompt_text(family, s, c, int(rng.choice(list(COUNTS.values()))), str(rng.choice(RELATIONS)))


def _relation_is_clear(relation: str, margin: float, size: int) -> PlacementCheck:
    """A placement check: the candidate (object 1) stands `relation` the first object placed, with GenEval's
    direction beyond 0.5 + `margin` and the margin-reduced offset >= 2 px, so that the ~1 px by which a
    detected box can differ from the drawn one cannot flip it."""
    axis, sign = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}[relation]

    def check(obj: SceneObject, placed: list[SceneObject], index: int) -> bool:
        if index != 1:
            return True
        ref = placed[0]
        c1, c2 = (obj.cx, obj.cy), (ref.cx, ref.cy)
        d = relation_direction(c1, (obj.size, obj.size), c2, (ref.size, ref.size))
        gap = abs(c1[axis] - c2[axis]) - 0.1 * (obj.size + ref.size)
        return d is not None and sign * d[axis] > 0.5 + margin and gap >= 2 * scale(size)

    return check


def scene_for_prompt(
    prompt: str,
    rng: np.random.Generator,
    size: int = 64,
    max_distractors: int = 1,
    sides: tuple[float, float] = (MIN_SIDE, MAX_SIDE),
    layout: str = "random",
) -> Scene:
    """A random scene that passes `prompt`, plus up to `max_distractors` objects of shapes the prompt does
    not name (so they cannot break it: none of a counted shape beyond the count, no second instance that
    could put a relation in doubt under GenEval's every-instance reading). A ``layout`` of
    ``render.SLOT_LAYOUTS`` places the objects with ``render.place_in_slots`` (no distractors, ``sides``
    unused)."""
    p = parse_prompt(prompt)
    named = [c.shape for c in p.clauses if c.kind == "present"]
    colours = {c.shape: c.color for c in p.clauses if c.kind == "color"}
    count = next((c.count for c in p.clauses if c.kind == "count"), 1)
    palette = list(COLORS)
    items = [(s, colours.get(s) or str(rng.choice(palette))) for s in named for _ in range(count)]
    check = None
    rel = next((c for c in p.clauses if c.kind == "relation"), None)
    if rel is not None:  # place the reference first, then object 1 where the relation clearly holds
        items = [(rel.other or "", str(rng.choice(palette))), (rel.shape, str(rng.choice(palette)))]
        check = _relation_is_clear(str(rel.relation), 0.15, size)
    if layout in SLOT_LAYOUTS:  # no distractors; a relation sets the pair's arrangement
        arrangement = None
        if rel is not None:
            arrangement = "h" if rel.relation in ("left of", "right of") else "v"
            if rel.relation in ("left of", "above"):  # object 1 first: left / top
                items = items[::-1]
        return Scene(place_in_slots(rng, items, size, arrangement, layout), size)
    if layout != "random":
        raise ValueError(f"layout {layout!r}: want one of {', '.join(LAYOUTS)}")
    others = [s for s in SHAPES if s not in named]
    for _ in range(int(rng.integers(0, max_distractors + 1))):
        items.append((str(rng.choice(others)), str(rng.choice(palette))))
    return Scene(place_objects(rng, items, size, check, sides=sides), size)


def _prompt_parts(p: ParsedPrompt) -> tuple[list[str], list[str], int, str]:
    """The arguments of `prompt_text` that `p` was written from: named shapes, colours, count, relation."""
    named = [c.shape for c in p.clauses if c.kind == "present"]
    colours = [c.color or "" for c in p.clauses if c.kind == "color"]
    count = next((c.count for c in p.clauses if c.kind == "count"), 1)
    relation = next((str(c.relation) for c in p.clauses if c.kind == "relation"), "")
    return named, colours, count, relation


def violate_prompt(prompt: str, scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """A prompt one word away from `prompt` that `scene` (which passes `prompt`) fails, and the kind of
    violation: `missing_object` (a shape absent from the scene), `wrong_color` (a colour no instance of that
    shape has), `wrong_count` or `swapped_relation` (the opposite relation). For tests and benchmarks."""
    p = parse_prompt(prompt)
    present = {o.shape for o in scene.objects}
    named, colours, count, relation = _prompt_parts(p)
    absent = [s for s in SHAPES if s not in present and s not in named]
    kinds = ["missing_object"] if absent else []
    if p.family in ("colors", "color_attr"):
        kinds.append("wrong_color")
    if p.family == "counting":
        kinds.append("wrong_count")
    if p.family == "position":
        kinds.append("swapped_relation")
    if not kinds:
        raise ValueError(f"every shape appears in the scene, so no one-word change of {prompt!r} is false")
    kind = str(rng.choice(kinds))
    i = int(rng.integers(len(named)))
    if kind == "missing_object":
        named[i] = str(rng.choice(absent))
    elif kind == "wrong_color":
        i = int(rng.integers(len(colours)))
        worn = {o.color for o in scene.objects if o.shape == named[i]}
        colours[i] = str(rng.choice([c for c in COLORS if c not in worn and c not in colours]))
    elif kind == "wrong_count":
        count = int(rng.choice([n for n in COUNTS.values() if n != count]))
    else:
        relation = OPPOSITE[relation]
    return prompt_text(p.family, named, colours, count, relation), kind


NEAR_MISSES = {
    "single_object": ("wrong_shape",),
    "two_object": ("missing_object", "wrong_shape"),
    "counting": ("wrong_count", "wrong_shape"),
    "colors": ("wrong_color", "wrong_shape"),
    "position": ("swapped_relation", "wrong_shape"),
    "color_attr": ("swapped_colors", "wrong_shape"),
}


def near_miss_prompt(prompt: str, rng: np.random.Generator) -> tuple[str, str]:
    """A prompt that fails `prompt` the way a text-to-image model typically does (GenEval's failure modes,
    one clause wrong): one named shape drawn as another (`wrong_shape`, any family) or, by family, one of
    the two objects left out (`two_object`), another count, another colour (`colors`), the opposite
    relation (`position`), the two colours swapped (`color_attr`, a binding error). The kind is drawn
    uniformly among the family's (`NEAR_MISSES`). Returns the near-miss prompt (to draw a scene for) and
    its kind."""
    p = parse_prompt(prompt)
    named, colours, count, relation = _prompt_parts(p)
    family = p.family
    kind = str(rng.choice(NEAR_MISSES[family]))
    if kind == "wrong_shape":
        named[int(rng.integers(len(named)))] = str(rng.choice([s for s in SHAPES if s not in named]))
    elif kind == "missing_object":
        family, named = "single_object", [named[int(rng.integers(2))]]
    elif kind == "wrong_count":
        count = int(rng.choice([n for n in COUNTS.values() if n != count]))
    elif kind == "wrong_color":
        colours = [str(rng.choice([c for c in COLORS if c != colours[0]]))]
    elif kind == "swapped_relation":
        relation = OPPOSITE[relation]
    else:
        colours = colours[::-1]
    return prompt_text(family, named, colours, count, relation), kind


def build_splits(seed: int = SPLIT_SEED) -> dict[str, list[dict]]:
    """The training and held-out prompt sets, a pure function of `seed`. The held-out split holds
    combinations never seen in training, as GenEval's test prompts are: an unordered shape pair
    (two_object), a (shape, count), a (colour, shape), a spatial configuration (`A left of B` and `B right
    of A` are one configuration) or an unordered pair of (colour, shape) objects (color_attr) belongs to one
    split only. single_object has only six prompts; all six are held out (the other families teach every
    shape). Sizes: held-out 6 / 10 / 6 / 20 / 20 / 30 prompts, training 0 / 20 / 12 / 40 / 100 / 250."""
    rng = np.random.default_rng(seed)
    train: list[str] = []
    held: list[str] = []

    def split(combos: list, n_held: int) -> tuple[list, list]:
        order = rng.permutation(len(combos))
        return [combos[i] for i in order[:n_held]], [combos[i] for i in order[n_held:]]

    held += [prompt_text("single_object", [s]) for s in SHAPES]
    h, t = split(list(combinations(SHAPES, 2)), 5)
    for dst, pairs in ((held, h), (train, t)):
        dst += [prompt_text("two_object", list(p)) for pair in pairs for p in (pair, pair[::-1])]
    h, t = split([(s, n) for s in SHAPES for n in COUNTS.values()], 6)
    for dst, sc in ((held, h), (train, t)):
        dst += [prompt_text("counting", [s], count=n) for s, n in sc]
    h, t = split([(c, s) for c in COLORS for s in SHAPES], 20)
    for dst, cs in ((held, h), (train, t)):
        dst += [prompt_text("colors", [s], [c]) for c, s in cs]
    h, t = split([(a, b, ax) for a, b in permutations(SHAPES, 2) for ax in ("left of", "above")], 10)
    for dst, cfgs in ((held, h), (train, t)):
        for a, b, rel in cfgs:
            dst += [
                prompt_text("position", [a, b], relation=rel),
                prompt_text("position", [b, a], relation=OPPOSITE[rel]),
            ]
    objects = [(c, s) for c in COLORS for s in SHAPES]
    pairs = [(o1, o2) for o1, o2 in combinations(objects, 2) if o1[0] != o2[0] and o1[1] != o2[1]]
    h, t = split(pairs, 30)
    for dst, chosen in ((held, h), (train, t[:250])):
        for pair in chosen:
            (c1, s1), (c2, s2) = pair if rng.random() < 0.5 else pair[::-1]
            dst.append(prompt_text("color_attr", [s1, s2], [c1, c2]))
    return {
        name: [parse_prompt(t).metadata() for t in texts]
        for name, texts in (("train", train), ("heldout", held))
    }


def write_splits(folder: Path = SPLITS_DIR, seed: int = SPLIT_SEED) -> None:
    """Regenerates the committed split files `train.jsonl` and `heldout.jsonl`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in build_splits(seed).items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def load_split(name: str) -> list[dict]:
    """The committed `train` or `heldout` split: rows {"tag", "include", "exclude", "prompt"} as in
    GenEval's metadata file."""
    if name not in ("train", "heldout"):
        raise ValueError(f"unknown split {name!r}; known: train, heldout")
    path = SPLITS_DIR / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
