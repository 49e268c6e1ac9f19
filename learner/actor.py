"""A learner rank as a Ray actor: a thin shell around :class:`LearnerEngine`.

The shell also records the rank's metrics (``vgrpo.core.metrics``): step time, loss, grad norm, clip
fraction, weight publishing, policy version — timed around the engine's calls, which stay Ray-free.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import ray
import torch

from vgrpo.core import metrics
from vgrpo.core.weight_sync import WeightSyncGroup, WeightSyncMember
from vgrpo.learner.engine import LearnerEngine
from vgrpo.proto.messages import TrainShard, WeightUpdate


class LearnerShell(LearnerEngine, WeightSyncMember):
    weight_sync: WeightSyncGroup | None = None  # WeightSyncMember's, restated for the type checker

    def __init__(self, *args, threads: int | None = None, **kwargs):
        torch.set_num_threads(threads or os.cpu_count() or 1)
        super().__init__(*args, **kwargs)
        self.worker = metrics.worker_id("learner", self.rank)
        metrics.actor_started("learner", self.worker, error_kinds=("train_step", "publish"))

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a free port for the DeepSpeed group's rendezvous (asked of rank 0)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def ready(self) -> dict:
        return {"pid": os.getpid(), "rank": self.rank, "node": ray.util.get_node_ip_address()}

    def train_step(self, shard: TrainShard, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        try:
            out = super().train_step(shard, step)
        except Exception:
            metrics.error("learner", self.worker, "train_step")
            raise
        n_samples = len(shard)
        metrics.learner_stepped(self.worker, out, n_samples, time.perf_counter() - t0, self.version)
        return out

    def publish(self, ship: bool = True) -> dict[str, torch.Tensor]:
        """The published state of the current version (a collective under ZeRO-3: every rank calls).
        ``ship=False``: the rank keeps it (history, EMA) and returns an empty dict, so the driver does not
        receive a copy it has no use for (ranks > 0, or rank 0 when the weights go by broadcast)."""
        t0 = time.perf_counter()
        try:
            state = super().publish()
        except Exception:
            metrics.error("learner", self.worker, "publish")
            raise
        n_bytes = sum(int(v.numel()) * v.element_size() for v in state.values())
        metrics.weights_synced("learner", self.worker, time.perf_counter() - t0, n_bytes, self.version)
        return state if ship else {}

    def published_weights(self, version: int) -> WeightUpdate:
        """A published version still in the history (the last ``kept_versions``): what a replacement
        rollout worker is loaded with, or the object-store fallback of a failed broadcast."""
        if version not in self.history:
            raise KeyError(
                f"learner rank {self.rank}: version {version} is no longer kept (kept: {sorted(self.history)})"
            )
        return WeightUpdate(version, self.history[version])

    def broadcast_weights(self, bucket_mb: float | None) -> dict[str, Any]:
        """Publish the current version (as :meth:`publish`: every learner rank calls publish or this at
        once, a collective under ZeRO-3) and broadcast it to the rollout workers (a collective with their
        receive_weights; ``bucket_mb``: None = one shot, for LoRA). Returns the version, bytes and times
        only: the weights stay here (history) for a replacement worker or a fallback."""
        t0 = time.perf_counter()
        state = self.publish(ship=True)
        t1 = time.perf_counter()
        if self.weight_sync is None:
            raise RuntimeError("broadcast_weights: no weight-sync group on this rank (join_weight_sync)")
        try:
            self.weight_sync.broadcast(state, version=self.version, bucket_mb=bucket_mb)
        except Exception:
            metrics.error("learner", self.worker, "publish")
            self.weight_sync.abort()  # receivers still in this broadcast fail now, not at the timeout
            self.weight_sync = None  # the driver rebuilds the group before the next broadcast
            raise
        n_bytes = sum(int(v.numel()) * v.element_size() for v in state.values())
        return {
            "version": self.version,
            "bytes": n_bytes,
            "publish_s": t1 - t0,
            "broadcast_s": time.perf_counter() - t1,
        }


LearnerActor = ray.remote(LearnerShell)
