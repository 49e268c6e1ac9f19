"""The Grafana dashboard is real: a short `vgrpo train` on a Ray cluster of this test's own, a real
Prometheus configured from deploy/prometheus/prometheus.yml scraping it through the service-discovery
file Ray writes, and then every PromQL query of deploy/grafana/ must return data from Prometheus' HTTP
API (there is no Grafana package to run; the queries are what could be wrong).

Not marked slow: this is the dashboard's proof and runs in the default selection. It skips, saying why,
only when Debian's `prometheus` is not installed (`.ci/run` installs it).

Why a separate `ray start --head` rather than the session's `ray_cluster` fixture: that one runs without
the dashboard process, and the dashboard process is what writes the discovery file. The cluster and
Prometheus run in process groups of their own and are stopped by those pids, never by name.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "deploy" / "grafana"
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DISCOVERY = "prom_metrics_service_discovery.json"
# Grafana's built-in interval variables, as Grafana would expand them for a 1 s scrape interval
GRAFANA_VARS = {"$__rate_interval": "30s", "$__interval": "5s", "$__range": "5m"}
# Ray 2.60 turns token authentication on by itself when ~/.ray/auth_token exists; this throw-away cluster
# and its one driver agree on "off" explicitly, so the test does not depend on the machine's home dir
RAY_ENV = {"RAY_AUTH_MODE": "disabled"}
DEADLINE_S = 200.0  # from the first training step to every query answering

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="Debian's `prometheus` is not on PATH (apt-get install -y prometheus, as .ci/run does): "
    "the live dashboard proof needs a real Prometheus",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every dashboard JSON under deploy/grafana/."""
    out = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p.get("title", "?"), t["expr"]))
            walk(p.get("panels", []))

    for f in sorted(DASHBOARDS.rglob("*.json")):
        dash = json.loads(f.read_text())
        walk(dash.get("dashboard", dash).get("panels", []))
    return out


def expand(expr: str) -> str:
    for k, v in GRAFANA_VARS.items():
        expr = expr.replace(k, v)
    assert "$" not in expr, f"unexpanded Grafana variable in {expr!r}"
    return expr


def http_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM to the process group this test started, then SIGKILL whatever is left of it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def wait_for(what: str, check: Any, timeout_s: float, every_s: float = 0.5, logs: Path | None = None) -> Any:
    t_end = time.monotonic() + timeout_s
    while True:
        try:
            got = check()
        except AssertionError:  # the thing waited on is gone (a process exited): fail now, not at timeout
            raise
        except Exception:  # not up yet (connection refused, file half-written)
            got = None
        if got:
            return got
        if time.monotonic() > t_end:
            tail = logs.read_text()[-3000:] if logs and logs.exists() else ""
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tail}")
        time.sleep(every_s)


@pytest.fixture
def ray_head() -> Iterator[dict[str, Any]]:
    """`ray start --head --block` with the dashboard (it writes the discovery file), own temp dir and
    free ports, in its own process group."""
    temp = Path(tempfile.mkdtemp(prefix="vgrpo-obs-", dir="/tmp"))
    gcs = free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_ADDRESS="", **RAY_ENV)
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        f"--temp-dir={temp}",
        "--num-cpus=2",
        f"--port={gcs}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--disable-usage-stats",
    ]
    log = temp / "ray-start.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        discovery = temp / DISCOVERY
        wait_for(
            "Ray's Prometheus discovery file",
            lambda: discovery.exists() and json.loads(discovery.read_text())[0]["targets"],
            120,
            logs=log,
        )
        yield {"address": f"127.0.0.1:{gcs}", "temp": temp, "discovery": discovery}
    finally:
        stop_group(proc, grace_s=10)  # `ray start --block` may leave children on SIGTERM: then SIGKILL
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def prometheus(ray_head: dict[str, Any], tmp_path: Path) -> Iterator[str]:
    """A real Prometheus on 127.0.0.1, configured from deploy/prometheus/prometheus.yml with only the
    discovery path (this cluster's temp dir) and the intervals (1 s, so the test is short) changed."""
    cfg = yaml.safe_load(SCRAPE_CONFIG.read_text())
    cfg["global"]["scrape_interval"] = cfg["global"]["evaluation_interval"] = "1s"
    (job,) = [j for j in cfg["scrape_configs"] if "file_sd_configs" in j]
    job["file_sd_configs"][0]["files"] = [str(ray_head["discovery"])]
    job["file_sd_configs"][0]["refresh_interval"] = "2s"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    log = tmp_path / "prometheus.log"
    assert PROMETHEUS is not None
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            "Prometheus ready",
            lambda: urllib.request.urlopen(url + "/-/ready", timeout=2).status == 200,
            60,
            logs=log,
        )
        yield url
    finally:
        stop_group(proc)


