"""The loop's step in one process, without Ray: the same engine calls as `vgrpo train`'s actors, in the
same order (sample → score → advantages → update → publish → apply; vgrpo/driver.py has the diagram) and
through the same messages (proto/messages.py). The learnability probe (`benchmarks/learnability.py`) runs
it step after step; the planner's measurement (`vgrpo plan --measure`, vgrpo/plan.py) times its phases.
What it leaves out is what Ray adds: placement, several workers and ranks, faults, the staleness overlap.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vgrpo.proto.config import RunConfig
from vgrpo.proto.messages import RewardScores, RolloutBatch, TrainShard, WeightUpdate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalStep:
    """What one step produced, and the seconds of each phase (``rollout``, ``reward``, ``learner``,
    ``weight_sync``)."""

    batch: RolloutBatch
    scores: RewardScores
    advantages: np.ndarray
    adv_stats: dict[str, float]
    learner: dict[str, float]
    seconds: dict[str, float]


class LocalLoop:
    """One rollout engine, the configured rewards in-process and a one-rank DeepSpeed learner (gloo on
    CPU, NCCL on GPU) built from ``cfg`` as `vgrpo train` builds its actors."""

    def __init__(
        self,
        cfg: RunConfig,
        device: str = "cpu",
        seed: int | None = None,
        total_steps: int | None = None,
        max_staleness: int = 0,
    ) -> None:
        from vgrpo.learner.engine import LearnerEngine
        from vgrpo.reward_servers.registry import get_reward
        from vgrpo.rollout_workers.engine import RolloutEngine

        self.cfg = cfg
        seed = cfg.train.seed if seed is None else seed
        noise = float(getattr(cfg.algorithm.params(), "noise_level", 0.7))
        self.rollout = RolloutEngine(
            cfg.model,
            cfg.rollout,
            cfg.sampler(),  # type: ignore[arg-type]
            noise_level=noise,
            sigma_grid=cfg.sigma_grid(),  # type: ignore[arg-type]
            seed=seed,
            device=device,
        )
        self.learner = LearnerEngine(
            cfg.model,
            cfg.learner,
            cfg.algorithm,
            cfg.rollout,
            rank=0,
            world_size=1,
            total_steps=total_steps or cfg.train.steps,
            seed=seed,
            device=device,
        )
        self.learner.init_distributed("127.0.0.1", free_port(), max_staleness=max_staleness)
        self.objective = self.learner.objective
        self.weights = {name: float(w) for name, w in cfg.reward.weights.items()}
        self.rewards = {
            name: get_reward(name, dict(cfg.reward.server(name).options)) for name in self.weights
        }

    def sample(self, prompts: list[str], step: int, seeds: list[int]) -> RolloutBatch:
        """G images for each prompt, with the step's SDE window (MixGRPO, Flow-GRPO-Fast) as the driver
        draws it."""
        window = self.objective.rollout_window(step, self.cfg.rollout.num_steps, self.cfg.train.seed)
        batch = self.rollout.sample(prompts, self.cfg.rollout.group_size, seeds, window)
        return batch.check("the local rollout engine", num_prompts=len(prompts))

    def score(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]] | None = None
    ) -> RewardScores:
        """Every reward of ``reward.weights`` on every image and their weighted total; an image a reward
        cannot score stops the step with its index and prompt (as the driver's RewardClient does)."""
        t0 = time.perf_counter()
        values: dict[str, np.ndarray] = {}
        details: dict[str, list[dict[str, Any]]] = {}
        total = np.zeros(len(prompts))
        for name, reward in self.rewards.items():
            scored = reward.score_samples(list(images), prompts, metadata)
            got = [s.value if s.error is None else None for s in scored]
            bad = next((i for i, v in enumerate(got) if v is None or not np.isfinite(v)), None)
            if bad is not None:
                why = scored[bad].error or f"value {got[bad]}"
                raise RuntimeError(f"reward {name!r} failed on image {bad} (prompt {prompts[bad]!r}): {why}")
            values[name] = np.array(got, dtype=np.float64)
            details[name] = [s.details for s in scored]
            total += self.weights[name] * values[name]
        scores = RewardScores(values, total, details, {}, time.perf_counter() - t0, 0)
        return scores.check("the local rewards", len(prompts))

    def advantages(self, batch: RolloutBatch, scores: RewardScores) -> tuple[np.ndarray, dict[str, float]]:
        """The objective's advantages of the rewards combined as ``reward.combine`` says (as the driver)."""
        from vgrpo.learner.advantages import combine_rewards

        group_b = np.repeat(np.arange(batch.num_prompts), batch.group_size)
        total = torch.as_tensor(scores.total)
        if len(scores.values) > 1 and self.cfg.reward.combine == "group_normalized":
            values = {k: torch.as_tensor(v) for k, v in scores.values.items()}
            total, _ = combine_rewards(values, self.weights, torch.as_tensor(group_b), "group_normalized")
        adv, stats = self.objective.advantages(total, torch.as_tensor(group_b))
        return adv.numpy(), stats

    def learn(self, batch: RolloutBatch, advantages: np.ndarray, step: int, policy_version: int) -> dict:
        (shard,) = TrainShard.split(batch, advantages, 1, policy_version)
        return self.learner.train_step(shard, step)

    def publish(self, step: int) -> int:
        """The learner publishes version ``step`` and the rollout engine applies it; returns its bytes."""
        state = self.learner.publish()
        self.rollout.update_weights(WeightUpdate(step, state))
        return sum(int(v.numel()) * v.element_size() for v in state.values())

    def step(
        self, prompts: list[str], step: int, seeds: list[int], metadata: list[dict] | None = None
    ) -> LocalStep:
        """One synchronous step, each phase timed."""
        t = [time.perf_counter()]
        batch = self.sample(prompts, step, seeds)
        t.append(time.perf_counter())
        g = self.cfg.rollout.group_size
        per_image = [p for p in prompts for _ in range(g)]
        meta = [m for m in metadata for _ in range(g)] if metadata is not None else None
        scores = self.score(batch.images, per_image, meta)
        t.append(time.perf_counter())
        adv, stats = self.advantages(batch, scores)
        learned = self.learn(batch, adv, step, batch.policy_version)
        t.append(time.perf_counter())
        self.publish(step)
        t.append(time.perf_counter())
        phases = ("rollout", "reward", "learner", "weight_sync")
        seconds = {k: t[i + 1] - t[i] for i, k in enumerate(phases)}
        return LocalStep(batch, scores, adv, stats, learned, seconds)

    def close(self) -> None:
        """Leave the one-rank process group (a measurement must not fail on teardown)."""
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
