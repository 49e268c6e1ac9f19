"""``vgrpo train``: the driver. It owns the loop, the run directory, metrics and checkpoints.

    prompts (PromptSource) ─┐
                            ▼
      RolloutWorker × R  ── images, final latents, prompt embeddings, seeds, policy version ──┐
        (holds v_k)                                                                            ▼
            ▲                                                          reward servers (Ray Serve, batched)
            │ update_weights(v_k+1)                                                            │
            │                                                        rewards → group advantages│
      Learner × L (DeepSpeed ZeRO group) ◀──────── batch shards (whole prompt groups) ─────────┘
        objective: V-GRPO | DGPO | Flow-GRPO | DiffusionNFT

Bounded staleness: with ``train.max_staleness >= 1`` the rollout of step k+1 is launched before the
update of step k, so sampling overlaps reward scoring and learning; a rollout whose policy version lags
the learner by more than the bound is never trained on. Versions: the starting policy is 0, step N
publishes version N; ``staleness`` = (N - 1) - (the oldest version that sampled step N's batch).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vgrpo import placement
from vgrpo.core.metrics import export_step
from vgrpo.proto.config import RunConfig, dump_config
from vgrpo.proto.messages import PromptItem, RolloutBatch, TrainShard, WeightUpdate, split_evenly

log = logging.getLogger("vgrpo")


class TrainingError(RuntimeError):
    """A failure of one role, with the role named; the run stops with this message."""


class ActorLost(TrainingError):
    """An actor died (``ray.kill``, OOM, a lost node) while the driver waited on it. ``index`` is the
    position of its call in the list the driver waited on; ``reason`` a one-line cause."""

    def __init__(self, message: str, index: int, reason: str):
        super().__init__(message)
        self.index, self.reason = index, reason


def death_reason(e: BaseException) -> str:
    """One line out of Ray's many-line actor-death message: the error type, pid and why it died."""
    import re

    text = str(e)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    because = re.search(r"dead because (.*?)\.(?:\s|$)", text)
    why = because.group(1) if because else (lines[0][:200] if lines else "")
    kind = re.search(r"Worker exit type: (\w+)", text)
    pid = re.search(r"pid: (\d+)", text)
    return f"{type(e).__name__}{', pid ' + pid.group(1) if pid else ''}: {why}" + (
        f" ({kind.group(1)})" if kind else ""
    )


# a step in which rollout workers die this many times (replacements included) stops the run
MAX_WORKER_REPLACEMENTS_PER_STEP = 3


@dataclass
class PendingRollout:
    step: int
    prompts: list[PromptItem]
    seeds: list[int]
    refs: list[Any]  # one ObjectRef per worker
    slices: list[tuple[int, int]]  # prompt range [lo, hi) of each worker
    data_before: dict[str, int]  # the prompt source's position before this step's prompts were drawn
    version: int = 0  # the policy version the workers sample this step with (their last queued update)
    # the SDE window (start, size) of the step (MixGRPO, Flow-GRPO-Fast; None for the other objectives),
    # decided once here: every worker, and the redo of a dead worker's share, samples with it
    window: tuple[int, int] | None = None
    launched: float = field(default_factory=time.perf_counter)


# ----------------------------------------------------------------------------------------------- run dir


