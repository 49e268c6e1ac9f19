"""benchmarks/race.py's analysis on synthetic curves: the target, time to target and reward-hacking flags."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def race():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("race", BENCH / "race.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    sys.path.remove(str(BENCH))


def run(label, seed, evals, rewards, s_per_step=1.0):
    rows = []
    for i, r in enumerate(rewards, start=1):
        row = {"step": i, "reward_mean": r, "time/step": s_per_step}
        if i in evals:
            row["eval/overall"] = evals[i]
            row["eval/counting"] = evals[i] / 2
        rows.append(row)
    return rows


def test_target_steps_seconds_and_ratio(race):
    fast = race.curves(
        "vgrpo", 0, [], run("vgrpo", 0, {2: 0.5, 4: 0.8}, [0.3, 0.4, 0.5, 0.6]), {}, 0, 10, False
    )
    slow = race.curves(
        "nft", 0, [], run("nft", 0, {2: 0.4, 4: 0.6, 6: 0.8}, [0.3] * 6, s_per_step=2.0), {}, 0, 20, False
    )
    s = race.analyse([fast, slow], 0.9)
    assert s["best_final"] == pytest.approx(0.8) and s["target"] == pytest.approx(0.72)
    v, n = s["objectives"]["vgrpo"], s["objectives"]["nft"]
    assert (v["steps_to_target"], v["seconds_to_target"]) == (4, 4.0)
    assert (n["steps_to_target"], n["seconds_to_target"]) == (6, 12.0)
    assert n["vgrpo_speedup_seconds"] == pytest.approx(3.0)
    assert v["families"]["counting"] == pytest.approx(0.4)


def test_reward_hacking_is_flagged_when_heldout_stalls(race):
    hack = race.curves(
        "x",
        0,
        [],
        run("x", 0, {3: 0.5, 6: 0.52, 9: 0.49}, [0.2] * 3 + [0.5] * 3 + [0.8] * 3),
        {},
        0,
        9,
        False,
    )
    honest = race.curves(
        "y", 0, [], run("y", 0, {3: 0.5, 6: 0.6, 9: 0.7}, [0.2] * 3 + [0.5] * 3 + [0.8] * 3), {}, 0, 9, False
    )
    assert race.hacking_signs(hack)["flag"] is True
    assert race.hacking_signs(honest)["flag"] is False
    short = race.curves("z", 0, [], run("z", 0, {1: 0.5, 2: 0.5}, [0.2, 0.8]), {}, 0, 2, False)
    assert race.hacking_signs(short)["flag"] is None  # two steps cannot tell a trend from noise


def test_a_target_no_higher_than_the_start_is_called_out_and_gains_are_reported(race):
    flat = race.curves("vgrpo", 0, [], run("vgrpo", 0, {2: 0.27, 4: 0.28}, [0.3] * 4), {}, 0, 10, False)
    worse = race.curves("nft", 0, [], run("nft", 0, {2: 0.25, 4: 0.24}, [0.3] * 4), {}, 0, 10, False)
    s = race.analyse([flat, worse], 0.9, start=0.287)
    assert s["target"] == pytest.approx(0.252) and s["target_not_above_start"] is True
    assert s["objectives"]["vgrpo"]["gain_over_start"] == pytest.approx(0.28 - 0.287)
    assert s["objectives"]["nft"]["gain_over_start"] == pytest.approx(0.24 - 0.287)
    learned = race.curves("vgrpo", 0, [], run("vgrpo", 0, {2: 0.35, 4: 0.5}, [0.3] * 4), {}, 0, 10, False)
    assert race.analyse([learned], 0.9, start=0.287)["target_not_above_start"] is False
