"""The capacity planner (vgrpo/plan.py): the pipeline model, the split search and `vgrpo plan`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vgrpo import plan as PL
from vgrpo.cli import app


def costs(rollout: float = 0.2, reward: float = 0.01, learner: float = 0.1, sync: float = 0.0) -> PL.Costs:
    return PL.Costs(rollout=rollout, reward=reward, learner=learner, weight_sync=sync, source="test")


WORK = PL.Workload(prompts=48, group_size=24, max_staleness=1)


def test_raising_a_roles_cost_shifts_devices_to_it():
    cluster = PL.Cluster(64)
    base = PL.make_plan(costs(), WORK, cluster).best.split
    heavy_learner = PL.make_plan(costs(learner=0.4), WORK, cluster).best.split
    heavy_reward = PL.make_plan(costs(reward=0.2), WORK, cluster).best.split
    assert heavy_learner.learner > base.learner
    assert heavy_reward.reward > base.reward
    image = PL.Workload(48, 24, 1, granularity="image")
    b = PL.make_plan(costs(), image, cluster).best.split
    heavy_rollout = PL.make_plan(costs(rollout=0.6), image, cluster).best.split
    assert heavy_rollout.rollout > b.rollout


def test_overlap_is_max_of_stages_and_sync_is_their_sum():
    c, cluster, split = costs(sync=0.5), PL.Cluster(16), PL.Split(8, 2, 6)
    sync = PL.predict(c, PL.Workload(48, 24, 0), split, cluster)
    over = PL.predict(c, PL.Workload(48, 24, 1), split, cluster)
    st = sync.stage_s
    assert sync.step_s == pytest.approx(st["rollout"] + st["reward"] + st["learner"] + st["weight_sync"])
    assert over.step_s == pytest.approx(max(st["rollout"], st["reward"] + st["learner"] + st["weight_sync"]))
    assert over.images_per_s > sync.images_per_s
    # whole prompt groups per worker: 48 prompts on 8 workers = 6 groups of 24 images
    assert st["rollout"] == pytest.approx(6 * 24 * 0.2)


def test_plan_beats_every_other_split_it_could_have_chosen():
    c, cluster, work = costs(), PL.Cluster(12), PL.Workload(12, 8, 1)
    best = PL.make_plan(c, work, cluster).best
    for r in range(1, 11):
        for w in range(1, 12 - r):
            for lr in range(1, 13 - r - w):
                p = PL.predict(c, work, PL.Split(r, w, lr), cluster)
                assert p.images_per_s <= best.images_per_s * (1 + 1e-9)


def test_bottleneck_names_the_slow_role():
    cluster = PL.Cluster(8)
    assert PL.make_plan(costs(rollout=5.0), WORK, cluster).best.bottleneck == "rollout"
    assert PL.make_plan(costs(rollout=0.001, learner=5.0), WORK, cluster).best.bottleneck == "learner"


def test_infeasible_cluster_is_a_clear_error():
    with pytest.raises(PL.InfeasibleError, match=r"at least 3 devices.*--gpus 3"):
        PL.make_plan(costs(), WORK, PL.Cluster(2))
    est = PL.estimate_costs(PL.default_config()[0], WORK)
    with pytest.raises(PL.InfeasibleError, match="GB"):
        PL.make_plan(est, WORK, PL.Cluster(64, memory_gb=8))


def test_resources_json_forms():
    a = PL.parse_resources('{"GPU": 64, "CPU": 512}')
    assert (a.kind, a.devices, a.cpus) == ("GPU", 64, 512)
    b = PL.parse_resources('{"nodes": [{"GPU": 8, "CPU": 96}, {"GPU": 4, "CPU": 48}], "gpu_memory_gb": 141}')
    assert (b.devices, b.devices_per_node, b.memory_gb) == (12, 8, 141.0)
    assert PL.parse_resources('{"CPU": 2}').kind == "CPU"
    with pytest.raises(PL.PlanError, match="not JSON"):
        PL.parse_resources("{GPU: 8")


def test_flop_estimate_of_the_recipe_is_stated_and_sane():
    cfg, _ = PL.default_config()
    c = PL.estimate_costs(cfg, WORK)
    # 40 steps of a ~2.2 TFLOP forward dominate the rollout; the learner is a few forwards per image
    assert 60 < c.flops["rollout"] < 150
    assert c.rollout > c.learner > c.reward > 0
    assert any("40 sampler steps" in a for a in c.assumptions)


def test_costs_roundtrip_through_json(tmp_path):
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(costs(rollout=0.3).to_json()))
    assert PL.load_costs(path).rollout == 0.3
    path.write_text('{"rollout": 1}')
    with pytest.raises(PL.PlanError, match="missing reward, learner"):
        PL.load_costs(path)


def test_cli_plan_gpus_64_prints_the_three_roles():
    res = CliRunner().invoke(app, ["plan", "--gpus", "64"])
    assert res.exit_code == 0, res.output
    out = res.output.lower()
    lines: dict[str, list[str]] = {}
    for ln in out.splitlines():  # the first line naming each role is its line of the plan
        if ln.split():
            lines.setdefault(ln.split()[0], ln.split())
    for role in ("rollout", "reward", "learner"):
        assert role in lines and lines[role][1].isdigit() and lines[role][2] == "gpus"
    assert sum(int(lines[r][1]) for r in ("rollout", "reward", "learner")) <= 64
    assert "images/s" in out and "bottleneck" in out and "estimates" in out


def test_cli_plan_too_few_gpus_exits_3_without_traceback():
    res = CliRunner().invoke(app, ["plan", "--gpus", "2"])
    assert res.exit_code == 3
    assert "Traceback" not in res.output and "at least 3" in res.output


def test_time_shared_devices_gain_nothing_from_more_actors():
    """capacity: on a machine with one core's worth of compute free, overlap and more workers buy nothing."""
    c, w1, w0 = costs(), PL.Workload(4, 8, 1), PL.Workload(4, 8, 0)
    free = PL.Cluster(2, "CPU")
    busy = PL.Cluster(2, "CPU", capacity=1.0)
    one = PL.Split(1, 0, 1)
    assert PL.predict(c, w1, one, free).images_per_s > 1.3 * PL.predict(c, w0, one, free).images_per_s
    assert PL.predict(c, w1, one, busy).images_per_s == pytest.approx(
        PL.predict(c, w0, one, busy).images_per_s
    )
    two = PL.Split(2, 0, 1)
    assert PL.predict(c, w0, two, free).images_per_s > PL.predict(c, w0, one, free).images_per_s
    assert PL.predict(c, w0, two, busy).images_per_s == pytest.approx(
        PL.predict(c, w0, one, busy).images_per_s
    )


def test_costs_from_a_runs_metrics(tmp_path):
    from vgrpo.proto.config import dump_config, load_config

    cfg = load_config(None, ["rollout.num_workers=2", "learner.num_ranks=2"])
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    row = {"images_per_s": 16.0, "time/step": 2.0, "time/sample_compute": 1.0, "time/reward": 0.32}
    row |= {"time/learner": 0.64, "time/weight_sync": 0.05}
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(row) for _ in range(3)))
    c = PL.load_costs(tmp_path / "metrics.jsonl")
    # 32 images a step: 2 workers x 1 s, 1 replica x 0.32 s, 2 ranks x 0.64 s
    assert (c.rollout, c.reward, c.learner) == pytest.approx((2 / 32, 0.01, 0.04))
    assert c.device == "CPU" and c.weight_sync == pytest.approx(0.05)
