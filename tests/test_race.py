"""benchmarks/race.py's analysis on synthetic curves: the target, time to target and reward-hacking flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def race(load_benchmark):
    return load_benchmark("race")


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


# ----------------------------------------------------------------------------------------------- race v2


def hit_run(race, label, seed, hit_step, steps, s_per_step=1.0, every=1, low=0.5, high=1.0):
    """A run evaluated every `every` steps: `low` before hit_step, `high` from it (None: never)."""
    evals = {
        i: (high if hit_step is not None and i >= hit_step else low) for i in range(every, steps + 1, every)
    }
    return race.curves(
        label, seed, [], run(label, seed, evals, [0.3] * steps, s_per_step), {}, 0, 1.0, False, 32
    )


def test_bootstrap_interval_contains_the_point_and_repeats(race):
    runs = [hit_run(race, "vgrpo", s, h, 12) for s, h in enumerate([2, 4, 9])]
    a = race.analyse(runs, 0.9)["objectives"]["vgrpo"]["time_to_target"]
    b = race.analyse(list(reversed(runs)), 0.9)["objectives"]["vgrpo"]["time_to_target"]
    sec = a["seconds"]
    assert sec["point"] == pytest.approx(5.0) and sec["censored"] == 0 and not sec["lower_bound"]
    assert sec["lo"] <= sec["point"] <= sec["hi"] and sec["lo"] < sec["hi"]
    assert sec["lo"] >= 2.0 and sec["hi"] <= 9.0
    assert (a["seconds"]["lo"], a["seconds"]["hi"]) == (b["seconds"]["lo"], b["seconds"]["hi"])
    assert a["images"]["point"] == pytest.approx(5.0 * 32) and a["images"]["hi"] == pytest.approx(
        sec["hi"] * 32
    )


def test_a_censored_run_is_greater_than_its_budget_and_bounds_the_ratio(race):
    fast = hit_run(race, "dgpo", 0, 10, 20, every=10)  # 10 s to target, at its first evaluation
    slow = hit_run(race, "flow_grpo", 0, None, 50, s_per_step=2.0)  # never: budget 100 s, 50 x 32 images
    s = race.analyse([fast, slow], 0.9)
    t = s["objectives"]["flow_grpo"]["time_to_target"]
    assert t["seconds"]["censored"] == 1 and t["seconds"]["lower_bound"] and t["seconds"]["hi"] is None
    assert t["seconds"]["point"] == pytest.approx(100.0) and t["images"]["point"] == 50 * 32
    assert race.fmt_time(t["seconds"], ".0f").startswith(">100 [100, open)")
    assert s["objectives"]["flow_grpo"]["runs"][0]["seconds_to_target"] is None
    claim = next(c for c in s["claims"] if c["slower"] == "flow_grpo" and c["faster"] == "dgpo")
    r = claim["seconds"]
    assert r["bound"] == "lower" and r["hi"] is None
    assert r["point"] == pytest.approx(10.0) and r["lo"] == pytest.approx(10.0)  # budget / 10 s
    assert claim["images"]["point"] == pytest.approx(5.0)  # 50 steps' images / 10 steps'
    assert claim["verdict"] == "not measurable here" and "at most" in claim["note"]
    assert race.fmt_ratio(r).startswith(">=10.00x [10.00, open]")
    # the faster method censored instead: the ratio is an upper bound
    s2 = race.analyse([hit_run(race, "dgpo", 0, None, 20), hit_run(race, "flow_grpo", 0, 5, 10)], 0.9)
    r2 = next(c for c in s2["claims"] if c["faster"] == "dgpo")["seconds"]
    assert r2["bound"] == "upper" and r2["lo"] is None and r2["hi"] == pytest.approx(5 / 20)
    assert next(c for c in s2["claims"] if c["faster"] == "dgpo")["verdict"] == "not reproduced"


def test_claim_verdicts(race):
    runs = []
    for seed in range(3):
        runs += [
            hit_run(race, "vgrpo", seed, 10 + seed, 40),
            hit_run(race, "mixgrpo", seed, 33 + seed, 40),  # ~3x V-GRPO's: >= 2x reproduced
            hit_run(race, "nft", seed, 20 + seed, 40),  # ~2x: the 3x claim not reproduced
            hit_run(race, "dgpo", seed, 2, 40),
            hit_run(race, "flow_grpo", seed, None if seed else 30, 40),  # 15x / censored: not measurable
        ]
    s = race.analyse(runs, 0.9)
    v = {(c["faster"], c["slower"]): c for c in s["claims"]}
    assert v["vgrpo", "mixgrpo"]["verdict"] == "reproduced"
    assert v["vgrpo", "mixgrpo"]["seconds"]["lo"] >= 2.0
    assert v["vgrpo", "nft"]["verdict"] == "not reproduced" and v["vgrpo", "nft"]["seconds"]["hi"] < 3.0
    assert v["dgpo", "flow_grpo"]["verdict"] == "not measurable here"
    assert v["dgpo", "flow_grpo"]["seconds"]["bound"] == "lower"
    # a censored slower method far enough behind: its budget alone shows the claim
    far = [hit_run(race, "dgpo", 0, 1, 10), hit_run(race, "flow_grpo", 0, None, 40, s_per_step=1.0)]
    far_claims = race.analyse([*far, hit_run(race, "vgrpo", 0, 1, 2)], 0.9)["claims"]
    assert next(c for c in far_claims if c["faster"] == "dgpo")["verdict"] == "reproduced"  # >= 40x
    assert next(c for c in far_claims if c["slower"] == "mixgrpo")["note"] == "mixgrpo not in this race"
    # a target the starting policy already meets says nothing
    flat = race.analyse(runs, 0.9, start=0.95)["claims"]
    assert all(c["verdict"] == "not measurable here" for c in flat)


def test_images_axis(race):
    rows = [
        {"step": i, "reward_mean": 0.3, "time/step": 2.0, "images_per_s": 12.0, "eval/overall": 0.1 * i}
        for i in range(1, 4)
    ]
    c = race.curves("vgrpo", 0, [], rows, {}, 0, 6.0, False, 32)
    assert c["images"] == [24, 48, 72]  # the driver's count (images_per_s x time/step) over the config's
    assert [e["images"] for e in c["evals"]] == [24, 48, 72]
    no_rate = race.curves(
        "vgrpo", 0, ["rollout.group_size=4"], run("v", 0, {2: 0.5}, [0.3] * 2), {}, 0, 2, False
    )
    assert no_rate["images"] == [16, 32]  # 4 prompts x G 4 from the config and the run's --set
    old = {"steps": [1, 2, 3], "evals": [{"step": 2, "overall": 0.5}]}  # stored before images were counted
    assert race.with_images(old, 32)["evals"][0]["images"] == 64 and old["images"] == [32, 64, 96]
    t = race.time_to_target(c, 0.2)
    assert (t["steps"], t["seconds"], t["images"], t["censored"]) == (2, 4.0, 48, False)


def test_json_keeps_the_schema_and_plots_both_axes(race, tmp_path):
    args = race.parse_args(["--objectives", "vgrpo,nft", "--seeds", "2"])
    args.starts = {0: 0.4, 1: 0.4}
    runs = [hit_run(race, o, s, 2 + s, 4) for s in range(2) for o in ("vgrpo", "nft")]
    entries = [(o, [f"algorithm.name={o}"]) for o in ("vgrpo", "nft")]
    out = tmp_path / "race.json"
    race.write(out, args, runs, entries)
    data = json.loads(out.read_text())
    assert {(r["label"], r["seed"]) for r in data["runs"]} == {
        (o, s) for o in ("vgrpo", "nft") for s in (0, 1)
    }
    for r in data["runs"]:
        for e in r["evals"]:
            assert {"step", "wall_s", "overall", "families", "images", "train_s"} <= set(e)
    summ = data["summary"]
    assert summ["target"] == pytest.approx(0.9) and summ["start"] == pytest.approx(0.4)
    assert {"seconds", "images"} == set(summ["objectives"]["vgrpo"]["time_to_target"])
    assert "samples" not in summ["objectives"]["vgrpo"]["time_to_target"]["seconds"]
    assert [c["claim"] for c in summ["claims"]] == [c[3] for c in race.CLAIMS]
    assert out.with_suffix(".png").is_file() and (tmp_path / "race_images.png").is_file()


def test_defaults_fit_the_budget_and_smoke_is_small(race):
    d = race.parse_args([])
    assert d.objectives.split(",") == ["vgrpo", "dgpo", "flow_grpo", "flow_grpo_fast", "mixgrpo", "nft"]
    assert (d.seeds, d.max_steps, d.time_limit, d.eval_every, d.eval_images) == (3, 160, 720.0, 20, 2)
    assert race.estimate_s(18, 3, d) <= 5 * 3600
    s = race.parse_args(["--smoke"])
    assert (s.objectives, s.seeds, s.max_steps) == ("vgrpo,nft", 1, 3)
    h = race.parse_args(["--eval-prompts", "hard.jsonl", "--set", "data.train_prompts=hard_train.jsonl"])
    sets = race.race_sets(h)
    assert "data.eval_prompts=hard.jsonl" in sets and "data.train_prompts=hard_train.jsonl" in sets
    assert race.start_eval_args(h) == ["--prompts", "hard.jsonl"]
    assert race.start_file(0, h, Path("r")).name != "start_s0.json"
