"""Where the actors of a run go: the Ray resource bundles the driver asks for, and the placement plan that
``vgrpo train --dry-run`` prints and checks against a cluster. Pure functions of the configuration and a
description of the cluster's nodes: no Ray, no torch (``cluster_from_address`` alone talks to Ray).

    learner rank i    -> bundle i of the learners' placement group   {CPU: cpus_per_rank, GPU: gpus_per_rank, custom}
    rollout worker j  -> a one-bundle placement group of its own    {CPU: cpus_per_worker, GPU: gpus_per_worker, custom}
    reward replica    -> a Serve replica (own actor)                {CPU: cpus, GPU: gpus (fractions share), custom}
    driver            -> the process running `vgrpo train` (no Ray resources)

The learners' group is created first (``resources.placement_strategy`` applies to it), then one group per
rollout worker (so that a worker can be added, removed or replaced alone: vgrpo/capacity.py), then Serve
places the reward replicas on what is left; the fit check follows that order, packing first-fit-decreasing
onto the nodes described.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

from vgrpo.proto.config import ConfigError, RewardServerConfig, RunConfig

Resources = dict[str, float]

EPS = 1e-9
# a bundle must ask for something; an all-zero request (cpus 0, gpus 0) gets this token CPU share
MIN_BUNDLE: Resources = {"CPU": 0.01}


def actor_resources(cpus: float, gpus: float, custom: dict[str, float] | None = None) -> Resources:
    """One actor's Ray resource request; zero amounts are dropped, an empty request gets ``MIN_BUNDLE``."""
    req = {"CPU": float(cpus), "GPU": float(gpus), **{k: float(v) for k, v in (custom or {}).items()}}
    return {k: v for k, v in req.items() if v > 0} or dict(MIN_BUNDLE)


def placement_bundles(cfg: RunConfig) -> list[Resources]:
    """The run's placement-group bundles: learner ranks first (bundle i = rank i: the learners' group),
    then rollout workers (entry L + j = worker j's own group). The driver's ``Roles`` creates its groups
    from exactly this list."""
    lc, r = cfg.learner, cfg.rollout
    learner = actor_resources(lc.cpus_per_rank, lc.gpus_per_rank, lc.custom_resources)
    worker = actor_resources(r.cpus_per_worker, r.gpus_per_worker, r.custom_resources)
    return [dict(learner) for _ in range(lc.num_ranks)] + [dict(worker) for _ in range(r.num_workers)]


def reward_replicas(server: RewardServerConfig) -> int:
    """Replicas Serve starts with: num_replicas, or for ``auto`` its initial count max(1, min_replicas)."""
    if server.num_replicas == "auto":
        return max(1, server.min_replicas)
    return int(server.num_replicas)


@dataclass(frozen=True)
class ActorGroup:
    role: str  # "learner", "rollout", "reward:<name>"
    count: int
    per_actor: Resources
    in_placement_group: bool
    note: str = ""

    def total(self) -> Resources:
        return {k: v * self.count for k, v in self.per_actor.items()}


def actor_groups(cfg: RunConfig) -> list[ActorGroup]:
    """Every actor of the run by role. Raises ConfigError for settings no cluster could serve."""
    lc, r = cfg.learner, cfg.rollout
    groups = [
        ActorGroup(
            "learner",
            lc.num_ranks,
            actor_resources(lc.cpus_per_rank, lc.gpus_per_rank, lc.custom_resources),
            True,
            f"DeepSpeed ZeRO-{lc.zero_stage} group",
        ),
        ActorGroup(
            "rollout",
            r.num_workers,
            actor_resources(r.cpus_per_worker, r.gpus_per_worker, r.custom_resources),
            True,
            f"{r.prompts_per_step} prompts x {r.group_size} images, {r.num_steps} {cfg.sampler()} steps",
        ),
    ]
    problems = gpu_problems(cfg)
    for name in cfg.reward.weights:
        s = cfg.reward.server(name)
        where = f"reward.servers.{name}"
        if s.num_replicas == "auto" and s.min_replicas > s.max_replicas:
            problems.append(f"{where}: min_replicas={s.min_replicas} > max_replicas={s.max_replicas}")
        if s.num_replicas != "auto" and int(s.num_replicas) < 1:
            problems.append(f'{where}.num_replicas={s.num_replicas}: want >= 1, or "auto"')
        if s.max_ongoing_requests is not None and s.max_ongoing_requests < s.max_batch_size:
            problems.append(
                f"{where}.max_ongoing_requests={s.max_ongoing_requests} < max_batch_size={s.max_batch_size}"
            )
        note = "Serve replicas"
        if s.num_replicas == "auto":
            note += f", autoscaling {s.min_replicas}..{s.max_replicas} (starts with the count shown)"
        groups.append(
            ActorGroup(
                f"reward:{name}",
                reward_replicas(s),
                actor_resources(s.cpus, s.gpus, s.custom_resources),
                False,
                note,
            )
        )
    if problems:
        raise ConfigError(problems)
    return groups