def query(url: str, expr: str) -> list[dict[str, Any]]:
    got = http_json(url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert got["status"] == "success", (expr, got)
    return got["data"]["result"]


def has_data(result: list[dict[str, Any]]) -> bool:
    """At least one series with a finite value (a quantile over an idle histogram is NaN: no data)."""
    return any(math.isfinite(float(s["value"][1])) for s in result)


def test_every_dashboard_query_returns_data(
    ray_head: dict[str, Any], prometheus: str, tmp_path: Path
) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 15, "the dashboard lost its panels"
    run = tmp_path / "run"
    log = tmp_path / "train.log"
    sets = [
        "train.steps=200",  # longer than needed: the test stops it (SIGTERM) once every query answers
        "rollout.num_steps=4",
        "rollout.prompts_per_step=2",
        "rollout.group_size=4",
        "train.checkpoint_every=1000",
        "train.samples_every=1000",
        "observability.progress=plain",
        "observability.report=false",
        # a re-plan from step 4 on feeds the "Capacity" row; capped at one worker so it never moves
        "train.autoscale.enabled=true",
        "train.autoscale.every=2",
        "train.autoscale.window=1",
        "train.autoscale.max_rollout_workers=1",
    ]
    cmd = [sys.executable, "-c", "from vgrpo.cli import main; main()", "train", "--run-dir", str(run)]
    cmd += ["--address", ray_head["address"]] + [a for s in sets for a in ("--set", s)]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", **RAY_ENV)
    with log.open("w") as out:
        train = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        metrics = run / "metrics.jsonl"

        def first_step() -> bool:
            assert train.poll() is None, (
                f"vgrpo train exited with {train.returncode}:\n{log.read_text()[-3000:]}"
            )
            return metrics.exists() and metrics.stat().st_size > 0

        t0 = time.monotonic()
        wait_for("the first training step", first_step, 300, every_s=1.0, logs=log)
        print(f"first training step after {time.monotonic() - t0:.0f} s")
        up = wait_for(
            "Prometheus scraping Ray's targets",
            lambda: [
                t
                for t in http_json(prometheus + "/api/v1/targets")["data"]["activeTargets"]
                if t["health"] == "up"
            ],
            60,
        )
        assert all(t["labels"]["job"] == "ray" for t in up)

        pending = dict(enumerate(queries))
        results: dict[int, list[dict[str, Any]]] = {}
        t_end = time.monotonic() + DEADLINE_S
        while pending and time.monotonic() < t_end:
            assert train.poll() is None, (
                f"vgrpo train exited with {train.returncode}:\n{log.read_text()[-3000:]}"
            )
            for i, (_, expr) in list(pending.items()):
                res = query(prometheus, expand(expr))
                if has_data(res):
                    results[i] = res
                    del pending[i]
            if pending:
                time.sleep(1.0)
        print(f"{len(results)}/{len(queries)} dashboard queries answered after {time.monotonic() - t0:.0f} s")
        missing = [f"{title}: {expr}" for title, expr in pending.values()]
        assert not missing, (
            f"{len(missing)} of {len(queries)} dashboard queries returned no data:\n" + "\n".join(missing)
        )
        # the numbers are this run's, not just present: the step counter and the reward match metrics.jsonl
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        step = float(query(prometheus, "max(ray_vgrpo_train_step)")[0]["value"][1])
        assert 1 <= step <= rows[-1]["step"]
    finally:
        stop_group(train, grace_s=60)
