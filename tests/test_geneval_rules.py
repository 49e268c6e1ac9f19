"""GenEval's rules (docs/algorithms.md §7.1) on synthetic detections, one family at a time: selection
thresholds, counting with exclude, colour on the top-count detections, position margin and relations,
and the quirks of Flow-GRPO's partial-credit training score."""

from __future__ import annotations

import pytest

from vgrpo.reward_servers.geneval import (
    Detection,
    evaluate_official,
    evaluate_partial,
    judge,
    metadata_problem,
    relative_position,
    select_detections,
)


def det(label: str, score: float = 0.95, box=(0, 0, 10, 10), color: str | None = None) -> Detection:
    return Detection(label, score, tuple(float(v) for v in box), None, color)  # type: ignore[arg-type]


def objs(*dets: Detection, tag: str = "single_object") -> dict[str, list[Detection]]:
    return select_detections(list(dets), tag)


# ------------------------------------------------------------------------------------------- selection


def test_selection_threshold_counting_threshold_cap_and_order() -> None:
    dets = [det("cat", 0.31), det("cat", 0.29), det("cat", 0.95), det("dog", 0.5)]
    sel = select_detections(dets, "two_object")
    assert [d.score for d in sel["cat"]] == [0.95, 0.31]  # > 0.3, by confidence
    assert select_detections(dets, "counting") == {"cat": [dets[2]]}  # > 0.9 for counting
    assert "dog" not in select_detections(dets, "counting")
    many = [det("cup", 0.4 + i * 0.01, box=(i, i, i + 5, i + 5)) for i in range(20)]  # overlapping: no NMS
    kept = select_detections(many, "single_object")["cup"]
    assert len(kept) == 16 and kept[0].score == pytest.approx(0.59) and kept[-1].score == pytest.approx(0.44)


# ------------------------------------------------------------------------------------ single / two objects


def test_single_and_two_object() -> None:
    meta = {"tag": "single_object", "include": [{"class": "bowl", "count": 1}]}
    assert evaluate_official(objs(det("bowl")), meta)[0]
    assert not evaluate_official(objs(det("cup")), meta)[0]
    # official accepts >= count; the partial score penalises the extra bowl (count term 1 - 1/1 = 0)
    two_bowls = objs(det("bowl"), det("bowl", 0.8))
    assert evaluate_official(two_bowls, meta)[0]
    strict, reward, _ = evaluate_partial(two_bowls, meta)
    assert not strict and reward == 0.0
    meta2 = {"tag": "two_object", "include": [{"class": "bowl", "count": 1}, {"class": "skis", "count": 1}]}
    ok, why = evaluate_official(objs(det("bowl")), meta2)
    assert not ok and "expected skis>=1, found 0" in why
    assert evaluate_partial(objs(det("bowl")), meta2)[1] == pytest.approx(0.5)
    assert evaluate_partial(objs(det("bowl"), det("skis")), meta2) == (True, 1.0, "")


# -------------------------------------------------------------------------------------------- counting


def test_counting_exact_through_exclude_and_partial_can_go_negative() -> None:
    meta = {
        "tag": "counting",
        "include": [{"class": "orange", "count": 3}],
        "exclude": [{"class": "orange", "count": 4}],
    }
    three = [det("orange", 0.95) for _ in range(3)]
    assert evaluate_official(objs(*three, tag="counting"), meta)[0]
    four = objs(*three, det("orange", 0.92), tag="counting")
    ok, why = evaluate_official(four, meta)
    assert not ok and "expected orange<4, found 4" in why  # the exclude clause makes the count exact
    # a low-confidence fourth orange is not counted for a counting prompt (threshold 0.9)
    assert evaluate_official(objs(*three, det("orange", 0.85), tag="counting"), meta)[0]
    assert evaluate_partial(objs(*three[:2], tag="counting"), meta)[1] == pytest.approx(1 - 1 / 3)
    # partial: count term over all detections, not truncated: 8 found for 3 -> 1 - 5/3 < 0
    eight = objs(*[det("orange", 0.95) for _ in range(8)], tag="counting")
    assert evaluate_partial(eight, meta)[1] == pytest.approx(1 - 5 / 3)
    # strict correctness ignores exclude clauses but needs the exact count
    assert evaluate_partial(objs(*three, tag="counting"), meta)[0]


# ---------------------------------------------------------------------------------------------- colour


def test_colour_checks_only_the_top_count_detections() -> None:
    meta = {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "purple"}]}
    top_purple = objs(det("cup", 0.9, color="purple"), det("cup", 0.5, color="red"))
    top_red = objs(det("cup", 0.9, color="red"), det("cup", 0.5, color="purple"))
    assert evaluate_official(top_purple, meta)[0]
    ok, why = evaluate_official(top_red, meta)
    assert not ok and "expected purple cup>=1, found 0 purple; and 1 red" in why
    # partial: two cups for one -> count term 0 and a colour/position clause with a wrong count adds 0
    assert evaluate_partial(top_purple, meta)[1] == 0.0
    assert evaluate_partial(objs(det("cup", color="purple")), meta) == (True, 1.0, "")
    strict, reward, _ = evaluate_partial(objs(det("cup", color="red")), meta)
    assert not strict and reward == pytest.approx(0.5)  # mean(count 1, colour 0)


def test_color_attr_two_clauses() -> None:
    meta = {
        "tag": "color_attr",
        "include": [
            {"class": "handbag", "count": 1, "color": "pink"},
            {"class": "scissors", "count": 1, "color": "black"},
        ],
    }
    good = objs(det("handbag", color="pink"), det("scissors", color="black"))
    swapped = objs(det("handbag", color="black"), det("scissors", color="pink"))
    assert evaluate_official(good, meta)[0] and not evaluate_official(swapped, meta)[0]
    assert evaluate_partial(swapped, meta)[1] == pytest.approx(0.5)  # [1, 0, 1, 0]