def gpu_problems(cfg: RunConfig) -> list[str]:
    """GPU requests Ray or NCCL would refuse only once the actors start."""
    lc = cfg.learner
    asks = [
        ("rollout.gpus_per_worker", cfg.rollout.gpus_per_worker),
        ("learner.gpus_per_rank", lc.gpus_per_rank),
    ]
    asks += [(f"reward.servers.{n}.gpus", cfg.reward.server(n).gpus) for n in cfg.reward.weights]
    problems = [
        f"{key} = {g:g}: Ray shares a GPU only in fractions below 1; fix: a whole number or a fraction < 1"
        for key, g in asks
        if g > 1 and g != int(g)
    ]
    if lc.backend == "nccl" and lc.gpus_per_rank == 0:
        problems.append(
            "learner.backend = 'nccl' needs GPUs but learner.gpus_per_rank = 0; "
            "fix: --set learner.gpus_per_rank=1 (or learner.backend=auto)"
        )
    if lc.backend == "nccl" and 0 < lc.gpus_per_rank < 1 and lc.num_ranks > 1:
        problems.append(
            f"learner.gpus_per_rank = {lc.gpus_per_rank:g} with NCCL: two ranks may share a GPU, which NCCL "
            "refuses; fix: --set learner.gpus_per_rank=1"
        )
    return problems


def check_reward_names(cfg: RunConfig) -> None:
    """Unknown reward names are configuration errors (checked without importing any reward model)."""
    from vgrpo.reward_servers.registry import available_rewards, is_resolvable

    known = set(available_rewards())
    problems = []
    for name in cfg.reward.weights:
        if not is_resolvable(name, known, cfg.reward.server(name).own_code()):
            problems.append(
                f"reward.weights.{name}: unknown reward; available: {', '.join(sorted(known))} "
                "(or a plug-in as package.module:ClassName)"
            )
    if problems:
        raise ConfigError(problems)


# ----------------------------------------------------------------------------------------------- clusters


class ResourcesError(ValueError):
    """A --resources description that cannot be read."""


def parse_resources(text: str) -> tuple[list[Resources], bool]:
    """``'{"GPU": 64, "CPU": 1024}'`` (the whole cluster, per-node packing unknown) or a per-node list
    ``'[{"GPU": 8, "CPU": 96}, ...]'``. Returns (nodes, aggregate)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ResourcesError(
            f"--resources {text!r} is not JSON ({e.msg}); fix: e.g. "
            """--resources '{"GPU": 64, "CPU": 1024}' or a per-node list """
            """'[{"GPU": 8, "CPU": 96}, {"GPU": 8, "CPU": 96}]'"""
        ) from None
    aggregate = isinstance(data, dict)
    nodes = [data] if aggregate else data
    if not isinstance(nodes, list) or not nodes:
        raise ResourcesError(f"--resources {text!r}: want a JSON object or a non-empty list of objects")
    out = []
    for i, node in enumerate(nodes):
        where = "--resources" if aggregate else f"--resources node {i}"
        if not isinstance(node, dict):
            raise ResourcesError(f"{where}: {node!r} is not an object of resource amounts")
        res: Resources = {}
        for k, v in node.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ResourcesError(f"{where}: {k} = {v!r}; want a number >= 0")
            res[str(k)] = float(v)
        out.append(res)
    return out, aggregate


def local_gpu_count() -> int:
    """GPUs the embedded Ray would see: CUDA_VISIBLE_DEVICES when set, else `nvidia-smi -L`, else 0."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def local_cluster(cfg: RunConfig) -> list[Resources]:
    """The embedded local Ray that `vgrpo train` would start: resources.num_cpus / num_gpus, else this
    machine's cores and GPUs."""
    cpus = cfg.resources.num_cpus if cfg.resources.num_cpus is not None else float(os.cpu_count() or 1)
    gpus = cfg.resources.num_gpus if cfg.resources.num_gpus is not None else float(local_gpu_count())
    return [{"CPU": float(cpus), "GPU": float(gpus)}]


def cluster_from_address(address: str) -> list[Resources]:
    """The total resources of each alive node of a running cluster (joins it as a client; starts no actor)."""
    from vgrpo.launch import check_reachable, enable_token_auth_if_available

    check_reachable(address)
    enable_token_auth_if_available()  # before `import ray`: Ray reads RAY_AUTH_MODE when imported
    import ray

    ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    try:
        return [
            {k: float(v) for k, v in n["Resources"].items() if not k.startswith("node:")}
            for n in ray.nodes()
            if n.get("Alive")
        ]
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------------------------- the plan


