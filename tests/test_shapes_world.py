"""GenEval-Shapes: renderer, detector, prompts, reward and splits agree with the spec
(docs/geneval-shapes.md), on clean, independently drawn and corrupted images."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from vgrpo.reward_servers.registry import UnknownRewardError, available_rewards, get_reward
from vgrpo.reward_servers.shapes.detector import detect
from vgrpo.reward_servers.shapes.grammar import PromptError, parse_prompt
from vgrpo.reward_servers.shapes.rules import evaluate
from vgrpo.reward_servers.shapes.spec import BACKGROUND, COLORS, FAMILIES, Scene, SceneObject, relations
from vgrpo.shapes.prompts import (
    NEAR_MISSES,
    build_splits,
    load_split,
    make_prompt,
    near_miss_prompt,
    scene_for_prompt,
    violate_prompt,
)
from vgrpo.shapes.render import random_scene, render_scene

BROKEN_CLAUSE = {
    "missing_object": "present",
    "wrong_color": "color",
    "wrong_count": "count",
    "swapped_relation": "relation",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_true_prompts_pass_and_single_violations_fail(family: str) -> None:
    rng = np.random.default_rng(FAMILIES.index(family))
    kinds = set()
    for _ in range(12):
        prompt = make_prompt(family, rng)
        scene = scene_for_prompt(prompt, rng)
        dets = detect(render_scene(scene))
        v = evaluate(prompt, dets)
        assert (v.score, v.reward) == (1.0, 1.0), (prompt, v.to_dict())
        false_prompt, kind = violate_prompt(prompt, scene, rng)
        kinds.add(kind)
        bad = evaluate(false_prompt, dets)
        assert bad.score == 0.0 and bad.reward < 1.0, (false_prompt, bad.to_dict())
        failed = {c.kind for c in bad.clauses if not c.passed}
        assert BROKEN_CLAUSE[kind] in failed, (false_prompt, kind, bad.to_dict())
        assert all(c.why for c in bad.clauses if not c.passed)
    expected = {
        "colors": "wrong_color",
        "color_attr": "wrong_color",
        "counting": "wrong_count",
        "position": "swapped_relation",
    }
    if family in expected:
        assert expected[family] in kinds


@pytest.mark.parametrize("layout", ["random", "slots"])
@pytest.mark.parametrize("family", FAMILIES)
def test_near_misses_fail_their_caption_by_one_clause_of_each_kind(family: str, layout: str) -> None:
    """Pretraining's caption noise (pretrain_tiny.make_pairs): a scene drawn for a near miss of a caption is
    judged a failure of that caption, and every kind of near miss of the family occurs."""
    rng = np.random.default_rng(10 + FAMILIES.index(family))
    kinds = set()
    for _ in range(16):
        prompt = make_prompt(family, rng)
        miss, kind = near_miss_prompt(prompt, rng)
        kinds.add(kind)
        scene = scene_for_prompt(miss, rng, max_distractors=0, layout=layout)
        v = evaluate(prompt, detect(render_scene(scene)))
        assert v.score == 0.0 and v.reward < 1.0, (prompt, miss, kind, v.to_dict())
        assert parse_prompt(miss).family in (family, "single_object")
    assert kinds == set(NEAR_MISSES[family])


@pytest.mark.parametrize("layout", ["slots", "slots_compact"])
@pytest.mark.parametrize("family", FAMILIES)
def test_slot_layouts_pass_their_prompt_within_the_spec(family: str, layout: str) -> None:
    """Pretraining's slot layouts (render.place_in_slots): every scene passes its prompt exactly, boxes
    within the spec's 12-28 px (20-28 for "slots"), >= 1 px from the border, shapes >= 2 px apart (pixel
    distance, as the spec measures)."""
    from scipy import ndimage

    from vgrpo.shapes.render import coverage

    rng = np.random.default_rng(20 + FAMILIES.index(family))
    for _ in range(25):
        prompt = make_prompt(family, rng)
        scene = scene_for_prompt(prompt, rng, layout=layout)
        assert evaluate(prompt, detect(render_scene(scene))).score == 1.0, prompt
        masks = []
        for o in scene.objects:
            x0, y0, x1, y1 = o.bbox
            assert (
                (20 if layout == "slots" else 12) <= o.size <= 28 and min(x0, y0) >= 1 and max(x1, y1) <= 63
            ), (prompt, o)
            m = np.zeros((64, 64), bool)
            m[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))] = (
                coverage(o, int(x0), int(y0), int(np.ceil(x1)) - int(x0), int(np.ceil(y1)) - int(y0)) > 0
            )
            masks.append(m)
        for i, a in enumerate(masks):
            for b in masks[i + 1 :]:
                assert ndimage.distance_transform_edt(~a)[b].min() >= 2, prompt


def test_partial_credit_is_the_fraction_of_clauses() -> None:
    scene = Scene([SceneObject("circle", "red", 20, 32, 16), SceneObject("square", "blue", 46, 32, 16)])
    dets = detect(render_scene(scene))
    assert evaluate("a photo of a red circle and a green square", dets).reward == pytest.approx(3 / 4)
    assert evaluate("a photo of a square left of a circle", dets).reward == pytest.approx(2 / 3)
    assert evaluate("a photo of three circles", dets).reward == pytest.approx(1 / 2)
    assert evaluate("a photo of a ring", dets).reward == 0.0


def _draw(objects: list[tuple[str, tuple[int, int, int], float, float, float]], size: int = 64) -> np.ndarray:
    """An independent minimal drawing routine: a pixel takes the colour when its centre is inside the
    shape (no anti-aliasing), each shape written out from the spec's words."""
    img = np.full((size, size, 3), BACKGROUND, np.uint8)
    y, x = np.mgrid[0:size, 0:size] + 0.5
    for shape, rgb, cx, cy, s in objects:
        dx, dy, r = x - cx, y - cy, s / 2
        masks = {
            "circle": np.hypot(dx, dy) <= r,
            "ring": (np.hypot(dx, dy) <= r) & (np.hypot(dx, dy) >= s / 4),
            "square": np.maximum(abs(dx), abs(dy)) <= r,
            "diamond": abs(dx) + abs(dy) <= r,
            "triangle": (dy <= r) & (2 * abs(dx) <= dy + r),
            "cross": (np.minimum(abs(dx), abs(dy)) <= s / 6) & (np.maximum(abs(dx), abs(dy)) <= r),
        }
        img[masks[shape]] = rgb
    return img


