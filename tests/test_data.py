"""Prompt sources: epochs, resumable positions, family-balanced sampling; the shapes reward's modes."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from vgrpo.data import PromptSource


def _rows(sizes: dict[str, int]) -> list[dict]:
    return [{"prompt": f"{tag} {i}", "tag": tag} for tag, n in sizes.items() for i in range(n)]


def test_unbalanced_epoch_hands_out_every_prompt_once() -> None:
    src = PromptSource(_rows({"a": 7, "b": 3}), seed=1)
    first = [p.prompt for p in src.next(10)]
    assert sorted(first) == sorted(r["prompt"] for r in src.rows)
    assert src.epoch == 0 and src.index == 10


def test_balanced_source_draws_each_family_equally_often_whatever_its_size() -> None:
    src = PromptSource(_rows({"big": 30, "mid": 6, "small": 2}), seed=0, balance_by="tag")
    tags = [p.metadata["tag"] for p in src.next(90)]
    counts = Counter(tags)
    assert counts == {"big": 30, "mid": 30, "small": 30}
    # every round of three holds one of each family
    assert all(len(set(tags[k : k + 3])) == 3 for k in range(0, 90, 3))
    # the small family cycles through all its prompts, not one of them
    small = [
        p.prompt for p in PromptSource(src.rows, 0, balance_by="tag").next(90) if p.metadata["tag"] == "small"
    ]
    assert set(small) == {"small 0", "small 1"}


def test_balanced_source_resumes_from_its_position() -> None:
    rows = _rows({"a": 9, "b": 2, "c": 4})
    a = PromptSource(rows, seed=3, balance_by="tag")
    a.next(5)
    b = PromptSource(rows, seed=3, balance_by="tag")
    b.load_state(a.state())
    assert [p.prompt for p in a.next(40)] == [p.prompt for p in b.next(40)]


def test_balance_by_a_missing_field_names_the_field_and_the_fix(tmp_path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(r)
            for r in [{"prompt": "a photo of a ring", "tag": "a"}, {"prompt": 'a sign that says "hi"'}]
        )
    )
    with pytest.raises(ValueError, match=r"data.balance_by = 'tag'.*line 2.*balance_by=null"):
        PromptSource.from_spec(str(path), balance_by="tag")


def test_training_prompts_outside_the_shapes_grammar_load_untagged(tmp_path) -> None:
    path = tmp_path / "ocr.txt"
    path.write_text('a sign that says "open"\na photo of two rings\n')
    rows = PromptSource.from_spec(str(path)).rows
    assert rows == [
        {"prompt": 'a sign that says "open"'},
        {"prompt": "a photo of two rings", "tag": "counting"},
    ]


def test_the_builtin_training_split_balanced_covers_its_five_families() -> None:
    src = PromptSource.from_spec("builtin:shapes/train", balance_by="tag")
    counts = Counter(p.metadata["tag"] for p in src.next(50))
    assert set(counts) == {"two_object", "counting", "colors", "position", "color_attr"}
    assert set(counts.values()) == {10}


@pytest.mark.parametrize("mode", ["partial", "binary", "mixed"])
def test_shapes_reward_modes(mode: str) -> None:
    from vgrpo.reward_servers.shapes import ShapesReward
    from vgrpo.shapes.prompts import scene_for_prompt
    from vgrpo.shapes.render import render_scene

    prompt = "a photo of a red circle and a blue square"
    rng = np.random.default_rng(0)
    good = render_scene(scene_for_prompt(prompt, rng))
    half = render_scene(scene_for_prompt("a photo of a red circle and a green square", rng))
    good_v, half_v = (s.value for s in ShapesReward(mode=mode).score([good, half], [prompt, prompt]))
    assert good_v == 1.0
    partial = 0.75  # circle present, square present, red circle: 3 of the 4 clauses
    assert half_v == pytest.approx({"partial": partial, "binary": 0.0, "mixed": partial / 2}[mode])


def test_shapes_reward_refuses_an_unknown_mode() -> None:
    from vgrpo.reward_servers.shapes import ShapesReward

    with pytest.raises(ValueError, match=r"mode=.dense.*partial, binary, mixed"):
        ShapesReward(mode="dense")
