"""The metric table of core/metrics.py against what depends on its names: Ray's metric classes (a bad
boundary or tag would only show as a missing series at run time), the Grafana dashboard's queries and the
glossary. Fast and Prometheus-free; tests/test_dashboard_live.py is the live proof."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vgrpo.core import metrics
from vgrpo.core.metrics import SPECS, exported_name

ROOT = Path(__file__).resolve().parents[1]


def exported_series() -> set[str]:
    out = set()
    for name, spec in SPECS.items():
        base = exported_name(name)
        out |= {base + s for s in ("_bucket", "_sum", "_count")} if spec.kind == "histogram" else {base}
    return out


def dashboard_exprs() -> list[str]:
    exprs: list[str] = []

    def walk(panels: list[dict]) -> None:
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    for f in (ROOT / "deploy" / "grafana").rglob("*.json"):
        d = json.loads(f.read_text())
        walk(d.get("dashboard", d).get("panels", []))
    return exprs


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_metric_is_valid_for_ray(name: str):
    """Constructing the ray.util.metrics object validates the name, tag keys and histogram boundaries
    (Ray wants them > 0) without a running cluster."""
    from ray.util import metrics as rm

    spec = SPECS[name]
    assert name.startswith("vgrpo_") and spec.tags[:2] == ("role", "worker")
    if spec.kind == "counter":
        rm.Counter(name, description=spec.help, tag_keys=spec.tags)
    elif spec.kind == "gauge":
        rm.Gauge(name, description=spec.help, tag_keys=spec.tags)
    else:
        assert list(spec.bounds) == sorted(spec.bounds) and spec.bounds[0] > 0
        rm.Histogram(name, description=spec.help, boundaries=list(spec.bounds), tag_keys=spec.tags)


def test_exported_names_follow_ray():
    assert exported_name("vgrpo_rollout_images") == "ray_vgrpo_rollout_images_total"
    assert exported_name("vgrpo_staleness") == "ray_vgrpo_staleness"


def test_dashboard_queries_only_exported_names():
    """The dashboard must use the names as Prometheus sees them (ray_ prefix, _total on counters):
    an unprefixed or misspelt name is an empty panel forever."""
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    known = exported_series()
    used = {m for e in exprs for m in re.findall(r"\b(?:ray_)?vgrpo_[A-Za-z0-9_]+", e)}
    assert used and used <= known, f"unknown metric names in the dashboard: {sorted(used - known)}"
    for needed in (
        "rollout_images_total",
        "reward_queue_depth",
        "phase_seconds",
        "staleness",
        "errors_total",
    ):
        assert "ray_vgrpo_" + needed in used


def test_glossary_lists_every_metric():
    doc = (ROOT / "docs" / "metrics.md").read_text()
    missing = [exported_name(n) for n in SPECS if f"`{exported_name(n)}`" not in doc]
    assert not missing, f"docs/metrics.md lacks {missing}"


def test_recording_never_raises_without_ray():
    """Engines are unit-tested outside Ray: recording there must be a no-op, not an error."""
    metrics.record("vgrpo_learner_loss", float("nan"), "learner", "rank0")
    metrics.learner_stepped("rank0", {"loss": 0.1, "grad_norm": 1.0, "lr": 1e-4}, 8, 0.5, 1)
    metrics.reward_batch("shapes", "local", [{"value": 0.5}, {"failure": "x"}, {"error": "bad"}], 0.01)
    row = {
        "step": 1,
        "policy_version": 1,
        "staleness": 0,
        "images_per_s": 4.0,
        "time/step": 2.0,
        "reward_mean": 0.5,
        "reward_std": 0.1,
        "reward/shapes": 0.5,
        "time/rollout": 1.0,
    }
    metrics.export_step(row)
