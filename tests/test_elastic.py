"""Re-planning from measured per-phase seconds (vgrpo/elastic.py): the measured costs invert the planner's
step model, and a decision moves devices between rollout and reward only when the model predicts a gain
past the threshold — never the learner's ranks, never below one rollout worker."""

from __future__ import annotations

import pytest

from vgrpo.elastic import best_split, measured_costs, replan
from vgrpo.plan import Cluster, Costs, Split, Workload, predict

WORK = Workload(prompts=48, group_size=24, max_staleness=1)  # 1152 images a step
GPUS = Cluster(devices=48, kind="GPU")


def rows_of(costs: Costs, split: Split, n: int = 3) -> list[dict]:
    """Metric rows as the driver logs them for a run whose phases take what the model says."""
    p = predict(costs, WORK, split, GPUS)
    row = {
        "time/sample_compute": p.stage_s["rollout"],
        "time/reward": p.stage_s["reward"],
        "time/learner": p.stage_s["learner"],
        "time/weight_sync": p.stage_s["weight_sync"],
    }
    return [dict(row) for _ in range(n)]


def test_measured_costs_are_the_per_image_seconds_of_each_role():
    # by hand: 24 workers sample 2 groups x 24 = 48 images in 12 s -> 0.25 s an image; 8 replicas score
    # 1152 / 8 = 144 images in 7.2 s -> 0.05; 16 ranks train 3 groups x 24 = 72 images in 14.4 s -> 0.2
    rows = [{"time/sample_compute": 12.0, "time/reward": 7.2, "time/learner": 14.4, "time/weight_sync": 1.5}]
    got = measured_costs(rows, Split(24, 8, 16), WORK, GPUS)
    assert (got.rollout, got.reward, got.learner, got.weight_sync) == pytest.approx((0.25, 0.05, 0.2, 1.5))
    # and it inverts the planner's model for any split (median over the rows)
    costs = Costs(rollout=0.31, reward=0.07, learner=0.22, weight_sync=0.8)
    back = measured_costs(rows_of(costs, Split(20, 12, 16)), Split(20, 12, 16), WORK, GPUS)
    assert (back.rollout, back.reward, back.learner) == pytest.approx((0.31, 0.07, 0.22))


def test_a_reward_that_became_the_bottleneck_gets_devices_from_the_rollout():
    start = Costs(rollout=0.25, reward=0.05, learner=0.2, weight_sync=0.5)
    current = best_split(start, WORK, 16, 48, GPUS).split
    heavy = Costs(rollout=0.25, reward=0.4, learner=0.2, weight_sync=0.5)  # the reward model got 8x dearer
    d = replan(rows_of(heavy, current), WORK, current, 48, GPUS, step=300)
    assert d.act and d.bottleneck == "reward", d.reason
    assert d.proposed.reward > current.reward and d.proposed.rollout < current.rollout
    assert d.proposed.learner == current.learner == 16 and d.proposed.rollout >= 1
    want = predict(heavy, WORK, d.proposed, GPUS).images_per_s
    assert d.new_images_per_s == pytest.approx(want) and d.new_images_per_s > d.now_images_per_s * 1.1
    assert "largest: reward" in d.reason and f"reward {current.reward} -> {d.proposed.reward}" in d.reason


def test_the_best_split_stays_and_a_small_gain_does_not_move():
    costs = Costs(rollout=0.25, reward=0.05, learner=0.2, weight_sync=0.5)
    best = best_split(costs, WORK, 16, 48, GPUS).split
    d = replan(rows_of(costs, best), WORK, best, 48, GPUS, step=25)
    assert not d.act and d.proposed == best and d.reason.startswith("keep: already the best split")
    near = Split(best.rollout - 1, best.reward + 1, 16)  # one device off: a few percent
    d = replan(rows_of(costs, near), WORK, near, 48, GPUS, step=25, min_gain=0.5)
    assert not d.act and "< 50%" in d.reason


def test_a_node_that_left_forces_a_split_that_fits_and_a_joined_one_is_used():
    costs = Costs(rollout=0.25, reward=0.05, learner=0.2, weight_sync=0.5)
    current = best_split(costs, WORK, 16, 48, GPUS).split
    left = replan(rows_of(costs, current), WORK, current, 40, GPUS, step=50, min_gain=10.0)
    assert left.act and left.proposed.total <= 40 and left.proposed.learner == 16
    # sampling-bound (the learner is not: it keeps its 8 ranks): the joined devices go to the rollout,
    # whose share halves once every worker has one group (48 workers for 48 prompts)
    slow_sampler = Costs(rollout=0.6, reward=0.05, learner=0.1, weight_sync=0.5)
    current = best_split(slow_sampler, WORK, 8, 48, GPUS).split
    joined = replan(rows_of(slow_sampler, current), WORK, current, 64, GPUS, step=50)
    assert joined.act and joined.proposed.rollout > current.rollout and joined.gain >= 0.1, joined.reason
    assert joined.proposed.total <= 64 and "devices (was" not in joined.reason  # a gain, not a forced move
    assert "40 devices (was 48)" in left.reason
