"""V-GRPO (Tang et al. 2026), docs/algorithms.md §4: GRPO on an ELBO surrogate of the final sample.

z_t = (1 - t) o + t eps,   x0_hat = z_t - t v(z_t, t, c)
l(o; t, eps) = mean_d (x0_hat - o)^2 / sg(max(mean_d |x0_hat - o|, 1e-5))       (adaptive weighting)
s(o) = -(1/N_MC) sum_k l(o; t_k, eps_k)                                          (§4.1)
rho = exp(s_theta(o) - s_old(o))               same (t_k, eps_k) for both, shared by the group (§4.2)
J = min(rho A, clip(rho, 1 - eps, 1 + eps) A),   A = eta tanh(A / eta)           (§4.3)
KL = (1/N_MC) sum_k mean_d (x0_hat_theta - x0_hat_old)^2
KL_ref = (1/N_MC) sum_k mean_d (x0_hat_theta - x0_hat_ref)^2      (optional: ref_kl_beta > 0)
loss = -mean J + beta KL + beta_ref KL_ref
"""

from __future__ import annotations

import torch

from vgrpo.core.flow import interpolate, shift_sigma, x0_from_velocity
from vgrpo.learner.objectives.base import FlowPolicy, Objective, TrainBatch, mean_d
from vgrpo.proto.config import VGRPOConfig


def stratified_times(
    num_groups: int, n_mc: int, shift: float, t_min: float, t_max: float, generator: torch.Generator
) -> torch.Tensor:
    """(num_groups, n_mc) training times: one shared offset U per group, u_k = (k + U) / N_MC in uniform
    time, mapped through the SD3 shift and kept inside [t_min, t_max] (§4.2.2, inferred reading)."""
    offset_g1 = torch.rand(num_groups, 1, generator=generator, dtype=torch.float64)
    u_gk = (torch.arange(n_mc, dtype=torch.float64) + offset_g1) / n_mc
    return shift_sigma(u_gk, shift).clamp(t_min, t_max).float()


def adaptive_x0_loss(x0_hat_bchw: torch.Tensor, o_bchw: torch.Tensor) -> torch.Tensor:
    """mean_d (x0_hat - o)^2 / sg(max(mean_d |x0_hat - o|, 1e-5)), in float64 (§4.1, §9.2)."""
    err = x0_hat_bchw.double() - o_bchw.double()
    weight_b = mean_d(err.abs()).clamp_min(1e-5).detach()
    return mean_d(err**2) / weight_b


class VGRPO(Objective):
    name = "vgrpo"
    sampler = "dpm2"
    old_policy = "behaviour"

    cfg: VGRPOConfig

    def uses_ref(self) -> bool:
        # the paper's KL is to the old (behaviour) policy; a reference term is opt-in (ref_kl_beta)
        return self.cfg.ref_kl_beta > 0

    def loss(
        self, policy: FlowPolicy, batch: TrainBatch, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        o_bchw = batch.latents_bchw.float()
        groups, group_b = torch.unique(batch.group_ids_b, return_inverse=True)
        dev = o_bchw.device  # draws come from the CPU generator (reproducible), then move to the batch
        t_gk = stratified_times(len(groups), cfg.n_mc, batch.shift, cfg.t_min, cfg.t_max, generator).to(dev)
        eps_gkchw = torch.randn((len(groups), cfg.n_mc, *o_bchw.shape[1:]), generator=generator).to(dev)
        old_is_current = policy.old_is_current()
        need_old = not old_is_current or cfg.kl_beta > 0

        score_b = torch.zeros(len(batch), dtype=torch.float64, device=dev)
        score_old_b = torch.zeros(len(batch), dtype=torch.float64, device=dev)
        kl_b = torch.zeros(len(batch), dtype=torch.float64, device=dev)
        kl_ref_b = torch.zeros(len(batch), dtype=torch.float64, device=dev)
        for k in range(cfg.n_mc):
            t_b = t_gk[group_b, k]
            eps_bchw = eps_gkchw[group_b, k]
            t_bchw = t_b.view(-1, *([1] * (o_bchw.ndim - 1)))
            z_bchw = interpolate(o_bchw, eps_bchw, t_bchw)
            x0_hat = x0_from_velocity(
                z_bchw, policy.velocity(z_bchw, t_b, batch.cond, "current").float(), t_bchw
            )
            score_b = score_b - adaptive_x0_loss(x0_hat, o_bchw) / cfg.n_mc
            if need_old and not old_is_current:
                with torch.no_grad():
                    x0_old = x0_from_velocity(
                        z_bchw, policy.velocity(z_bchw, t_b, batch.cond, "old").float(), t_bchw
                    )
                score_old_b = score_old_b - adaptive_x0_loss(x0_old, o_bchw) / cfg.n_mc
                kl_b = kl_b + mean_d((x0_hat.double() - x0_old.double()) ** 2) / cfg.n_mc
            if cfg.ref_kl_beta > 0:
                with torch.no_grad():
                    x0_ref = x0_from_velocity(
                        z_bchw, policy.velocity(z_bchw, t_b, batch.cond, "ref").float(), t_bchw
                    )
                kl_ref_b = kl_ref_b + mean_d((x0_hat.double() - x0_ref.double()) ** 2) / cfg.n_mc
        if old_is_current:
            score_old_b = score_b.detach()  # theta_old = theta: rho = 1 exactly, KL = 0 (§4.4 step 7)

        adv_b = batch.advantages_b.double()
        ratio_b = torch.exp(score_b - score_old_b)
        clipped_b = ratio_b.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)
        objective_b = torch.minimum(ratio_b * adv_b, clipped_b * adv_b)
        loss = -objective_b.mean() + cfg.kl_beta * kl_b.mean() + cfg.ref_kl_beta * kl_ref_b.mean()
        with torch.no_grad():
            ratio_dev_b = (ratio_b - 1).abs()
            diag = {
                "policy_loss": -objective_b.mean().item(),
                "kl": kl_b.mean().item(),
                "kl_ref": kl_ref_b.mean().item(),
                "ratio_mean": ratio_b.mean().item(),
                "ratio_max_dev": ratio_dev_b.max().item(),
                "clip_frac": (ratio_dev_b > cfg.clip_range).double().mean().item(),
                "elbo_score": score_b.mean().item(),
            }
        return loss.float(), diag