class RunDir:
    """The run directory of DESIGN.md: config.yaml, metrics.jsonl, checkpoints/, samples/, tb/, report.html."""

    def __init__(self, root: Path):
        self.root = root
        self.checkpoints = root / "checkpoints"
        self.samples = root / "samples"
        root.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        self.samples.mkdir(exist_ok=True)
        self.metrics_path = root / "metrics.jsonl"

    def write_config(self, cfg: RunConfig) -> None:
        tmp = self.root / "config.yaml.tmp"
        tmp.write_text(dump_config(cfg))
        os.replace(tmp, self.root / "config.yaml")

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_metrics(self, last_step: int) -> None:
        """Keep metric lines of steps <= last_step only (a resumed run continues with no duplicate)."""
        if not self.metrics_path.exists():
            return
        keep = [
            line
            for line in self.metrics_path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step
        ]
        self.metrics_path.write_text("".join(line + "\n" for line in keep))

    def checkpoint_dirs(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first (a complete one has driver_state.json; partial ones are
        written under a .tmp name and never match)."""
        out = []
        for p in self.checkpoints.iterdir():
            if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit():
                if (p / "driver_state.json").is_file():
                    out.append((int(p.name[5:]), p))
                else:
                    log.warning("skipping incomplete checkpoint %s", p)
        return sorted(out)


# ----------------------------------------------------------------------------------------------- helpers


def derive_seeds(seed: int, step: int, n: int) -> list[int]:
    """Noise seeds of a step's images: a pure function of (train.seed, step), so a resumed run redraws the
    same noise as an uninterrupted one."""
    rng = np.random.default_rng([seed, step, 0xA11CE])
    return [int(x) for x in rng.integers(0, 2**31 - 1, size=n)]


def check_staleness(versions: list[int], step: int, max_staleness: int) -> int:
    """The step's staleness, (step - 1) - oldest sampling version; a batch that mixes versions or lags more
    than ``max_staleness`` is refused (never trained on)."""
    staleness = (step - 1) - min(versions)
    if len(set(versions)) > 1:
        raise TrainingError(f"step {step}: the rollout batch mixes policy versions {sorted(set(versions))}")
    if staleness > max_staleness or staleness < 0:
        raise TrainingError(
            f"step {step}: rollouts of version {min(versions)} are {staleness} versions behind the learner "
            f"(version {step - 1}); train.max_staleness = {max_staleness}"
        )
    return staleness


def image_grid(images_bhwc: np.ndarray, columns: int) -> np.ndarray:
    b, h, w, c = images_bhwc.shape
    rows = math.ceil(b / columns)
    grid = np.full((rows * h, columns * w, c), 255, dtype=np.uint8)
    for k in range(b):
        r, col = divmod(k, columns)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = images_bhwc[k]
    return grid


def role_rates(row: dict[str, Any]) -> dict[str, float]:
    """images/s per role for one metrics row: the step's images over the seconds each role spent on them
    (rollout = sampling compute, reward = scoring, learner = the update). The smallest is the bottleneck."""
    n_images = row["images_per_s"] * row["time/step"]
    keys = {"rollout": "time/sample_compute", "reward": "time/reward", "learner": "time/learner"}
    return {role: n_images / row[k] for role, k in keys.items() if row.get(k, 0) > 0}


class Progress:
    """Progress of the loop. On a terminal: a rich live panel (bar, then step, reward, images/s per role,
    staleness and phase times of the last step); otherwise one plain line per step, for log files."""

    def __init__(self, mode: str, total: int, start: int):
        self.live = mode == "rich" or (mode == "auto" and sys.stderr.isatty())
        self.off = mode == "off"
        self.total = total
        self._bar: Any = None
        self._live: Any = None
        if self.live and not self.off:
            from rich.console import Console, Group
            from rich.live import Live
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._group = Group
            self._bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self._task = self._bar.add_task("train", total=total, completed=start, info="starting the roles")
            self._live = Live(self._bar, console=Console(stderr=True), refresh_per_second=4, transient=False)
            self._live.start()

    def update(self, row: dict[str, Any]) -> None:
        rates = role_rates(row)
        per_role = " · ".join(f"{k} {v:.1f}" for k, v in rates.items())
        bottleneck = min(rates, key=lambda k: rates[k]) if rates else "?"
        info = (
            f"reward {row['reward_mean']:.3f} ± {row['reward_std']:.3f} | loss {row['loss']:+.4f} | "
            f"{row['images_per_s']:.1f} img/s ({per_role}) | stale {row['staleness']}"
        )
        if "eval/overall" in row:
            info += f" | eval {row['eval/overall']:.3f}"
        if self.off:
            return
        if self._live is None:
            print(f"step {row['step']}/{self.total} | {info} | {row['time/step']:.1f} s", flush=True)
            return
        from rich.text import Text

        # short lines (< 80 columns): a narrow terminal must not wrap the panel into noise
        role_cells = "  ".join(
            f"{k} [bold]{v:.1f}[/]" + (" [yellow](slowest)[/]" if k == bottleneck else "")
            for k, v in rates.items()
        )
        phases = " · ".join(
            f"{k[5:]} {row[k]:.2f}s"
            for k in ("time/rollout", "time/reward", "time/learner", "time/weight_sync")
        )
        lines = [
            f"  reward [bold green]{row['reward_mean']:.3f}[/] ± {row['reward_std']:.3f}   loss {row['loss']:+.4f}"
            f"   staleness [bold]{row['staleness']}[/]   {row['time/step']:.2f} s/step"
            + (f"   eval [bold]{row['eval/overall']:.3f}[/]" if "eval/overall" in row else ""),
            f"  images/s  e2e [bold]{row['images_per_s']:.1f}[/]  {role_cells}",
            f"  phases    {phases}",
        ]
        self._bar.update(self._task, completed=row["step"], info="")
        self._live.update(self._group(self._bar, *(Text.from_markup(line) for line in lines)))

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


# ----------------------------------------------------------------------------------------------- roles


def auto_threads(cfg: RunConfig) -> int:
    """torch threads per actor when not configured: all cores when the roles take turns (one worker, one
    rank, synchronous), else a share of them: on CPU, OpenMP threads that outnumber the cores spin and
    starve the other roles (measured: a reward call of 0.3 s took 36 s with 2 workers + 2 ranks at 2
    threads each on 2 cores)."""
    cores = os.cpu_count() or 1
    concurrent = cfg.rollout.num_workers + cfg.learner.num_ranks
    if cfg.train.max_staleness == 0 and concurrent == 2:
        return cores
    return max(1, cores // concurrent)


def weight_sync_mode(cfg: RunConfig) -> tuple[str, str]:
    """(path, backend) of the weight broadcast: ``train.weight_sync`` resolved. auto = the collective when
    the rollout workers and the learner ranks have GPUs (NCCL), else the object store; collective on CPU
    uses gloo (how the CPU tests run this path)."""
    on_gpu = cfg.rollout.gpus_per_worker > 0 and cfg.learner.gpus_per_rank > 0
    mode = cfg.train.weight_sync
    if mode == "auto":
        mode = "collective" if on_gpu else "object_store"
    return mode, ("nccl" if on_gpu else "gloo")


# ``Trainer.published`` value of a version whose weights went by broadcast: learner rank 0 keeps them (its
# publish history); they enter the object store only if a replacement worker or a fallback asks for them
KEPT_BY_LEARNER = "kept by learner rank 0"


class Roles:
    """The actors of one run: a placement group, R rollout workers, L learner ranks, the reward servers."""

    def __init__(self, cfg: RunConfig, timeout_s: float):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from vgrpo.learner.actor import LearnerActor
        from vgrpo.learner.objectives import build_objective
        from vgrpo.reward_servers.serve import RewardClient, deploy_rewards
        from vgrpo.rollout_workers.actor import RolloutWorker

        self.cfg, self.timeout_s = cfg, timeout_s
        r, lc = cfg.rollout, cfg.learner
        bundles = placement.placement_bundles(cfg)  # the plan `vgrpo train --dry-run` prints
        self.pg = placement_group(bundles, strategy=cfg.resources.placement_strategy, name="vgrpo")
        self.get(self.pg.ready(), "placement group (resources: " + json.dumps(bundles) + ")")

        def at(i: int) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=i)

        self.objective = build_objective(cfg.algorithm)
        threads = cfg.resources.torch_threads or auto_threads(cfg)
        self.learners = [
            LearnerActor.options(
                num_cpus=lc.cpus_per_rank,
                num_gpus=lc.gpus_per_rank,
                resources=dict(lc.custom_resources) or None,
                scheduling_strategy=at(i),
            ).remote(
                cfg.model,
                lc,
                cfg.algorithm,
                r,
                rank=i,
                world_size=lc.num_ranks,
                total_steps=cfg.train.steps,
                seed=cfg.train.seed,
                threads=threads,
            )
            for i in range(lc.num_ranks)
        ]
        noise = float(getattr(cfg.algorithm.params(), "noise_level", 0.7))

        def new_worker(i: int) -> Any:
            """Rollout worker i in placement-group bundle L + i (also where a replacement goes)."""
            return RolloutWorker.options(
                num_cpus=r.cpus_per_worker,
                num_gpus=r.gpus_per_worker,
                resources=dict(r.custom_resources) or None,
                scheduling_strategy=at(lc.num_ranks + i),
            ).remote(
                cfg.model,
                r,
                cfg.sampler(),
                noise_level=noise,
                seed=cfg.train.seed,
                threads=threads,
                sigma_grid=cfg.sigma_grid(),
            )

        self._new_worker = new_worker
        self.workers = [new_worker(i) for i in range(r.num_workers)]
        self.replacements = 0
        addr, port = self.get(self.learners[0].rendezvous_address.remote(), "learner rank 0 (start-up)")
        infos = self.get(
            [
                lrn.init_distributed.remote(addr, port, cfg.train.max_staleness, cfg.train.ema)
                for lrn in self.learners
            ],
            "learner group (DeepSpeed initialisation)",
            names=[f"learner rank {i} (DeepSpeed initialisation)" for i in range(lc.num_ranks)],
        )
        self.learner_info = infos[0]
        self.get([w.ready.remote() for w in self.workers], "rollout workers (loading the policy)")
        # the weight broadcast's group: learner rank 0 (rank 0) and the rollout workers (ranks 1..R)
        self.weight_sync, self.sync_backend = weight_sync_mode(cfg)
        self.sync_members: list[Any] | None = None  # the workers of the current group (None: none built)
        if self.weight_sync == "collective":
            self.build_weight_sync()
        handles = deploy_rewards(cfg.reward, quiet=True)
        self.rewards = RewardClient(handles, cfg.reward)

    def get(self, refs: Any, role: str, timeout: float | None = None, names: list[str] | None = None) -> Any:
        """ray.get with a timeout (train.timeout_s for the whole wait). The first failure surfaces at once
        (not after the other calls finish, which may never happen when a peer of a collective died), named
        by ``names[i]`` (default ``role``): a dead actor as :class:`ActorLost` (its ``index`` says which
        call), a raising one with its traceback."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        lost: tuple[type[BaseException], ...] = (RayActorError,)
        if hasattr(ray.exceptions, "OutOfMemoryError"):  # Ray's memory monitor killed the worker
            lost += (ray.exceptions.OutOfMemoryError,)
        single = not isinstance(refs, list)
        items = [refs] if single else list(refs)
        labels = names or [role] * len(items)
        limit = timeout or self.timeout_s
        deadline = time.monotonic() + limit
        index = {ref: i for i, ref in enumerate(items)}
        out: list[Any] = [None] * len(items)
        remaining = list(dict.fromkeys(items))
        while remaining:
            left = deadline - time.monotonic()
            ready, remaining = ray.wait(remaining, num_returns=1, timeout=max(0.0, left))
            if not ready:
                waiting = sorted({labels[index[ref]] for ref in remaining})
                raise TrainingError(
                    f"{', '.join(waiting)}: no answer within {limit:.0f} s (train.timeout_s)"
                ) from None
            ref = ready[0]
            i = index[ref]
            try:
                value = ray.get(ref, timeout=max(1.0, left))
            except RayTaskError as e:
                raise TrainingError(f"{labels[i]} failed:\n{e}") from None
            except lost as e:
                why = death_reason(e)
                raise ActorLost(f"{labels[i]}: the actor died ({why})", i, why) from None
            for j, other in enumerate(items):
                if other == ref:
                    out[j] = value
        return out[0] if single else out

    def build_weight_sync(self) -> bool:
        """(Re)build the weight-broadcast group on a fresh port: learner rank 0 hosts it, every rollout
        worker joins; all joins are launched, then awaited together (a collective). A worker busy with a
        batch joins after it (one method at a time): the others wait for it. A dead worker: a warning, the
        object store for this step (which replaces it) and a new try at the next step. Any other failure:
        a warning, and the weights go by the object store for the rest of the run."""
        self.sync_members = None
        try:
            try:  # a dead member would hold learner rank 0 in the rendezvous until the timeout: look first
                self.get(
                    [w.ready.remote() for w in self.workers],
                    "rollout workers (before the weight-sync group)",
                    names=[
                        f"rollout worker {i} (before the weight-sync group)" for i in range(len(self.workers))
                    ],
                )
            except ActorLost as e:
                log.warning(
                    "rollout worker %d is dead (%s): this step's weights go by the object store (which "
                    "replaces it); the weight-broadcast group is built at the next step, with its replacement",
                    e.index,
                    e.reason,
                )
                return False
            host, port = self.get(self.learners[0].rendezvous_address.remote(), "learner rank 0 (port)")
            world = 1 + len(self.workers)
            args = (host, port)
            refs = [
                self.learners[0].join_weight_sync.remote(*args, 0, world, self.sync_backend, self.timeout_s)
            ]
            refs += [
                w.join_weight_sync.remote(*args, 1 + i, world, self.sync_backend, self.timeout_s)
                for i, w in enumerate(self.workers)
            ]
            names = ["learner rank 0 (join weight sync)"]
            names += [f"rollout worker {i} (join weight sync)" for i in range(len(self.workers))]
            self.get(refs, "weight-sync group", names=names)
        except TrainingError as e:
            log.warning(
                "could not build the weight-broadcast group (%s backend) of learner rank 0 and %d rollout "
                "workers: %s; the weights go by the object store for the rest of the run",
                self.sync_backend,
                len(self.workers),
                str(e).splitlines()[0],
            )
            self.weight_sync = "object_store"  # members that did join keep an unused group: harmless
            return False
        self.sync_members = list(self.workers)
        return True

    def ensure_weight_sync(self) -> bool:
        """True when the broadcast can be used now: the collective is on and its group holds exactly the
        current workers; a group that lost a member (a replaced worker, a failed broadcast) is rebuilt
        first, on a new port."""
        if self.weight_sync != "collective":
            return False
        members = self.sync_members
        if (
            members is None
            or len(members) != len(self.workers)
            or any(a is not b for a, b in zip(members, self.workers, strict=True))
        ):
            return self.build_weight_sync()
        return True

    def replace_worker(self, i: int, version: int, weights: Any) -> None:
        """A new rollout worker i in the dead one's placement-group bundle, holding policy ``version``
        (``weights``: its published ``WeightUpdate`` or an ObjectRef of it; None for the starting policy)."""
        import ray

        with contextlib.suppress(Exception):  # dead already, or hung: release its bundle
            ray.kill(self.workers[i], no_restart=True)
        self.replacements += 1
        w = self._new_worker(i)
        self.get(w.ready.remote(), f"rollout worker {i} (replacement, loading the policy)")
        if weights is not None:
            self.get(w.update_weights.remote(weights), f"rollout worker {i} (replacement weights)")
        self.workers[i] = w

    def dead_learner_ranks(self, probe_s: float = 10.0) -> list[int]:
        """Ranks whose actor is dead. A live rank answers ``ready`` or is busy (stuck in a collective with
        a dead peer): both count as alive; only a dead actor fails the probe."""
        import ray
        from ray.exceptions import RayActorError

        refs = [lrn.ready.remote() for lrn in self.learners]
        ray.wait(refs, num_returns=len(refs), timeout=probe_s)
        dead = []
        for rank, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=0.1)
            except RayActorError:
                dead.append(rank)
            except Exception:  # busy (GetTimeoutError) or failing for another reason: alive
                pass
        return dead

    def stop(self, cluster_ends: bool = False) -> None:
        """Kill this run's actors. On a cluster that outlives the run, also delete its reward
        applications; an embedded cluster is about to end with everything in it (and Serve's shutdown
        would only add retry warnings from its controller)."""
        import ray

        from vgrpo.reward_servers.serve import shutdown_rewards

        if not cluster_ends:
            try:
                shutdown_rewards()
            except Exception as e:  # shutting down: report, do not mask the run's own outcome
                log.warning("reward servers did not shut down cleanly: %s", e)
        for a in self.workers + self.learners:
            ray.kill(a)
        ray.util.remove_placement_group(self.pg)


