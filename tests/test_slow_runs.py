"""End-to-end runs of the loop (marked slow: minutes each on 2 cores). Run with ``pytest -m slow``."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from vgrpo.proto.config import load_config

pytestmark = pytest.mark.slow


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["vgrpo", "dgpo", "flow_grpo", "nft"])
def test_each_objective_trains(ray_cluster, tmp_path, name):
    from vgrpo.driver import train

    cfg = load_config(None, [f"algorithm.name={name}", "train.steps=3", "observability.progress=off"])
    assert train(cfg, tmp_path / "run") == 3
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)


@pytest.mark.parametrize("name", ["mixgrpo", "flow_grpo_fast"])
def test_each_windowed_objective_trains(ray_cluster, tmp_path, name):
    """MixGRPO and Flow-GRPO-Fast through the real loop: the window the driver decides for each step is the
    one the workers sampled and the learner trained on (logged as rollout/window_start)."""
    from vgrpo.driver import train
    from vgrpo.learner.objectives import build_objective

    cfg = load_config(None, [f"algorithm.name={name}", "train.steps=2", "observability.progress=off"])
    assert train(cfg, tmp_path / "run") == 2
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    obj = build_objective(cfg.algorithm)
    want = [obj.rollout_window(step, cfg.rollout.num_steps, cfg.train.seed) for step in (1, 2)]
    assert [(r["rollout/window_start"], 2) for r in rows] == want


def test_bounded_staleness_overlaps_and_is_measured(ray_cluster, tmp_path):
    from vgrpo.driver import train

    cfg = load_config(
        None,
        ["train.max_staleness=1", "train.steps=4", "rollout.num_workers=2", "observability.progress=off"],
    )
    train(cfg, tmp_path / "run")
    rows = metrics(tmp_path / "run")
    # step 1 is sampled by version 0 while the learner holds 0; from step 2 on, the rollout of step k was
    # launched before the update of step k-1, so it lags exactly one version
    assert [r["staleness"] for r in rows] == [0, 1, 1, 1]


def test_default_run_learns(tmp_path):
    """The embedded default (seeded) raises the held-out shapes score: `vgrpo eval --step 0` vs the end."""
    run = tmp_path / "run"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "vgrpo.cli",
            "train",
            "--run-dir",
            str(run),
            "--set",
            "observability.progress=plain",
        ],
        check=True,
        timeout=1800,
    )
    scores = []
    for extra in (["--step", "0"], []):
        out = tmp_path / f"eval{len(scores)}.json"
        subprocess.run(
            [sys.executable, "-m", "vgrpo.cli", "eval", "--run-dir", str(run), *extra, "--out", str(out)],
            check=True,
            timeout=600,
        )
        scores.append(json.loads(out.read_text())["overall"])
    assert scores[1] >= scores[0] + 0.15, scores


def test_ema_policy_is_evaluated_saved_and_exported(ray_cluster, tmp_path):
    """train.ema: the learner keeps an EMA of the policy; held-out eval scores it, checkpoints save it
    (ema.safetensors) and `vgrpo eval` / `vgrpo export` read it. With max_staleness=1 and 2 workers, so the
    overlapped weight updates are exercised too."""
    import torch
    from safetensors.torch import load_file

    from vgrpo.checkpoints import export_policy, load_run_pipeline
    from vgrpo.core.adapters import trainable_params
    from vgrpo.driver import train

    sets = ["train.ema=0.9", "train.steps=2", "train.max_staleness=1", "rollout.num_workers=2"]
    sets += [
        "rollout.prompts_per_step=2",
        "rollout.group_size=2",
        "rollout.num_steps=4",
        "train.eval_every=2",
    ]
    sets += ["data.eval_max_prompts=2", "data.eval_images_per_prompt=1", "data.eval_num_steps=4"]
    sets += ["observability.progress=off", "observability.tensorboard=false", "observability.report=false"]
    run = tmp_path / "run"
    assert train(load_config(None, sets), run) == 2
    rows = metrics(run)
    assert [r["staleness"] for r in rows] == [0, 1] and "eval/overall" in rows[-1]
    ckpt = run / "checkpoints" / "step_2"
    ema, policy = load_file(str(ckpt / "ema.safetensors")), load_file(str(ckpt / "policy.safetensors"))
    assert set(ema) == set(policy) and any(not torch.equal(ema[k], policy[k]) for k in ema)
    pipe, _, step = load_run_pipeline(run, None)
    assert step == 2
    for k, p in trainable_params(pipe.transformer).items():
        assert torch.equal(p.detach(), ema[k]), k
    assert export_policy(run, None, tmp_path / "export") == (2, "lora")
