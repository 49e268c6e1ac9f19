"""Faults the loop survives, on real local Ray clusters (marked slow: a few minutes each on 2 cores).

- a rollout worker killed mid-run is replaced and its share of the step redone: the run's metrics equal an
  uninterrupted run's (same seed);
- a reward replica killed mid-run is replaced by Serve and its requests retried: metrics again equal;
- the driver's process group SIGKILLed, then ``--resume``: the steps after the checkpoint equal the
  uninterrupted run's (within float tolerance), each step logged once;
- a learner rank killed: the run stops with a message naming the rank and ``--resume`` (non-zero exit, no
  traceback), and ``--resume`` on a different number of ranks (2 ranks ZeRO-3 -> 1) finishes the run;
- ``--address`` joins a ``ray start --head`` cluster this test starts (own temp dir, RAY_AUTH_MODE unset)
  and stops by process id.

In-process runs share the session's Ray (``ray_cluster``); command-line runs start their own embedded Ray
in a session of their own, and whatever is left of that session is ended by pid, never by name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vgrpo.proto.config import load_config

pytestmark = pytest.mark.slow

SETS = [
    "train.steps=4",
    "rollout.num_workers=2",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "rollout.num_steps=4",
    "train.checkpoint_every=1",
    "train.eval_every=0",
    "observability.progress=plain",
    "observability.tensorboard=false",
    "observability.report=false",
]
# what must equal an uninterrupted run of the same seed (timings may differ)
SAME = [
    "step",
    "policy_version",
    "staleness",
    "reward_mean",
    "reward_std",
    "reward/shapes",
    "loss",
    "grad_norm",
]


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_same_metrics(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        for k in SAME:
            assert math.isclose(g[k], w[k], rel_tol=1e-4, abs_tol=1e-6), (g["step"], k, g[k], w[k])


@pytest.fixture(scope="module")
def reference(ray_cluster: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The uninterrupted run every faulty one is compared with."""
    from vgrpo.driver import train

    run = tmp_path_factory.mktemp("reference") / "run"
    t0 = time.perf_counter()
    assert train(load_config(None, SETS), run) == 4
    print(f"reference run: {time.perf_counter() - t0:.0f} s")
    return metrics(run)


# ------------------------------------------------------------------------------------- processes by pid


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the command-line runs are started in a session of their own)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z" and int(fields[3]) == sid:
                out.append(int(d.name))
    return out


def cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    return ""


def end_session(sid: int, wait_s: float) -> list[int]:
    """Wait up to ``wait_s`` for session ``sid`` to empty by itself; SIGKILL (by pid) what is left and
    return those pids."""
    t_end = time.monotonic() + wait_s
    while session_pids(sid) and time.monotonic() < t_end:
        time.sleep(1)
    left = session_pids(sid)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def wait_for(
    what: str, check: Callable[[], Any], timeout_s: float, proc: subprocess.Popen | None = None
) -> Any:
    t_end = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process exited ({proc.returncode}) before {what}")
        if time.monotonic() > t_end:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)


def cli_env() -> dict[str, str]:
    """A newcomer's environment: no Ray address or auth mode inherited from this test session's Ray."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def vgrpo_train(*args: str) -> list[str]:
    return [sys.executable, "-m", "vgrpo.cli", "train", *args]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=cli_env(), start_new_session=True
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------------ tests


def test_killed_rollout_worker_is_replaced_and_its_share_redone(
    ray_cluster: dict[str, Any],
    reference: list[dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import ray

    from vgrpo import driver

    launch = driver.Trainer.launch
    killed: list[Any] = []

    def launch_then_kill(self: Any, roles: Any, step: int) -> Any:
        pending = launch(self, roles, step)
        if step == 2 and not killed:  # worker 0 dies while sampling its share of step 2
            killed.append(roles.workers[0])
            ray.kill(roles.workers[0], no_restart=True)
        return pending

    monkeypatch.setattr(driver.Trainer, "launch", launch_then_kill)
    with caplog.at_level(logging.WARNING, logger="vgrpo"):
        assert driver.train(load_config(None, SETS), tmp_path / "run") == 4
    assert killed, "the fault was not injected"
    assert "rollout worker 0 died during sampling step 2" in caplog.text, caplog.text
    assert "replacing it in its placement-group bundle" in caplog.text
    # the redone share used the same prompts, seeds and policy version: nothing differs
    assert_same_metrics(metrics(tmp_path / "run"), reference)


def test_killed_rollout_worker_with_overlapped_rollouts(
    ray_cluster: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_staleness=1: worker 1 dies while sampling step 3 with version 1 (the learner already holds 2).
    Its replacement is loaded with version 1, redoes the share (the batch stays one version), then catches
    up with version 2; the run equals an uninterrupted one."""
    import ray

    from vgrpo import driver

    sets = [*[s for s in SETS if not s.startswith("train.steps")], "train.steps=4", "train.max_staleness=1"]
    assert driver.train(load_config(None, sets), tmp_path / "reference") == 4
    launch = driver.Trainer.launch
    killed: list[Any] = []

    def launch_then_kill(self: Any, roles: Any, step: int) -> Any:
        pending = launch(self, roles, step)
        if step == 3 and not killed:
            killed.append(roles.workers[1])
            ray.kill(roles.workers[1], no_restart=True)
        return pending

    monkeypatch.setattr(driver.Trainer, "launch", launch_then_kill)
    assert driver.train(load_config(None, sets), tmp_path / "run") == 4
    assert killed
    rows = metrics(tmp_path / "run")
    assert [r["staleness"] for r in rows] == [0, 1, 1, 1]
    assert_same_metrics(rows, metrics(tmp_path / "reference"))