def test_independently_drawn_scene_is_detected_exactly() -> None:
    objs = [
        ("circle", COLORS["red"], 14.0, 14.0, 21.0),
        ("ring", COLORS["purple"], 48.0, 13.0, 16.0),
        ("square", COLORS["yellow"], 12.0, 47.0, 14.0),
        ("triangle", COLORS["brown"], 32.0, 37.0, 14.0),
        ("diamond", COLORS["black"], 52.0, 34.0, 14.0),
        ("cross", COLORS["white"], 50.0, 54.0, 12.0),
    ]
    dets = sorted(detect(_draw(objs)), key=lambda d: d.shape)
    want = sorted(objs, key=lambda o: o[0])
    assert [(d.shape, COLORS[d.color]) for d in dets] == [(o[0], o[1]) for o in want]
    for d, o in zip(dets, want, strict=True):
        assert abs(d.cx - o[2]) <= 0.5 and abs(d.cy - o[3]) <= 0.5, (d, o)
    assert evaluate("a photo of a circle left of a ring", dets).score == 1
    assert evaluate("a photo of a cross below a ring", dets).score == 1
    assert evaluate("a photo of a black diamond and a white cross", dets).score == 1


def _blur(img: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=1)))


def _noise(img: np.ndarray) -> np.ndarray:
    return np.clip(img + np.random.default_rng(0).normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def _jpeg(img: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=70, subsampling=2)
    return np.asarray(Image.open(buf).convert("RGB"))


@pytest.mark.parametrize("corrupt", [_blur, _noise, _jpeg])
def test_corrupted_images_mostly_pass(corrupt) -> None:
    rng = np.random.default_rng(5)
    passed = 0
    for i in range(24):
        prompt = make_prompt(FAMILIES[i % len(FAMILIES)], rng)
        passed += evaluate(prompt, detect(corrupt(render_scene(scene_for_prompt(prompt, rng))))).score == 1
    assert passed >= 20


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((0, 0, 3), np.uint8),
        np.full((64, 64, 3), 128, np.uint8),
        np.full((64, 64, 3), COLORS["red"], np.uint8),
        np.zeros((64, 64), np.uint8),
        np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8),
        np.clip(128 + np.random.default_rng(1).normal(0, 8, (64, 64, 3)), 0, 255).astype(np.uint8),
        np.random.default_rng(2).random((32, 48, 3)),
    ],
    ids=["empty", "grey", "uniform-red", "black-L", "uniform-noise", "grey-noise", "float-noise"],
)
def test_images_without_objects_give_none(image: np.ndarray) -> None:
    assert detect(image) == []


