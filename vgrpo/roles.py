"""The roles of one run and what happens when one of them fails: the placement group, R rollout workers,
L learner ranks and the reward servers (`Roles`), and the driver's calls on them (`RoleCalls`: a rollout
worker that dies is replaced in its placement-group bundle and its share redone; a learner rank that dies
stops the run with the resume hint). docs/training.md "Faults"."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from vgrpo import placement
from vgrpo.proto.config import RunConfig

log = logging.getLogger("vgrpo")


class TrainingError(RuntimeError):
    """A failure of one role, with the role named; the run stops with this message."""


class ActorLost(TrainingError):
    """An actor died (``ray.kill``, OOM, a lost node) while the driver waited on it. ``index`` is the
    position of its call in the list the driver waited on; ``reason`` a one-line cause."""

    def __init__(self, message: str, index: int, reason: str):
        super().__init__(message)
        self.index, self.reason = index, reason


def death_reason(e: BaseException) -> str:
    """One line out of Ray's many-line actor-death message: the error type, pid and why it died."""
    import re

    text = str(e)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    because = re.search(r"dead because (.*?)\.(?:\s|$)", text)
    why = because.group(1) if because else (lines[0][:200] if lines else "")
    kind = re.search(r"Worker exit type: (\w+)", text)
    pid = re.search(r"pid: (\d+)", text)
    return f"{type(e).__name__}{', pid ' + pid.group(1) if pid else ''}: {why}" + (
        f" ({kind.group(1)})" if kind else ""
    )


# a step in which rollout workers die this many times (replacements included) stops the run
MAX_WORKER_REPLACEMENTS_PER_STEP = 3


