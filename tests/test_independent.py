"""Independent re-implementations of the objectives and samplers (docs/algorithms.md §2–§6), off-policy.

Each objective test drives the library's loss with a fake :class:`FlowPolicy` whose velocities come from
small affine torch modules (one per ``which``: current, old, ref) and which records every call's inputs.
A second, plain implementation written from the equations then recomputes the loss from the recorded
(x_t, t) alone — e.g. eps = (x_t − (1 − t)·x0)/t — so the comparison does not depend on the order of the
library's random draws. Value (rtol 1e-6, of the size of the loss's terms: see :func:`assert_matches`)
and the gradient w.r.t. the current module's parameters (rtol 1e-5) must agree. None of the library's helpers (adaptive_x0_loss, mean_d, group_advantages,
sde_step_with_logprob, ...) is used by the references. The samplers are compared with diffusers'
schedulers on the same sigma grids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from vgrpo.core.flow import ode_sample, sd3_sigmas, sde_step_with_logprob, shift_sigma
from vgrpo.learner.objectives import TrainBatch
from vgrpo.learner.objectives.dgpo import DGPO
from vgrpo.learner.objectives.flow_grpo import FlowGRPO
from vgrpo.learner.objectives.nft import DiffusionNFT
from vgrpo.learner.objectives.vgrpo import VGRPO
from vgrpo.proto.config import DGPOConfig, FlowGRPOConfig, NFTConfig, VGRPOConfig

C, H, W = 3, 4, 4  # latent shape of the fake samples
DIMS = (1, 2, 3)


# --------------------------------------------------------------------------------------------- fake policy


class AffineVelocity(nn.Module):
    """v(x, sigma, prompt) = W x + sigma U x + b + e[prompt] (a 1x1 "conv" over channels), float64."""

    def __init__(self, num_prompts: int, seed: int, scale: float = 0.5):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def param(*shape: int, std: float) -> nn.Parameter:
            return nn.Parameter(std * torch.randn(*shape, generator=g, dtype=torch.float64))

        self.w = param(C, C, std=scale / math.sqrt(C))
        self.u = param(C, C, std=scale / math.sqrt(C))
        self.b = param(C, std=0.2)
        self.e = param(num_prompts, C, std=0.3)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        x = x.double()
        s = sigma.double().view(-1, 1, 1, 1)
        lin = torch.einsum("oc,bchw->bohw", self.w, x) + s * torch.einsum("oc,bchw->bohw", self.u, x)
        return lin + (self.b + self.e[prompt]).view(-1, C, 1, 1)

    def perturbed(self, seed: int, delta: float) -> AffineVelocity:
        """A frozen copy with every parameter moved by delta * N(0, 1)."""
        other = AffineVelocity(self.e.shape[0], seed=0)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p_new, p in zip(other.parameters(), self.parameters(), strict=True):
                p_new.copy_(p + delta * torch.randn(p.shape, generator=g, dtype=torch.float64))
        return other.requires_grad_(False)


@dataclass
class Call:
    which: str
    sample_b: torch.Tensor  # which batch rows (sample ids, from the conditioning) the call saw
    x_bchw: torch.Tensor
    sigma_b: torch.Tensor


class RecordingPolicy:
    """A FlowPolicy over three AffineVelocity modules that records every velocity call. The conditioning
    is a dict {"sample": sample id, "prompt": prompt id}, so each recorded row names its sample whatever
    the library's batching."""

    def __init__(self, nets: dict[str, AffineVelocity], old_is_current: bool = False):
        self.nets = nets
        self.calls: list[Call] = []
        self._old_is_current = old_is_current

    def velocity(self, x_bchw, sigma_b, cond, which="current"):
        self.calls.append(
            Call(which, cond["sample"].clone(), x_bchw.detach().clone(), sigma_b.detach().clone())
        )
        return self.nets[which](x_bchw, sigma_b, cond["prompt"])

    def old_is_current(self) -> bool:
        return self._old_is_current

    def rows(self, which: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x (n, K, C, H, W) float64, t (n, K) float64): the K inputs each sample was evaluated on by
        ``which``, in call order."""
        xs: list[list[torch.Tensor]] = [[] for _ in range(n)]
        ts: list[list[torch.Tensor]] = [[] for _ in range(n)]
        for c in self.calls:
            if c.which != which:
                continue
            for r, i in enumerate(c.sample_b.tolist()):
                xs[i].append(c.x_bchw[r].double())
                ts[i].append(c.sigma_b[r].double())
        assert len({len(x) for x in xs}) == 1, f"samples saw different numbers of {which} forwards"
        return torch.stack([torch.stack(x) for x in xs]), torch.stack([torch.stack(t) for t in ts])


def make_policy(num_prompts: int, old_delta: float, ref_delta: float, seed: int) -> RecordingPolicy:
    """Current and old: independent perturbations of size ``old_delta`` of one base module (so that the
    ratio falls on both sides of 1), reference: one of size ``ref_delta``. Only the current one trains."""
    base = AffineVelocity(num_prompts, seed=seed)
    return RecordingPolicy(
        {
            "current": base.perturbed(seed + 101, old_delta).requires_grad_(True),
            "old": base.perturbed(seed + 202, old_delta),
            "ref": base.perturbed(seed + 303, ref_delta),
        }
    )


def cond_of(prompt_b: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"sample": torch.arange(len(prompt_b)), "prompt": prompt_b}


def library_loss(objective, policy: RecordingPolicy, batch: TrainBatch, seed: int = 0):
    """What the learner does with one (micro)batch: train_subset, loss, backward. Returns (loss, grads)."""
    net = policy.nets["current"]
    net.zero_grad()
    sub, _ = objective.train_subset(batch)
    loss, _ = objective.loss(policy, sub, torch.Generator().manual_seed(seed))
    loss.backward()
    return loss.detach().double(), flat_grad(net)


def flat_grad(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten().clone() for p in net.parameters()])


def reference_grad(net: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    net.zero_grad()
    loss.backward()
    return flat_grad(net)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    """|actual − expected| <= atol + rtol·|expected| elementwise (torch.testing.assert_close's rule; that
    function imports torch.distributed on first use, seconds on this machine)."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    excess = (actual - expected).abs() - (atol + rtol * expected.abs())
    assert bool((excess <= 0).all()), (
        f"{int((excess > 0).sum())}/{excess.numel()} elements differ; worst: actual "
        f"{float(actual.flatten()[excess.argmax()]):.10g} expected {float(expected.flatten()[excess.argmax()]):.10g}"
    )


