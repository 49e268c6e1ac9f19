"""Ray nodes on this machine, each its own ``ray start`` process with its own raylet: a head and worker
nodes that join and leave a running cluster for real. What tests/test_elastic.py and benchmarks/elastic.py
use to show a run gaining and losing a node (docs/training.md "Capacity during a run"); a way to try the
same by hand is in that section too.

Every process is started in a session of its own and stopped by its pid (never ``ray stop``, which would
end every Ray on the machine); ``leave`` kills a worker node's raylet, as a lost machine would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    log: Path
    raylet_pid: int | None = None


@dataclass
class LocalCluster:
    """A head (``start``) and worker nodes (``join``) on 127.0.0.1; their logs under ``root``.
    ``object_store_mb`` per node keeps three nodes within a small machine's memory."""

    root: Path
    head_cpus: float = 2
    head_resources: dict[str, float] = field(default_factory=dict)
    object_store_mb: int = 400
    port: int = 0
    nodes: list[Node] = field(default_factory=list)
    ray_dir: Path | None = None  # Ray's temp dir: short, under /tmp (unix socket paths must fit 107 bytes)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, name: str, args: list[str], timeout_s: float = 120.0) -> Node:
        self.root.mkdir(parents=True, exist_ok=True)
        log = self.root / f"{name}.log"
        cmd = [
            _ray_cli(),
            "start",
            "--block",
            "--disable-usage-stats",
            f"--object-store-memory={self.object_store_mb * 1_000_000}",
            *args,
        ]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        with log.open("w") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
        node = Node(name, proc, log)
        self.nodes.append(node)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if "Ray runtime started" in text or "will now block" in text:
                node.raylet_pid = self._raylet_of(proc.pid)
                if node.raylet_pid is not None:
                    return node
            if proc.poll() is not None:
                raise RuntimeError(f"ray start ({name}) exited {proc.returncode}: {text[-2000:]}")
            time.sleep(0.5)
        raise RuntimeError(f"ray start ({name}) not up within {timeout_s:.0f} s; log {log}")

    @staticmethod
    def _raylet_of(pid: int) -> int | None:
        import psutil

        try:
            for child in psutil.Process(pid).children(recursive=True):
                if child.name().startswith("raylet"):
                    return int(child.pid)
        except psutil.Error:
            return None
        return None

    def start(self) -> LocalCluster:
        from vgrpo.launch import enable_token_auth_if_available

        # a head started where a Ray token exists turns token authentication on: the nodes that join it
        # (and this process, if it connects) need RAY_AUTH_MODE=token, inherited from here
        enable_token_auth_if_available()
        self.ray_dir = Path(tempfile.mkdtemp(prefix="vgrpo-nodes-", dir="/tmp"))
        self.port = free_port()
        args = [
            "--head",
            f"--port={self.port}",
            f"--num-cpus={self.head_cpus}",
            "--num-gpus=0",
            "--include-dashboard=false",
            f"--temp-dir={self.ray_dir}",
        ]
        if self.head_resources:
            args.append(f"--resources={json.dumps(self.head_resources)}")
        self._start("head", args)
        return self

    def join(self, cpus: float, resources: dict[str, float] | None = None) -> Node:
        """A worker node with ``cpus`` CPUs (and ``resources``) joins the cluster."""
        name = f"node{len(self.nodes)}"
        args = [f"--address={self.address}", f"--num-cpus={cpus}", "--num-gpus=0"]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        return self._start(name, args)

    def leave(self, node: Node) -> None:
        """The node leaves as a lost machine would: its raylet is killed (SIGKILL, by pid); its workers die
        with it; then what is left of its processes is ended."""
        if node.raylet_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.raylet_pid, signal.SIGKILL)
        self._end(node, grace_s=10.0)

    @staticmethod
    def _end(node: Node, grace_s: float) -> None:
        import psutil

        try:  # Ray's processes may leave the process group: end them by pid too
            family = psutil.Process(node.proc.pid).children(recursive=True)
        except psutil.Error:
            family = []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.proc.wait(timeout=grace_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.proc.wait(timeout=5)
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.kill()

    def stop(self) -> None:
        """End every node this cluster started (worker nodes first), by pid."""
        for node in reversed(self.nodes):
            self._end(node, grace_s=15.0)
        self.nodes.clear()
        if self.ray_dir is not None:
            shutil.rmtree(self.ray_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------- join / leave runs

# the learner rank and the reward replica stay on the head (custom resource `vgrpo_head`); the head's 2
# CPUs hold the learner rank (1 CPU) and one rollout worker (1 CPU), so a second worker needs another node.
# torch_threads 1: each actor's compute is one CPU, as the re-planner counts it
ELASTIC_CONFIG = """\
learner: {cpus_per_rank: 1, custom_resources: {vgrpo_head: 0.01}}
rollout: {cpus_per_worker: 1, num_workers: WORKERS}
reward:
  servers:
    shapes: {cpus: 0, custom_resources: {vgrpo_head: 0.01}}
resources: {torch_threads: 1}
train:
  steps: STEPS
  checkpoint_every: 1000
  placement_wait_s: 15
  autoscale: {enabled: true, every: 2, window: 1, min_gain: 0.05}
observability: {progress: plain, report: false, tensorboard: false}
"""


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line being written
            out.append(json.loads(line))
    return out


def elastic_run(root: Path, event: str, steps: int = 8, at_step: int = 2, timeout_s: float = 900.0) -> dict:
    """A real run through a node joining (``event="join"``: the run starts with one rollout worker on a
    full head; a 1-CPU node joins once step ``at_step`` is logged) or leaving (``"leave"``: the run starts
    with two workers, one on a 1-CPU node whose raylet is killed once step ``at_step`` is logged). Returns
    the run's metric rows, its capacity.jsonl events, the event's step and time, and the exit code."""
    if event not in ("join", "leave"):
        raise ValueError(f"event {event!r}: join or leave")
    cluster = LocalCluster(root / "cluster", head_cpus=2, head_resources={"vgrpo_head": 1})
    run = root / "run"
    cfg = root / "elastic.yaml"
    root.mkdir(parents=True, exist_ok=True)
    cfg.write_text(
        ELASTIC_CONFIG.replace("WORKERS", "2" if event == "leave" else "1").replace("STEPS", str(steps))
    )
    vgrpo = str(Path(sys.executable).with_name("vgrpo"))
    happened: dict = {}
    with cluster:
        extra = cluster.join(1) if event == "leave" else None
        t0 = time.monotonic()
        with (root / "train.log").open("w") as log:
            cmd = [vgrpo, "train", "--address", cluster.address, "--run-dir", str(run), "--config", str(cfg)]
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                while proc.poll() is None and time.monotonic() - t0 < timeout_s:
                    rows = _rows(run / "metrics.jsonl")
                    if not happened and rows and rows[-1]["step"] >= at_step:
                        happened = {
                            "event": event,
                            "after_step": rows[-1]["step"],
                            "time_s": time.monotonic() - t0,
                        }
                        if event == "join":
                            cluster.join(1)
                        else:
                            assert extra is not None
                            cluster.leave(extra)
                    time.sleep(0.5)
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=60)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
    return {
        "rc": proc.returncode,
        "happened": happened,
        "rows": _rows(run / "metrics.jsonl"),
        "capacity": _rows(run / "capacity.jsonl"),
        "log": str(root / "train.log"),
        "wall_s": time.monotonic() - t0,
    }
