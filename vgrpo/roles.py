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
    """The actors of one run: L learner ranks in one placement group (a DeepSpeed group is placed, and
    lives, as a whole), R rollout workers each in a one-bundle placement group of its own (so that one can
    be added, removed or replaced alone: docs/training.md "Capacity during a run"), the reward servers."""

    def __init__(self, cfg: RunConfig, timeout_s: float):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from vgrpo.learner.actor import LearnerActor
        from vgrpo.learner.objectives import build_objective
        from vgrpo.reward_servers.serve import RewardClient, deploy_rewards

        self.cfg, self.timeout_s = cfg, timeout_s
        r, lc = cfg.rollout, cfg.learner
        bundles = placement.placement_bundles(cfg)  # the plan `vgrpo train --dry-run` prints
        self.learner_bundles, self.worker_bundle = bundles[: lc.num_ranks], bundles[lc.num_ranks :][:1]
        self.pg = placement_group(
            self.learner_bundles, strategy=cfg.resources.placement_strategy, name="vgrpo"
        )
        self.get(
            self.pg.ready(), f"the learners' placement group (resources: {json.dumps(self.learner_bundles)})"
        )

        self.objective = build_objective(cfg.algorithm)
        self.threads = cfg.resources.torch_threads or auto_threads(cfg)
        self.learners = [
            LearnerActor.options(
                num_cpus=lc.cpus_per_rank,
                num_gpus=lc.gpus_per_rank,
                resources=dict(lc.custom_resources) or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=i
                ),
            ).remote(
                cfg.model,
                lc,
                cfg.algorithm,
                r,
                rank=i,
                world_size=lc.num_ranks,
                total_steps=cfg.train.steps,
                seed=cfg.train.seed,
                threads=self.threads,
            )
            for i in range(lc.num_ranks)
        ]
        self.workers: list[Any] = []  # the live rollout workers, in the order prompts are split over them
        self.worker_pgs: list[Any] = []  # each worker's own placement group
        self.worker_ids: list[int] = []  # stable names: "rollout worker <id>" in logs
        self._next_id = 0
        self.replacements = 0
        for _ in range(r.num_workers):  # at start-up every configured worker must be placed
            placed = self._place_worker(timeout_s, required=True)
            assert placed is not None  # required: raised instead
            self._append(*placed)
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
        self.reward_replicas = {name: placement.reward_replicas(cfg.reward.server(name)) for name in handles}

    # --- rollout workers, one placement group each ----------------------------------------------------

    def _place_worker(self, wait_s: float, required: bool = False) -> tuple[Any, Any] | None:
        """A new rollout worker in a one-bundle placement group of its own, or None when no node has room
        for the bundle within ``wait_s`` (the group is removed again; ``required``: a TrainingError naming
        the resources instead). The worker starts loading the policy; :meth:`ready` tells when it is done."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from vgrpo.rollout_workers.actor import RolloutWorker

        cfg, r = self.cfg, self.cfg.rollout
        pg = placement_group(self.worker_bundle, name=f"vgrpo-rollout-{self._next_id}")
        ready, _ = ray.wait([pg.ready()], timeout=wait_s)
        if not ready:
            remove_placement_group(pg)
            if required:
                raise TrainingError(
                    f"rollout worker {self._next_id}: no node has room for its resources "
                    f"{json.dumps(self.worker_bundle[0])} within {wait_s:.0f} s (the learner group holds "
                    f"{json.dumps(self.learner_bundles)}); fix: fewer rollout.num_workers, smaller "
                    "rollout.cpus_per_worker/gpus_per_worker, or a larger cluster (`vgrpo train --dry-run` "
                    "prints the plan)"
                )
            return None
        noise = float(getattr(cfg.algorithm.params(), "noise_level", 0.7))
        worker = RolloutWorker.options(
            num_cpus=r.cpus_per_worker,
            num_gpus=r.gpus_per_worker,
            resources=dict(r.custom_resources) or None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=0
            ),
        ).remote(
            cfg.model,
            r,
            cfg.sampler(),
            noise_level=noise,
            seed=cfg.train.seed,
            threads=self.threads,
            sigma_grid=cfg.sigma_grid(),
        )
        return worker, pg

    def _append(self, worker: Any, pg: Any) -> None:
        self.workers.append(worker)
        self.worker_pgs.append(pg)
        self.worker_ids.append(self._next_id)
        self._next_id += 1

    def name(self, worker: Any) -> str:
        """``rollout worker <id>``: a worker's name for as long as the run lasts (positions shift when one
        leaves)."""
        for w, wid in zip(self.workers, self.worker_ids, strict=True):
            if w is worker:
                return f"rollout worker {wid}"
        return "rollout worker (gone)"

    def _release(self, i: int) -> None:
        """Kill worker i (dead already, or hung) and remove its placement group; the lists drop it."""
        import ray
        from ray.util.placement_group import remove_placement_group

        with contextlib.suppress(Exception):
            ray.kill(self.workers[i], no_restart=True)
        with contextlib.suppress(Exception):
            remove_placement_group(self.worker_pgs[i])
        del self.workers[i], self.worker_pgs[i], self.worker_ids[i]

    def _load(self, worker: Any, name: str, weights: Any) -> None:
        self.get(worker.ready.remote(), f"{name} (loading the policy)")
        if weights is not None:
            self.get(worker.update_weights.remote(weights), f"{name} (weights)")

    def add_workers(self, n: int, weights: Any, wait_s: float) -> int:
        """Up to ``n`` new rollout workers, each in its own placement group, loaded with ``weights`` (the
        current version's published update; None: the starting policy). Stops at the first that no node
        can take within ``wait_s``. Returns how many joined."""
        added = 0
        for _ in range(n):
            placed = self._place_worker(wait_s)
            if placed is None:
                break
            self._append(*placed)
            try:
                self._load(self.workers[-1], f"rollout worker {self.worker_ids[-1]} (added)", weights)
            except TrainingError as e:  # the run goes on with the workers it has
                log.warning("an added rollout worker did not start, the run goes on without it: %s", e)
                self._release(len(self.workers) - 1)
                break
            added += 1
        return added

    def remove_workers(self, n: int) -> int:
        """Remove the last ``n`` rollout workers (never the last one); returns how many left. Only between
        steps: no call of theirs is in flight."""
        n = min(n, len(self.workers) - 1)
        for _ in range(n):
            self._release(len(self.workers) - 1)
        return max(0, n)

    def replace_worker(self, worker: Any, version: int, weights: Any) -> Any | None:
        """A dead (or hung) rollout worker replaced by a new one in a new placement group, loaded with
        policy ``version`` (``weights``: its published ``WeightUpdate`` or an ObjectRef of it; None for the
        starting policy); returns the new worker in the dead one's position. When no node has room within
        train.placement_wait_s (its node left the cluster and the others are full) the worker leaves the
        run instead and None is returned: the caller redoes its share on the others."""
        i = next(k for k, w in enumerate(self.workers) if w is worker)
        wid = self.worker_ids[i]
        self._release(i)
        self.replacements += 1
        placed = self._place_worker(self.cfg.train.placement_wait_s)
        if placed is None:
            log.warning(
                "rollout worker %d: no node has room for a replacement (%s) within %.0f s "
                "(train.placement_wait_s); the run goes on with %d rollout worker(s)",
                wid,
                json.dumps(self.worker_bundle[0]),
                self.cfg.train.placement_wait_s,
                len(self.workers),
            )
            return None
        new, pg = placed
        self._load(new, f"rollout worker {wid} (replacement)", weights)
        self.workers.insert(i, new)
        self.worker_pgs.insert(i, pg)
        self.worker_ids.insert(i, wid)
        return new

    # --- rewards ---------------------------------------------------------------------------------------

    def scale_reward(self, name: str, replicas: int) -> None:
        """Reward ``name`` served by ``replicas`` replicas: its Serve application is redeployed with the new
        count (Serve starts or stops replicas; the others keep serving). docs/training.md."""
        from vgrpo.reward_servers.serve import rescale_reward

        rescale_reward(self.cfg.reward, name, replicas)
        self.reward_replicas[name] = replicas

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
                    names=[f"{self.name(w)} (before the weight-sync group)" for w in self.workers],
                )
            except ActorLost as e:
                log.warning(
                    "%s is dead (%s): this step's weights go by the object store (which replaces it); the "
                    "weight-broadcast group is built at the next step, with its replacement",
                    self.name(self.workers[e.index]),
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
            names += [f"{self.name(w)} (join weight sync)" for w in self.workers]
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
        for pg in [*self.worker_pgs, self.pg]:
            with contextlib.suppress(Exception):  # a node that left took its group with it
                ray.util.remove_placement_group(pg)


class RoleCalls:
    """The driver's waits on the roles, with their fault handling (a mixin of ``Trainer``)."""

    cfg: RunConfig
    run: Any
    version: int

    weights_for: Callable[[Roles, int], Any]  # Publishing

    # --- rollout workers that die --------------------------------------------------------------------

    def on_workers(
        self,
        roles: Roles,
        calls: dict[int, Any],
        what: str,
        version: int,
        owners: dict[int, Any] | None = None,
        redo_elsewhere: bool = True,
    ) -> dict[int, Any]:
        """Run ``calls[k](owners[k])`` (default owner: ``roles.workers[k]``) and wait for all. A worker that
        dies is replaced (a new actor in a new placement group, loaded with policy ``version``, the one the
        calls expect) and its calls redone; then it is brought up to the current version. When no node has
        room for a replacement (its node left the cluster) the worker leaves the run and its calls are redone
        on the live worker with the fewest (``redo_elsewhere``: a share of the step must not be lost; that
        worker samples it with ``version`` and returns to the current one), or dropped (a weight update meant
        for the dead worker only). Gives up when more than MAX_WORKER_REPLACEMENTS_PER_STEP of the actors
        this call started or handed a share to die too, or when no rollout worker is left."""
        owner = dict(owners) if owners is not None else {k: roles.workers[k] for k in calls}
        refs = {k: fn(owner[k]) for k, fn in calls.items()}
        fresh: set[int] = set()  # ids of the actors given a share here: their deaths count
        deaths = 0
        while refs:
            order = list(refs)
            try:
                values = roles.get(
                    [refs[k] for k in order], what, names=[f"{roles.name(owner[k])} ({what})" for k in order]
                )
                return dict(zip(order, values, strict=True))
            except ActorLost as e:
                dead = owner[order[e.index]]
                name = roles.name(dead)
                if id(dead) in fresh:
                    deaths += 1
                if deaths > MAX_WORKER_REPLACEMENTS_PER_STEP:
                    raise TrainingError(
                        f"{name} ({what}) died again: {deaths} deaths in one call, the last {e.reason}; not "
                        "replacing it any more. " + self.resume_hint()
                    ) from None
                mine = [k for k in refs if owner[k] is dead]
                known = any(w is dead for w in roles.workers)  # else replaced or gone in an earlier call
                log.warning(
                    "%s died during %s (%s); %s",
                    name,
                    what,
                    e.reason,
                    f"replacing it with policy version {version} and redoing its share"
                    if known
                    else "redoing its share",
                )
                new = roles.replace_worker(dead, version, self.weights_for(roles, version)) if known else None
                if new is not None:
                    fresh.add(id(new))
                    for k in mine:
                        owner[k], refs[k] = new, calls[k](new)
                    if version < self.version:  # the redone share sampled `version`; now catch up
                        new.update_weights.remote(self.weights_for(roles, self.version))
                    continue
                if not roles.workers:
                    raise TrainingError(
                        f"{name} died during {what} ({e.reason}) and no rollout worker is left: no node has "
                        f"room for one ({json.dumps(roles.worker_bundle[0])}). " + self.resume_hint()
                    ) from None
                for k in mine:
                    del refs[k]
                    if not redo_elsewhere:
                        continue
                    host = min(roles.workers, key=lambda w: sum(owner[j] is w for j in refs))
                    owner[k] = host
                    fresh.add(id(host))
                    # actor calls run in order: sample the share with its version, then return to the current
                    if version != self.version:
                        host.update_weights.remote(self.exact_weights(roles, version))
                    refs[k] = calls[k](host)
                    if version != self.version:
                        host.update_weights.remote(self.exact_weights(roles, self.version))
                    log.warning("%s's share of %s goes to %s", name, what, roles.name(host))
        return {}

    def exact_weights(self, roles: Roles, version: int) -> Any:
        """The weights of ``version`` to load into a worker that holds another one: ``weights_for``'s, and
        for the starting policy (None there: a new worker holds it already) learner rank 0's copy (kept
        when train.max_staleness >= 1, the only case in which a share of version 0 is redone late)."""
        weights = self.weights_for(roles, version)
        return weights if weights is not None else roles.learners[0].published_weights.remote(version)

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