def test_colour_fn_is_asked_about_the_top_count_only() -> None:
    seen: list[list[float]] = []

    def colors_of(dets: list[Detection], classname: str) -> list[str]:
        seen.append([d.score for d in dets])
        return ["blue"] * len(dets)

    meta = {"tag": "colors", "include": [{"class": "tv", "count": 1, "color": "blue"}]}
    evaluate_official(objs(det("tv", 0.9), det("tv", 0.6)), meta, colors_of)
    assert seen == [[0.9]]


# -------------------------------------------------------------------------------------------- position


def test_relative_position_margin_and_relations() -> None:
    a, b = (0, 0, 10, 10), (30, 0, 40, 10)  # centres 5 and 35, sizes 10 + 10 -> margin 2
    assert relative_position(a, b) == {"left of"}
    assert relative_position(b, a) == {"right of"}
    assert relative_position((0, 0, 10, 10), (0, 30, 10, 40)) == {"above"}
    assert relative_position((0, 30, 10, 40), (0, 0, 10, 10)) == {"below"}
    # offset 1.5 per axis, margin 0.1 * (10 + 10) = 2 -> revised offset 0: no relation at all
    assert relative_position((1.5, 1.5, 11.5, 11.5), (0, 0, 10, 10)) == set()
    # margin is 0.1 of the SUMMED sizes (100 + 100 -> 20): offset 30 -> revised 10, 10/30 < 0.5: none;
    # with margin 0.05 -> revised 20, 20/30 > 0.5: right of
    assert relative_position((30, 0, 130, 100), (0, 0, 100, 100)) == set()
    assert relative_position((30, 0, 130, 100), (0, 0, 100, 100), margin=0.05) == {"right of"}
    # diagonal: dx = dy = (30 - 2) / (30 sqrt 2) ≈ 0.66 > 0.5 -> both relations
    assert relative_position((30, 30, 40, 40), (0, 0, 10, 10)) == {"right of", "below"}
    # mostly horizontal: dy/‖off‖ < 0.5 -> only "right of"
    assert relative_position((40, 8, 50, 18), (0, 0, 10, 10)) == {"right of"}


def test_relative_position_margin_uses_heights_on_y_and_widths_on_x() -> None:
    # boxes (x1, y1, x2, y2). Tall-thin (2 x 40), centres 10 apart vertically: margin 0.1 (40 + 40) = 8,
    # revised 2, 2/10 < 0.5 -> none; a width-based vertical margin (0.4) would give "below"
    assert relative_position((49, 30, 51, 70), (49, 20, 51, 60)) == set()
    # wide-flat (40 x 2), the same offset: margin 0.4 -> below; a width-based margin (8) would give none
    assert relative_position((30, 49, 70, 51), (30, 39, 70, 41)) == {"below"}
    # horizontally the other way round
    assert relative_position((40, 49, 80, 51), (30, 49, 70, 51)) == set()
    assert relative_position((59, 30, 61, 70), (49, 30, 51, 70)) == {"right of"}


def test_position_official_and_partial_quirk() -> None:
    meta = {
        "tag": "position",
        "include": [
            {"class": "laptop", "count": 1},
            {"class": "cow", "count": 1, "position": ["right of", 0]},
        ],
    }
    laptop, cow_right, cow_left = (
        det("laptop", box=(0, 0, 10, 10)),
        det("cow", box=(40, 0, 50, 10)),
        det("cow", box=(-40, 0, -30, 10)),
    )
    assert evaluate_official(objs(laptop, cow_right), meta)[0]
    ok, why = evaluate_official(objs(laptop, cow_left), meta)
    assert not ok and "expected cow right of target, found left of target" in why
    assert evaluate_partial(objs(laptop, cow_right), meta) == (True, 1.0, "")
    # quirk: a failed pair appends 0 AND then 1.0 after the loop -> mean(1, 1, 0, 1) = 0.75
    strict, reward, _ = evaluate_partial(objs(laptop, cow_left), meta)
    assert not strict and reward == pytest.approx(0.75)
    # no target (laptop missing): official fails; partial = mean(0, 1, 0) with the "no target" 0
    ok, why = evaluate_official(objs(cow_right), meta)
    assert not ok and "no target for cow to be right of" in why
    assert evaluate_partial(objs(cow_right), meta)[1] == pytest.approx(1 / 3)
    # the target group is the referenced clause's top-`count` detections: a second, less confident
    # laptop right of the cow does not matter to the official rule; the partial rule's exact count fails
    two_laptops = objs(laptop, det("laptop", 0.5, box=(80, 0, 90, 10)), cow_right)
    assert evaluate_official(two_laptops, meta)[0]
    assert not evaluate_partial(two_laptops, meta)[0]


def test_judge_returns_both_readings() -> None:
    meta = {"tag": "single_object", "include": [{"class": "bowl", "count": 1}]}
    v = judge(objs(det("bowl"), det("bowl")), meta)
    assert v.correct and not v.strict_correct and v.reward == 0.0


def test_metadata_problems_name_the_fields() -> None:
    assert "'tag'" in (metadata_problem({"include": []}) or "")
    assert "'include'" in (metadata_problem({"tag": "colors"}) or "")
    assert "no GenEval metadata" in (metadata_problem(None) or "")
    assert "count" in (metadata_problem({"tag": "x", "include": [{"class": "cat", "count": 0}]}) or "")
    assert "earlier" in (
        metadata_problem(
            {"tag": "position", "include": [{"class": "cat", "count": 1, "position": ["left of", 0]}]}
        )
        or ""
    )
    assert metadata_problem({"tag": "single_object", "include": [{"class": "cat", "count": 1}]}) is None