# ----------------------------------------------------------------------------------------------- the loop


class Trainer:
    def __init__(self, cfg: RunConfig, run: RunDir):
        self.cfg, self.run = cfg, run
        from vgrpo.data import PromptSource

        try:
            self.source = PromptSource.from_spec(
                cfg.data.train_prompts,
                seed=cfg.train.seed,
                shuffle=cfg.data.shuffle,
                balance_by=cfg.data.balance_by,
            )
            if "ocr" in cfg.reward.weights:  # an OCR prompt without quoted text fails now, not mid-run
                from vgrpo.reward_servers.ocr import validate_prompts

                validate_prompts([row["prompt"] for row in self.source.rows])
        except (ValueError, OSError) as e:
            raise TrainingError(f"data.train_prompts = {cfg.data.train_prompts!r}: {e}") from None
        self.step = 0
        self.version = 0
        self.pending: deque[PendingRollout] = deque()
        self.tb: Any = None
        # published weights by version (ObjectRefs; None = the starting policy every new worker holds): what
        # a replacement rollout worker is loaded with
        self.published: dict[int, Any] = {0: None}
        self._ema_cache: tuple[int, Any] | None = None  # (version, EMA weights) last fetched
        self._current_cache: tuple[int, Any] | None = None  # (version, trained weights) last fetched

    def _publish(self, version: int, weights: Any) -> Any:
        """Keep ``weights`` (an ObjectRef) as version ``version``; drop versions no pending rollout can
        still need (max_staleness + 1 back)."""
        self.published[version] = weights
        for v in [v for v in self.published if v < version - self.cfg.train.max_staleness - 1]:
            del self.published[v]
        return weights

    def weights_for(self, roles: Roles, version: int) -> Any:
        """The published weights of ``version`` for a replacement worker or an object-store update: an
        ObjectRef of its ``WeightUpdate``, or None (the starting policy). A version that went by broadcast is fetched from learner
        rank 0's publish history on first use (and then kept as an ObjectRef like the others)."""
        weights = self.published.get(version)
        if isinstance(weights, str) and weights == KEPT_BY_LEARNER:
            weights = roles.learners[0].published_weights.remote(version)
            self.published[version] = weights
        return weights

    # --- rollout workers that die --------------------------------------------------------------------

    def on_workers(self, roles: Roles, calls: dict[int, Any], what: str, version: int) -> dict[int, Any]:
        """Run ``calls[i](worker i)`` and wait for all. A worker that dies is replaced (a new actor in its
        placement-group bundle, loaded with policy ``version``, the one the call expects) and its call
        redone; then it is brought up to the current version. Gives up after
        MAX_WORKER_REPLACEMENTS_PER_STEP deaths in one call."""
        refs = {i: fn(roles.workers[i]) for i, fn in calls.items()}
        deaths = 0
        while True:
            order = list(refs)
            try:
                values = roles.get(
                    [refs[i] for i in order], what, names=[f"rollout worker {i} ({what})" for i in order]
                )
                return dict(zip(order, values, strict=True))
            except ActorLost as e:
                i = order[e.index]
                deaths += 1
                if deaths > MAX_WORKER_REPLACEMENTS_PER_STEP:
                    raise TrainingError(
                        f"rollout worker {i} ({what}) died again: {deaths} deaths in one call, the last "
                        f"{e.reason}; not replacing it any more. " + self.resume_hint()
                    ) from None
                log.warning(
                    "rollout worker %d died during %s (%s); replacing it in its placement-group bundle "
                    "with policy version %d and redoing its share",
                    i,
                    what,
                    e.reason,
                    version,
                )
                roles.replace_worker(i, version, self.weights_for(roles, version))
                refs[i] = calls[i](roles.workers[i])
                if version < self.version:  # the redone share sampled `version`; now catch up
                    roles.workers[i].update_weights.remote(self.weights_for(roles, self.version))

    def resume_hint(self) -> str:
        ckpts = self.run.checkpoint_dirs()
        where = f"the last checkpoint (step {ckpts[-1][0]})" if ckpts else "step 0 (no checkpoint yet)"
        return f"`vgrpo train --run-dir {self.run.root} --resume` continues from {where}."

    def on_learners(self, roles: Roles, refs: list[Any], what: str, step: int) -> list[Any]:
        """Wait for one call on every learner rank. A rank that dies stops the run (a DeepSpeed group cannot
        lose a member): the message names the rank and how to resume."""
        names = [f"learner rank {k} ({what})" for k in range(len(refs))]
        try:
            return roles.get(refs, what, names=names)
        except TrainingError as e:
            dead = [e.index] if isinstance(e, ActorLost) else roles.dead_learner_ranks()
            if not dead:
                raise
            why = e.reason if isinstance(e, ActorLost) else "its actor is dead"
            ranks = ", ".join(str(k) for k in dead)
            raise TrainingError(
                f"learner rank {ranks} died during {what} of step {step} ({why}). A DeepSpeed group cannot "
                f"go on without one of its ranks, so the run stops. " + self.resume_hint()
            ) from None

    # --- rollout ---------------------------------------------------------------------------------

    def launch(self, roles: Roles, step: int) -> PendingRollout:
        r = self.cfg.rollout
        data_before = self.source.state()
        prompts = self.source.next(r.prompts_per_step)
        seeds = derive_seeds(self.cfg.train.seed, step, len(prompts) * r.group_size)
        window = roles.objective.rollout_window(step, r.num_steps, self.cfg.train.seed)
        slices = [s for s in split_evenly(len(prompts), len(roles.workers))]
        refs = []
        for w, (lo, hi) in zip(roles.workers, slices, strict=True):
            if hi > lo:
                refs.append(
                    w.sample.remote(
                        [p.prompt for p in prompts[lo:hi]],
                        r.group_size,
                        seeds[lo * r.group_size : hi * r.group_size],
                        window,
                    )
                )
            else:
                refs.append(None)
        return PendingRollout(
            step, prompts, seeds, refs, slices, data_before, version=self.version, window=window
        )

    def collect(self, roles: Roles, pending: PendingRollout) -> RolloutBatch:
        """The step's rollouts, each worker's share checked (proto/messages.py) and joined in prompt
        order; the share of a worker that died is redone by its replacement, with the same prompts, seeds
        and policy version (so the batch is what it would have been)."""
        r = self.cfg.rollout

        def call(i: int) -> Any:
            lo, hi = pending.slices[i]
            launched = [pending.refs[i]]  # the first call is the one launched already; a redo resubmits

            def fn(w: Any) -> Any:
                if launched:
                    return launched.pop()
                prompts = [p.prompt for p in pending.prompts[lo:hi]]
                return w.sample.remote(
                    prompts,
                    r.group_size,
                    pending.seeds[lo * r.group_size : hi * r.group_size],
                    pending.window,
                )

            return fn

        calls = {i: call(i) for i, ref in enumerate(pending.refs) if ref is not None}
        got = self.on_workers(roles, calls, f"sampling step {pending.step}", pending.version)
        parts = []
        for i in sorted(got):
            lo, hi = pending.slices[i]
            parts.append(got[i].check(f"rollout worker {i} (step {pending.step})", num_prompts=hi - lo))
        check_staleness([p.policy_version for p in parts], pending.step, self.cfg.train.max_staleness)
        return RolloutBatch.concat(parts)

    # --- one step ----------------------------------------------------------------------------------

    def train_step(self, roles: Roles, step: int) -> dict[str, Any]:
        cfg, r = self.cfg, self.cfg.rollout
        t_step = time.perf_counter()
        if not self.pending:
            self.pending.append(self.launch(roles, step))
        pending = self.pending.popleft()
        t0 = time.perf_counter()
        batch = self.collect(roles, pending)
        t_rollout = time.perf_counter() - t0
        staleness = (step - 1) - batch.policy_version  # collect checked it against train.max_staleness
        oldest = batch.policy_version
        # the overlap: the next step's rollout runs on the workers while this step scores and learns
        if cfg.train.max_staleness >= 1 and step < cfg.train.steps:
            self.pending.append(self.launch(roles, step + 1))

        t0 = time.perf_counter()
        prompts = [p.prompt for p in pending.prompts for _ in range(r.group_size)]
        metadata = [p.metadata for p in pending.prompts for _ in range(r.group_size)]
        scores = roles.rewards.score(batch.images, prompts, metadata).check(
            "the reward servers", len(prompts)
        )
        t_reward = time.perf_counter() - t0

        import torch

        group_b = np.repeat(np.arange(len(pending.prompts)), r.group_size)
        adv_b, adv_stats = roles.objective.advantages(torch.as_tensor(scores.total), torch.as_tensor(group_b))
        t0 = time.perf_counter()
        shards = TrainShard.split(batch, adv_b.numpy(), len(roles.learners), oldest)
        results = self.on_learners(
            roles,
            [lrn.train_step.remote(s, step) for lrn, s in zip(roles.learners, shards, strict=True)],
            "train_step",
            step,
        )
        t_learner = time.perf_counter() - t0

        t0 = time.perf_counter()
        collective = roles.ensure_weight_sync()  # (re)builds the group first if a worker was replaced
        if collective:
            n_bytes = self.broadcast_weights(roles, step)
        else:
            n_bytes = self.store_weights(roles, step)
        t_sync = time.perf_counter() - t0

        loss = float(np.mean([res["loss"] for res in results]))
        n_images = len(prompts)
        elapsed = time.perf_counter() - t_step
        row: dict[str, Any] = {
            "step": step,
            "policy_version": step,
            "reward_mean": float(np.mean(scores.total)),
            "reward_std": float(np.std(scores.total)),
            "loss": loss,
            "staleness": int(staleness),
            "images_per_s": n_images / elapsed,
            "time/rollout": t_rollout,
            "time/reward": t_reward,
            "time/learner": t_learner,
            "time/weight_sync": t_sync,
            "time/step": elapsed,
            "time/sample_compute": float(batch.seconds),
            "grad_norm": float(results[0]["grad_norm"]),
            "lr": results[0]["lr"],
            "weight_sync_bytes": n_bytes,
            "weight_sync_collective": int(collective),
            "reward_retries": scores.retries,
            "adv/zero_std_frac": adv_stats["zero_std_frac"],
        }
        if pending.window is not None:
            row["rollout/window_start"] = pending.window[0]
        for name, values in scores.values.items():
            row[f"reward/{name}"] = float(np.mean(values))
        for k in results[0]:
            if k.startswith("learner/"):
                row[k] = float(np.mean([res.get(k, 0.0) for res in results]))
        if not math.isfinite(loss):
            raise TrainingError(f"step {step}: non-finite loss {loss}")
        self._last_batch = (batch.images, prompts, scores.total)
        return row

    # --- weight sync -------------------------------------------------------------------------------

    def store_weights(self, roles: Roles, step: int) -> int:
        """The object-store path: every learner rank publishes (a collective under ZeRO-3), rank 0's state
        is ray.put once and each worker fetches it. Returns the bytes published."""
        import ray

        cfg = self.cfg
        keep = max(1, cfg.train.max_staleness + 1)
        states = self.on_learners(
            roles, [lrn.publish.remote(keep, k == 0) for k, lrn in enumerate(roles.learners)], "publish", step
        )
        weights_ref = self._publish(step, ray.put(WeightUpdate(step, states[0])))
        updates = {i: (lambda w: w.update_weights.remote(weights_ref)) for i in range(len(roles.workers))}
        self.version = step
        if cfg.train.max_staleness == 0:
            self.on_workers(roles, updates, f"update_weights to version {step}", step)
        else:  # not awaited: a worker applies it before its next batch; one that died meanwhile is
            for fn, w in zip(updates.values(), roles.workers, strict=True):  # replaced when that batch fails
                fn(w)
        return sum(int(v.numel()) * v.element_size() for v in states[0].values())

    def broadcast_weights(self, roles: Roles, step: int) -> int:
        """The collective path: learner rank 0 publishes and broadcasts (LoRA in one shot, full weights in
        buckets of train.weight_sync_bucket_mb), ranks > 0 publish without shipping anything back (ZeRO-3
        gathers need every rank), every worker receives in place; all calls are launched, then awaited
        together. The weights stay in learner rank 0's history: the object store sees them only when a
        replacement worker or a fallback needs them. A failure falls back to the object store for this step
        (:meth:`sync_fallback`). Returns the bytes broadcast.

        With train.max_staleness >= 1 a worker may still be sampling the next step's batch (launched before
        this update): its receive_weights runs after that batch (an actor runs one method at a time), and
        learner rank 0 waits in the broadcast until then (within the group's timeout, train.timeout_s).
        That is a wait, not a deadlock: the batch needs nothing the learner holds. The batch keeps the
        version it started with (receive_weights takes the sampling lock), so the staleness guard holds."""
        cfg = self.cfg
        keep = max(1, cfg.train.max_staleness + 1)
        bucket_mb = None if cfg.model.lora is not None else cfg.train.weight_sync_bucket_mb
        learner_refs = [roles.learners[0].broadcast_weights.remote(keep, bucket_mb)]
        learner_refs += [lrn.publish.remote(keep, False) for lrn in roles.learners[1:]]
        worker_refs = [w.receive_weights.remote() for w in roles.workers]
        self._publish(step, KEPT_BY_LEARNER)
        self.version = step
        names = [f"learner rank 0 (broadcast of version {step})"]
        names += [f"learner rank {k} (publish)" for k in range(1, len(roles.learners))]
        names += [f"rollout worker {i} (receive version {step})" for i in range(len(roles.workers))]
        try:
            got = roles.get(learner_refs + worker_refs, "weight broadcast", names=names)
        except TrainingError as e:
            return self.sync_fallback(roles, step, learner_refs, worker_refs, e)
        return int(got[0]["bytes"])

    def sync_fallback(
        self, roles: Roles, step: int, learner_refs: list[Any], worker_refs: list[Any], error: TrainingError
    ) -> int:
        """A broadcast that failed (a worker died, a timeout, an error): wait for every call of it to end,
        then send version ``step`` by the object store to each worker that did not receive it (a dead or
        hung one is replaced, loaded with it), and rebuild the group, new port, with the replacements. A
        learner rank that died or hung stops the run, as in any learner call."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        ray.wait(
            learner_refs + worker_refs,
            num_returns=len(learner_refs + worker_refs),
            timeout=roles.timeout_s + 30,
        )

        def outcome(ref: Any) -> tuple[str, Any]:
            try:
                return "ok", ray.get(ref, timeout=0.1)
            except GetTimeoutError:
                return "hung", None
            except RayActorError as e:
                return "dead", death_reason(e)
            except Exception as e:  # the call raised (a peer's socket closed, the group's timeout)
                return "failed", str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__

        learners = [outcome(ref) for ref in learner_refs]
        for k, (state, why) in enumerate(learners):
            if state == "dead" or state == "hung" or (state == "failed" and k > 0):
                raise TrainingError(
                    f"learner rank {k} {'died' if state == 'dead' else state} during the weight broadcast of "
                    f"step {step} ({why or 'no answer within train.timeout_s'}); the run stops. "
                    + self.resume_hint()
                ) from None
        workers = [outcome(ref) for ref in worker_refs]
        redo = {i: o for i, o in enumerate(workers) if not (o[0] == "ok" and o[1]["version"] == step)}
        log.warning(
            "the weight broadcast of version %d failed (%s); sending it by the object store to rollout "
            "worker(s) %s (%s) and rebuilding the weight-sync group",
            step,
            str(error).splitlines()[0],
            sorted(redo),
            "; ".join(
                f"worker {i}: {o[0]}{' ' + str(o[1]) if o[0] != 'ok' and o[1] else ''}"
                for i, o in redo.items()
            ),
        )
        weights = self.weights_for(roles, step)
        # a dead worker with a batch still pending (max_staleness >= 1) is replaced when collect finds that
        # batch lost (and then caught up to this version); replacing it here would only be undone there
        deferred = [
            i
            for i, (state, _) in redo.items()
            if state == "dead" and any(i < len(p.refs) and p.refs[i] is not None for p in self.pending)
        ]
        alive = {}
        for i, (state, _) in redo.items():
            if i in deferred:
                continue
            if state in ("dead", "hung"):
                roles.replace_worker(i, step, weights)
            else:
                alive[i] = lambda w: w.update_weights.remote(weights)
        if alive:
            self.on_workers(roles, alive, f"update_weights to version {step} (broadcast fallback)", step)
        roles.sync_members = None  # rebuilt before the next broadcast; now, unless a member is still dead
        if not deferred:
            roles.ensure_weight_sync()
        return int(learners[0][1]["bytes"]) if learners[0][0] == "ok" else 0

    # --- outputs -----------------------------------------------------------------------------------

    def save_samples(self, step: int) -> None:
        from PIL import Image

        images, prompts, rewards = self._last_batch
        g = self.cfg.rollout.group_size
        folder = self.run.samples / f"step_{step}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image_grid(images, columns=g)).save(folder / "grid.png")
        rows = [
            {"prompt": prompts[i * g], "rewards": [round(float(x), 4) for x in rewards[i * g : (i + 1) * g]]}
            for i in range(len(prompts) // g)
        ]
        (folder / "samples.json").write_text(json.dumps(rows, indent=1))
        if self.tb is not None:
            self.tb.add_image("samples", image_grid(images, columns=g), step, dataformats="HWC")

    def ema_weights(self, roles: Roles, version: int) -> Any:
        """The EMA of the policy after update ``version`` (train.ema), fetched from learner rank 0 once per
        version: a step that both evaluates and checkpoints uses one copy."""
        if self._ema_cache is None or self._ema_cache[0] != version:
            ema = self.on_learners(roles, [roles.learners[0].get_ema.remote()], "get_ema", version)[0]
            self._ema_cache = (version, ema)
        return self._ema_cache[1]

    def current_weights(self, roles: Roles, version: int) -> Any:
        """The trained weights after update ``version`` (every learner rank gathers; rank 0's are kept),
        fetched once per version: a step that evaluates and checkpoints uses one copy."""
        if self._current_cache is None or self._current_cache[0] != version:
            states = self.on_learners(
                roles, [lrn.get_weights.remote() for lrn in roles.learners], "get_weights", version
            )
            self._current_cache = (version, states[0])
        return self._current_cache[1]

    def evaluate(self, roles: Roles) -> dict[str, float]:
        """Held-out evaluation as training works: rollout worker 0 samples (fixed seeds), the shapes
        reward server's model scores, the driver tabulates (vgrpo/evaluate.py)."""
        from vgrpo.evaluate import load_prompt_rows, score_heldout, shapes_reward

        d, r = self.cfg.data, self.cfg.rollout
        rows = load_prompt_rows(d.eval_prompts, d.eval_max_prompts)
        # with train.ema the held-out score is the EMA policy's (as Flow-GRPO and DiffusionNFT evaluate)
        weights = None
        if self.cfg.train.ema is not None:
            weights = self.ema_weights(roles, self.version)
        elif roles.objective.rollout_policy(self.version) == "old":
            # the workers hold the objective's old copy (DiffusionNFT samples with it): the held-out score
            # is the trained policy's, as upstream evaluates its "default" adapter
            weights = self.current_weights(roles, self.version)
        sampled = self.on_workers(
            roles,
            {
                0: lambda w: w.sample_heldout.remote(
                    [row["prompt"] for row in rows],
                    weights=weights,
                    images_per_prompt=d.eval_images_per_prompt,
                    seed=self.cfg.train.seed,
                    num_steps=d.eval_num_steps,
                    guidance_scale=d.eval_guidance_scale,
                    sampler="dpm2",
                    shift=r.shift,
                    batch_size=r.batch_size,
                )
            },
            "held-out evaluation",
            self.version,
        )[0]
        res = score_heldout(rows, sampled, shapes_reward(), "shapes")
        out = {"eval/overall": float(res["overall"])}
        out.update({f"eval/{k}": float(v) for k, v in res["families"].items()})
        return out

    def checkpoint(self, roles: Roles, step: int) -> Path:
        """checkpoints/step_N/: learner shards (DeepSpeed), policy.safetensors, driver_state.json. Written
        under a .tmp name and renamed when complete."""
        from vgrpo.learner.engine import save_policy_weights

        final = self.run.checkpoints / f"step_{step}"
        tmp = self.run.checkpoints / f".step_{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        lora = self.cfg.model.lora is not None
        self.on_learners(
            roles,
            [lrn.save_checkpoint.remote(str(tmp / "learner")) for lrn in roles.learners],
            "checkpoint",
            step,
        )
        save_policy_weights(self.current_weights(roles, step), tmp / "policy.safetensors", step, lora)
        if self.cfg.train.ema is not None:  # what `vgrpo eval` and `vgrpo export` use for this step
            ema = self.ema_weights(roles, step)
            save_policy_weights(ema, tmp / "ema.safetensors", step, lora)
        state = {
            "step": step,
            "version": step,
            "data": self.source.state(),
            "python_random": repr(random.getstate()),
            "time": time.time(),
        }
        (tmp / "driver_state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old_step, path in self.run.checkpoint_dirs()[: -self.cfg.train.keep_checkpoints]:
            if old_step != step:
                shutil.rmtree(path, ignore_errors=True)
        return final

    def restore(self, roles: Roles) -> int:
        ckpts = self.run.checkpoint_dirs()
        if not ckpts:
            self.run.truncate_metrics(0)
            return 0
        step, path = ckpts[-1]
        state = json.loads((path / "driver_state.json").read_text())
        self.on_learners(
            roles,
            [lrn.load_checkpoint.remote(str(path / "learner")) for lrn in roles.learners],
            "resume",
            step,
        )
        self.source.load_state(state["data"])
        import ray
        from safetensors.torch import load_file

        self.version = step
        if roles.objective.rollout_policy(step) == "current":
            state = load_file(str(path / "policy.safetensors"))
        else:  # the rollout samples with the objective's old copy, restored by the learners just now
            state = self.on_learners(
                roles, [lrn.sampling_weights.remote() for lrn in roles.learners], "resume", step
            )[0]
        weights = self._publish(step, ray.put(state))
        self.on_workers(
            roles,
            {i: (lambda w: w.update_weights.remote(step, weights)) for i in range(len(roles.workers))},
            "resume",
            step,
        )
        self.run.truncate_metrics(step)
        return step

    # --- the recipe ---------------------------------------------------------------------------------

    def fit(self, roles: Roles, resume: bool) -> int:
        cfg = self.cfg
        start = self.restore(roles) if resume else 0
        if cfg.observability.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run.root / "tb"), purge_step=start + 1 if start else None)
        progress = Progress(cfg.observability.progress, cfg.train.steps, start)
        step = start
        StopRequest.in_loop = True
        try:
            for step in range(start + 1, cfg.train.steps + 1):
                row = self.train_step(roles, step)  # sample → score → advantages → update → broadcast
                last = step == cfg.train.steps
                if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or last):
                    row.update(self.evaluate(roles))
                self.run.append_metrics(row)
                export_step(row, cfg.observability.metrics_port)  # Prometheus: core/metrics.py
                if self.tb is not None:
                    for k, v in row.items():
                        if k != "step" and isinstance(v, (int, float)):
                            self.tb.add_scalar(k, v, step)
                progress.update(row)
                if step % cfg.train.samples_every == 0 or last:
                    self.save_samples(step)
                stopping = StopRequest.requested and not last
                if step % cfg.train.checkpoint_every == 0 or last or stopping:
                    path = self.checkpoint(roles, step)
                self.step = step
                if stopping:
                    progress.close()
                    print(
                        f"stopped at step {step}: checkpoint {path}; continue with "
                        f"`vgrpo train --run-dir {self.run.root} --resume`",
                        file=sys.stderr,
                        flush=True,
                    )
                    raise KeyboardInterrupt
        finally:
            StopRequest.in_loop = False
            progress.close()
            if self.tb is not None:
                self.tb.close()
            if cfg.observability.report:
                from vgrpo.report import try_write_report

                try_write_report(self.run.root)
        return step


