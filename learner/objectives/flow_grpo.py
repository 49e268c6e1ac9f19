"""Flow-GRPO (Liu et al. 2025), docs/algorithms.md §6.1: PPO on the per-step log-probs of an SDE sampler.

For each recorded transition j (the first ``timestep_fraction`` of the steps):

    rho_j = exp(log p_theta(x_{j+1} | x_j) - log p_old_j)
    L_pg  = mean max(-A rho_j, -A clip(rho_j, 1 - eps, 1 + eps))
    KL_j  = mean_d (mu_theta - mu_ref)^2 / (2 s_j^2)        (s_j^2, not s_j^2 |dt|: upstream's form, §9.4)
    loss  = mean_j (L_pg + beta KL_j)

The per-step loss (:func:`sde_step_loss`) is shared with the windowed variants, MixGRPO and
Flow-GRPO-Fast (:class:`WindowedFlowGRPO`), which train on their SDE window's steps only.
"""

from __future__ import annotations

from typing import Any

import torch

from vgrpo.core.flow import sde_std, sde_step_with_logprob
from vgrpo.learner.objectives.base import FlowPolicy, Objective, TrainBatch, mean_d
from vgrpo.proto.config import FlowGRPOConfig


class FlowGRPO(Objective):
    name = "flow_grpo"
    sampler = "sde"
    records_trajectory = True
    needs_ref = True
    old_policy = "none"  # the behaviour policy's log-probs are recorded by the rollout

    cfg: FlowGRPOConfig

    def train_steps(self, num_steps: int) -> int:
        return max(1, int(num_steps * self.cfg.timestep_fraction))

    def train_subset(self, batch: TrainBatch) -> tuple[TrainBatch, dict[str, float]]:
        """Upstream train_sd3.py trains only on samples with a non-zero advantage (a group whose rewards are
        all equal has A = 0 for every image): their policy term is zero anyway, and dropping them keeps
        the KL term and the mean over samples to the images that carry signal."""
        if not getattr(self.cfg, "drop_zero_advantage", True):
            return batch, {}
        keep_b = batch.advantages_b != 0
        dropped = 1.0 - float(keep_b.double().mean()) if len(batch) else 0.0
        return batch.select(keep_b.nonzero().squeeze(1)), {"zero_adv_dropped": dropped}

    def loss(
        self, policy: FlowPolicy, batch: TrainBatch, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return clipped_sde_loss(policy, batch, self.cfg, self.train_steps(len(batch.sigmas) - 1), self.name)


class WindowedFlowGRPO(FlowGRPO):
    """Flow-GRPO restricted to an SDE window of W consecutive steps (docs/algorithms.md §6.2, §6.3): the
    rollout takes SDE steps on [s, s + W) only and records those W transitions; the loss is Flow-GRPO's on
    them. Subclasses say how the window moves (:meth:`window_start`); every image of a step shares it."""

    sampler = "sde_window"

    cfg: Any  # FlowGRPOFastConfig or MixGRPOConfig: noise_level, clip_range, kl_beta, sde_window_size

    def window_start(self, step: int, num_steps: int, seed: int) -> int:
        raise NotImplementedError

    def rollout_window(self, step: int, num_steps: int, seed: int) -> tuple[int, int]:
        return self.window_start(step, num_steps, seed), int(self.cfg.sde_window_size)

    def loss(
        self, policy: FlowPolicy, batch: TrainBatch, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if batch.logp_old_bt is None:
            raise ValueError(f"{self.name} needs rollouts recorded with the sde_window sampler")
        return clipped_sde_loss(policy, batch, self.cfg, int(batch.logp_old_bt.shape[1]), self.name)


def sde_step_loss(
    policy: FlowPolicy, batch: TrainBatch, cfg: Any, j: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Flow-GRPO's loss on recorded transition j (trajectory slot j -> j + 1, log-prob slot j), taken at grid
    step i = window_start + j (sigma_i -> sigma_{i+1}). Returns (L_pg + beta KL_j, rho_b, KL_j or None)."""
    assert batch.trajectory_btchw is not None and batch.logp_old_bt is not None
    sigmas = batch.sigmas
    i = batch.window_start + j
    s, s_next, sigma_1 = float(sigmas[i]), float(sigmas[i + 1]), float(sigmas[1])
    adv_b = batch.advantages_b.double()
    x_j = batch.trajectory_btchw[:, j].float()
    x_next = batch.trajectory_btchw[:, j + 1].float()
    sigma_b = torch.full((len(batch),), s, device=x_j.device)
    v = policy.velocity(x_j, sigma_b, batch.cond, "current")
    _, logp_b, mu, _ = sde_step_with_logprob(x_j, v, s, s_next, sigma_1, cfg.noise_level, prev_sample=x_next)
    ratio_b = torch.exp(logp_b.double() - batch.logp_old_bt[:, j].double())
    unclipped = -adv_b * ratio_b
    clipped = -adv_b * ratio_b.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)
    step_loss = torch.maximum(unclipped, clipped).mean()
    kl = None
    if cfg.kl_beta > 0:
        with torch.no_grad():
            v_ref = policy.velocity(x_j, sigma_b, batch.cond, "ref")
            _, _, mu_ref, _ = sde_step_with_logprob(
                x_j, v_ref, s, s_next, sigma_1, cfg.noise_level, prev_sample=x_next
            )
        s_j = sde_std(s, sigma_1, cfg.noise_level)
        kl = (mean_d((mu.double() - mu_ref.double()) ** 2) / (2 * s_j**2)).mean()
        step_loss = step_loss + cfg.kl_beta * kl
    return step_loss, ratio_b, kl


def clipped_sde_loss(
    policy: FlowPolicy, batch: TrainBatch, cfg: Any, n_train: int, name: str = "flow_grpo"
) -> tuple[torch.Tensor, dict[str, float]]:
    """mean_j of :func:`sde_step_loss` over the first ``n_train`` recorded transitions, and diagnostics."""
    if batch.trajectory_btchw is None or batch.logp_old_bt is None:
        raise ValueError(f"{name} needs rollouts recorded with the SDE sampler (trajectory and log-probs)")
    total = torch.zeros((), dtype=torch.float64, device=batch.trajectory_btchw.device)
    clip_frac = kl_mean = ratio_dev = 0.0
    for j in range(n_train):
        step_loss, ratio_b, kl = sde_step_loss(policy, batch, cfg, j)
        if kl is not None:
            kl_mean += kl.item() / n_train
        total = total + step_loss / n_train
        with torch.no_grad():
            clip_frac += float(((ratio_b - 1).abs() > cfg.clip_range).double().mean()) / n_train
            ratio_dev = max(ratio_dev, float((ratio_b - 1).abs().max()))
    return total.float(), {"clip_frac": clip_frac, "kl": kl_mean, "ratio_max_dev": ratio_dev}
