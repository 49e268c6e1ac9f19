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