def auto_threads(cfg: RunConfig) -> int:
    """torch threads per actor when not configured: all cores when the roles take turns (one worker, one
    rank, synchronous), else a share of them: on CPU, OpenMP threads that outnumber the cores spin and
    starve the other roles (measured: a reward call of 0.3 s took 36 s with 2 workers + 2 ranks at 2
    threads each on 2 cores)."""
    cores = os.cpu_count() or 1
    concurrent = cfg.rollout.num_workers + cfg.learner.num_ranks
    if cfg.train.max_staleness == 0 and concurrent == 2:
        return cores
    return max(1, cores // concurrent)


def weight_sync_mode(cfg: RunConfig) -> tuple[str, str]:
    """(path, backend) of the weight broadcast: ``train.weight_sync`` resolved. auto = the collective when
    the rollout workers and the learner ranks have GPUs (NCCL), else the object store; collective on CPU
    uses gloo (how the CPU tests run this path)."""
    on_gpu = cfg.rollout.gpus_per_worker > 0 and cfg.learner.gpus_per_rank > 0
    mode = cfg.train.weight_sync
    if mode == "auto":
        mode = "collective" if on_gpu else "object_store"
    return mode, ("nccl" if on_gpu else "gloo")


# ``Trainer.published`` value of a version whose weights went by broadcast: learner rank 0 keeps them (its
# publish history); they enter the object store only if a replacement worker or a fallback asks for them
KEPT_BY_LEARNER = "kept by learner rank 0"


class Roles:
    """The actors of one run: a placement group, R rollout workers, L learner ranks, the reward servers."""

    def __init__(self, cfg: RunConfig, timeout_s: float):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from vgrpo.learner.actor import LearnerActor
        from vgrpo.learner.objectives import build_objective
        from vgrpo.reward_servers.serve import RewardClient, deploy_rewards
        from vgrpo.rollout_workers.actor import RolloutWorker

        self.cfg, self.timeout_s = cfg, timeout_s
        r, lc = cfg.rollout, cfg.learner
        bundles = placement.placement_bundles(cfg)  # the plan `vgrpo train --dry-run` prints
        self.pg = placement_group(bundles, strategy=cfg.resources.placement_strategy, name="vgrpo")
        self.get(self.pg.ready(), "placement group (resources: " + json.dumps(bundles) + ")")

        def at(i: int) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=i)

        self.objective = build_objective(cfg.algorithm)
        threads = cfg.resources.torch_threads or auto_threads(cfg)
        self.learners = [
            LearnerActor.options(
                num_cpus=lc.cpus_per_rank,
                num_gpus=lc.gpus_per_rank,
                resources=dict(lc.custom_resources) or None,
                scheduling_strategy=at(i),
            ).remote(
                cfg.model,
                lc,
                cfg.algorithm,
                r,
                rank=i,
                world_size=lc.num_ranks,
                total_steps=cfg.train.steps,
                seed=cfg.train.seed,
                threads=threads,
            )
            for i in range(lc.num_ranks)
        ]
        noise = float(getattr(cfg.algorithm.params(), "noise_level", 0.7))

        def new_worker(i: int) -> Any:
            """Rollout worker i in placement-group bundle L + i (also where a replacement goes)."""
            return RolloutWorker.options(
                num_cpus=r.cpus_per_worker,
                num_gpus=r.gpus_per_worker,
                resources=dict(r.custom_resources) or None,
                scheduling_strategy=at(lc.num_ranks + i),
            ).remote(
                cfg.model,
                r,
                cfg.sampler(),
                noise_level=noise,
                seed=cfg.train.seed,
                threads=threads,
                sigma_grid=cfg.sigma_grid(),
            )

        self._new_worker = new_worker
        self.workers = [new_worker(i) for i in range(r.num_workers)]
        self.replacements = 0
        addr, port = self.get(self.learners[0].rendezvous_address.remote(), "learner rank 0 (start-up)")
        infos = self.get(
            [
                lrn.init_distributed.remote(addr, port, cfg.train.max_staleness, cfg.train.ema)
                for lrn in self.learners
            ],
            "learner group (DeepSpeed initialisation)",
            names=[f"learner rank {i} (DeepSpeed initialisation)" for i in range(lc.num_ranks)],
        )
        self.learner_info = infos[0]
        self.get([w.ready.remote() for w in self.workers], "rollout workers (loading the policy)")
        # the weight broadcast's group: learner rank 0 (rank 0) and the rollout workers (ranks 1..R)
        self.weight_sync, self.sync_backend = weight_sync_mode(cfg)
        self.sync_members: list[Any] | None = None  # the workers of the current group (None: none built)
        if self.weight_sync == "collective":
            self.build_weight_sync()
        handles = deploy_rewards(cfg.reward, quiet=True)
        self.rewards = RewardClient(handles, cfg.reward)

    def get(self, refs: Any, role: str, timeout: float | None = None, names: list[str] | None = None) -> Any:
        """ray.get with a timeout (train.timeout_s for the whole wait). The first failure surfaces at once
        (not after the other calls finish, which may never happen when a peer of a collective died), named
        by ``names[i]`` (default ``role``): a dead actor as :class:`ActorLost` (its ``index`` says which
        call), a raising one with its traceback."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        lost: tuple[type[BaseException], ...] = (RayActorError,)
        if hasattr(ray.exceptions, "OutOfMemoryError"):  # Ray's memory monitor killed the worker
            lost += (ray.exceptions.OutOfMemoryError,)
        single = not isinstance(refs, list)
        items = [refs] if single else list(refs)
        labels = names or [role] * len(items)
        limit = timeout or self.timeout_s
        deadline = time.monotonic() + limit
        index = {ref: i for i, ref in enumerate(items)}
        out: list[Any] = [None] * len(items)
        remaining = list(dict.fromkeys(items))
        while remaining:
            left = deadline - time.monotonic()
            ready, remaining = ray.wait(remaining, num_returns=1, timeout=max(0.0, left))
            if not ready:
                waiting = sorted({labels[index[ref]] for ref in remaining})
                raise TrainingError(
                    f"{', '.join(waiting)}: no answer within {limit:.0f} s (train.timeout_s)"
                ) from None
            ref = ready[0]
            i = index[ref]
            try:
                value = ray.get(ref, timeout=max(1.0, left))
            except RayTaskError as e:
                raise TrainingError(f"{labels[i]} failed:\n{e}") from None
            except lost as e:
                why = death_reason(e)
                raise ActorLost(f"{labels[i]}: the actor died ({why})", i, why) from None
            for j, other in enumerate(items):
                if other == ref:
                    out[j] = value
        return out[0] if single else out

    def build_weight_sync(self) -> bool:
        """(Re)build the weight-broadcast group on a fresh port: learner rank 0 hosts it, every rollout
        worker joins; all joins are launched, then awaited together (a collective). A worker busy with a
        batch joins after it (one method at a time): the others wait for it. A dead worker: a warning, the
        object store for this step (which replaces it) and a new try at the next step. Any other failure:
        a warning, and the weights go by the object store for the rest of the run."""
        self.sync_members = None
        try:
            try:  # a dead member would hold learner rank 0 in the rendezvous until the timeout: look first
                self.get(
                    [w.ready.remote() for w in self.workers],
                    "rollout workers (before the weight-sync group)",
                    names=[
                        f"rollout worker {i} (before the weight-sync group)" for i in range(len(self.workers))
                    ],
                )
            except ActorLost as e:
                log.warning(
                    "rollout worker %d is dead (%s): this step's weights go by the object store (which "
                    "replaces it); the weight-broadcast group is built at the next step, with its replacement",
                    e.index,
                    e.reason,
                )
                return False
            host, port = self.get(self.learners[0].rendezvous_address.remote(), "learner rank 0 (port)")
            world = 1 + len(self.workers)
            args = (host, port)
            refs = [
                self.learners[0].join_weight_sync.remote(*args, 0, world, self.sync_backend, self.timeout_s)
            ]
            refs += [
                w.join_weight_sync.remote(*args, 1 + i, world, self.sync_backend, self.timeout_s)
                for i, w in enumerate(self.workers)
            ]
            names = ["learner rank 0 (join weight sync)"]
            names += [f"rollout worker {i} (join weight sync)" for i in range(len(self.workers))]
            self.get(refs, "weight-sync group", names=names)
        except TrainingError as e:
            log.warning(
                "could not build the weight-broadcast group (%s backend) of learner rank 0 and %d rollout "
                "workers: %s; the weights go by the object store for the rest of the run",
                self.sync_backend,
                len(self.workers),
                str(e).splitlines()[0],
            )
            self.weight_sync = "object_store"  # members that did join keep an unused group: harmless
            return False
        self.sync_members = list(self.workers)
        return True

    def ensure_weight_sync(self) -> bool:
        """True when the broadcast can be used now: the collective is on and its group holds exactly the
        current workers; a group that lost a member (a replaced worker, a failed broadcast) is rebuilt
        first, on a new port."""
        if self.weight_sync != "collective":
            return False
        members = self.sync_members
        if (
            members is None
            or len(members) != len(self.workers)
            or any(a is not b for a, b in zip(members, self.workers, strict=True))
        ):
            return self.build_weight_sync()
        return True

    def replace_worker(self, i: int, version: int, weights: Any) -> None:
        """A new rollout worker i in the dead one's placement-group bundle, holding policy ``version``
        (``weights``: its published ``WeightUpdate`` or an ObjectRef of it; None for the starting policy)."""
        import ray

        with contextlib.suppress(Exception):  # dead already, or hung: release its bundle
            ray.kill(self.workers[i], no_restart=True)
        self.replacements += 1
        w = self._new_worker(i)
        self.get(w.ready.remote(), f"rollout worker {i} (replacement, loading the policy)")
        if weights is not None:
            self.get(w.update_weights.remote(weights), f"rollout worker {i} (replacement weights)")
        self.workers[i] = w

    def dead_learner_ranks(self, probe_s: float = 10.0) -> list[int]:
        """Ranks whose actor is dead. A live rank answers ``ready`` or is busy (stuck in a collective with
        a dead peer): both count as alive; only a dead actor fails the probe."""
        import ray
        from ray.exceptions import RayActorError

        refs = [lrn.ready.remote() for lrn in self.learners]
        ray.wait(refs, num_returns=len(refs), timeout=probe_s)
        dead = []
        for rank, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=0.1)
            except RayActorError:
                dead.append(rank)
            except Exception:  # busy (GetTimeoutError) or failing for another reason: alive
                pass
        return dead

    def stop(self, cluster_ends: bool = False) -> None:
        """Kill this run's actors. On a cluster that outlives the run, also delete its reward
        applications; an embedded cluster is about to end with everything in it (and Serve's shutdown
        would only add retry warnings from its controller)."""
        import ray

        from vgrpo.reward_servers.serve import shutdown_rewards

        if not cluster_ends:
            try:
                shutdown_rewards()
            except Exception as e:  # shutting down: report, do not mask the run's own outcome
                log.warning("reward servers did not shut down cleanly: %s", e)
        for a in self.workers + self.learners:
            ray.kill(a)
        ray.util.remove_placement_group(self.pg)


class RoleCalls:
    """The driver's waits on the roles, with their fault handling (a mixin of ``Trainer``)."""

    cfg: RunConfig
    run: Any
    version: int

    weights_for: Callable[[Roles, int], Any]  # Publishing

    # --- rollout workers that die --------------------------------------------------------------------

    def on_workers(self, roles: Roles, calls: dict[int, Any], what: str, version: int) -> dict[int, Any]:
        """Run ``calls[i](worker i)`` and wait for all. A worker that dies is replaced (a new actor in its
        placement-group bundle, loaded with policy ``version``, the one the call expects) and its call
        redone; then it is brought up to the current version. Gives up after
        MAX_WORKER_REPLACEMENTS_PER_STEP deaths in one call."""
        refs = {i: fn(roles.workers[i]) for i, fn in calls.items()}
        deaths = 0
        while True:
            order = list(refs)
            try:
                values = roles.get(
                    [refs[i] for i in order], what, names=[f"rollout worker {i} ({what})" for i in order]
                )
                return dict(zip(order, values, strict=True))
            except ActorLost as e:
                i = order[e.index]
                deaths += 1
                if deaths > MAX_WORKER_REPLACEMENTS_PER_STEP:
                    raise TrainingError(
                        f"rollout worker {i} ({what}) died again: {deaths} deaths in one call, the last "
                        f"{e.reason}; not replacing it any more. " + self.resume_hint()
                    ) from None
                log.warning(
                    "rollout worker %d died during %s (%s); replacing it in its placement-group bundle "
                    "with policy version %d and redoing its share",
                    i,
                    what,
                    e.reason,
                    version,
                )
                roles.replace_worker(i, version, self.weights_for(roles, version))
                refs[i] = calls[i](roles.workers[i])
                if version < self.version:  # the redone share sampled `version`; now catch up
                    roles.workers[i].update_weights.remote(self.weights_for(roles, self.version))

    def resume_hint(self) -> str:
        ckpts = self.run.checkpoint_dirs()
        where = f"the last checkpoint (step {ckpts[-1][0]})" if ckpts else "step 0 (no checkpoint yet)"
        return f"`vgrpo train --run-dir {self.run.root} --resume` continues from {where}."

    def on_learners(self, roles: Roles, refs: list[Any], what: str, step: int) -> list[Any]:
        """Wait for one call on every learner rank. A rank that dies stops the run (a DeepSpeed group cannot
        lose a member): the message names the rank and how to resume."""
        names = [f"learner rank {k} ({what})" for k in range(len(refs))]
        try:
            return roles.get(refs, what, names=names)
        except TrainingError as e:
            dead = [e.index] if isinstance(e, ActorLost) else roles.dead_learner_ranks()
            if not dead:
                raise
            why = e.reason if isinstance(e, ActorLost) else "its actor is dead"
            ranks = ", ".join(str(k) for k in dead)
            raise TrainingError(
                f"learner rank {ranks} died during {what} of step {step} ({why}). A DeepSpeed group cannot "
                f"go on without one of its ranks, so the run stops. " + self.resume_hint()
            ) from None
