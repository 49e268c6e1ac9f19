"""Capacity during a run (docs/training.md "Capacity during a run"): every ``train.autoscale.every`` steps
the driver feeds the per-phase seconds it measured into the planner's step model (``vgrpo/elastic.py``:
``replan``) and, when the predicted images/s gain passes ``min_gain``, adds or removes rollout workers (each
in a placement group of its own, ``vgrpo/roles.py``) and reward replicas (a redeploy of the reward's Serve
application with a new replica count). It acts between steps only, after a step's rollouts are collected
and before the next step's are launched, so no rollout is in flight; never below one worker; the learner
group keeps its ranks. A node that joined the cluster shows up as room for more workers at the next
re-plan; a node that left took its workers with it (``RoleCalls.on_workers`` redid their shares).

Every re-plan is logged with the numbers behind it, written to the run directory's ``capacity.jsonl``
(with every change of the worker count, whatever its cause) and exported as ``capacity/*`` and
``autoscale/*`` metrics. A mixin of ``Trainer``."""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Literal

from vgrpo import placement
from vgrpo.proto.config import RunConfig
from vgrpo.roles import Roles

log = logging.getLogger("vgrpo")


def available_per_node() -> list[dict[str, float]]:
    """Each alive node's available resources (what is neither used nor reserved by a placement group)."""
    import ray

    try:  # Ray's own per-node view (ray._private: stable since Ray 2.0, no public equivalent)
        from ray._private.state import available_resources_per_node

        return [dict(v) for v in available_resources_per_node().values()]
    except Exception:  # a Ray without it: the cluster's sum, as if one node
        return [dict(ray.available_resources())]


def distribute(total: int, current: dict[str, int], cap: int) -> dict[str, int]:
    """``total`` replicas over the rewards in proportion to their ``current`` counts (largest remainder),
    each at least 1 and at most ``cap``."""
    names = sorted(current)
    weight = sum(current.values()) or 1
    share = {n: total * current[n] / weight for n in names}
    out = {n: max(1, min(cap, math.floor(share[n]))) for n in names}
    for n in sorted(names, key=lambda n: share[n] - math.floor(share[n]), reverse=True):
        if sum(out.values()) >= total:
            break
        if out[n] < cap:
            out[n] += 1
    return out