def test_specks_are_ignored() -> None:
    img = render_scene(Scene([SceneObject("square", "blue", 32, 32, 16)]))
    img[5:7, 5:7] = COLORS["red"]
    img[60, 10] = COLORS["white"]
    assert [(d.shape, d.color) for d in detect(img)] == [("square", "blue")]


def test_large_and_other_format_images_are_resized_and_scored() -> None:
    rng = np.random.default_rng(3)
    prompt = "a photo of a cross right of a diamond"
    scene = scene_for_prompt(prompt, rng, size=512)
    img = render_scene(scene, supersample=1)
    assert img.shape == (512, 512, 3)
    assert evaluate(prompt, detect(img)).score == 1
    small = render_scene(scene_for_prompt("a photo of a yellow ring", rng, max_distractors=0))
    rgba = Image.fromarray(small).convert("RGBA")
    assert evaluate("a photo of a yellow ring", detect(rgba)).score == 1
    assert evaluate("a photo of a yellow ring", detect(small.astype(np.float32) / 255)).score == 1
    assert [d.shape for d in detect(Image.fromarray(small).convert("L"))] == ["ring"]
    item = get_reward("shapes").score([img], [prompt])[0]
    assert item.value == 1.0 and item.details["score"] == 1.0 and item.details["detections"]


def test_parser_accepts_articles_and_plurals_and_names_unknown_words() -> None:
    assert (
        parse_prompt("a photo of a orange cross").clauses
        == parse_prompt("a photo of an orange cross").clauses
    )
    assert parse_prompt("A photo of three crosses.").clauses[1].count == 3
    assert parse_prompt("a photo of an ring above a square").family == "position"
    for text, word in [
        ("a photo of a hexagon", "hexagon"),
        ("a photo of a teal circle", "teal"),
        ("a photo of five rings", "five"),
    ]:
        with pytest.raises(PromptError, match=f"'{word}'"):
            parse_prompt(text)
    for text in [
        "a photo of a circle and a circle",
        "a photo of three red circles",
        "a circle",
        "a photo of a red",
    ]:
        with pytest.raises(PromptError):
            parse_prompt(text)
    rng = np.random.default_rng(0)
    texts = {make_prompt(f, rng) for f in FAMILIES for _ in range(30)}
    assert any(" an orange " in t for t in texts) and not any(
        " a orange" in t or " an red" in t for t in texts
    )
    assert all(parse_prompt(t).text == t for t in texts)


