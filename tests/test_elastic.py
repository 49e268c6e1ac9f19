"""Re-planning from measured per-phase seconds (vgrpo/elastic.py): the measured costs invert the planner's
step model, and a decision moves devices between rollout and reward only when the model predicts a gain
past the threshold — never the learner's ranks, never below one rollout worker. The driver acting on it
(vgrpo/capacity.py): the room it counts, how replicas are shared; and, slow, real runs on a cluster of
`ray start` nodes on this machine that gains a node and that loses one (vgrpo/local_nodes.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vgrpo.capacity import distribute
from vgrpo.elastic import best_split, measured_costs, replan
from vgrpo.placement import free_slots
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


# ----------------------------------------------------------------------------------------- the driver's side


def test_free_slots_count_whole_bundles_per_node():
    worker = {"GPU": 1.0, "CPU": 8.0}
    nodes = [{"GPU": 3.0, "CPU": 20.0}, {"GPU": 0.5, "CPU": 64.0}, {"CPU": 96.0}, {"GPU": 8.0, "CPU": 8.0}]
    # node 0: CPU allows 2 (20 / 8), GPU 3 -> 2; node 1: half a GPU -> 0; node 2: no GPU; node 3: CPU 1
    assert free_slots(worker, nodes) == 3
    # a bundle that fits in the sum but on no single node counts nothing
    assert free_slots({"CPU": 1.0, "vgrpo_head": 0.01}, [{"CPU": 4.0}, {"vgrpo_head": 1.0}]) == 0
    assert free_slots({"CPU": 0.25}, [{"CPU": 1.0}]) == 4  # 4 x 0.25 exactly, despite float rounding


def test_replicas_are_shared_in_proportion_at_least_one_each_within_the_cap():
    assert distribute(6, {"pickscore": 2, "ocr": 1}, cap=8) == {"pickscore": 4, "ocr": 2}
    assert distribute(3, {"pickscore": 2, "ocr": 2}, cap=8) in (
        {"pickscore": 2, "ocr": 1},
        {"pickscore": 1, "ocr": 2},
    )
    assert distribute(1, {"pickscore": 4, "ocr": 4}, cap=8) == {"pickscore": 1, "ocr": 1}  # never below one
    assert distribute(20, {"pickscore": 1}, cap=4) == {"pickscore": 4}


# ------------------------------------------------------------------ nodes joining and leaving, for real (slow)


def _tail(path: str) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-40:])


@pytest.mark.slow
def test_a_node_that_joins_mid_run_gets_a_rollout_worker_with_prompts(tmp_path: Path):
    from vgrpo.local_nodes import elastic_run

    out = elastic_run(tmp_path / "join", "join", steps=8, at_step=2)
    assert out["rc"] == 0, _tail(out["log"])
    rows, joined = out["rows"], out["happened"]["after_step"]
    assert [r["step"] for r in rows] == list(range(1, 9))  # every step once
    replans = [e for e in out["capacity"] if e["event"] == "replan"]
    before = [e for e in replans if e["step"] <= joined]
    assert all(not e["act"] and e["free_slots"] == 0 for e in before), before  # a full head: nothing to add
    moves = [e for e in replans if e["act"]]
    assert len(moves) == 1 and moves[0]["step"] > joined, replans
    move = moves[0]
    assert move["free_slots"] == 1 and move["current"]["rollout"] == 1 and move["proposed"]["rollout"] == 2
    assert move["done"]["rollout_workers"] == [1, 2] and move["new_images_per_s"] > move["now_images_per_s"]
    assert move["proposed"]["learner"] == 1  # the learner group is never resized
    after = [r for r in rows if r["step"] > move["step"]]
    assert after and all(r["capacity/rollout_workers"] == 2 for r in after)
    assert all(r["capacity/sampling_workers"] == 2 for r in after)  # the new worker got prompts
    assert all(r["capacity/sampling_workers"] == 1 for r in rows if r["step"] <= move["step"])
    assert any(r.get("autoscale/acted") == 1 for r in rows)
    events = [e for e in out["capacity"] if e["event"] == "workers"]
    assert events == [
        {**events[0], "step": move["step"], "rollout_workers": 2, "before": 1, "cause": "re-plan"}
    ]


@pytest.mark.slow
def test_a_node_that_leaves_mid_run_takes_its_worker_and_the_run_goes_on(tmp_path: Path):
    from vgrpo.local_nodes import elastic_run

    out = elastic_run(tmp_path / "leave", "leave", steps=6, at_step=2)
    assert out["rc"] == 0, _tail(out["log"])
    rows, left = out["rows"], out["happened"]["after_step"]
    assert [r["step"] for r in rows] == list(range(1, 7))  # no step lost or done twice
    assert all(r["capacity/rollout_workers"] == 2 for r in rows if r["step"] <= left)
    assert rows[-1]["capacity/rollout_workers"] == 1 and rows[-1]["capacity/sampling_workers"] == 1
    assert all(r["reward/dropped_groups"] == 0 for r in rows)  # every share sampled, the lost one redone
    events = [e for e in out["capacity"] if e["event"] == "workers"]
    assert len(events) == 1 and events[0]["before"] == 2 and events[0]["rollout_workers"] == 1, events
    assert events[0]["cause"].startswith("workers lost") and events[0]["step"] > left
    log = Path(out["log"]).read_text(errors="replace")
    assert "no node has room for a replacement" in log, _tail(out["log"])


class StandInRoles:
    """What the re-planner acts on: workers, reward replicas; ``room`` new workers fit on the nodes."""

    def __init__(self, workers: int, replicas: dict[str, int], room: int):
        self.workers = [f"w{i}" for i in range(workers)]
        self.reward_replicas = dict(replicas)
        self.room, self.ops = room, []

    def remove_workers(self, n: int) -> int:
        self.ops.append(("remove", n))
        del self.workers[len(self.workers) - n :]
        return n

    def add_workers(self, n: int, weights, wait_s: float) -> int:
        k = min(n, self.room)
        self.ops.append(("add", n, weights))
        self.workers += [f"new{i}" for i in range(k)]
        return k

    def scale_reward(self, name: str, n: int) -> None:
        self.ops.append(("scale", name, n))
        self.reward_replicas[name] = n


def capacity_of(tmp_path: Path, sets: list[str]):
    from types import SimpleNamespace

    from vgrpo.capacity import Capacity
    from vgrpo.proto.config import load_config

    c = Capacity()
    c.cfg = load_config(None, sets)
    c.run = SimpleNamespace(root=tmp_path)
    c.version = 7
    c.pending = []
    c.weights_for = lambda roles, v: f"weights-v{v}"
    c.init_capacity()
    return c


def test_a_move_frees_devices_first_then_adds_loaded_with_the_current_version(tmp_path: Path, caplog):
    gpu = [
        "rollout.gpus_per_worker=1",
        "reward.servers.shapes.gpus=1",
        "reward.servers.shapes.max_replicas=8",
    ]
    c = capacity_of(tmp_path, gpu)
    roles = StandInRoles(workers=2, replicas={"shapes": 4}, room=1)
    assert c.scaled_rewards(roles) == {"shapes": 4}  # a GPU reward with a fixed count is the planner's
    with caplog.at_level("WARNING", logger="vgrpo"):
        done = c.apply_split(roles, workers=4, replicas=2, scaled={"shapes": 4})
    # the reward gives its GPUs back before workers are placed on them; only 1 of 2 workers found room
    assert roles.ops == [("scale", "shapes", 2), ("add", 2, "weights-v7")]
    assert done == {"rollout_workers": [2, 3], "reward_replicas": {"shapes": [4, 2]}}
    assert "1 of 2 rollout worker(s) added" in caplog.text
    # the other way: workers go first, then the reward grows (within its max_replicas)
    roles.ops.clear()
    c.apply_split(roles, workers=1, replicas=12, scaled={"shapes": 2})
    assert roles.ops == [("remove", 2), ("scale", "shapes", 8)]
    # a CPU run's reward, or one Serve autoscales, is not moved
    cpu = capacity_of(tmp_path, [])
    assert cpu.scaled_rewards(StandInRoles(1, {"shapes": 1}, 0)) == {}
    auto = capacity_of(tmp_path, [*gpu, "reward.servers.shapes.num_replicas=auto"])
    assert auto.scaled_rewards(StandInRoles(1, {"shapes": 1}, 0)) == {}