def assert_matches(loss_lib, grad_lib, loss_ref, grad_ref, scale: float = 0.0) -> None:
    """Loss to rtol 1e-6 and gradient to rtol 1e-5. The library runs the network output and the latents in
    float32 (docs/algorithms.md §9.2), so where the loss is a small difference of larger terms (advantages
    sum to zero in a group) its absolute error is 1e-6 of ``scale``, the size of those terms; a gradient
    element likewise gets 1e-6 of the largest one as absolute slack."""
    loss_ref = loss_ref.detach()
    assert_close(loss_lib, loss_ref, rtol=1e-6, atol=1e-6 * scale)
    assert_close(grad_lib, grad_ref, rtol=1e-5, atol=1e-6 * float(grad_ref.abs().max()))


def dmean(x: torch.Tensor) -> torch.Tensor:
    """Mean over each sample's latent elements (C, H, W)."""
    return x.mean(dim=DIMS)


def adaptive_loss(x0_hat: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """mean_d (x0_hat − x0)² / sg(max(mean_d |x0_hat − x0|, 1e-5)) (§4.1), float64."""
    err = x0_hat - x0
    return dmean(err**2) / dmean(err.abs()).clamp(min=1e-5).detach()


def bcast(t_b: torch.Tensor) -> torch.Tensor:
    return t_b.view(-1, 1, 1, 1)


# ------------------------------------------------------------------------------------------------ V-GRPO


def ref_group_advantages(rewards: torch.Tensor, groups: torch.Tensor, eta: float | None) -> torch.Tensor:
    """Per-group z-score (population std, eps 1e-4), then the soft clip eta·tanh(A/eta) (§3, §4.3)."""
    r = rewards.double()
    out = torch.empty_like(r)
    for g in groups.unique():
        m = groups == g
        rg = r[m]
        out[m] = (rg - rg.mean()) / (((rg - rg.mean()) ** 2).mean().sqrt() + 1e-4)
    return out if eta is None else eta * torch.tanh(out / eta)


def test_vgrpo_off_policy_with_clip_and_both_kls_matches_equations():
    """§4: rho != 1 (old != current) with the ratio clip active on both sides, KL to old and to the
    reference both on, advantages from rewards through the soft clip eta = 3 (tanh(A) would fail)."""
    n_groups, group_size, n_mc, shift = 3, 4, 3, 3.0
    n = n_groups * group_size
    cfg = VGRPOConfig(n_mc=n_mc, clip_range=0.01, kl_beta=0.3, ref_kl_beta=0.2)
    assert cfg.advantage.soft_clip == 3.0 and cfg.advantage.norm == "group"
    obj = VGRPO(cfg)
    groups = torch.arange(n_groups).repeat_interleave(group_size)
    gen = torch.Generator().manual_seed(3)
    # a high and a low outlier per group: |A| up to 1.6, where 3 tanh(A/3) and tanh(A) differ by 0.55
    rewards = torch.rand(n, generator=gen) * 0.1
    rewards[::group_size] += 1.0
    rewards[1::group_size] -= 0.5
    adv_b, _ = obj.advantages(rewards, groups)
    adv_ref = ref_group_advantages(rewards, groups, eta=3.0)
    assert_close(adv_b.double(), adv_ref, rtol=1e-6, atol=1e-7)
    assert float((adv_ref - torch.tanh(ref_group_advantages(rewards, groups, None))).abs().max()) > 0.3

    x0 = torch.randn(n, C, H, W, generator=gen)
    policy = make_policy(n_groups, old_delta=0.03, ref_delta=0.1, seed=3)
    batch = TrainBatch(x0, cond_of(groups), groups, adv_b, sd3_sigmas(10, shift), shift)
    loss_lib, grad_lib = library_loss(obj, policy, batch)

    # the recorded inputs: N_MC pairs per image, shared by its group; old and ref forwards on the same z
    z, t = policy.rows("current", n)
    assert z.shape[1] == n_mc
    for which in ("old", "ref"):
        z_w, t_w = policy.rows(which, n)
        assert torch.equal(z_w, z) and torch.equal(t_w, t)
    o = x0.double()[:, None]
    eps = (z - (1 - t[..., None, None, None]) * o) / t[..., None, None, None]
    for g in range(n_groups):
        m = groups == g
        assert torch.equal(t[m], t[m][:1].expand_as(t[m]))  # group-shared times
        assert_close(eps[m], eps[m][:1].expand_as(eps[m]), rtol=0, atol=2e-5)  # shared eps
    # stratified: t_k = shift(u_k) with u_k in [k/N_MC, (k+1)/N_MC), clamped to [t_min, t_max]
    u = t / (shift - (shift - 1) * t)
    inside = (t > cfg.t_min) & (t < cfg.t_max)
    k = torch.arange(n_mc).expand_as(u)
    assert torch.all(~inside | ((u * n_mc).floor() == k))

    # reference (§4.1, §4.3)
    prompt = groups
    cur, old, ref = (policy.nets[w] for w in ("current", "old", "ref"))
    score = torch.zeros(n, dtype=torch.float64)
    score_old = torch.zeros(n, dtype=torch.float64)
    kl = torch.zeros(n, dtype=torch.float64)
    kl_ref = torch.zeros(n, dtype=torch.float64)
    for kk in range(n_mc):
        z_k, t_k = z[:, kk], t[:, kk]
        x0_cur = z_k - bcast(t_k) * cur(z_k, t_k, prompt)
        with torch.no_grad():
            x0_old = z_k - bcast(t_k) * old(z_k, t_k, prompt)
            x0_ref = z_k - bcast(t_k) * ref(z_k, t_k, prompt)
        score = score - adaptive_loss(x0_cur, x0.double()) / n_mc
        score_old = score_old - adaptive_loss(x0_old, x0.double()) / n_mc
        kl = kl + dmean((x0_cur - x0_old) ** 2) / n_mc
        kl_ref = kl_ref + dmean((x0_cur - x0_ref) ** 2) / n_mc
    rho = torch.exp(score - score_old)
    a = adv_ref
    j = torch.minimum(rho * a, rho.clamp(1 - cfg.clip_range, 1 + cfg.clip_range) * a)
    loss_ref = -j.mean() + cfg.kl_beta * kl.mean() + cfg.ref_kl_beta * kl_ref.mean()
    scale = float((j.abs().mean() + cfg.kl_beta * kl.mean() + cfg.ref_kl_beta * kl_ref.mean()).detach())

    # the test exercises both branches of the clip and a ratio far from 1
    clipped = ((a > 0) & (rho > 1 + cfg.clip_range)) | ((a < 0) & (rho < 1 - cfg.clip_range))
    assert 0 < int(clipped.sum()) < n, rho
    assert bool(((a > 0) & (rho > 1 + cfg.clip_range)).any()) and bool(
        ((a < 0) & (rho < 1 - cfg.clip_range)).any()
    )
    assert float((rho - 1).abs().max().detach()) > 2 * cfg.clip_range
    assert (
        float(cfg.kl_beta * kl.mean().detach()) > 1e-4
        and float(cfg.ref_kl_beta * kl_ref.mean().detach()) > 1e-3
    )
    assert_matches(loss_lib, grad_lib, loss_ref, reference_grad(cur, loss_ref), scale)


# -------------------------------------------------------------------------------------------------- DGPO


def test_dgpo_off_policy_with_drops_and_group_weights_matches_equations():
    """§5.3: theta != ref, old != current with samples dropped on both sides of the PPO-style rule, group
    weights sigmoid(beta_dpo/G sum A sg(l - l_ref)) well away from 1/2: a flipped sign of (l - l_ref)
    changes the value, swapped drop conditions the gradient."""
    n_groups, group_size, n_steps = 3, 4, 10
    n = n_groups * group_size
    cfg = DGPOConfig(beta_dpo=100.0, kl_beta=0.05, clip_range=0.01, num_timesteps=3, trunc_steps=4)
    obj = DGPO(cfg)
    groups = torch.arange(n_groups).repeat_interleave(group_size)
    gen = torch.Generator().manual_seed(5)
    rewards = torch.rand(n, generator=gen)
    adv_b, _ = obj.advantages(rewards, groups)
    x0 = torch.randn(n, C, H, W, generator=gen)
    sigmas = sd3_sigmas(n_steps, 3.0)
    policy = make_policy(n_groups, old_delta=0.02, ref_delta=0.05, seed=3)
    batch = TrainBatch(x0, cond_of(groups), groups, adv_b, sigmas, 3.0)
    loss_lib, grad_lib = library_loss(obj, policy, batch)

    x_t, t = policy.rows("current", n)
    m_times = x_t.shape[1]
    assert m_times == cfg.num_timesteps
    for which in ("old", "ref"):
        x_w, t_w = policy.rows(which, n)
        assert torch.equal(x_w, x_t) and torch.equal(t_w, t)
    # M distinct high-noise grid times, shared by the whole batch
    assert torch.equal(t, t[:1].expand_as(t))
    grid = sigmas[: cfg.trunc_steps + 1].float().double()
    assert all(bool(torch.isclose(grid, tk).any()) for tk in t[0]) and len(set(t[0].tolist())) == m_times

    cur, old, ref = (policy.nets[w] for w in ("current", "old", "ref"))
    a = adv_b.double()
    o = x0.double()
    total = torch.zeros((), dtype=torch.float64)
    scale = 0.0
    dropped_pos = dropped_neg = 0
    weights = []
    for k in range(m_times):
        xk, tk = x_t[:, k], t[:, k]
        eps = (xk - (1 - bcast(tk)) * o) / bcast(tk)
        for g in range(n_groups):  # one eps per prompt group
            m = groups == g
            assert_close(eps[m], eps[m][:1].expand_as(eps[m]), rtol=0, atol=2e-5)
        target = eps - o
        v = cur(xk, tk, groups)
        ell = dmean((target - v) ** 2)
        with torch.no_grad():
            v_ref = ref(xk, tk, groups)
            ell_ref = dmean((target - v_ref) ** 2)
            ell_old = dmean((target - old(xk, tk, groups)) ** 2)
        rho = torch.exp(ell_old - ell.detach())
        drop_pos = (a > 0) & (rho > 1 + cfg.clip_range)
        drop_neg = (a <= 0) & (rho < 1 - cfg.clip_range)
        dropped_pos += int(drop_pos.sum())
        dropped_neg += int(drop_neg.sum())
        ell_used = torch.where(drop_pos | drop_neg, ell.detach(), ell)
        w_b = torch.empty(n, dtype=torch.float64)
        for g in range(n_groups):
            m = groups == g
            s_g = cfg.beta_dpo / int(m.sum()) * (a[m] * (ell[m].detach() - ell_ref[m])).sum()
            w_b[m] = torch.sigmoid(s_g)
            weights.append(float(s_g))
        kl = dmean((v - v_ref) ** 2).mean()
        total = total + (w_b * a * ell_used).mean() + cfg.kl_beta * kl
        scale += float(((w_b * a * ell).abs().mean() + cfg.kl_beta * kl).detach()) / m_times
    loss_ref = total / m_times

    # drops on both sides, some samples kept, group weights away from 1/2 (s_g well off 0) and unsaturated
    assert dropped_pos > 0 and dropped_neg > 0 and dropped_pos + dropped_neg < n * m_times
    assert min(abs(s) for s in weights) > 0.05 and max(abs(s) for s in weights) < 8, weights
    assert_matches(loss_lib, grad_lib, loss_ref, reference_grad(cur, loss_ref), scale)


# ------------------------------------------------------------------------------------------ DiffusionNFT


def test_nft_off_policy_beta_not_one_matches_equations():
    """§5.2 with beta = 0.3, old != current, the reference KL on, advantages beyond the +-5 clip."""
    n_groups, group_size, n_steps = 2, 4, 6
    n = n_groups * group_size
    cfg = NFTConfig(beta=0.3, kl_beta=0.05, adv_clip_max=5.0, timestep_fraction=0.99)
    obj = DiffusionNFT(cfg)
    groups = torch.arange(n_groups).repeat_interleave(group_size)
    gen = torch.Generator().manual_seed(7)
    # advantages given directly, beyond +-5 on both sides too: r = clamp(clamp(A, -5, 5)/10 + 1/2, 0, 1)
    adv_b = torch.tensor([6.5, 1.2, -0.4, -2.0, 0.3, -7.0, 4.0, -1.1])
    x0 = torch.randn(n, C, H, W, generator=gen)
    sigmas = sd3_sigmas(n_steps, 3.0)
    policy = make_policy(n_groups, old_delta=0.05, ref_delta=0.1, seed=2)
    batch = TrainBatch(x0, cond_of(groups), groups, adv_b, sigmas, 3.0)
    loss_lib, grad_lib = library_loss(obj, policy, batch)

    x_t, t = policy.rows("current", n)
    n_train = int(n_steps * 0.99)
    assert x_t.shape[1] == n_train
    for which in ("old", "ref"):
        x_w, t_w = policy.rows(which, n)
        assert torch.equal(x_w, x_t) and torch.equal(t_w, t)
    grid = sigmas[:-1].float().double()
    for i in range(n):  # each image: distinct grid times (its own permutation)
        assert len(set(t[i].tolist())) == n_train
        assert all(bool(torch.isclose(grid, ti).any()) for ti in t[i])

    cur, old, ref = (policy.nets[w] for w in ("current", "old", "ref"))
    o = x0.double()
    a = adv_b.double()
    r = (a.clamp(-5, 5) / 10 + 0.5).clamp(0, 1)
    beta = cfg.beta
    per_term = []
    kls = []
    for k in range(n_train):
        xk, tk = x_t[:, k], t[:, k]
        v = cur(xk, tk, groups)
        with torch.no_grad():
            v_old = old(xk, tk, groups)
            v_ref = ref(xk, tk, groups)
        v_pos = beta * v + (1 - beta) * v_old
        v_neg = (1 + beta) * v_old - beta * v
        l_pos = adaptive_loss(xk - bcast(tk) * v_pos, o)
        l_neg = adaptive_loss(xk - bcast(tk) * v_neg, o)
        per_term.append((5.0 / beta) * (r * l_pos + (1 - r) * l_neg))
        kls.append(dmean((v - v_ref) ** 2))
    loss_ref = torch.stack(per_term).mean() + cfg.kl_beta * torch.stack(kls).mean()
    assert float(cfg.kl_beta * torch.stack(kls).mean().detach()) > 1e-4
    assert_matches(loss_lib, grad_lib, loss_ref, reference_grad(cur, loss_ref))


# --------------------------------------------------------------------------------------------- Flow-GRPO


def ref_sde_mean_std(x, v, sigma, sigma_next, sigma_1, a):
    """§6.1: s = a sqrt(sigma / (1 − sigma')), sigma' = min(sigma, sigma_1); mu and the transition std."""
    dt = sigma_next - sigma
    s = a * math.sqrt(sigma / (1 - min(sigma, sigma_1)))
    mu = x + (v + s**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    return mu, s * math.sqrt(-dt), s


def ref_gauss_logp(x, mu, std):
    """mean_d of the log-density of N(mu, std²) at x (§6.1)."""
    return dmean(-((x - mu) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi))


def sde_rollout(net, prompt, x_init, sigmas, a, gen):
    """Independent SDE rollout with ``net`` (float64 math, float32 storage as the library keeps it):
    trajectory (B, N+1, C, H, W) and log-probs (B, N) of each stored transition."""
    sigma_1 = float(sigmas[1])
    x = x_init.float()
    traj, logps = [x], []
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            v = net(x, torch.full((len(x),), s), prompt)
            if s_next == 0:
                x_next, logp = (x.double() - s * v).float(), torch.zeros(len(x), dtype=torch.float64)
            else:
                mu, std, _ = ref_sde_mean_std(x.double(), v, s, s_next, sigma_1, a)
                x_next = (mu + std * torch.randn(x.shape, generator=gen, dtype=torch.float64)).float()
                logp = ref_gauss_logp(x_next.double(), mu, std)
            traj.append(x_next)
            logps.append(logp)
            x = x_next
    return torch.stack(traj, 1), torch.stack(logps, 1)


def flow_grpo_setup(seed: int = 4):
    n_groups, group_size, n_steps = 3, 4, 6
    n = n_groups * group_size
    cfg = FlowGRPOConfig(noise_level=0.7, clip_range=0.004, kl_beta=0.2, timestep_fraction=0.9)
    groups = torch.arange(n_groups).repeat_interleave(group_size)
    gen = torch.Generator().manual_seed(seed)
    sigmas = sd3_sigmas(n_steps, 3.0)
    policy = make_policy(n_groups, old_delta=0.01, ref_delta=0.05, seed=seed)
    # rollouts by the old (behaviour) policy; the current one differs: rho != 1
    traj, logp = sde_rollout(
        policy.nets["old"], groups, torch.randn(n, C, H, W, generator=gen), sigmas, cfg.noise_level, gen
    )
    rewards = torch.rand(n, generator=gen)
    return cfg, groups, sigmas, policy, traj, logp, rewards


def test_flow_grpo_off_policy_clip_and_kl_match_equations():
    """§6.1: rollouts (trajectory, log-probs) from the old policy by an independent SDE, rho != 1 with
    both clip branches taken, the KL to the reference with s_j² (not s_j²·|dt|), advantages all non-zero."""
    cfg, groups, sigmas, policy, traj, logp_old, rewards = flow_grpo_setup()
    n = len(groups)
    obj = FlowGRPO(cfg)
    adv_b, _ = obj.advantages(rewards, groups)
    # group mean, global std, clip +-5 (§3)
    r = rewards.double()
    means = torch.stack([r[groups == g].mean() for g in groups.tolist()])
    adv_ref = ((r - means) / (r.std(unbiased=False) + 1e-4)).clamp(-5, 5)
    assert_close(adv_b.double(), adv_ref, rtol=1e-6, atol=1e-7)
    assert bool((adv_ref != 0).all())  # no sample is dropped: the mean is over the whole batch
    batch = TrainBatch(
        traj[:, -1], cond_of(groups), groups, adv_b, sigmas, 3.0, trajectory_btchw=traj, logp_old_bt=logp_old
    )
    loss_lib, grad_lib = library_loss(obj, policy, batch)

    n_train = int((len(sigmas) - 1) * 0.9)
    x_rec, t_rec = policy.rows("current", n)
    assert x_rec.shape[1] == n_train
    cur, ref = policy.nets["current"], policy.nets["ref"]
    a = adv_b.double()
    sigma_1 = float(sigmas[1])
    total = torch.zeros((), dtype=torch.float64)
    scale = 0.0
    n_clipped = 0
    for j in range(n_train):
        s, s_next = float(sigmas[j]), float(sigmas[j + 1])
        x_j, x_next = traj[:, j].double(), traj[:, j + 1].double()
        assert torch.equal(x_rec[:, j], x_j) and torch.allclose(t_rec[:, j], torch.full((n,), s).double())
        sig_b = torch.full((n,), s, dtype=torch.float64)
        mu, std, s_j = ref_sde_mean_std(x_j, cur(x_j, sig_b, groups), s, s_next, sigma_1, cfg.noise_level)
        with torch.no_grad():
            mu_ref, _, _ = ref_sde_mean_std(x_j, ref(x_j, sig_b, groups), s, s_next, sigma_1, cfg.noise_level)
        rho = torch.exp(ref_gauss_logp(x_next, mu, std) - logp_old[:, j])
        eps = cfg.clip_range
        l_pg = torch.maximum(-a * rho, -a * rho.clamp(1 - eps, 1 + eps)).mean()
        kl = (dmean((mu - mu_ref) ** 2) / (2 * s_j**2)).mean()  # s_j², not s_j²·|dt| (§9.4)
        total = total + (l_pg + cfg.kl_beta * kl) / n_train
        scale += float(((a * rho).abs().mean() + cfg.kl_beta * kl).detach()) / n_train
        n_clipped += int((((a > 0) & (rho > 1 + eps)) | ((a < 0) & (rho < 1 - eps))).sum())
    loss_ref = total
    assert 0 < n_clipped < n * n_train  # both branches of the clip are taken
    assert_matches(loss_lib, grad_lib, loss_ref, reference_grad(cur, loss_ref), scale)


def test_flow_grpo_zero_advantage_group_is_the_same_as_no_group():
    """Zero-advantage samples are dropped (the mean, and the KL, run over the samples with A != 0): a
    group whose advantages are all zero changes neither the loss nor the gradient."""
    cfg, groups, sigmas, policy, traj, logp_old, _ = flow_grpo_setup(seed=6)
    obj = FlowGRPO(cfg)
    gen = torch.Generator().manual_seed(0)
    adv_b = torch.randn(len(groups), generator=gen)
    adv_b[groups == 1] = 0.0  # a group whose rewards were all equal
    full = TrainBatch(
        traj[:, -1], cond_of(groups), groups, adv_b, sigmas, 3.0, trajectory_btchw=traj, logp_old_bt=logp_old
    )
    loss_full, grad_full = library_loss(obj, policy, full)
    keep = (groups != 1).nonzero().squeeze(1)
    sub = full.select(keep)
    loss_sub, grad_sub = library_loss(obj, policy, sub)
    assert_close(loss_full, loss_sub, rtol=1e-6, atol=0)
    assert_close(grad_full, grad_sub, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------------------------------------- samplers


def linear_velocity(seed: int):
    """A fixed random affine velocity v(x, sigma) = W x + sigma U x + b (computed in float64)."""
    g = torch.Generator().manual_seed(seed)
    w = 0.6 * torch.randn(C, C, generator=g, dtype=torch.float64) / math.sqrt(C)
    u = 0.6 * torch.randn(C, C, generator=g, dtype=torch.float64) / math.sqrt(C)
    b = 0.3 * torch.randn(C, generator=g, dtype=torch.float64)

    def velocity(x: torch.Tensor, sigma_b: torch.Tensor) -> torch.Tensor:
        x64 = x.double()
        s = sigma_b.double().view(-1, 1, 1, 1)
        out = torch.einsum("oc,bchw->bohw", w, x64) + s * torch.einsum("oc,bchw->bohw", u, x64)
        return (out + b.view(1, C, 1, 1)).to(x.dtype)

    return velocity


def sigma_grid(kind: str, n: int) -> torch.Tensor:
    if kind in ("uniform", "diffusers"):
        return sd3_sigmas(n, 3.0, kind)  # type: ignore[arg-type]
    # a grid whose first sigma is below 1 (second-order steps from i = 1 on)
    u = torch.linspace(0.995, 1.0 / n, n, dtype=torch.float64)
    return torch.cat([shift_sigma(u, 3.0), torch.zeros(1, dtype=torch.float64)])


@pytest.mark.parametrize("n", [10, 40])
@pytest.mark.parametrize("kind", ["uniform", "diffusers", "below_one"])
def test_euler_ode_matches_diffusers_flow_match_euler(n, kind):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sigmas = sigma_grid(kind, n)
    velocity = linear_velocity(seed=n)
    x_init = torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(1))
    ours = ode_sample(velocity, x_init, sigmas, solver="euler")

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(sigmas=sigmas[:-1].tolist())
    assert_close(sched.sigmas.double(), sigmas, rtol=0, atol=1e-7)
    sched.set_begin_index(0)
    x = x_init.clone()
    for i, ts in enumerate(sched.timesteps):
        x = sched.step(velocity(x, torch.full((2,), float(sched.sigmas[i]))), ts, x).prev_sample
    assert float((ours - x).abs().max()) <= 1e-5


@pytest.mark.parametrize("n", [10, 40])
@pytest.mark.parametrize("kind", ["uniform", "diffusers", "below_one"])
def test_dpm2_ode_matches_diffusers_dpm_solver_multistep(n, kind):
    from diffusers import DPMSolverMultistepScheduler

    sigmas = sigma_grid(kind, n)
    velocity = linear_velocity(seed=100 + n)
    x_init = torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(2))
    ours = ode_sample(velocity, x_init, sigmas, solver="dpm2")

    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        solver_order=2,
        algorithm_type="dpmsolver++",
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=1.0,
        final_sigmas_type="zero",
    )
    sched.set_timesteps(n)
    sched.sigmas = sigmas.clone()  # the same grid, given explicitly (its own flow grid starts below 1)
    sched.timesteps = (sigmas[:-1] * 1000).round().long()
    sched.set_begin_index(0)
    x = x_init.clone()
    for i in range(n):
        v = velocity(x, torch.full((2,), float(sigmas[i]), dtype=torch.float32))
        x = sched.step(v, sched.timesteps[i], x).prev_sample
    assert torch.isfinite(x).all()
    assert float((ours - x).abs().max()) <= 1e-5


