"""DiffusionNFT (Zheng et al. 2025), docs/algorithms.md §5.2: negative-aware fine-tuning on the forward process.

Rollouts are sampled with the old policy (the EMA of the trained weights), as upstream does; evaluation
and export use the trained weights.

Per image, grid time t (each image its own permutation of the grid), fresh eps:

    v_old = v_old(x_t) (no grad),  v = v_theta(x_t)
    v+ = beta v + (1 - beta) v_old,   v- = (1 + beta) v_old - beta v
    x+ = x_t - t v+,  x- = x_t - t v-,   w+- = sg(max(mean_d |x+- - x0|, 1e-5))
    L+- = mean_d (x+- - x0)^2 / w+-,   r = clamp(clamp(A, -5, 5) / 10 + 1/2, 0, 1)
    loss = mean_i (5 / beta) (r L+ + (1 - r) L-) + lambda_KL mean_i mean_d (v - v_ref)^2
"""

from __future__ import annotations

from typing import Literal

import torch

from vgrpo.core.flow import interpolate, x0_from_velocity
from vgrpo.learner.objectives.base import FlowPolicy, Objective, TrainBatch, mean_d
from vgrpo.learner.objectives.vgrpo import adaptive_x0_loss
from vgrpo.proto.config import NFTConfig


class DiffusionNFT(Objective):
    name = "nft"
    sampler = "dpm2"
    needs_ref = True
    old_policy = "ema"

    cfg: NFTConfig

    def old_decay(self, step: int) -> float:
        return min(self.cfg.old_decay_rate * step, self.cfg.old_decay_max)

    def rollout_policy(self, version: int) -> Literal["current", "old"]:
        # upstream train_nft_sd3.py samples every batch with the "old" adapter and evaluates "default"
        return "old" if self.cfg.sample_with_old else "current"

    def loss(
        self, policy: FlowPolicy, batch: TrainBatch, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        x0_bchw = batch.latents_bchw.float()
        n = len(batch)
        dev = x0_bchw.device  # draws come from the CPU generator (reproducible), then move to the batch
        grid = batch.sigmas[:-1].float().to(dev)  # sigma_0..sigma_{N-1}
        n_train = max(1, int(len(grid) * cfg.timestep_fraction))
        perm_bn = torch.argsort(torch.rand(n, len(grid), generator=generator), dim=1)[:, :n_train].to(dev)
        adv_b = batch.advantages_b.double().clamp(-cfg.adv_clip_max, cfg.adv_clip_max)
        r_b = (adv_b / (2 * cfg.adv_clip_max) + 0.5).clamp(0, 1)  # clamp(A,-5,5)/10 + 1/2 for adv_clip_max 5
        total = torch.zeros((), dtype=torch.float64, device=dev)
        kl_mean = 0.0
        for j in range(n_train):
            t_b = grid[perm_bn[:, j]]
            t_bchw = t_b.view(-1, *([1] * (x0_bchw.ndim - 1)))
            eps = torch.randn(x0_bchw.shape, generator=generator).to(dev)
            x_t = interpolate(x0_bchw, eps, t_bchw)
            v = policy.velocity(x_t, t_b, batch.cond, "current").float()
            with torch.no_grad():
                v_old = (
                    v.detach()
                    if policy.old_is_current()
                    else policy.velocity(x_t, t_b, batch.cond, "old").float()
                )
            v_pos = cfg.beta * v + (1 - cfg.beta) * v_old
            v_neg = (1 + cfg.beta) * v_old - cfg.beta * v
            loss_pos_b = adaptive_x0_loss(x0_from_velocity(x_t, v_pos, t_bchw), x0_bchw)
            loss_neg_b = adaptive_x0_loss(x0_from_velocity(x_t, v_neg, t_bchw), x0_bchw)
            step = (cfg.adv_clip_max / cfg.beta) * (r_b * loss_pos_b + (1 - r_b) * loss_neg_b)
            total = total + step.mean() / n_train
            if cfg.kl_beta > 0:
                with torch.no_grad():
                    v_ref = policy.velocity(x_t, t_b, batch.cond, "ref").float()
                kl = mean_d((v.double() - v_ref.double()) ** 2).mean()
                total = total + cfg.kl_beta * kl / n_train
                kl_mean += kl.item() / n_train
        return total.float(), {"kl": kl_mean, "r_mean": float(r_b.mean())}