def test_position_rule_is_genevals() -> None:
    assert relations((10, 30), (10, 10), (40, 30), (10, 10)) == {"left of"}
    assert relations((40, 30), (10, 10), (10, 30), (10, 10)) == {"right of"}
    assert relations((30, 50), (10, 10), (30, 10), (10, 10)) == {"below"}
    assert relations((31, 31), (20, 20), (30, 30), (20, 20)) == set()  # inside the 0.1 (d1 + d2) margin
    assert relations((10, 10), (4, 4), (40, 40), (4, 4)) == {"left of", "above"}  # a clear diagonal
    # the margin uses widths on x: a wide reference box absorbs a small horizontal offset
    assert relations((30, 10), (10, 10), (24, 40), (50, 10)) == {"above"}


def test_position_margin_uses_heights_on_y_and_widths_on_x() -> None:
    # sizes are (width, height). Tall-thin boxes 10 apart vertically: margin 0.1 (40 + 40) = 8 leaves 2 of
    # the offset 10, 2/10 < 0.5: no relation (a margin from the widths, 0.4, would say "below")
    assert relations((50, 50), (2, 40), (50, 40), (2, 40)) == set()
    # wide-flat boxes, the same offset: margin 0.1 (2 + 2) = 0.4 -> 9.6/10 > 0.5: below (widths: none)
    assert relations((50, 50), (40, 2), (50, 40), (40, 2)) == {"below"}
    assert relations((50, 40), (40, 2), (50, 50), (40, 2)) == {"above"}
    # horizontally: wide-flat boxes absorb a horizontal offset of 10 (margin 8), tall-thin ones do not
    assert relations((60, 50), (40, 2), (50, 50), (40, 2)) == set()
    assert relations((60, 50), (2, 40), (50, 50), (2, 40)) == {"right of"}
    assert relations((40, 50), (2, 40), (50, 50), (2, 40)) == {"left of"}


def test_splits_are_disjoint_and_regenerate_from_the_seed() -> None:
    built = build_splits()
    train, held = load_split("train"), load_split("heldout")
    assert built == {"train": train, "heldout": held}, "regenerate with vgrpo.shapes.prompts.write_splits()"
    assert 300 <= len(train) <= 500 and 80 <= len(held) <= 130
    assert {r["tag"] for r in held} == set(FAMILIES)

    def combo(row: dict) -> frozenset:
        p = parse_prompt(row["prompt"])
        c = p.clauses
        if p.family == "position":  # 'A left of B' is the configuration 'B right of A'
            flip = c[2].relation in ("right of", "below")
            a, b = (c[2].other, c[2].shape) if flip else (c[2].shape, c[2].other)
            return frozenset({("position", a, b, "h" if "of" in str(c[2].relation) else "v")})
        return frozenset(
            {
                p.family,
                *((x.shape, x.color, x.count) for x in c if x.kind != "present"),
                *(x.shape for x in c),
            }
        )

    assert not {combo(r) for r in train} & {combo(r) for r in held}
    assert len({r["prompt"] for r in train}) == len(train)
    for row in held + train:
        assert (
            set(row) == {"tag", "include", "exclude", "prompt"}
            and parse_prompt(row["prompt"]).family == row["tag"]
        )
    counting = next(r for r in held if r["tag"] == "counting")
    assert counting["exclude"][0]["count"] == counting["include"][0]["count"] + 1


def test_reward_registry_and_per_item_errors() -> None:
    assert "shapes" in available_rewards()
    with pytest.raises(UnknownRewardError, match="shapes"):
        get_reward("no_such_reward")
    reward = get_reward("shapes")
    img = render_scene(random_scene(np.random.default_rng(0), 2))
    items = reward.score([img, img], ["a photo of a hexagon", "a photo of a ring"])
    assert items[0].value is None and "hexagon" in str(items[0].error)
    assert items[1].error is None and items[1].value is not None
    with pytest.raises(ValueError):
        reward.score([img], [])
