"""DGPO (Luo, Hu, Tang 2025), docs/algorithms.md §5.3: DPO from pairs to advantage-weighted groups.

For each of M high-noise grid times (shared by the batch) with one eps per prompt group:

    l_i   = mean_d (eps - x0 - v_theta(x_t))^2,   l_ref = the same for the frozen reference (no grad)
    s_g   = (beta_dpo / G) sum_{i in g} A_i sg(l_i - l_ref_i),   w_g = sigmoid(s_g)      (detached)
    L     = mean_i w_g(i) A_i l_i + beta_KL mean_i mean_d (v_theta - v_ref)^2

The M times are drawn once per update, shared by all ranks; after ``switch_ema_ref`` updates the rollouts
are sampled with the EMA copy. PPO-style drop: with rho_i = exp(l_old_i - l_i) against the EMA "old" copy, a sample with A > 0 and
rho > 1 + c, or A <= 0 and rho < 1 - c, has its l_i detached (it contributes no gradient).
"""

from __future__ import annotations

from typing import Literal

import torch

from vgrpo.core.flow import interpolate
from vgrpo.learner.objectives.base import FlowPolicy, Objective, TrainBatch, mean_d
from vgrpo.proto.config import DGPOConfig


class DGPO(Objective):
    name = "dgpo"
    sampler = "dpm2"
    needs_ref = True
    old_policy = "ema"

    cfg: DGPOConfig

    def uses_ref(self) -> bool:
        return True  # the DPO term needs l_ref whatever kl_beta is

    def old_decay(self, step: int) -> float:
        return min(self.cfg.ema_decay_max, 0.001 * step)

    def rollout_policy(self, version: int) -> Literal["current", "old"]:
        # upstream samples with the EMA copy once global_step > switch_ema_ref (200; 500 in its GenEval config)
        switch = self.cfg.switch_ema_ref
        return "old" if switch is not None and version > switch else "current"

    def loss(
        self, policy: FlowPolicy, batch: TrainBatch, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        x0_bchw = batch.latents_bchw.float()
        n_grid = len(batch.sigmas) - 1
        candidates = torch.arange(min(cfg.trunc_steps + 1, n_grid))
        # the M times are drawn once per update and shared by every micro-batch and rank (upstream draws
        # them on rank 0 and broadcasts): a generator of (seed, step) alone, not the rank's own stream
        step_gen = torch.Generator().manual_seed(int(batch.extras.get("step_seed", 0)))
        pick = candidates[torch.randperm(len(candidates), generator=step_gen)[: cfg.num_timesteps]]
        groups, group_b = torch.unique(batch.group_ids_b, return_inverse=True)
        count_g = torch.bincount(group_b, minlength=len(groups)).double()
        adv_b = batch.advantages_b.double()

        dev = x0_bchw.device  # draws come from the CPU generator (reproducible), then move to the batch
        total = torch.zeros((), dtype=torch.float64, device=dev)
        drop_frac = weight_mean = 0.0
        for idx in pick.tolist():
            t = float(batch.sigmas[idx])
            eps_gchw = torch.randn((len(groups), *x0_bchw.shape[1:]), generator=generator).to(dev)
            eps_bchw = eps_gchw[group_b]
            x_t = interpolate(x0_bchw, eps_bchw, t)
            t_b = torch.full((len(batch),), t, device=dev)
            target = eps_bchw - x0_bchw
            v = policy.velocity(x_t, t_b, batch.cond, "current").float()
            loss_b = mean_d((target - v).double() ** 2)
            with torch.no_grad():
                v_ref = policy.velocity(x_t, t_b, batch.cond, "ref").float()
                loss_ref_b = mean_d((target - v_ref).double() ** 2)
                if policy.old_is_current():
                    loss_old_b = loss_b.detach()
                else:
                    loss_old_b = mean_d(
                        (target - policy.velocity(x_t, t_b, batch.cond, "old").float()).double() ** 2
                    )
                ratio_b = torch.exp(loss_old_b - loss_b.detach())
                drop_b = ((adv_b > 0) & (ratio_b > 1 + cfg.clip_range)) | (
                    (adv_b <= 0) & (ratio_b < 1 - cfg.clip_range)
                )
                s_g = torch.zeros(len(groups), dtype=torch.float64, device=dev).index_add_(
                    0, group_b, adv_b * (loss_b.detach() - loss_ref_b)
                )
                w_g = torch.sigmoid(cfg.beta_dpo * s_g / count_g)
            loss_b = torch.where(drop_b, loss_b.detach(), loss_b)
            kl = mean_d((v.double() - v_ref.double()) ** 2).mean()
            total = total + (w_g[group_b] * adv_b * loss_b).mean() + cfg.kl_beta * kl
            drop_frac += float(drop_b.double().mean()) / len(pick)
            weight_mean += float(w_g.mean()) / len(pick)
        loss = total / len(pick)
        return loss.float(), {"clip_frac": drop_frac, "group_weight": weight_mean}
