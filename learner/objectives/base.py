"""The one interface every objective implements (STYLE.md: objectives are parameterisations of one
interface). An objective says what a rollout must record, turns rewards into advantages, and computes a
loss with diagnostics from a :class:`TrainBatch` and a :class:`FlowPolicy`. It never steps an optimiser.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import torch

from vgrpo.learner.advantages import group_advantages
from vgrpo.proto.config import AdvantageConfig

Which = Literal["current", "old", "ref"]


class FlowPolicy(Protocol):
    """What an objective needs from a model: the velocity of the current, old (behaviour) or frozen
    reference policy. ``cond`` is indexed by batch position (see :func:`index_cond`)."""

    def velocity(
        self, x_bchw: torch.Tensor, sigma_b: torch.Tensor, cond: Any, which: Which = "current"
    ) -> torch.Tensor: ...

    def old_is_current(self) -> bool:
        """True when the old policy's weights equal the current ones (on-policy, first inner step)."""
        ...


def index_cond(cond: Any, idx: torch.Tensor) -> Any:
    """Select batch rows of a conditioning: a tensor, or a tuple (a NamedTuple such as the families'
    ``TextCond`` too; None entries stay None) / list / dict of tensors."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond[idx]
    if isinstance(cond, tuple) and hasattr(cond, "_fields"):
        return type(cond)(*(index_cond(c, idx) for c in cond))
    if isinstance(cond, (tuple, list)):
        return type(cond)(index_cond(c, idx) for c in cond)
    if isinstance(cond, dict):
        return {k: index_cond(v, idx) for k, v in cond.items()}
    raise TypeError(f"cannot index a conditioning of type {type(cond).__name__}")


def mean_d(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch (docs/algorithms.md's mean_d)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


@dataclass
class TrainBatch:
    """A batch of final samples with advantages, as the learner receives it.

    ``latents_bchw`` is the final sample o = x_0 of each image; ``sigmas`` the rollout grid (N+1,);
    ``group_ids_b`` the prompt group of each image. Flow-GRPO also carries the whole trajectory
    ``trajectory_btchw`` (x at sigma_0..sigma_N) and ``logp_old_bt`` (log p of each recorded transition);
    the windowed objectives (MixGRPO, Flow-GRPO-Fast) carry only their SDE window's W + 1 latents (x at
    sigma_s..sigma_{s+W}) and W log-probs, with ``window_start`` = s, the grid index of
    ``trajectory_btchw[:, 0]`` (0 for Flow-GRPO's whole trajectory).
    """

    latents_bchw: torch.Tensor
    cond: Any
    group_ids_b: torch.Tensor
    advantages_b: torch.Tensor
    sigmas: torch.Tensor
    shift: float = 1.0
    trajectory_btchw: torch.Tensor | None = None
    logp_old_bt: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    window_start: int = 0

    def __len__(self) -> int:
        return int(self.latents_bchw.shape[0])

    def select(self, idx: torch.Tensor) -> TrainBatch:
        opt = lambda t: None if t is None else t[idx]  # noqa: E731
        return TrainBatch(
            latents_bchw=self.latents_bchw[idx],
            cond=index_cond(self.cond, idx),
            group_ids_b=self.group_ids_b[idx],
            advantages_b=self.advantages_b[idx],
            sigmas=self.sigmas,
            shift=self.shift,
            trajectory_btchw=opt(self.trajectory_btchw),
            logp_old_bt=opt(self.logp_old_bt),
            extras=self.extras,
            window_start=self.window_start,
        )


class Objective(ABC):
    """Base of V-GRPO, DGPO, Flow-GRPO and DiffusionNFT."""

    name: ClassVar[str]
    sampler: ClassVar[Literal["dpm2", "sde", "sde_window"]] = "dpm2"  # the rollout sampler it needs
    records_trajectory: ClassVar[bool] = False  # rollouts must keep every x_i and log-prob
    needs_ref: ClassVar[bool] = False  # a frozen reference policy (LoRA disabled)
    old_policy: ClassVar[Literal["behaviour", "ema", "none"]] = "behaviour"

    def __init__(self, cfg: Any):
        self.cfg = cfg

    @property
    def advantage_cfg(self) -> AdvantageConfig:
        return self.cfg.advantage

    def advantages(
        self, rewards_b: torch.Tensor, group_ids_b: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return group_advantages(rewards_b, group_ids_b, self.advantage_cfg)

    def num_inner_steps(self) -> int:
        return int(getattr(self.cfg, "inner_steps", 1))

    def uses_ref(self) -> bool:
        return self.needs_ref and float(getattr(self.cfg, "kl_beta", 0.0)) > 0

    def old_decay(self, step: int) -> float | None:
        """EMA decay d for ``old <- d old + (1 - d) current`` after optimiser step ``step`` (None: no EMA)."""
        return None

    def rollout_policy(self, version: int) -> Literal["current", "old"]:
        """Which weights the rollout workers sample with once version ``version`` is published: the
        trainable ones (``current``), or the objective's old copy (``old``: DiffusionNFT always, DGPO after
        ``switch_ema_ref`` steps). Evaluation, checkpoints and export always use the current weights."""
        return "current"

    def train_subset(self, batch: TrainBatch) -> tuple[TrainBatch, dict[str, float]]:
        """The part of a rank's batch the update trains on (all of it unless the objective drops samples,
        as Flow-GRPO drops zero-advantage ones), and diagnostics about what was dropped."""
        return batch, {}

    def rollout_window(self, step: int, num_steps: int, seed: int) -> tuple[int, int] | None:
        """The SDE window (start, size) of training step ``step``'s rollouts on an ``num_steps``-step schedule,
        for objectives that sample with ``sde_window`` (MixGRPO, Flow-GRPO-Fast); None for the others. A pure
        function of its arguments: the driver calls it once per step and a resumed run draws the same."""
        return None

    @abstractmethod
    def loss(
        self, policy: FlowPolicy, batch: TrainBatch, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar loss to minimise on this (micro)batch and float diagnostics."""