# ----------------------------------------------------------------------------------------------- entry


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
    return True


def train(cfg: RunConfig, run_dir: Path, address: str | None = None, resume: bool = False) -> int:
    """Run the loop; returns the last completed step. Raises TrainingError / KeyboardInterrupt."""
    if address or os.environ.get("RAY_ADDRESS"):
        # Ray reads RAY_AUTH_MODE once, when it is first imported: set it before that import (measured: set
        # after `import ray`, a token-auth head refuses the client with "RAY_AUTH_MODE is 'disabled'")
        enable_token_auth_if_available()
    import ray

    from vgrpo.core.policy import resolve_model_path

    resolve_model_path(cfg.model.path)  # a missing model fails before any Ray session starts
    run = RunDir(run_dir)
    run.write_config(cfg)
    trainer = Trainer(cfg, run)  # reads the prompt file: a bad one fails before Ray starts
    started = start_ray(cfg, address)
    install_stop_handlers()
    roles = None
    try:
        roles = Roles(cfg, cfg.train.timeout_s)
        return trainer.fit(roles, resume)
    finally:
        if roles is not None:
            try:
                roles.stop(cluster_ends=started)
            except Exception as e:  # already failing or interrupted: report and go on shutting down
                log.warning("stopping the actors: %s", e)
        if started:
            ray.shutdown()
