"""Starting and stopping: joining or starting Ray, and the stop signals (Ctrl-C / SIGTERM: finish the
step, checkpoint, exit 130)."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from vgrpo.proto.config import RunConfig
from vgrpo.roles import TrainingError

log = logging.getLogger("vgrpo")


class _DropTokenNotice(logging.Filter):
    """Ray 2.60 warns "Token authentication is enabled for this Ray cluster" on every start once a token
    exists. vgrpo turns token mode on deliberately (enable_token_auth_if_available) and keeps the token
    private (private_token_file); the notice asks nothing of the user, so it is dropped at its logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_DropTokenNotice())


class StopRequest:
    """Ctrl-C / SIGTERM inside the loop ask for a stop at the next step boundary (so the checkpoint is
    consistent: learner, rollout weights and data position of one step); a second signal, or one outside
    the loop, interrupts at once."""

    in_loop = False
    requested = False


def _raise_interrupt(signum: int, _frame: Any) -> None:
    if StopRequest.in_loop and not StopRequest.requested:
        StopRequest.requested = True
        print(
            "stop requested: finishing this step, then checkpoint and exit (signal again to abort now)",
            file=sys.stderr,
            flush=True,
        )
        return
    raise KeyboardInterrupt


def install_stop_handlers() -> None:
    """SIGINT and SIGTERM stop the loop through KeyboardInterrupt (checkpoint, then exit 130). Called
    after ray.init, which installs its own SIGTERM handler that exits at once without cleaning up."""
    import signal

    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)


def enable_token_auth_if_available() -> bool:
    """Ray 2.60: once a token exists (``~/.ray/auth_token``, written by any local ``ray.init``), ``ray start
    --head`` turns token authentication on, and a client without ``RAY_AUTH_MODE=token`` cannot join (it
    times out with a ConnectionError). A client in token mode joins clusters with auth on or off (measured),
    so set it when a token is at hand and the user has not chosen a mode."""
    if os.environ.get("RAY_AUTH_MODE"):
        return False
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or path.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"
        return True
    return False


CONNECT_TIMEOUT_S = 30.0  # to reach a cluster's head before Ray's own retries (which go on for minutes)


class ClusterUnreachable(TrainingError):
    """``--address`` names a head that does not answer."""


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """A TCP connect to the head's ``host:port`` (or a ``ray://`` client server's), retried until
    ``timeout_s``; raises ClusterUnreachable naming the address. ``auto`` and addresses without a port
    are left to Ray."""
    import socket

    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout_s)):
                return
        except OSError as e:
            last = str(e)
        if time.monotonic() >= deadline:
            raise ClusterUnreachable(
                f"--address {address}: nothing answers at {host}:{port} within {timeout_s:.0f} s ({last}); "
                "fix: start the head (`ray start --head`), check `ray status` there, or drop --address to "
                "use an embedded local cluster"
            )
        time.sleep(1.0)


def start_ray(cfg: RunConfig, address: str | None) -> bool:
    """Join ``address`` (or RAY_ADDRESS) if given, else start an embedded local Ray. Returns whether this
    process started the cluster (and so must stop it)."""
    import ray

    if ray.is_initialized():  # e.g. a test session's cluster: use it, leave it running
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    env = {
        "env_vars": {
            "TORCH_EXTENSIONS_DIR": os.environ.get(
                "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "vgrpo-torch-extensions")
            )
        }
    }
    if address:  # RAY_AUTH_MODE was settled before `import ray` (train)
        check_reachable(address)
        ray.init(address=address, runtime_env=env, log_to_driver=cfg.observability.log_level == "DEBUG")
        return False
    ray.init(
        num_cpus=cfg.resources.num_cpus,
        num_gpus=cfg.resources.num_gpus,
        include_dashboard=False,
        runtime_env=env,
        log_to_driver=cfg.observability.log_level == "DEBUG",
        configure_logging=True,
        logging_level=logging.WARNING,
    )
    private_token_file()
    return True


def private_token_file() -> None:
    """Ray writes its cluster token (``~/.ray/auth_token``) readable by every local user; a token is a
    password: keep it to its owner (0600)."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    try:
        if path.is_file() and path.stat().st_mode & 0o077:
            path.chmod(0o600)
    except OSError as e:  # not ours to change (another user's home): say so, go on
        log.warning("could not make %s private (%s); fix: chmod 600 %s", path, e, path)
