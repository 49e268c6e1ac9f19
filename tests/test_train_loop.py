"""The actor–learner loop on a real local Ray cluster, and its guards."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

from vgrpo.driver import check_staleness, derive_seeds
from vgrpo.proto.config import load_config
from vgrpo.proto.messages import WeightUpdate, split_evenly
from vgrpo.roles import TrainingError

FAST = [
    "train.steps=2",
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "train.checkpoint_every=1",
    "train.samples_every=1",
    "observability.progress=plain",
    "rollout.num_steps=4",
]
CONTRACT = [
    "step",
    "policy_version",
    "reward_mean",
    "reward_std",
    "loss",
    "staleness",
    "images_per_s",
    "time/rollout",
    "time/reward",
    "time/learner",
    "time/weight_sync",
    "time/step",
    "reward/shapes",
]


def test_two_steps_end_to_end_on_ray(ray_cluster, tmp_path):
    from safetensors.torch import load_file

    from vgrpo.driver import train

    cfg = load_config(None, FAST)
    run = tmp_path / "run"
    assert train(cfg, run) == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["policy_version"] for r in rows] == [1, 2]
    assert [r["staleness"] for r in rows] == [0, 0]
    for r in rows:
        for k in CONTRACT:
            assert isinstance(r[k], (int, float)) and math.isfinite(r[k]), (k, r.get(k))
    assert (run / "config.yaml").is_file() and (run / "samples" / "step_2" / "grid.png").is_file()
    w1 = load_file(str(run / "checkpoints" / "step_1" / "policy.safetensors"))
    w2 = load_file(str(run / "checkpoints" / "step_2" / "policy.safetensors"))
    assert set(w1) == set(w2) and len(w1) > 0
    # with train.seed 0 the step-2 rewards vary within a prompt group, so some advantages are non-zero and
    # the update moves the weights by about learner.lr (1e-3, Adam); weight decay alone (lr 1e-3 x wd 1e-4)
    # would move them by at most 1e-7 of their size
    assert rows[1]["adv/zero_std_frac"] < 1.0 and rows[1]["reward_std"] > 0, rows[1]
    moved = max(float((w2[k] - w1[k]).abs().max()) for k in w1)
    assert moved > 1e-4, moved


def test_staleness_guard_refuses_mixed_or_too_old_versions():
    assert check_staleness([4, 4], step=5, max_staleness=0) == 0
    assert check_staleness([3], step=5, max_staleness=1) == 1
    with pytest.raises(TrainingError, match="mixes policy versions"):
        check_staleness([3, 4], step=5, max_staleness=1)
    with pytest.raises(TrainingError, match="max_staleness = 1"):
        check_staleness([2], step=5, max_staleness=1)


def test_staleness_guard_refuses_versions_newer_than_the_learner():
    # the learner is at version step - 1 = 4: a rollout of version 5 or later cannot exist (negative staleness)
    for version in (5, 9):
        with pytest.raises(TrainingError, match="versions behind"):
            check_staleness([version], step=5, max_staleness=3)
    with pytest.raises(TrainingError):
        check_staleness([5, 5], step=5, max_staleness=0)
    assert check_staleness([4], step=5, max_staleness=0) == 0


def test_seeds_are_a_function_of_seed_and_step():
    assert derive_seeds(0, 3, 8) == derive_seeds(0, 3, 8)
    assert derive_seeds(0, 3, 8) != derive_seeds(0, 4, 8)
    assert derive_seeds(1, 3, 8) != derive_seeds(0, 3, 8)
    assert split_evenly(5, 2) == [(0, 3), (3, 5)]
    assert split_evenly(1, 3) == [(0, 1), (1, 1), (1, 1)]


def test_weight_update_is_atomic(tmp_path):
    """A bad payload changes nothing (no partial write, version kept); a good one changes everything."""
    from vgrpo.core.adapters import trainable_params
    from vgrpo.rollout_workers.engine import RolloutEngine

    cfg = load_config(None, ["rollout.num_steps=2"])
    eng = RolloutEngine(cfg.model, cfg.rollout, "dpm2", device="cpu")
    params = trainable_params(eng.pipe.transformer)
    before = {k: p.detach().clone() for k, p in params.items()}
    good = {k: torch.randn_like(v) for k, v in before.items()}
    bad = dict(good)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="missing"):
        eng.update_weights(WeightUpdate(1, bad))
    assert eng.get_version() == 0
    assert all(torch.equal(before[k], p) for k, p in params.items())
    wrong_shape = dict(good)
    k0 = next(iter(wrong_shape))
    wrong_shape[k0] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        eng.update_weights(WeightUpdate(1, wrong_shape))
    assert all(torch.equal(before[k], p) for k, p in params.items())
    assert eng.update_weights(WeightUpdate(1, good)) == 1
    assert all(torch.equal(good[k], p) for k, p in params.items())
    out = eng.sample(["a photo of a red circle"], 2, [1, 2])
    assert out.policy_version == 1 and out.images.shape[0] == 2
    assert np.isfinite(out.latents).all()
    out.check("the test", num_prompts=1)


@pytest.mark.parametrize("max_staleness", [0, 1])
def test_collective_weight_sync_matches_the_object_store(ray_cluster, tmp_path, caplog, max_staleness):
    """train.weight_sync=collective (gloo on CPU) with two rollout workers: the same seed gives the same
    run as the object-store path (the weights are identical, so step 2's rewards match exactly), and the
    sync is timed and recorded. With max_staleness=1 the broadcast of version 1 meets workers still
    sampling step 2 (launched before it): it waits for them, and step 2 is sampled by version 0 alone."""
    from vgrpo.driver import train

    rows = {}
    for mode in ("collective", "object_store"):
        sets = [*FAST, "rollout.num_workers=2", f"train.weight_sync={mode}", "train.checkpoint_every=2"]
        cfg = load_config(None, [*sets, f"train.max_staleness={max_staleness}"])
        run = tmp_path / mode
        with caplog.at_level(logging.WARNING, logger="vgrpo"):
            assert train(cfg, run) == 2
        rows[mode] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "weight broadcast" not in caplog.text and "weight-broadcast group" not in caplog.text, caplog.text
    assert [r["staleness"] for r in rows["collective"]] == [0, max_staleness]
    for a, b in zip(rows["collective"], rows["object_store"], strict=True):
        assert a["weight_sync_collective"] == 1 and b["weight_sync_collective"] == 0
        assert a["time/weight_sync"] > 0 and math.isfinite(a["time/weight_sync"])
        assert a["weight_sync_bytes"] == b["weight_sync_bytes"] > 0
        for k in ("reward_mean", "reward_std", "reward/shapes"):
            assert a[k] == b[k], (a["step"], k, a[k], b[k])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["broadcast", "sampling"])
def test_worker_killed_with_the_collective_on(ray_cluster, tmp_path, monkeypatch, caplog, when):
    """The collective on, rollout worker 1 killed. ``broadcast``: just before the broadcast of version 1:
    that step's weights go by the object store (the dead worker replaced, loaded with them), the group is
    rebuilt with the replacement. ``sampling``: while it samples step 2: collect replaces it, and the
    group is rebuilt with the replacement before the broadcast of version 2. Either way every step uses
    the broadcast and the run equals the object-store run of the same seed."""
    import ray

    from vgrpo import driver

    sets = [*FAST, "train.steps=3", "rollout.num_workers=2", "train.checkpoint_every=3", "train.timeout_s=90"]
    assert driver.train(load_config(None, [*sets, "train.weight_sync=object_store"]), tmp_path / "ref") == 3
    name = "broadcast_weights" if when == "broadcast" else "launch"
    original = getattr(driver.Trainer, name)
    at_step = 1 if when == "broadcast" else 2
    killed: list = []

    def kill_then_call(self, roles, step):
        if when == "broadcast" and step == at_step and not killed:
            killed.append(roles.workers[1])
            ray.kill(roles.workers[1], no_restart=True)
        out = original(self, roles, step)
        if when == "sampling" and step == at_step and not killed:
            killed.append(roles.workers[1])
            ray.kill(roles.workers[1], no_restart=True)
        return out

    monkeypatch.setattr(driver.Trainer, name, kill_then_call)
    with caplog.at_level(logging.WARNING, logger="vgrpo"):
        cfg = load_config(None, [*sets, "train.weight_sync=collective"])
        assert driver.train(cfg, tmp_path / "run") == 3
    assert killed
    if when == "broadcast":
        assert "the weight broadcast of version 1 failed" in caplog.text, caplog.text
    else:
        assert "rollout worker 1 died during sampling step 2" in caplog.text, caplog.text
        assert "weight broadcast" not in caplog.text, caplog.text
    assert "could not build" not in caplog.text, caplog.text
    read = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    rows, ref = read(tmp_path / "run"), read(tmp_path / "ref")
    assert [r["weight_sync_collective"] for r in rows] == [1, 1, 1]
    for a, b in zip(rows, ref, strict=True):
        for k in ("reward_mean", "reward_std", "reward/shapes"):
            assert a[k] == b[k], (a["step"], k, a[k], b[k])