def test_killed_reward_replica_is_replaced_and_requests_retried(
    ray_cluster: dict[str, Any],
    reference: list[dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ray

    from vgrpo.driver import train
    from vgrpo.reward_servers import serve as rs

    score = rs.RewardClient.score
    seen: list[dict[str, Any]] = []

    def kill_then_score(self: Any, *args: Any, **kwargs: Any) -> Any:
        info = self.handles["shapes"].describe.remote().result(timeout_s=120)
        seen.append(info)
        if len(seen) == 2:  # step 2: the only replica dies as its requests arrive
            ray.kill(ray.get_actor(info["actor_name"], namespace="serve"), no_restart=True)
        return score(self, *args, **kwargs)

    monkeypatch.setattr(rs.RewardClient, "score", kill_then_score)
    assert train(load_config(None, SETS), tmp_path / "run") == 4
    assert len(seen) == 4 and seen[2]["pid"] != seen[1]["pid"], "Serve did not replace the replica"
    rows = metrics(tmp_path / "run")
    print("reward_retries per step:", [r["reward_retries"] for r in rows])
    assert_same_metrics(rows, reference)


def resume_to_the_end(run: Path, *extra: str) -> list[dict[str, Any]]:
    """`vgrpo train --run-dir RUN --resume [extra]` to its last step; its metrics, each step once."""
    resumed = subprocess.run(
        vgrpo_train("--run-dir", str(run), "--resume", *extra),
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4], "a step missing or logged twice"
    return rows


def test_sigkill_of_the_driver_then_resume_continues_exactly(
    reference: list[dict[str, Any]], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    sets = [a for s in SETS for a in ("--set", s)]
    proc = start(vgrpo_train("--run-dir", str(run), *sets), tmp_path / "first.log")
    try:
        wait_for("checkpoints/step_2", lambda: (run / "checkpoints" / "step_2").is_dir(), 900, proc)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        left = end_session(proc.pid, 45)
    assert not left, f"processes outlived the SIGKILL of the driver's group by 45 s: {left}"
    rows = resume_to_the_end(run)
    assert_same_metrics(rows, reference)


def test_killed_learner_rank_stops_with_a_message_then_resume_on_fewer_ranks(tmp_path: Path) -> None:
    run = tmp_path / "run"
    sets = [*[s for s in SETS if "num_workers" not in s], "rollout.num_workers=1"]
    sets += ["learner.num_ranks=2", "learner.zero_stage=3"]
    log = tmp_path / "first.log"
    proc = start(vgrpo_train("--run-dir", str(run), *[a for s in sets for a in ("--set", s)]), log)
    try:
        wait_for("checkpoints/step_2", lambda: (run / "checkpoints" / "step_2").is_dir(), 900, proc)
        learners = wait_for(
            "the learner processes",
            lambda: [p for p in session_pids(proc.pid) if cmdline(p).startswith("ray::LearnerShell")],
            60,
            proc,
        )
        os.kill(learners[-1], signal.SIGKILL)
        rc = proc.wait(300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        end_session(proc.pid, 30)
    out = log.read_text()
    assert rc not in (0, 130), out[-3000:]
    assert "died during" in out and "learner rank" in out and "--resume" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    # capacity may change on resume: the same run on 1 rank loads the consolidated learner state
    rows = resume_to_the_end(run, "--set", "learner.num_ranks=1")
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert load_config(run / "config.yaml").learner.num_ranks == 1


def test_address_joins_a_cluster_started_with_ray_start(tmp_path: Path) -> None:
    temp = Path(f"/tmp/vgrpo-head-{os.getpid()}")  # short: Ray's socket paths live under it
    temp.mkdir(exist_ok=True)
    port = free_port()
    current = Path("/tmp/ray/ray_current_cluster")  # `ray start` records its address here; put it back
    prior = current.read_text() if current.is_file() else None
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=false",
        f"--temp-dir={temp}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        "--disable-usage-stats",
    ]
    head_log = tmp_path / "head.log"
    head = start(cmd, head_log)
    try:
        wait_for(
            "ray start --head",
            lambda: any(s in head_log.read_text() for s in ("Ray runtime started", "will now block")),
            180,
            head,
        )
        run = tmp_path / "run"
        sets = [*[s for s in SETS if not s.startswith("train.steps")], "train.steps=2"]
        res = subprocess.run(
            vgrpo_train(
                "--address",
                f"127.0.0.1:{port}",
                "--run-dir",
                str(run),
                *[a for s in sets for a in ("--set", s)],
            ),
            capture_output=True,
            text=True,
            env=cli_env(),
            timeout=900,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert [r["step"] for r in metrics(run)] == [1, 2]
        drivers = [p.name for p in temp.rglob("python-core-driver-*")]
        assert drivers, "no driver log in the head's session: the run did not use that cluster"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(20)
        end_session(head.pid, 10)
        if current.is_file() and current.read_text().endswith(f":{port}"):
            if prior is None:
                current.unlink()
            else:
                current.write_text(prior)
        shutil.rmtree(temp, ignore_errors=True)
