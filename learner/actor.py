"""A learner rank as a Ray actor: a thin shell around :class:`LearnerEngine`."""

from __future__ import annotations

import os
import socket

import ray
import torch

from vgrpo.learner.engine import LearnerEngine


class LearnerShell(LearnerEngine):
    def __init__(self, *args, threads: int | None = None, **kwargs):
        torch.set_num_threads(threads or os.cpu_count() or 1)
        super().__init__(*args, **kwargs)

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a free port for the DeepSpeed group's rendezvous (asked of rank 0)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def ready(self) -> dict:
        return {"pid": os.getpid(), "rank": self.rank, "node": ray.util.get_node_ip_address()}


LearnerActor = ray.remote(LearnerShell)