@dataclass
class Demand:
    label: str
    resources: Resources
    node: int | None = None


@dataclass
class Plan:
    groups: list[ActorGroup]
    bundles: list[Resources]
    nodes: list[Resources]
    aggregate: bool
    strategy: str
    source: str
    demands: list[Demand] = field(default_factory=list)
    short: list[str] = field(default_factory=list)  # resource names the cluster lacks
    problem: str = ""  # why it does not fit ("" when it fits)
    notes: list[str] = field(default_factory=list)  # fits, but worth knowing

    @property
    def fits(self) -> bool:
        return not self.problem

    def needed(self) -> Resources:
        return _sum(g.total() for g in self.groups)

    def available(self) -> Resources:
        return _sum(self.nodes)


def _sum(items: Any) -> Resources:
    out: Resources = {}
    for res in items:
        for k, v in res.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _fits(req: Resources, free: Resources) -> bool:
    return all(free.get(k, 0.0) + EPS >= v for k, v in req.items())


def free_slots(req: Resources, nodes: list[Resources]) -> int:
    """How many more actors of resources ``req`` the nodes' free resources hold, each whole on one node
    (the fit rule of :func:`_fits`): the room the capacity re-planner sees (vgrpo/capacity.py)."""
    total = 0
    for free in nodes:
        fits = [math.floor((free.get(k, 0.0) + EPS) / v) for k, v in req.items() if v > 0]
        total += max(0, min(fits)) if fits else 0
    return total


def _take(req: Resources, free: Resources) -> None:
    for k, v in req.items():
        free[k] = free.get(k, 0.0) - v


def _size(req: Resources) -> tuple[float, float, float]:
    return (
        req.get("GPU", 0.0),
        sum(v for k, v in req.items() if k not in ("GPU", "CPU")),
        req.get("CPU", 0.0),
    )


def _pack(demands: list[Demand], free: list[Resources], single_node: bool = False) -> Demand | None:
    """First-fit decreasing onto the nodes' free resources (updated in place); returns the first demand
    that fits nowhere, or None. ``single_node``: all demands on one node (STRICT_PACK)."""
    if single_node:
        total = _sum(d.resources for d in demands)
        for i, node in enumerate(free):
            if _fits(total, node):
                _take(total, node)
                for d in demands:
                    d.node = i
                return None
        return demands[0] if demands else None
    for d in sorted(demands, key=lambda d: _size(d.resources), reverse=True):
        for i, node in enumerate(free):
            if _fits(d.resources, node):
                _take(d.resources, node)
                d.node = i
                break
        else:
            return d
    return None


def _order(key: str) -> tuple[bool, bool, str]:
    """GPU first, then CPU, then custom resources by name."""
    return (key != "GPU", key != "CPU", key)


def _fmt(res: Resources) -> str:
    order = sorted(res, key=_order)
    return ", ".join(f"{k} {v:g}" for k, v in ((k, res[k]) for k in order)) or "none"


def plan_placement(
    cfg: RunConfig, nodes: list[Resources], aggregate: bool = False, source: str = "--resources"
) -> Plan:
    """The placement plan of ``cfg`` on a cluster of ``nodes``; ``plan.problem`` says why it does not fit
    and ``plan.short`` names the resources that are short. Raises ConfigError for a bad configuration."""
    groups = actor_groups(cfg)
    bundles = placement_bundles(cfg)
    strategy = cfg.resources.placement_strategy
    plan = Plan(groups, bundles, [dict(n) for n in nodes], aggregate, strategy, source)
    roles = ["learner rank"] * cfg.learner.num_ranks + ["rollout worker"] * cfg.rollout.num_workers
    offset = {"learner rank": 0, "rollout worker": cfg.learner.num_ranks}
    pg = [
        Demand(f"{role} {i - offset[role]}", b)
        for i, (role, b) in enumerate(zip(roles, bundles, strict=True))
    ]
    serve = [
        Demand(f"{g.role} replica {j}", dict(g.per_actor))
        for g in groups
        if not g.in_placement_group
        for j in range(g.count)
    ]
    plan.demands = pg + serve
    plan.notes = balance_notes(cfg)
    ranks = cfg.learner.num_ranks

    need, have = plan.needed(), plan.available()
    short = [k for k in sorted(need, key=_order) if need[k] > have.get(k, 0.0) + EPS]
    if short:
        plan.short = short
        parts = []
        for k in short:
            by_role = " + ".join(f"{g.role} {g.total()[k]:g}" for g in groups if g.total().get(k, 0.0) > 0)
            parts.append(f"{k}: the plan needs {need[k]:g} ({by_role}), the cluster has {have.get(k, 0.0):g}")
        plan.problem = "short of " + "; ".join(parts)
        return plan

    free = [dict(n) for n in nodes]
    strict = strategy == "STRICT_PACK"
    stuck = _pack(pg[:ranks], free, single_node=strict)
    whole_group = strict and stuck is not None
    stuck = stuck or _pack(pg[ranks:], free) or _pack(serve, free)
    if stuck is not None:
        req = _sum(d.resources for d in pg[:ranks]) if whole_group else stuck.resources
        most = {k: max(n.get(k, 0.0) for n in free) for k in req}
        plan.short = [k for k in sorted(req, key=_order) if most[k] + EPS < req[k]] or list(req)
        what = (
            f"the learners' placement group ({_fmt(req)}; STRICT_PACK: all learner ranks on one node)"
            if whole_group
            else f"{stuck.label} ({_fmt(req)})"
        )
        after = "" if whole_group else " once the actors before it are placed"
        plan.problem = (
            f"short of {', '.join(plan.short)} on any one node: {what} fits on no node{after} "
            f"(most left on a node: {_fmt(most)})"
        )
        pinned = sorted(set(cfg.rollout.custom_resources) - set(cfg.learner.custom_resources))
        if pinned and stuck in pg[ranks:]:
            plan.problem += (
                f"; the learners' group is placed first and may take the nodes that hold {', '.join(pinned)}: "
                f"fix: pin it elsewhere with learner.custom_resources"
            )
    return plan


