"""``vgrpo train``: the driver, read as the recipe. One step, top to bottom in ``Trainer.train_step``:

    prompts (PromptSource) ── PromptItem ──▶ RolloutWorker × R (holds policy v_k; rollout_workers/)
                                               │ RolloutBatch: images, final latents, text features,
                                               │ the sampler grid (+ SDE trajectory, log-probs)
                                               ▼
                    reward servers (Ray Serve, batched; reward_servers/) ── RewardScores ──┐
                                                                                            ▼
                                           group-relative advantages (the objective's rule)
                                                                                            │
      Learner × L (DeepSpeed ZeRO group; learner/) ◀── TrainShard × L (whole prompt groups) ┘
                  │ one update of the objective: V-GRPO | DGPO | Flow-GRPO(-Fast) | MixGRPO | NFT
                  ▼
      publish v_k+1 ── WeightUpdate (object store) or WeightManifest + buckets (collective) ──▶ workers
                  ▼
      every train.eval_every steps: held-out images (worker 0) → scored and tabulated here;
      every train.checkpoint_every steps: checkpoint (run_dir.py)

The messages are proto/messages.py's, each checked where it arrives. Around the recipe: ``roles.py`` (the
actors, placement, a dead worker replaced and its share redone), ``publishing.py`` (the three publish
paths), ``run_dir.py`` (the run directory, checkpoints, samples), ``progress.py`` (the console),
``launch.py`` (Ray and the stop signals); docs/architecture.md maps them all.

Bounded staleness: with ``train.max_staleness >= 1`` the rollout of step k+1 is launched before the
update of step k, so sampling overlaps reward scoring and learning; a rollout whose policy version lags
the learner by more than the bound is never trained on. Versions: the starting policy is 0, step N
publishes version N; ``staleness`` = (N - 1) - (the oldest version that sampled step N's batch).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vgrpo.capacity import Capacity
from vgrpo.core.metrics import export_step
from vgrpo.health import HealthWatch
from vgrpo.launch import StopRequest, enable_token_auth_if_available, install_stop_handlers, start_ray
from vgrpo.progress import Progress
from vgrpo.proto.config import RunConfig
from vgrpo.proto.messages import PromptItem, RewardScores, RolloutBatch, TrainShard, split_evenly
from vgrpo.publishing import Publishing
from vgrpo.roles import RoleCalls, Roles, TrainingError
from vgrpo.run_dir import Checkpointing, RunDir

log = logging.getLogger("vgrpo")


@dataclass
class PendingRollout:
    step: int
    prompts: list[PromptItem]
    seeds: list[int]
    refs: list[Any]  # one ObjectRef per worker
    slices: list[tuple[int, int]]  # prompt range [lo, hi) of each worker
    workers: list[Any]  # the worker each share was sent to
    data_before: dict[str, int]  # the prompt source's position before this step's prompts were drawn
    version: int = 0  # the policy version the workers sample this step with (their last queued update)
    # the SDE window (start, size) of the step (MixGRPO, Flow-GRPO-Fast; None for the other objectives),
    # decided once here: every worker, and the redo of a dead worker's share, samples with it
    window: tuple[int, int] | None = None
    launched: float = field(default_factory=time.perf_counter)


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


# ----------------------------------------------------------------------------------------------- the loop


def drop_failed_groups(
    step: int, batch: RolloutBatch, prompts: list[str], scores: RewardScores, num_ranks: int
) -> tuple[RolloutBatch, list[str], RewardScores, int]:
    """``reward.on_failure=drop_group``: the prompt groups with an image no reward could score leave
    the step (each failure logged with its cause); the step stops when fewer groups than learner
    ranks remain. Without failures (or with on_failure=stop, which raised already) all is kept."""
    if scores.failed is None or not scores.failed.any():
        return batch, prompts, scores, 0
    g = batch.group_size
    bad = np.unique(np.flatnonzero(scores.failed) // g)
    keep = np.setdiff1d(np.arange(batch.num_prompts), bad)
    for line in scores.errors[:3]:
        log.warning("step %d: %s", step, line)
    if len(scores.errors) > 3:
        log.warning("step %d: and %d more reward failure(s)", step, len(scores.errors) - 3)
    if len(keep) < num_ranks:
        raise TrainingError(
            f"step {step}: the rewards failed in {len(bad)} of {batch.num_prompts} prompt groups "
            f"(reward.on_failure=drop_group), {len(keep)} left for {num_ranks} learner rank(s); "
            f"first: {scores.errors[0]}"
        )
    log.warning(
        "step %d: %d prompt group(s) dropped from the update (reward.on_failure=drop_group)",
        step,
        len(bad),
    )
    rows = np.repeat(np.isin(np.arange(batch.num_prompts), keep), g)
    kept_prompts = [p for p, k in zip(prompts, rows, strict=True) if k]
    return batch.select_groups(keep), kept_prompts, scores.select(rows), len(bad)


class Trainer(RoleCalls, Publishing, Checkpointing, Capacity):
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
            if "shapes" in cfg.reward.weights:  # so does a prompt the shapes reward cannot parse
                from vgrpo.reward_servers.shapes.grammar import parse_prompt

                for n, row in enumerate(self.source.rows, start=1):
                    try:
                        parse_prompt(row["prompt"])
                    except ValueError as e:
                        raise ValueError(
                            f"prompt {n} ({row['prompt']!r}) is outside the shapes grammar: {e}"
                        ) from None
        except (ValueError, OSError) as e:
            raise TrainingError(f"data.train_prompts = {cfg.data.train_prompts!r}: {e}") from None
        if cfg.train.eval_every:  # a bad held-out file fails now, not at the first evaluation
            from vgrpo.evaluate import load_prompt_rows

            try:
                load_prompt_rows(cfg.data.eval_prompts, cfg.data.eval_max_prompts)
            except (ValueError, OSError, KeyError) as e:
                raise TrainingError(f"data.eval_prompts = {cfg.data.eval_prompts!r}: {e}") from None
        self.step = 0
        self.version = 0
        self.pending: deque[PendingRollout] = deque()
        self.tb: Any = None
        # published weights by version (ObjectRefs; None = the starting policy every new worker holds): what
        # a replacement rollout worker is loaded with
        self.published: dict[int, Any] = {0: None}
        self._ema_cache: tuple[int, Any] | None = None  # (version, EMA weights) last fetched
        self._current_cache: tuple[int, Any] | None = None  # (version, trained weights) last fetched
        self.health = HealthWatch()
        self.init_capacity()

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
            step,
            prompts,
            seeds,
            refs,
            slices,
            list(roles.workers),
            data_before,
            version=self.version,
            window=window,
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
        owners = {i: pending.workers[i] for i in calls}
        got = self.on_workers(roles, calls, f"sampling step {pending.step}", pending.version, owners=owners)
        parts = []
        for i in sorted(got):
            lo, hi = pending.slices[i]
            parts.append(got[i].check(f"rollout share {i} (step {pending.step})", num_prompts=hi - lo))
        versions = sorted({p.policy_version for p in parts})
        if len(versions) > 1:
            raise TrainingError(f"step {pending.step}: the rollout batch mixes policy versions {versions}")
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
        staleness = check_staleness([batch.policy_version], step, cfg.train.max_staleness)
        oldest = batch.policy_version
        # nothing is in flight on the workers now: the moment to re-plan capacity (vgrpo/capacity.py)
        autoscale = self.replan_capacity(roles, step)
        # the overlap: the next step's rollout runs on the workers while this step scores and learns
        if cfg.train.max_staleness >= 1 and step < cfg.train.steps:
            self.pending.append(self.launch(roles, step + 1))

        t0 = time.perf_counter()
        prompts = [p.prompt for p in pending.prompts for _ in range(r.group_size)]
        metadata = [p.metadata for p in pending.prompts for _ in range(r.group_size)]
        drop = cfg.reward.on_failure == "drop_group"
        scores = roles.rewards.score(batch.images, prompts, metadata, keep_failures=drop).check(
            "the reward servers", len(prompts)
        )
        t_reward = time.perf_counter() - t0
        batch, prompts, scores, dropped = drop_failed_groups(
            step, batch, prompts, scores, len(roles.learners)
        )
        num_prompts = batch.num_prompts

        import torch

        from vgrpo.learner.advantages import combine_rewards

        group_b = np.repeat(np.arange(num_prompts), r.group_size)
        total, reward_stats = scores.total, {}
        if len(scores.values) > 1:  # several rewards: combined as reward.combine says, each one logged
            values = {k: torch.as_tensor(v) for k, v in scores.values.items()}
            mode = cfg.reward.combine
            combined, reward_stats = combine_rewards(
                values, roles.rewards.weights, torch.as_tensor(group_b), mode
            )
            total = combined.numpy() if mode == "group_normalized" else scores.total
        adv_b, adv_stats = roles.objective.advantages(torch.as_tensor(total), torch.as_tensor(group_b))
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
        n_images = len(pending.prompts) * r.group_size  # sampled, dropped groups included
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
            "reward/dropped_groups": dropped,
            "adv/zero_std_frac": adv_stats["zero_std_frac"],
            **reward_stats,
        }
        if pending.window is not None:
            row["rollout/window_start"] = pending.window[0]
        row.update(autoscale)
        row["capacity/sampling_workers"] = sum(ref is not None for ref in pending.refs)  # got prompts
        self.capacity_row(roles, step, row)  # capacity/* metrics; the row measures the split for re-plans
        for name, values in scores.values.items():
            row[f"reward/{name}"] = float(np.mean(values))
        for k in results[0]:
            if k.startswith("learner/"):
                row[k] = float(np.mean([res.get(k, 0.0) for res in results]))
        if not math.isfinite(loss):
            raise TrainingError(f"step {step}: non-finite loss {loss}")
        self._last_batch = (batch.images, prompts, scores.total)
        return row

    def evaluate(self, roles: Roles) -> dict[str, float]:
        """Held-out evaluation as training works: rollout worker 0 samples (fixed seeds), the shapes
        reward server scores, the driver tabulates (vgrpo/evaluate.py)."""
        from vgrpo.evaluate import load_prompt_rows, score_heldout, shapes_reward
        from vgrpo.reward_servers.serve import ServedReward

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
        # the served shapes reward scores when training serves it (its binary verdict is the table's number),
        # else the same model in this process
        served = "shapes" in getattr(getattr(roles, "rewards", None), "handles", {})
        scorer = ServedReward(roles.rewards, "shapes") if served else shapes_reward()
        res = score_heldout(rows, sampled, scorer, "shapes")
        out = {"eval/overall": float(res["overall"])}
        out.update({f"eval/{k}": float(v) for k, v in res["families"].items()})
        return out

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
                row.update(self.health.update(row))  # alarms: vgrpo/health.py
                self.run.append_metrics(row)
                export_step(row, cfg.observability.metrics_port, cfg.observability.bind)  # core/metrics.py
                if self.tb is not None:
                    for k, v in row.items():
                        if k != "step" and isinstance(v, (int, float)):
                            self.tb.add_scalar(k, v, step)
                progress.update(row)
                if step % cfg.train.samples_every == 0 or last:
                    self.save_samples(step)
                stopping = StopRequest.requested and not last
                better = cfg.train.keep_best and self.run.is_best(row.get("eval/overall"))
                if step % cfg.train.checkpoint_every == 0 or last or stopping or better:
                    path = self.checkpoint(roles, step)
                if better:
                    self.run.record_best(step, float(row["eval/overall"]))
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


def train(
    cfg: RunConfig, run_dir: Path, address: str | None = None, resume: bool = False, overwrite: bool = False
) -> int:
    """Run the loop; returns the last completed step. Raises TrainingError / KeyboardInterrupt. A run
    directory that holds a run is refused unless ``resume`` (continue it, with its identity unchanged)
    or ``overwrite`` (delete it and start over)."""
    if address or os.environ.get("RAY_ADDRESS"):
        # Ray reads RAY_AUTH_MODE once, when it is first imported: set it before that import (measured: set
        # after `import ray`, a token-auth head refuses the client with "RAY_AUTH_MODE is 'disabled'")
        enable_token_auth_if_available()
    # Serve's router (in this process: the driver holds the reward handles) asks each replica for its
    # queue length within 0.1 s by default and warns when it misses; a replica busy scoring a batch on a
    # loaded machine misses it routinely (seen on 2 cores with a video family), a warning with nothing to
    # act on. 1 s is Serve's own back-off ceiling; a user's setting wins. Read when Serve is imported.
    os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "1.0")
    import ray

    from vgrpo.core.policy import resolve_model_path

    resolve_model_path(cfg.model.path)  # a missing model fails before any Ray session starts
    run = RunDir(run_dir)
    if resume:
        run.check_identity(cfg)
    elif (held := run.holds_a_run()) is not None:
        if not overwrite:
            raise TrainingError(
                f"{run_dir} already holds a run ({held}); fix: `vgrpo train --run-dir {run_dir} --resume` "
                "continues it, --overwrite starts it over, or choose another --run-dir"
            )
        run.clear()
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