def test_sde_step_logprob_matches_torch_normal_in_float64():
    """§6.1: mu, std and log p of one SDE step (a fresh draw and a replay) against torch's Normal."""
    sigmas = sd3_sigmas(10, 3.0)
    sigma_1 = float(sigmas[1])
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, C, H, W, generator=g)
    v = torch.randn(4, C, H, W, generator=g)
    for i in (0, 1, 5, 8):  # i = 0: sigma = 1, the clamped std
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        dt = s_next - s
        s_i = 0.7 * math.sqrt(s / (1 - min(s, sigma_1)))
        std_ref = s_i * math.sqrt(-dt)
        x64, v64 = x.double(), v.double()
        mu_ref = x64 + (v64 + s_i**2 / (2 * s) * (x64 + (1 - s) * v64)) * dt
        noise = torch.randn(4, C, H, W, generator=g)
        # a fresh draw with given noise, and the replay of a given sample
        x_next, logp, mu, std = sde_step_with_logprob(x, v, s, s_next, sigma_1, 0.7, noise=noise)
        assert std == pytest.approx(std_ref, rel=1e-12)
        assert_close(mu.double(), mu_ref, rtol=1e-6, atol=1e-6)
        assert_close(x_next.double(), mu_ref + std_ref * noise.double(), rtol=1e-6, atol=1e-6)
        expected = torch.distributions.Normal(mu_ref, std_ref).log_prob(x_next.double()).mean(dim=DIMS)
        assert_close(logp.double(), expected, rtol=1e-5, atol=1e-5)
        other = x_next + 0.3 * torch.randn(4, C, H, W, generator=g)
        _, logp_replay, _, _ = sde_step_with_logprob(x, v, s, s_next, sigma_1, 0.7, prev_sample=other)
        expected = torch.distributions.Normal(mu_ref, std_ref).log_prob(other.double()).mean(dim=DIMS)
        assert_close(logp_replay.double(), expected, rtol=1e-5, atol=1e-5)
