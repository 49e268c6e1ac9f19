"""The rollout worker as a Ray actor: a thin shell around :class:`RolloutEngine`."""

from __future__ import annotations

import os

import ray
import torch

from vgrpo.rollout_workers.engine import RolloutEngine


class RolloutWorkerShell(RolloutEngine):
    def __init__(self, *args, threads: int | None = None, **kwargs):
        torch.set_num_threads(threads or os.cpu_count() or 1)
        super().__init__(*args, **kwargs)

    def ready(self) -> dict:
        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "version": self.version}


RolloutWorker = ray.remote(RolloutWorkerShell)