def balance_notes(cfg: RunConfig) -> list[str]:
    """Shapes that fit but waste GPUs: the driver hands whole prompt groups to each worker and rank, so
    the busiest one sets the step time."""
    notes = []
    p = cfg.rollout.prompts_per_step
    for role, n in (("rollout workers", cfg.rollout.num_workers), ("learner ranks", cfg.learner.num_ranks)):
        if p < n:
            notes.append(f"{n} {role} for {p} prompts per step: {n - p} of them get no prompt group")
        elif p % n:
            notes.append(
                f"{p} prompts over {n} {role}: {p // n}-{p // n + 1} groups each; the busiest sets the pace"
            )
    return notes


def format_plan(plan: Plan) -> str:
    """The plan as a table for the terminal; the last line says whether it fits."""
    have = plan.available()
    workers = sum(g.count for g in plan.groups if g.role == "rollout")
    if plan.aggregate:
        cluster = f"{_fmt(have)} in all ({plan.source}; per-node packing unchecked: give a per-node list)"
    else:
        cluster = f"{len(plan.nodes)} node{'s' * (len(plan.nodes) != 1)}, {_fmt(have)} ({plan.source})"
    lines = [
        "placement plan (dry run: nothing started)",
        f"  cluster:  {cluster}",
        f"  strategy: {plan.strategy} (the learners' placement group of {len(plan.bundles) - workers} "
        f"bundle{'s' * (len(plan.bundles) - workers != 1)}; each rollout worker its own)",
        "",
        f"  {'role':<22}{'actors':>7}  {'per actor':<28}{'total':<30}where",
    ]
    for g in plan.groups:
        if g.role == "learner":
            where = f"bundles 0..{g.count - 1}" if g.count > 1 else "bundle 0"
        elif g.in_placement_group:
            where = "own groups" if g.count > 1 else "own group"
        else:
            where = "own actors"
        lines.append(f"  {g.role:<22}{g.count:>7}  {_fmt(g.per_actor):<28}{_fmt(g.total()):<30}{where}")
        if g.note:
            lines.append(f"  {'':<31}{g.note}")
    lines.append(f"  {'driver':<22}{1:>7}  {'none':<28}{'':<30}the process running `vgrpo train`")
    need = plan.needed()
    lines.append("")
    order = sorted(need, key=_order)
    lines.append("  needs:    " + ", ".join(f"{k} {need[k]:g} of {have.get(k, 0.0):g}" for k in order))
    if not plan.aggregate and plan.fits and len(plan.nodes) > 1:
        for i in range(len(plan.nodes)):
            on = [d.label for d in plan.demands if d.node == i]
            if on:
                lines.append(f"  node {i}:   {_summarise(on)}")
    lines += [f"  note:     {n}" for n in plan.notes]
    if plan.fits:
        gpus = f"{need.get('GPU', 0.0):g}/{have.get('GPU', 0.0):g} GPU, " if need.get("GPU") else ""
        lines.append(f"fits: {gpus}{need.get('CPU', 0.0):g}/{have.get('CPU', 0.0):g} CPU")
    else:
        lines.append(f"does not fit: {plan.problem}")
    return "\n".join(lines)


def _summarise(labels: list[str]) -> str:
    counts: dict[str, int] = {}
    for label in labels:
        role = label.rsplit(" ", 1)[0]
        counts[role] = counts.get(role, 0) + 1
    return ", ".join(f"{role} x{n}" for role, n in counts.items())