class Capacity:
    """The driver's re-planning (a mixin of ``Trainer``)."""

    cfg: RunConfig
    run: Any
    version: int
    pending: Any  # Trainer: the rollouts launched and not yet collected
    weights_for: Any  # Publishing

    def init_capacity(self) -> None:
        self.capacity_rows: list[dict[str, Any]] = []  # steps measured with the current split
        self.capacity_workers: int | None = None  # the worker count last recorded
        self.capacity_cause: str | None = None  # why the worker count changed (None: workers were lost)
        self.capacity_t0 = time.time()

    def scaled_rewards(self, roles: Roles) -> dict[str, int]:
        """The rewards whose replicas the re-planner moves: a fixed count (``auto`` is Serve's) on the run's
        devices (GPUs when the workers have GPUs); a CPU reward's replicas are left as they are."""
        if self.cfg.rollout.gpus_per_worker <= 0:
            return {}
        out = {}
        for name, n in roles.reward_replicas.items():
            server = self.cfg.reward.server(name)
            if server.num_replicas != "auto" and server.gpus > 0:
                out[name] = n
        return out

    def capacity_row(self, roles: Roles, step: int, row: dict[str, Any]) -> None:
        """Adds the ``capacity/*`` metrics to a step's ``row`` and keeps the row as a measurement of the
        current split (the first step after a start or a change is not: it pays one-time costs). Records an
        event in capacity.jsonl when the worker count changed since the last step."""
        n = len(roles.workers)
        first = self.capacity_workers is None
        if not first and n != self.capacity_workers:
            cause = self.capacity_cause or "workers lost (no node had room for a replacement)"
            self.record_capacity(
                {
                    "event": "workers",
                    "step": step,
                    "rollout_workers": n,
                    "before": self.capacity_workers,
                    "cause": cause,
                }
            )
            self.capacity_rows.clear()  # the costs measured with the old split no longer apply
            first = True
        self.capacity_workers, self.capacity_cause = n, None
        row["capacity/rollout_workers"] = n
        row["capacity/reward_replicas"] = sum(roles.reward_replicas.values())
        row["capacity/worker_replacements"] = roles.replacements
        if not first:
            self.capacity_rows.append(row)

    def record_capacity(self, event: dict[str, Any]) -> None:
        event = {"time_s": round(time.time() - self.capacity_t0, 3), **event}
        with (self.run.root / "capacity.jsonl").open("a") as f:
            f.write(json.dumps(event) + "\n")

    def replan_capacity(self, roles: Roles, step: int) -> dict[str, Any]:
        """At a re-plan step: decide from the last ``window`` steps measured with the current split and act
        on the decision. Returns the ``autoscale/*`` metrics of the step (none between re-plans)."""
        import ray

        from vgrpo.elastic import replan
        from vgrpo.plan import Cluster, Split, workload_of

        a = self.cfg.train.autoscale
        if not a.enabled or step % a.every != 0 or len(self.capacity_rows) < a.window:
            return {}
        if self.pending:  # a rollout in flight on the workers (never at the driver's call site): not now
            return {}
        rows = self.capacity_rows[-a.window :]
        scaled = self.scaled_rewards(roles)
        on_gpu = self.cfg.rollout.gpus_per_worker > 0
        room = placement.free_slots(roles.worker_bundle[0], available_per_node())
        cap = a.max_rollout_workers
        if cap is not None:
            room = min(room, max(0, cap - len(roles.workers)))
        current = Split(len(roles.workers), sum(scaled.values()), len(roles.learners))
        devices = current.total + room
        cpus = float(ray.cluster_resources().get("CPU", 0.0))
        cluster = Cluster(
            devices=devices,
            kind="GPU" if on_gpu else "CPU",
            cpus=int(cpus) or None,
            # on CPUs an actor runs at full speed on `threads` cores: the cluster's CPUs hold that many
            # actors' worth of compute, however small the CPU share each actor declares
            capacity=None if on_gpu else max(1.0, cpus / roles.threads),
        )
        reward_device: Literal["device", "cpu"] = "device" if scaled else "cpu"
        decision = replan(
            rows, workload_of(self.cfg), current, devices, cluster, step, a.min_gain, reward_device
        )
        event: dict[str, Any] = {"event": "replan", "free_slots": room, **decision.to_json()}
        out: dict[str, Any] = {
            "autoscale/predicted_gain": decision.gain if math.isfinite(decision.gain) else 0.0,
            "autoscale/predicted_images_per_s": decision.new_images_per_s,
            "autoscale/acted": int(decision.act),
            "autoscale/decision_s": decision.seconds,
        }
        log.info("step %d: capacity re-plan (%d free worker slot(s)): %s", step, room, decision.reason)
        if decision.act:
            t0 = time.perf_counter()
            event["done"] = self.apply_split(
                roles, decision.proposed.rollout, decision.proposed.reward, scaled
            )
            event["apply_s"] = time.perf_counter() - t0
            out["autoscale/apply_s"] = event["apply_s"]
            self.capacity_rows.clear()
        self.record_capacity(event)
        return out

    def apply_split(
        self, roles: Roles, workers: int, replicas: int, scaled: dict[str, int]
    ) -> dict[str, Any]:
        """Move to ``workers`` rollout workers and ``replicas`` replicas of the scaled rewards: removals
        first (they free the devices), then additions (each waits train.placement_wait_s at most for a node
        with room). Returns what was done."""
        a, train = self.cfg.train.autoscale, self.cfg.train
        before = len(roles.workers)
        target = {}
        if scaled and replicas != sum(scaled.values()):
            cap = a.max_reward_replicas or max(self.cfg.reward.server(n).max_replicas for n in scaled)
            target = distribute(max(replicas, len(scaled)), scaled, cap)
        if workers < before:
            roles.remove_workers(before - workers)
        for name, n in target.items():
            if n < scaled[name]:
                roles.scale_reward(name, n)
        if workers > before:
            added = roles.add_workers(
                workers - before, self.weights_for(roles, self.version), train.placement_wait_s
            )
            if added < workers - before:
                log.warning(
                    "capacity: %d of %d rollout worker(s) added; no node had room for the others within %.0f s "
                    "(train.placement_wait_s)",
                    added,
                    workers - before,
                    train.placement_wait_s,
                )
        for name, n in target.items():
            if n > scaled[name]:
                roles.scale_reward(name, n)
        self.capacity_cause = "re-plan"
        log.info(
            "capacity: rollout workers %d -> %d%s",
            before,
            len(roles.workers),
            "".join(f", reward {n} replicas {scaled[n]} -> {k}" for n, k in target.items()),
        )
        return {
            "rollout_workers": [before, len(roles.workers)],
            "reward_replicas": {n: [scaled[n], k] for n, k in target.items()},
        }
