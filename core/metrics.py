"""Every Prometheus metric of vgrpo, defined in one place, with the small functions the roles call.

Why one module: the Grafana dashboard (``deploy/grafana/``), the glossary (``docs/metrics.md``) and the
live dashboard test all depend on the exact names below; keeping them in one table makes a rename a
one-line, reviewable change.

Export path. Every role — rollout workers, learner ranks, reward replicas and the driver — records through
``ray.util.metrics``; each node's Ray metrics agent then serves them on its metrics export port, and the
Prometheus service-discovery file Ray writes in its session directory lists those ports, so one scrape
job (``deploy/prometheus/prometheus.yml``) sees the whole cluster, beside Ray's own metrics. Ray prefixes
the names with ``ray_`` and counters gain ``_total`` (``vgrpo_rollout_images`` is scraped as
``ray_vgrpo_rollout_images_total``): :func:`exported_name` gives the name as Prometheus sees it.
With ``observability.metrics_port`` set, the driver additionally serves its own metrics with
prometheus-client on that port, unprefixed (``vgrpo_train_step``), for setups without Ray's agent.

Tags: ``role`` (rollout | learner | reward | driver) and ``worker`` (rollout actor id, ``rank<N>``,
Serve replica id, ``driver``) on every metric, plus ``reward``, ``phase`` or ``kind`` where named.

Recording never raises: a metric that cannot be recorded (Ray not initialised, a unit test calling an
engine directly) must not fail a training step, so failures are logged once and then ignored.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger("vgrpo.core.metrics")

Kind = Literal["counter", "gauge", "histogram"]

# seconds: from a millisecond reward call to a minute-long learner step on a big model
LATENCY_BOUNDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
STEP_BOUNDS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0]
BATCH_BOUNDS = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]
# Ray's histogram boundaries must be > 0: values at or below the first bound fall in the first bucket
VALUE_BOUNDS = [0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0]


@dataclass(frozen=True)
class Spec:
    name: str  # as created; Prometheus sees exported_name(name)
    kind: Kind
    help: str
    tags: tuple[str, ...] = ("role", "worker")
    bounds: tuple[float, ...] = ()


def _spec(
    name: str, kind: Kind, help: str, extra: tuple[str, ...] = (), bounds: list[float] | None = None
) -> Spec:
    return Spec(name, kind, help, ("role", "worker", *extra), tuple(bounds or ()))


SPECS: dict[str, Spec] = {
    s.name: s
    for s in [
        # --- rollout workers
        _spec("vgrpo_rollout_images", "counter", "images sampled (rate() = rollout images/s)"),
        _spec("vgrpo_rollout_images_per_s", "gauge", "images/s of the worker's last sample() call"),
        _spec(
            "vgrpo_rollout_image_latency_seconds",
            "histogram",
            "sample() seconds / images",
            bounds=LATENCY_BOUNDS,
        ),
        _spec("vgrpo_rollout_batch_seconds", "histogram", "seconds of one sample() call", bounds=STEP_BOUNDS),
        # --- reward replicas (Serve deployments)
        _spec("vgrpo_reward_requests", "counter", "images asked of the reward replica", ("reward",)),
        _spec(
            "vgrpo_reward_batch_size", "histogram", "images per Reward.score batch", ("reward",), BATCH_BOUNDS
        ),
        _spec(
            "vgrpo_reward_latency_seconds",
            "histogram",
            "one request, queueing + batch compute",
            ("reward",),
            LATENCY_BOUNDS,
        ),
        _spec(
            "vgrpo_reward_batch_seconds",
            "histogram",
            "compute seconds of one batch",
            ("reward",),
            LATENCY_BOUNDS,
        ),
        _spec(
            "vgrpo_reward_queue_depth",
            "gauge",
            "requests held by the replica (queued or scoring)",
            ("reward",),
        ),
        _spec(
            "vgrpo_reward_value", "histogram", "reward values returned, per image", ("reward",), VALUE_BOUNDS
        ),
        # --- learner ranks
        _spec("vgrpo_learner_steps", "counter", "optimizer steps (train_step calls)"),
        _spec("vgrpo_learner_samples", "counter", "samples trained on (rate() = learner samples/s)"),
        _spec("vgrpo_learner_step_seconds", "histogram", "seconds of one train_step", bounds=STEP_BOUNDS),
        _spec("vgrpo_learner_loss", "gauge", "objective loss of the last step"),
        _spec("vgrpo_learner_grad_norm", "gauge", "global gradient norm of the last step (before clipping)"),
        _spec("vgrpo_learner_clip_frac", "gauge", "fraction of clipped ratios / dropped samples, last step"),
        _spec("vgrpo_learner_lr", "gauge", "learning rate of the last step"),
        # --- weight sync (learner publishes, rollout workers apply)
        _spec(
            "vgrpo_weight_sync_seconds",
            "histogram",
            "publish (learner) or apply (rollout) seconds",
            bounds=STEP_BOUNDS,
        ),
        _spec("vgrpo_weight_sync_bytes", "counter", "bytes of trainable weights published or applied"),
        _spec(
            "vgrpo_policy_version", "gauge", "policy version held (rollout, learner) or published (driver)"
        ),
        # --- driver: one value per training step, from the metrics.jsonl row
        _spec("vgrpo_train_step", "gauge", "last completed training step"),
        _spec("vgrpo_train_images", "counter", "images trained on (rate() = end-to-end images/s)"),
        _spec(
            "vgrpo_images_per_s", "gauge", "end-to-end images/s of the last step (metrics.jsonl images_per_s)"
        ),
        _spec("vgrpo_staleness", "gauge", "versions between the learner and the batch's sampler"),
        _spec(
            "vgrpo_reward_mean", "gauge", "batch mean reward; reward=total is the weighted sum", ("reward",)
        ),
        _spec("vgrpo_reward_std", "gauge", "batch std of the weighted total reward", ("reward",)),
        _spec("vgrpo_phase_seconds", "gauge", "wall-clock seconds of the step's phase", ("phase",)),
        _spec("vgrpo_weight_update_bytes", "gauge", "bytes of the step's weight update"),
        _spec(
            "vgrpo_health",
            "gauge",
            "1 while a training-health alarm is raised (signal: reward_hacking, no_signal)",
            ("signal",),
        ),
        _spec("vgrpo_adv_zero_std_frac", "gauge", "fraction of prompt groups whose rewards are all equal"),
        _spec(
            "vgrpo_capacity",
            "gauge",
            "the run's capacity (kind: rollout_workers, reward_replicas after the step; sampling_workers: those "
            "given prompts in it; worker_replacements so far)",
            ("kind",),
        ),
        _spec(
            "vgrpo_autoscale",
            "gauge",
            "the last capacity re-plan (signal: predicted_gain, predicted_images_per_s, acted, decision_s, "
            "apply_s)",
            ("signal",),
        ),
        _spec(
            "vgrpo_eval_score", "gauge", "held-out evaluation score; family=overall is the mean", ("family",)
        ),
        # --- failures, any role
        _spec("vgrpo_errors", "counter", "calls that raised, by method", ("kind",)),
        _spec("vgrpo_retries", "counter", "retried reward requests (driver)", ("kind",)),
        _spec("vgrpo_actor_starts", "counter", "actor (re)starts; more than one per worker = restarts"),
    ]
}

PHASES = ("rollout", "reward", "learner", "weight_sync", "step", "sample_compute")


def exported_name(name: str) -> str:
    """The name Prometheus scrapes for a metric created as ``name`` through Ray: ``ray_`` prefix, and
    ``_total`` on counters (docs/stack-notes.md). Histograms export ``_bucket``/``_sum``/``_count`` series."""
    spec = SPECS[name]
    return "ray_" + name + ("_total" if spec.kind == "counter" else "")


# ----------------------------------------------------------------------------------------------- recording


class _Recorder:
    """The metric objects of this process, created on first use (``ray.util.metrics`` objects register with
    the process's core worker, so they can only be made after ``ray.init`` / inside an actor)."""

    def __init__(self) -> None:
        self._metrics: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self.prom: Any = None  # the driver's optional prometheus-client registry

    def _metric(self, name: str) -> Any:
        m = self._metrics.get(name)
        if m is None:
            from ray.util import metrics as rm

            spec = SPECS[name]
            with self._lock:
                m = self._metrics.get(name)
                if m is None:
                    if spec.kind == "counter":
                        m = rm.Counter(name, description=spec.help, tag_keys=spec.tags)
                    elif spec.kind == "gauge":
                        m = rm.Gauge(name, description=spec.help, tag_keys=spec.tags)
                    else:
                        m = rm.Histogram(
                            name, description=spec.help, boundaries=list(spec.bounds), tag_keys=spec.tags
                        )
                    self._metrics[name] = m
        return m

    def seed(self, name: str, tags: dict[str, str]) -> None:
        """Create a counter's series at 0. Prometheus' advice ("initialise every label set you know"):
        without it an error counter that never fired has no series, and the dashboard's errors panel
        shows "No data" instead of a flat 0. Ray's public ``inc`` refuses 0, hence ``_record``."""
        try:
            m = self._metric(name)
            if hasattr(m, "_record"):
                m._record(0.0, tags=tags)
            if self.prom is not None:
                self.prom.record(SPECS[name], 0.0, tags)
        except Exception as e:
            if name not in self._warned:
                self._warned.add(name)
                log.warning("metric %s not seeded (%s: %s)", name, type(e).__name__, e)

    def record(self, name: str, value: float, tags: dict[str, str]) -> None:
        try:
            spec = SPECS[name]
            m = self._metric(name)
            if spec.kind == "counter":
                if value > 0:
                    m.inc(value, tags=tags)
            elif spec.kind == "gauge":
                m.set(value, tags=tags)
            else:
                m.observe(value, tags=tags)
            if self.prom is not None:
                self.prom.record(spec, value, tags)
        except Exception as e:  # a metric must never fail a step; say it once per metric
            if name not in self._warned:
                self._warned.add(name)
                log.warning(
                    "metric %s not recorded (%s: %s); further failures are silent", name, type(e).__name__, e
                )


_recorder = _Recorder()


def record(name: str, value: float, role: str, worker: str, **extra: str) -> None:
    """Record one value of metric ``name`` (see SPECS) with its role/worker tags and any extra tags."""
    _recorder.record(name, float(value), {"role": role, "worker": worker, **extra})


def worker_id(role: str, index: int | None = None) -> str:
    """A short stable label for this process within its role: ``rank<N>`` when an index is known,
    else the Ray actor id's first 8 hex digits, else ``pid<N>``."""
    if index is not None:
        return f"rank{index}"
    try:
        import ray

        actor = ray.get_runtime_context().get_actor_id()
        if actor:
            return actor[:8]
    except Exception:
        pass
    return f"pid{os.getpid()}"


# ----------------------------------------------------------------------------------------------- per role


def actor_started(role: str, worker: str, error_kinds: tuple[str, ...] = ()) -> None:
    """Counted in each actor's ``__init__``: a restarted actor counts again, so starts > 1 = restarts.
    ``error_kinds`` (the methods that can fail) get their error series created at 0."""
    record("vgrpo_actor_starts", 1, role, worker)
    for kind in error_kinds:
        _recorder.seed("vgrpo_errors", {"role": role, "worker": worker, "kind": kind})


def error(role: str, worker: str, kind: str) -> None:
    """A call that raised (``kind`` = the method name, or the reward's failure class)."""
    record("vgrpo_errors", 1, role, worker, kind=kind)


def rollout_sampled(worker: str, n_images: int, seconds: float, version: int) -> None:
    """One ``sample()`` call of a rollout worker."""
    record("vgrpo_rollout_images", n_images, "rollout", worker)
    record("vgrpo_rollout_batch_seconds", seconds, "rollout", worker)
    if n_images > 0 and seconds > 0:
        record("vgrpo_rollout_images_per_s", n_images / seconds, "rollout", worker)
        per_image = seconds / n_images
        for _ in range(n_images):  # one observation per image: the histogram counts images
            record("vgrpo_rollout_image_latency_seconds", per_image, "rollout", worker)
    record("vgrpo_policy_version", version, "rollout", worker)


def weights_synced(role: str, worker: str, seconds: float, n_bytes: int, version: int) -> None:
    """A weight update published (learner) or applied (rollout worker)."""
    record("vgrpo_weight_sync_seconds", seconds, role, worker)
    record("vgrpo_weight_sync_bytes", n_bytes, role, worker)
    record("vgrpo_policy_version", version, role, worker)


def learner_stepped(
    worker: str, result: dict[str, Any], n_samples: int, seconds: float, version: int
) -> None:
    """One ``train_step`` of a learner rank; ``result`` is its returned dict."""
    record("vgrpo_learner_steps", 1, "learner", worker)
    record("vgrpo_learner_samples", n_samples, "learner", worker)
    record("vgrpo_learner_step_seconds", seconds, "learner", worker)
    for key, name in (
        ("loss", "vgrpo_learner_loss"),
        ("grad_norm", "vgrpo_learner_grad_norm"),
        ("learner/clip_frac", "vgrpo_learner_clip_frac"),
        ("lr", "vgrpo_learner_lr"),
    ):
        value = result.get(key)
        if isinstance(value, (int, float)):
            record(name, value, "learner", worker)
    if "learner/clip_frac" not in result:  # objectives without clipping report 0, so the panel has data
        record("vgrpo_learner_clip_frac", 0.0, "learner", worker)
    record("vgrpo_policy_version", version, "learner", worker)


def reward_request(reward: str, replica: str, seconds: float) -> None:
    """One image answered by a reward replica (queueing + its batch's compute)."""
    record("vgrpo_reward_requests", 1, "reward", replica, reward=reward)
    record("vgrpo_reward_latency_seconds", seconds, "reward", replica, reward=reward)


def reward_batch(reward: str, replica: str, items: list[dict[str, Any]], seconds: float) -> None:
    """One ``Reward.score`` batch of a replica: its size, compute time, values and failures."""
    record("vgrpo_reward_batch_size", len(items), "reward", replica, reward=reward)
    record("vgrpo_reward_batch_seconds", seconds, "reward", replica, reward=reward)
    for it in items:
        if "failure" in it:
            error("reward", replica, "failure")
        elif it.get("error"):
            error("reward", replica, "error")
        elif isinstance(it.get("value"), (int, float)):
            record("vgrpo_reward_value", it["value"], "reward", replica, reward=reward)


def reward_queue(reward: str, replica: str, depth: int) -> None:
    record("vgrpo_reward_queue_depth", depth, "reward", replica, reward=reward)


def export_step(row: dict[str, Any], port: int | None = None, bind: str = "127.0.0.1") -> None:
    """The driver's side: one ``metrics.jsonl`` row as gauges/counters (called after each step).
    ``port`` (``observability.metrics_port``) also serves them with prometheus-client on the interface
    ``bind`` (``observability.bind``)."""
    serve_driver_metrics(port, bind)
    tags = ("driver", "driver")
    if row["step"] == 1 or "vgrpo_retries" not in _recorder._metrics:
        _recorder.seed("vgrpo_retries", {"role": "driver", "worker": "driver", "kind": "reward"})
    record("vgrpo_train_step", row["step"], *tags)
    record("vgrpo_policy_version", row["policy_version"], *tags)
    record("vgrpo_staleness", row["staleness"], *tags)
    record("vgrpo_images_per_s", row["images_per_s"], *tags)
    record("vgrpo_train_images", row["images_per_s"] * row["time/step"], *tags)
    record("vgrpo_reward_mean", row["reward_mean"], *tags, reward="total")
    record("vgrpo_reward_std", row["reward_std"], *tags, reward="total")
    for key, value in row.items():
        if not isinstance(value, (int, float)):
            continue
        if key.startswith("reward/"):
            record("vgrpo_reward_mean", value, *tags, reward=key[7:])
        elif key.startswith("reward_std/"):
            record("vgrpo_reward_std", value, *tags, reward=key[11:])
        elif key.startswith("time/"):
            record("vgrpo_phase_seconds", value, *tags, phase=key[5:])
        elif key.startswith("eval/"):
            record("vgrpo_eval_score", value, *tags, family=key[5:])
        elif key.startswith("health/"):
            record("vgrpo_health", value, *tags, signal=key[7:])
        elif key.startswith("capacity/"):
            record("vgrpo_capacity", value, *tags, kind=key[9:])
        elif key.startswith("autoscale/"):
            record("vgrpo_autoscale", value, *tags, signal=key[10:])
    record("vgrpo_weight_update_bytes", row.get("weight_sync_bytes", 0), *tags)
    record("vgrpo_adv_zero_std_frac", row.get("adv/zero_std_frac", 0.0), *tags)
    record("vgrpo_retries", row.get("reward_retries", 0), *tags, kind="reward")


# ----------------------------------------------------------------------------------------------- driver port


class _PromMirror:
    """The driver's metrics on ``observability.metrics_port`` through prometheus-client (unprefixed)."""

    def __init__(self, port: int, bind: str = "127.0.0.1") -> None:
        import prometheus_client as pc

        self.pc = pc
        self.registry = pc.CollectorRegistry()
        self.metrics: dict[str, Any] = {}
        pc.start_http_server(port, addr=bind, registry=self.registry)

    def record(self, spec: Spec, value: float, tags: dict[str, str]) -> None:
        if tags.get("role") != "driver":
            return
        m = self.metrics.get(spec.name)
        if m is None:
            cls = {"counter": self.pc.Counter, "gauge": self.pc.Gauge, "histogram": self.pc.Histogram}[
                spec.kind
            ]
            kwargs: dict[str, Any] = {"buckets": list(spec.bounds)} if spec.kind == "histogram" else {}
            m = self.metrics[spec.name] = cls(
                spec.name, spec.help, list(spec.tags), registry=self.registry, **kwargs
            )
        child = m.labels(**tags)
        if spec.kind == "counter":
            if value > 0:
                child.inc(value)
        elif spec.kind == "gauge":
            child.set(value)
        else:
            child.observe(value)


def serve_driver_metrics(port: int | None, bind: str = "127.0.0.1") -> None:
    """Start the driver's prometheus-client endpoint once (no-op for ``None`` or when already serving),
    listening on ``bind`` only (127.0.0.1 unless ``observability.bind`` opens it)."""
    if port is None or _recorder.prom is not None:
        return
    try:
        _recorder.prom = _PromMirror(port, bind)
    except OSError as e:
        log.warning(
            "observability.metrics_port=%d: cannot serve driver metrics (%s); pick a free port", port, e
        )
