"""A learner rank as a Ray actor: a thin shell around :class:`LearnerEngine`.

The shell also records the rank's metrics (``vgrpo.metrics``): step time, loss, grad norm, clip
fraction, weight publishing, policy version — timed around the engine's calls, which stay Ray-free.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import ray
import torch

from vgrpo import metrics
from vgrpo.learner.engine import LearnerEngine


class LearnerShell(LearnerEngine):
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

    def train_step(self, shard: dict[str, Any], step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        try:
            out = super().train_step(shard, step)
        except Exception:
            metrics.error("learner", self.worker, "train_step")
            raise
        n_samples = len(shard["latents"])
        metrics.learner_stepped(self.worker, out, n_samples, time.perf_counter() - t0, self.version)
        return out

    def publish(self, keep_history: int) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        try:
            state = super().publish(keep_history)
        except Exception:
            metrics.error("learner", self.worker, "publish")
            raise
        n_bytes = sum(int(v.numel()) * v.element_size() for v in state.values())
        metrics.weights_synced("learner", self.worker, time.perf_counter() - t0, n_bytes, self.version)
        return state


LearnerActor = ray.remote(LearnerShell)
