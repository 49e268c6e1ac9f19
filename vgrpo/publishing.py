"""Publishing the learner's weights to the rollout workers after every update (docs/training.md "Weight
sync"): the object-store path (one ``ray.put`` of a ``WeightUpdate``, every worker fetches it), the
collective broadcast (``core/weight_sync.py``) and its fallback, and the trained / EMA weights that
evaluation and checkpoints read. A mixin of ``Trainer``."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from vgrpo.proto.config import RunConfig
from vgrpo.proto.messages import WeightUpdate
from vgrpo.roles import KEPT_BY_LEARNER, Roles, TrainingError, death_reason

log = logging.getLogger("vgrpo")


class Publishing:
    cfg: RunConfig
    version: int
    published: dict[int, Any]
    pending: deque[Any]
    _ema_cache: tuple[int, Any] | None
    _current_cache: tuple[int, Any] | None

    on_workers: Callable[..., dict[int, Any]]  # RoleCalls
    on_learners: Callable[[Roles, list[Any], str, int], list[Any]]  # RoleCalls
    resume_hint: Callable[[], str]  # RoleCalls

    def _publish(self, version: int, weights: Any) -> Any:
        """Keep ``weights`` (an ObjectRef) as version ``version``; drop versions no pending rollout can
        still need (max_staleness + 1 back)."""
        self.published[version] = weights
        for v in [v for v in self.published if v < version - self.cfg.train.kept_versions()]:
            del self.published[v]
        return weights

    def weights_for(self, roles: Roles, version: int) -> Any:
        """The published weights of ``version`` for a replacement worker or an object-store update: an
        ObjectRef of its ``WeightUpdate``, or None (the starting policy). A version that went by broadcast
        is fetched from learner rank 0's publish history on first use (and then kept as an ObjectRef like
        the others)."""
        weights = self.published.get(version)
        if isinstance(weights, str) and weights == KEPT_BY_LEARNER:
            weights = roles.learners[0].published_weights.remote(version)
            self.published[version] = weights
        return weights

    # --- weight sync -------------------------------------------------------------------------------

    def store_weights(self, roles: Roles, step: int) -> int:
        """The object-store path: every learner rank publishes (a collective under ZeRO-3), rank 0's state
        is ray.put once and each worker fetches it. Returns the bytes published."""
        import ray

        cfg = self.cfg
        states = self.on_learners(
            roles, [lrn.publish.remote(k == 0) for k, lrn in enumerate(roles.learners)], "publish", step
        )
        weights_ref = self._publish(step, ray.put(WeightUpdate(step, states[0])))
        updates = {i: (lambda w: w.update_weights.remote(weights_ref)) for i in range(len(roles.workers))}
        self.version = step
        if cfg.train.max_staleness == 0:
            self.on_workers(roles, updates, f"update_weights to version {step}", step, redo_elsewhere=False)
        else:  # not awaited: a worker applies it before its next batch; one that died meanwhile is
            for fn, w in zip(updates.values(), roles.workers, strict=True):  # replaced when that batch fails
                fn(w)
        return sum(int(v.numel()) * v.element_size() for v in states[0].values())

    def broadcast_weights(self, roles: Roles, step: int) -> int:
        """The collective path: learner rank 0 publishes and broadcasts (LoRA in one shot, full weights in
        buckets of train.weight_sync_bucket_mb), ranks > 0 publish without shipping anything back (ZeRO-3
        gathers need every rank), every worker receives in place; all calls are launched, then awaited
        together. The weights stay in learner rank 0's history: the object store sees them only when a
        replacement worker or a fallback needs them. A failure falls back to the object store for this step
        (:meth:`sync_fallback`). Returns the bytes broadcast.

        With train.max_staleness >= 1 a worker may still be sampling the next step's batch (launched before
        this update): its receive_weights runs after that batch (an actor runs one method at a time), and
        learner rank 0 waits in the broadcast until then (within the group's timeout, train.timeout_s).
        That is a wait, not a deadlock: the batch needs nothing the learner holds. The batch keeps the
        version it started with (receive_weights takes the sampling lock), so the staleness guard holds."""
        cfg = self.cfg
        bucket_mb = None if cfg.model.lora is not None else cfg.train.weight_sync_bucket_mb
        learner_refs = [roles.learners[0].broadcast_weights.remote(bucket_mb)]
        learner_refs += [lrn.publish.remote(False) for lrn in roles.learners[1:]]
        worker_refs = [w.receive_weights.remote() for w in roles.workers]
        self._publish(step, KEPT_BY_LEARNER)
        self.version = step
        names = [f"learner rank 0 (broadcast of version {step})"]
        names += [f"learner rank {k} (publish)" for k in range(1, len(roles.learners))]
        names += [f"rollout worker {i} (receive version {step})" for i in range(len(roles.workers))]
        try:
            got = roles.get(learner_refs + worker_refs, "weight broadcast", names=names)
        except TrainingError as e:
            return self.sync_fallback(roles, step, learner_refs, worker_refs, e)
        return int(got[0]["bytes"])

    def sync_fallback(
        self, roles: Roles, step: int, learner_refs: list[Any], worker_refs: list[Any], error: TrainingError
    ) -> int:
        """A broadcast that failed (a worker died, a timeout, an error): wait for every call of it to end,
        then send version ``step`` by the object store to each worker that did not receive it (a dead or
        hung one is replaced, loaded with it), and rebuild the group, new port, with the replacements. A
        learner rank that died or hung stops the run, as in any learner call."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        ray.wait(
            learner_refs + worker_refs,
            num_returns=len(learner_refs + worker_refs),
            timeout=roles.timeout_s + 30,
        )

        def outcome(ref: Any) -> tuple[str, Any]:
            try:
                return "ok", ray.get(ref, timeout=0.1)
            except GetTimeoutError:
                return "hung", None
            except RayActorError as e:
                return "dead", death_reason(e)
            except Exception as e:  # the call raised (a peer's socket closed, the group's timeout)
                return "failed", str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__

        learners = [outcome(ref) for ref in learner_refs]
        for k, (state, why) in enumerate(learners):
            if state == "dead" or state == "hung" or (state == "failed" and k > 0):
                raise TrainingError(
                    f"learner rank {k} {'died' if state == 'dead' else state} during the weight broadcast of "
                    f"step {step} ({why or 'no answer within train.timeout_s'}); the run stops. "
                    + self.resume_hint()
                ) from None
        workers = [outcome(ref) for ref in worker_refs]
        redo = {i: o for i, o in enumerate(workers) if not (o[0] == "ok" and o[1]["version"] == step)}
        log.warning(
            "the weight broadcast of version %d failed (%s); sending it by the object store to rollout "
            "worker(s) %s (%s) and rebuilding the weight-sync group",
            step,
            str(error).splitlines()[0],
            sorted(redo),
            "; ".join(
                f"worker {i}: {o[0]}{' ' + str(o[1]) if o[0] != 'ok' and o[1] else ''}"
                for i, o in redo.items()
            ),
        )
        weights = self.weights_for(roles, step)
        # a dead worker with a batch still pending (max_staleness >= 1) is replaced when collect finds that
        # batch lost (and then caught up to this version); replacing it here would only be undone there
        deferred = [
            i
            for i, (state, _) in redo.items()
            if state == "dead"
            and any(
                w is roles.workers[i] and ref is not None
                for p in self.pending
                for w, ref in zip(p.workers, p.refs, strict=True)
            )
        ]
        stale = [
            roles.workers[i]
            for i, (state, _) in redo.items()
            if i not in deferred and state in ("dead", "hung")
        ]
        alive = [
            roles.workers[i]
            for i, (state, _) in redo.items()
            if i not in deferred and state not in ("dead", "hung")
        ]
        for worker in stale:  # a replacement loaded with this version, or gone when no node has room
            roles.replace_worker(worker, step, weights)
        if alive:
            self.on_workers(
                roles,
                {k: (lambda w: w.update_weights.remote(weights)) for k in range(len(alive))},
                f"update_weights to version {step} (broadcast fallback)",
                step,
                owners=dict(enumerate(alive)),
                redo_elsewhere=False,
            )
        roles.sync_members = None  # rebuilt before the next broadcast; now, unless a member is still dead
        if not deferred:
            roles.ensure_weight_sync()
        return int(learners[0][1]["bytes"]) if learners[0][0] == "ok" else 0

    def ema_weights(self, roles: Roles, version: int) -> Any:
        """The EMA of the policy after update ``version`` (train.ema), fetched from learner rank 0 once per
        version: a step that both evaluates and checkpoints uses one copy."""
        if self._ema_cache is None or self._ema_cache[0] != version:
            ema = self.on_learners(roles, [roles.learners[0].get_ema.remote()], "get_ema", version)[0]
            self._ema_cache = (version, ema)
        return self._ema_cache[1]

    def current_weights(self, roles: Roles, version: int) -> Any:
        """The trained weights after update ``version`` (every learner rank gathers; rank 0's are kept),
        fetched once per version: a step that evaluates and checkpoints uses one copy."""
        if self._current_cache is None or self._current_cache[0] != version:
            states = self.on_learners(
                roles, [lrn.get_weights.remote() for lrn in roles.learners], "get_weights", version
            )
            self._current_cache = (version, states[0])
        return self._current_cache[1]
