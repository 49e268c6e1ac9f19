"""The rollout worker as a Ray actor: a thin shell around :class:`RolloutEngine`.

The shell is also where the worker's metrics are recorded (``vgrpo.core.metrics``): the engine stays plain
torch so it can be timed in-process without Ray, and the shell times the calls the driver makes.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray
import torch

from vgrpo.core import metrics
from vgrpo.core.adapters import load_weights, trainable_params
from vgrpo.core.heldout import sample_heldout
from vgrpo.core.weight_sync import WeightSyncGroup, WeightSyncMember
from vgrpo.proto.messages import RolloutBatch, WeightUpdate
from vgrpo.rollout_workers.engine import RolloutEngine


class RolloutWorkerShell(RolloutEngine, WeightSyncMember):
    weight_sync: WeightSyncGroup | None = None  # WeightSyncMember's, restated for the type checker

    def __init__(self, *args, threads: int | None = None, **kwargs):
        torch.set_num_threads(threads or os.cpu_count() or 1)
        super().__init__(*args, **kwargs)
        self.worker = metrics.worker_id("rollout")
        metrics.actor_started("rollout", self.worker, error_kinds=("sample", "update_weights"))
        metrics.record("vgrpo_policy_version", self.version, "rollout", self.worker)

    def ready(self) -> dict:
        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "version": self.version}

    def sample(
        self,
        prompts: list[str],
        group_size: int,
        seeds: list[int],
        window: tuple[int, int] | None = None,
    ) -> RolloutBatch:
        try:
            out = super().sample(prompts, group_size, seeds, window)
        except Exception:
            metrics.error("rollout", self.worker, "sample")
            raise
        metrics.rollout_sampled(self.worker, len(seeds), out.seconds, out.policy_version)
        return out

    def update_weights(self, update: WeightUpdate) -> int:
        t0 = time.perf_counter()
        try:
            got = super().update_weights(update)
        except Exception:
            metrics.error("rollout", self.worker, "update_weights")
            raise
        n_bytes = sum(int(v.numel()) * v.element_size() for v in update.tensors.values())
        metrics.weights_synced("rollout", self.worker, time.perf_counter() - t0, n_bytes, got)
        return got

    def receive_weights(self) -> dict[str, Any]:
        """Receive learner rank 0's broadcast of a new version into this worker's policy (see
        :meth:`RolloutEngine.receive_weights_from`). A collective with the learner's broadcast_weights."""
        if self.weight_sync is None:
            raise RuntimeError("receive_weights: this worker is in no weight-sync group (join_weight_sync)")
        t0 = time.perf_counter()
        before = self.weight_sync.bytes_sent
        try:
            got = super().receive_weights_from(self.weight_sync)
        except ValueError:  # the manifest did not fit the model: the broadcast itself completed
            metrics.error("rollout", self.worker, "update_weights")
            raise
        except Exception:
            metrics.error("rollout", self.worker, "update_weights")
            self.weight_sync.abort()  # the others still in this broadcast fail now, not at the timeout
            self.weight_sync = None  # the driver rebuilds the group before the next broadcast
            raise
        seconds = time.perf_counter() - t0
        n_bytes = self.weight_sync.bytes_sent - before
        metrics.weights_synced("rollout", self.worker, seconds, n_bytes, got)
        return {"version": got, "seconds": seconds, "bytes": n_bytes}

    def sample_heldout(
        self, prompts: list[str], weights: dict[str, torch.Tensor] | None = None, **kwargs: Any
    ) -> dict:
        """Held-out images with this worker's policy, or with ``weights`` (train.ema: the EMA policy; an
        objective that samples with its old copy: the trained weights) swapped in for the evaluation
        only; the worker's own weights and version are restored after."""
        if weights is None:
            return super().sample_heldout(prompts, **kwargs)
        with self._lock:
            keep = {k: p.detach().clone() for k, p in trainable_params(self.pipe.transformer).items()}
            load_weights(self.pipe.transformer, weights)
            try:
                result = sample_heldout(self.pipe, prompts, **self.heldout_geometry(kwargs))
            finally:
                load_weights(self.pipe.transformer, keep)
            result["policy_version"] = self.version
            result["weights"] = "given"
            return result


RolloutWorker = ray.remote(RolloutWorkerShell)
