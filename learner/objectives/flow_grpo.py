"""Flow-GRPO (Liu et al. 2025), ALGORITHMS.md §6.1: PPO on the per-step log-probs of an SDE sampler.

For each recorded transition j (the first ``timestep_fraction`` of the steps):

    rho_j = exp(log p_theta(x_{j+1} | x_j) - log p_old_j)
    L_pg  = mean max(-A rho_j, -A clip(rho_j, 1 - eps, 1 + eps))
    KL_j  = mean_d (mu_theta - mu_ref)^2 / (2 s_j^2)        (s_j^2, not s_j^2 |dt|: upstream's form, §9.4)
    loss  = mean_j (L_pg + beta KL_j)
"""

from __future__ import annotations

import torch

from vgrpo.learner.objectives.base import FlowPolicy, Objective, TrainBatch, mean_d
from vgrpo.proto.config import FlowGRPOConfig
from vgrpo.rollout_workers.samplers import sde_std, sde_step_with_logprob


class FlowGRPO(Objective):
    name = "flow_grpo"
    sampler = "sde"
    records_trajectory = True
    needs_ref = True
    old_policy = "none"  # the behaviour policy's log-probs are recorded by the rollout

    cfg: FlowGRPOConfig

    def train_steps(self, num_steps: int) -> int:
        return max(1, int(num_steps * self.cfg.timestep_fraction))

    def loss(
        self, policy: FlowPolicy, batch: TrainBatch, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        if batch.trajectory_btchw is None or batch.logp_old_bt is None:
            raise ValueError(
                "flow_grpo needs rollouts recorded with the SDE sampler (trajectory and log-probs)"
            )
        sigmas = batch.sigmas
        sigma_1 = float(sigmas[1])
        adv_b = batch.advantages_b.double()
        n_train = self.train_steps(len(sigmas) - 1)
        dev = batch.trajectory_btchw.device
        total = torch.zeros((), dtype=torch.float64, device=dev)
        clip_frac = kl_mean = ratio_dev = 0.0
        for j in range(n_train):
            s, s_next = float(sigmas[j]), float(sigmas[j + 1])
            x_j = batch.trajectory_btchw[:, j].float()
            x_next = batch.trajectory_btchw[:, j + 1].float()
            sigma_b = torch.full((len(batch),), s, device=dev)
            v = policy.velocity(x_j, sigma_b, batch.cond, "current")
            _, logp_b, mu, _ = sde_step_with_logprob(
                x_j, v, s, s_next, sigma_1, cfg.noise_level, prev_sample=x_next
            )
            ratio_b = torch.exp(logp_b.double() - batch.logp_old_bt[:, j].double())
            unclipped = -adv_b * ratio_b
            clipped = -adv_b * ratio_b.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)
            step_loss = torch.maximum(unclipped, clipped).mean()
            if cfg.kl_beta > 0:
                with torch.no_grad():
                    v_ref = policy.velocity(x_j, sigma_b, batch.cond, "ref")
                    _, _, mu_ref, _ = sde_step_with_logprob(
                        x_j, v_ref, s, s_next, sigma_1, cfg.noise_level, prev_sample=x_next
                    )
                s_j = sde_std(s, sigma_1, cfg.noise_level)
                kl = (mean_d((mu.double() - mu_ref.double()) ** 2) / (2 * s_j**2)).mean()
                step_loss = step_loss + cfg.kl_beta * kl
                kl_mean += kl.item() / n_train
            total = total + step_loss / n_train
            with torch.no_grad():
                clip_frac += float(((ratio_b - 1).abs() > cfg.clip_range).double().mean()) / n_train
                ratio_dev = max(ratio_dev, float((ratio_b - 1).abs().max()))
        return total.float(), {"clip_frac": clip_frac, "kl": kl_mean, "ratio_max_dev": ratio_dev}
