"""Re-planning rollout and reward capacity from a run's own measurements (docs/training.md "Elastic
capacity"): the planner's step model (``vgrpo/plan.py``: ``predict``) fed the per-phase seconds the run
measured decides whether moving devices between rollout workers and reward replicas buys enough images/s
to be worth the move. The learner group keeps its ranks (a DeepSpeed group cannot change size mid-run).

This module decides; it starts and stops nothing. ``benchmarks/elastic.py`` runs it over the planner's
cost model of a 64-GPU job whose reward becomes the bottleneck halfway (static split vs re-planned).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from vgrpo.plan import Cluster, Costs, Prediction, Split, Workload, images_each, predict, reward_units


@dataclass
class Decision:
    """One re-plan: the split in use and the best one under the measured costs, the images/s the model
    predicts for each, and whether the gain passes the threshold (``act``); ``reason`` says it in words
    with the numbers, ``seconds`` is how long deciding took."""

    step: int
    current: Split
    proposed: Split
    now_images_per_s: float
    new_images_per_s: float
    gain: float
    act: bool
    reason: str
    bottleneck: str
    seconds: float = 0.0
    costs: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["current"], out["proposed"] = asdict(self.current), asdict(self.proposed)
        return out


def measured_costs(
    rows: list[dict[str, Any]],
    split: Split,
    work: Workload,
    cluster: Cluster,
    reward_device: Literal["device", "cpu"] = "device",
) -> Costs:
    """Per-image device-seconds of each role from metric rows (the median over ``rows``), inverting the
    planner's step model for the split that produced them: a rollout worker samples
    ``images_each(work, R)`` images in ``time/sample_compute`` (else ``time/rollout``), the reward replicas
    score ``ceil(images / units)`` images each in ``time/reward`` (``plan.reward_units``: the reward's
    devices, or the CPUs a CPU reward has, ``reward_device="cpu"``), a learner rank trains ``images_each(work, L)``
    in ``time/learner``; ``time/weight_sync`` is per step."""
    if not rows:
        raise ValueError("measured_costs: no metric rows to measure from")

    def med(key: str, fallback: str | None = None) -> float:
        values = [float(r[key]) for r in rows if key in r] or (
            [float(r[fallback]) for r in rows if fallback and fallback in r]
        )
        if not values:
            raise ValueError(f"measured_costs: the metric rows have no {key!r}")
        return statistics.median(values)

    units = reward_units(reward_device, split, cluster)
    return Costs(
        rollout=med("time/sample_compute", "time/rollout") / images_each(work, split.rollout),
        reward=med("time/reward") / math.ceil(work.images / units),
        learner=med("time/learner") / images_each(work, split.learner),
        weight_sync=med("time/weight_sync"),
        reward_device=reward_device,
        device=cluster.kind,
        source=f"the run's last {len(rows)} steps (median)",
    )


def best_split(costs: Costs, work: Workload, learner: int, devices: int, cluster: Cluster) -> Prediction:
    """The rollout/reward split of ``devices`` (the learner's ``learner`` included) with the most images/s
    under ``costs``; among splits within 1 % of it, the one that uses fewest devices. At least one
    rollout worker and one reward replica (none where the reward runs on the CPUs)."""
    free = devices - learner
    cpu_reward = costs.reward_device == "cpu"  # scored on the CPUs: every free device can sample
    if free < (1 if cpu_reward else 2):
        raise ValueError(f"{devices} devices leave {free} beside {learner} learner rank(s): too few")
    preds = [
        predict(costs, work, Split(r, w, learner), cluster)
        for r in range(1, free + 1)
        for w in ([0] if cpu_reward else range(1, free - r + 1))
    ]
    top = max(p.images_per_s for p in preds)
    near = [p for p in preds if p.images_per_s >= top * 0.99]
    return min(near, key=lambda p: (p.split.total, -p.images_per_s))


def replan(
    rows: list[dict[str, Any]],
    work: Workload,
    current: Split,
    devices: int,
    cluster: Cluster,
    step: int,
    min_gain: float = 0.1,
    reward_device: Literal["device", "cpu"] = "device",
) -> Decision:
    """Whether to move to the best split of ``devices`` (which may differ from ``current``'s total: a
    node joined or left) under the costs measured in ``rows`` with ``current``; ``act`` when the
    predicted images/s gain is at least ``min_gain`` (or the current split no longer fits ``devices``)."""
    t0 = time.perf_counter()
    costs = measured_costs(rows, current, work, cluster, reward_device)
    now = predict(costs, work, current, cluster)
    best = best_split(costs, work, current.learner, devices, cluster)
    gain = best.images_per_s / now.images_per_s - 1.0 if now.images_per_s > 0 else math.inf
    must = current.total > devices  # a node left: the current split cannot stay
    act = best.split != current and (must or gain >= min_gain)
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in now.stage_s.items())
    move = (
        f"rollout {current.rollout} -> {best.split.rollout}, reward {current.reward} -> {best.split.reward}"
    )
    if not act:
        why = "already the best split" if best.split == current else f"gain {gain:+.0%} < {min_gain:.0%}"
        reason = f"keep: {why} ({stages}; {now.images_per_s:.2f} images/s)"
    else:
        lead = f"{devices} devices (was {current.total}); " if must else ""
        reason = (
            f"{lead}step {now.step_s:.2f} s ({stages}; largest: {now.bottleneck}): {move}: predicted "
            f"{now.images_per_s:.2f} -> {best.images_per_s:.2f} images/s ({gain:+.0%})"
        )
    return Decision(
        step=step,
        current=current,
        proposed=best.split,
        now_images_per_s=now.images_per_s,
        new_images_per_s=best.images_per_s,
        gain=gain,
        act=act,
        reason=reason,
        bottleneck=now.bottleneck,
        seconds=time.perf_counter() - t0,
        costs={"rollout": costs.rollout, "reward": costs.reward, "learner": costs.learner},
    )
