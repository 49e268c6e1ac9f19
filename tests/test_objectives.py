"""Each objective's formula against an independent computation (docs/algorithms.md §3–§6)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from vgrpo.core.flow import sd3_sigmas
from vgrpo.learner.advantages import group_advantages
from vgrpo.learner.objectives import OBJECTIVES, TrainBatch, build_objective
from vgrpo.learner.objectives.vgrpo import VGRPO, adaptive_x0_loss, stratified_times
from vgrpo.proto.config import (
    AdvantageConfig,
    AlgorithmConfig,
    DGPOConfig,
    FlowGRPOConfig,
    NFTConfig,
    VGRPOConfig,
)
from vgrpo.toy.train import rollout
from vgrpo.toy.world import ToyPolicy, pretrained_model


def make_batch(world, policy, objective, sigmas, seed=0, groups=3, group_size=4):
    gen = torch.Generator().manual_seed(seed)
    cond_b = torch.arange(groups).repeat_interleave(group_size) % world.num_conditions
    group_b = torch.arange(groups).repeat_interleave(group_size)
    x0, traj, logp = rollout(policy, objective, cond_b, sigmas, gen)
    rewards = world.reward(x0, cond_b)
    adv, _ = objective.advantages(rewards, group_b)
    return TrainBatch(x0, cond_b, group_b, adv, sigmas, 1.0, traj, logp)


def grads(module):
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


# ---------------------------------------------------------------------------------------------- advantages


def test_advantages_zero_group_mean_and_unit_group_std():
    torch.manual_seed(0)
    rewards = torch.rand(24)
    groups = torch.arange(4).repeat_interleave(6)
    adv, stats = group_advantages(rewards, groups, AdvantageConfig(norm="group", clip=None))
    for g in range(4):
        a = adv[groups == g].double()
        assert abs(float(a.mean())) < 1e-6
        assert float(a.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    assert stats["zero_std_frac"] == 0.0


def test_advantages_global_std_and_zero_std_groups():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv, stats = group_advantages(rewards, groups, AdvantageConfig(norm="global_std", clip=None))
    assert torch.all(adv[:3] == 0)  # identical rewards: A = 0
    expected = (rewards[3:] - rewards[3:].mean()) / (rewards.std(unbiased=False) + 1e-4)
    assert torch.allclose(adv[3:], expected, atol=1e-6)
    assert stats["zero_std_frac"] == 0.5


def test_advantage_clips():
    rewards = torch.tensor([0.0] * 9 + [1.0])
    groups = torch.zeros(10, dtype=torch.long)
    hard, _ = group_advantages(rewards, groups, AdvantageConfig(norm="group", clip=2.0))
    assert float(hard.max()) == pytest.approx(2.0)
    soft, _ = group_advantages(rewards, groups, AdvantageConfig(norm="group", clip=None, soft_clip=1.0))
    raw, _ = group_advantages(rewards, groups, AdvantageConfig(norm="group", clip=None))
    assert torch.allclose(soft, torch.tanh(raw), atol=1e-6)
    assert float(soft.abs().max()) < 1.0


# ---------------------------------------------------------------------------------------------- V-GRPO


def test_vgrpo_ratio_is_one_and_gradient_is_advantage_weighted_elbo(world, policy):
    sigmas = sd3_sigmas(10, 1.0)
    obj = VGRPO(
        VGRPOConfig(
            n_mc=3, ref_kl_beta=0.0, advantage=AdvantageConfig(norm="group", clip=None, soft_clip=3.0)
        )
    )
    batch = make_batch(world, policy, obj, sigmas)
    loss, diag = obj.loss(policy, batch, torch.Generator().manual_seed(5))
    assert diag["ratio_mean"] == pytest.approx(1.0, abs=1e-12) and diag["ratio_max_dev"] == 0.0
    loss.backward()
    g_obj = grads(policy.current)

    # independent: -mean_i A_i grad s(o_i) with the same group-shared (t, eps) draws
    policy.current.zero_grad()
    gen = torch.Generator().manual_seed(5)
    groups, group_b = torch.unique(batch.group_ids_b, return_inverse=True)
    t_gk = stratified_times(len(groups), 3, 1.0, 0.02, 0.98, gen)
    eps = torch.randn((len(groups), 3, 2), generator=gen)
    score = torch.zeros(len(batch), dtype=torch.float64)
    for k in range(3):
        t = t_gk[group_b, k][:, None]
        z = (1 - t) * batch.latents_bchw + t * eps[group_b, k]
        x0_hat = z - t * policy.current(z, t[:, 0], batch.cond)
        score = score - adaptive_x0_loss(x0_hat, batch.latents_bchw) / 3
    (-(batch.advantages_b.double() * score).mean()).backward()
    g_ref = grads(policy.current)
    assert torch.allclose(g_obj, g_ref, rtol=1e-4, atol=1e-7)
    assert g_obj.norm() > 0


def test_vgrpo_loss_flips_sign_with_advantages(world, policy):
    sigmas = sd3_sigmas(10, 1.0)
    obj = VGRPO(VGRPOConfig(ref_kl_beta=0.0))
    batch = make_batch(world, policy, obj, sigmas)
    loss, _ = obj.loss(policy, batch, torch.Generator().manual_seed(1))
    batch.advantages_b = -batch.advantages_b
    loss_neg, _ = obj.loss(policy, batch, torch.Generator().manual_seed(1))
    assert loss.item() == pytest.approx(-loss_neg.item(), rel=1e-5)


def test_vgrpo_pairs_shared_within_group_and_stratified():
    gen = torch.Generator().manual_seed(0)
    t = stratified_times(200, 4, 1.0, 0.0, 1.0, gen)
    # one time per stratum [k/4, (k+1)/4)
    for k in range(4):
        assert torch.all((t[:, k] >= k / 4) & (t[:, k] < (k + 1) / 4))
    t3 = stratified_times(50, 4, 3.0, 0.02, 0.98, torch.Generator().manual_seed(0))
    assert float(t3.min()) >= 0.02 - 1e-6 and float(t3.max()) <= 0.98 + 1e-6


def test_vgrpo_clip_zeroes_gradient_outside_trust_region(world, policy):
    """min(rho A, clip(rho) A) has zero gradient exactly when the clipped term is the minimum:
    A > 0 with rho > 1 + eps, or A < 0 with rho < 1 - eps; elsewhere the gradient is non-zero."""
    sigmas = sd3_sigmas(10, 1.0)
    eps_clip = 2e-3
    obj = VGRPO(VGRPOConfig(clip_range=eps_clip, n_mc=2, ref_kl_beta=0.0))
    batch = make_batch(world, policy, obj, sigmas, groups=3, group_size=4)
    policy.sync_old()
    with torch.no_grad():
        for p in policy.current.parameters():
            p.add_(0.01 * torch.randn_like(p, generator=None))
    policy.mark_updated()
    seen = {"zero": 0, "live": 0}
    for i in range(len(batch)):
        for sign in (1.0, -1.0):
            one = batch.select(torch.tensor([i]))
            one.advantages_b = torch.tensor([sign])
            policy.current.zero_grad()
            loss, diag = obj.loss(policy, one, torch.Generator().manual_seed(i))
            loss.backward()
            g = grads(policy.current).norm().item()
            rho = diag["ratio_mean"]
            outside_favoured = (sign > 0 and rho > 1 + eps_clip) or (sign < 0 and rho < 1 - eps_clip)
            if outside_favoured:
                assert g == 0.0, (i, sign, rho)
                seen["zero"] += 1
            else:
                assert g > 0.0, (i, sign, rho)
                seen["live"] += 1
    assert seen["zero"] > 0 and seen["live"] > 0  # both regimes were exercised


def test_vgrpo_kl_to_old_is_zero_when_equal_and_positive_after_a_change(world, policy):
    sigmas = sd3_sigmas(10, 1.0)
    obj = VGRPO(VGRPOConfig(kl_beta=0.3, ref_kl_beta=0.0))
    batch = make_batch(world, policy, obj, sigmas)
    policy.sync_old()
    policy.mark_updated()  # force the old forward even though weights are equal
    _, diag = obj.loss(policy, batch, torch.Generator().manual_seed(0))
    assert diag["kl"] == pytest.approx(0.0, abs=1e-12) and diag["ratio_max_dev"] < 1e-9
    with torch.no_grad():
        next(policy.current.parameters()).add_(0.1)
    _, diag2 = obj.loss(policy, batch, torch.Generator().manual_seed(0))
    assert diag2["kl"] > 0 and diag2["ratio_max_dev"] > 0


def test_vgrpo_reference_kl_is_opt_in_and_pulls_back_to_the_reference(world, policy):
    sigmas = sd3_sigmas(10, 1.0)
    assert not VGRPO(VGRPOConfig(ref_kl_beta=0.0)).uses_ref()
    obj = VGRPO(VGRPOConfig(ref_kl_beta=1.0))
    assert obj.uses_ref()
    batch = make_batch(world, policy, obj, sigmas)
    _, diag = obj.loss(policy, batch, torch.Generator().manual_seed(0))
    assert diag["kl_ref"] == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        for p in policy.current.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = dataclasses.replace(batch, advantages_b=torch.zeros_like(batch.advantages_b))  # KL alone
    loss, diag = obj.loss(policy, batch, torch.Generator().manual_seed(0))
    assert diag["kl_ref"] > 0
    policy.current.zero_grad()
    loss.backward()
    with torch.no_grad():  # a small step along -grad lowers the distance to the reference
        for p in policy.current.parameters():
            p.sub_(1e-2 * p.grad)
    _, after = obj.loss(policy, batch, torch.Generator().manual_seed(0))
    assert after["kl_ref"] < diag["kl_ref"]


# ---------------------------------------------------------------------------------------------- others


def test_flow_grpo_ratio_is_one_on_policy_and_loss_flips_with_advantage(world, policy):
    sigmas = sd3_sigmas(10, 1.0)
    obj = build_objective(AlgorithmConfig(name="flow_grpo", flow_grpo=FlowGRPOConfig(kl_beta=0.0)))
    batch = make_batch(world, policy, obj, sigmas)
    assert batch.trajectory_btchw is not None and batch.trajectory_btchw.shape[1] == 11
    loss, diag = obj.loss(policy, batch, torch.Generator())
    assert diag["ratio_max_dev"] < 1e-4  # replaying the recorded transitions reproduces their log-probs
    # at rho = 1 the loss is -mean(A) per step, which is ~0 for group-centred advantages
    assert abs(loss.item()) < 1e-4
    loss.backward()
    g_pos = grads(policy.current).clone()
    policy.current.zero_grad()
    batch.advantages_b = -batch.advantages_b
    loss2, _ = obj.loss(policy, batch, torch.Generator())
    loss2.backward()
    assert torch.allclose(grads(policy.current), -g_pos, atol=1e-6)


def test_flow_grpo_kl_zero_against_identical_reference(world, policy):
    sigmas = sd3_sigmas(10, 1.0)
    obj = build_objective(AlgorithmConfig(name="flow_grpo"))
    batch = make_batch(world, policy, obj, sigmas)
    _, diag = obj.loss(policy, batch, torch.Generator())
    assert diag["kl"] == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        next(policy.current.parameters()).add_(0.1)
    _, diag2 = obj.loss(policy, batch, torch.Generator())
    assert diag2["kl"] > 0


def test_dgpo_gradient_is_half_advantage_weighted_denoising_loss_at_reference(world, policy):
    """At theta = ref, l - l_ref = 0, so every group weight is sigmoid(0) = 1/2 (§5.3)."""
    sigmas = sd3_sigmas(10, 1.0)
    cfg = DGPOConfig(kl_beta=0.0, num_timesteps=1, trunc_steps=0)  # the single grid time sigma_0 = 1
    obj = build_objective(AlgorithmConfig(name="dgpo", dgpo=cfg))
    batch = make_batch(world, policy, obj, sigmas)
    loss, diag = obj.loss(policy, batch, torch.Generator().manual_seed(2))
    assert diag["group_weight"] == pytest.approx(0.5)
    loss.backward()
    g = grads(policy.current).clone()
    policy.current.zero_grad()
    gen = torch.Generator().manual_seed(2)
    torch.randperm(1, generator=gen)
    groups, group_b = torch.unique(batch.group_ids_b, return_inverse=True)
    eps = torch.randn((len(groups), 2), generator=gen)[group_b]
    x_t = eps  # t = 1
    v = policy.current(x_t, torch.ones(len(batch)), batch.cond)
    ref_loss = (0.5 * batch.advantages_b * ((eps - batch.latents_bchw - v) ** 2).mean(-1)).mean()
    ref_loss.backward()
    assert torch.allclose(g, grads(policy.current), rtol=1e-4, atol=1e-7)


def test_nft_reduces_to_weighted_regression_at_beta_one(world, policy):
    """With beta = 1 and old = current, v+ = v and v- = 2 v_old - v: both branches pull x0-predictions."""
    sigmas = sd3_sigmas(10, 1.0)
    obj = build_objective(AlgorithmConfig(name="nft", nft=NFTConfig(kl_beta=0.0)))
    batch = make_batch(world, policy, obj, sigmas)
    batch.advantages_b = torch.full_like(batch.advantages_b, 5.0)  # r = 1: only the positive branch
    loss_pos, diag = obj.loss(policy, batch, torch.Generator().manual_seed(0))
    assert diag["r_mean"] == pytest.approx(1.0)
    batch.advantages_b = torch.full_like(batch.advantages_b, -5.0)  # r = 0: only the negative branch
    loss_neg, diag = obj.loss(policy, batch, torch.Generator().manual_seed(0))
    assert diag["r_mean"] == pytest.approx(0.0)
    # old = current: the negative branch's x0-prediction equals the positive one, so the values match
    assert float(loss_pos.detach()) == pytest.approx(float(loss_neg.detach()), rel=1e-5)
    loss_pos.backward()
    g_pos = grads(policy.current).clone()
    policy.current.zero_grad()
    loss_neg.backward()
    assert torch.allclose(grads(policy.current), -g_pos, atol=1e-6)  # ... but pushes the opposite way


def test_every_objective_is_registered_and_configured():
    assert set(OBJECTIVES) == {"vgrpo", "dgpo", "flow_grpo", "nft", "flow_grpo_fast", "mixgrpo"}
    for name, cls in OBJECTIVES.items():
        obj = build_objective(AlgorithmConfig(name=name))
        assert isinstance(obj, cls) and obj.name == name
    assert build_objective(AlgorithmConfig(name="flow_grpo")).sampler == "sde"
    assert all(build_objective(AlgorithmConfig(name=n)).sampler == "dpm2" for n in ("vgrpo", "dgpo", "nft"))
    assert all(
        build_objective(AlgorithmConfig(name=n)).sampler == "sde_window"
        for n in ("mixgrpo", "flow_grpo_fast")
    )


def test_ema_old_policy(world):
    p = ToyPolicy(pretrained_model(world, steps=300))
    before = copy.deepcopy(p.old.state_dict())
    with torch.no_grad():
        for q in p.current.parameters():
            q.add_(1.0)
    p.ema_old(0.25)
    for k, v in p.old.state_dict().items():
        assert torch.allclose(v, 0.25 * before[k] + 0.75 * p.current.state_dict()[k], atol=1e-6)
    assert not p.old_is_current()


def test_rewards_combine_by_weight_or_standardised_in_their_groups():
    """group_normalized: each reward z-scored inside its prompt group, then weighted; checked against a
    plain computation, with a reward constant in one group contributing 0 there."""
    from vgrpo.learner.advantages import combine_rewards

    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    a = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])  # constant in group 1
    b = torch.tensor([100.0, 300.0, 200.0, 0.0, 10.0, 20.0])  # another scale
    plain, _ = combine_rewards({"a": a, "b": b}, {"a": 1.0, "b": 0.5}, groups, "weighted_sum")
    assert torch.allclose(plain, (a + 0.5 * b).double())
    got, stats = combine_rewards({"a": a, "b": b}, {"a": 1.0, "b": 0.5}, groups, "group_normalized")

    def z(x: list[float]) -> list[float]:
        m = sum(x) / len(x)
        s = (sum((v - m) ** 2 for v in x) / len(x)) ** 0.5
        return [0.0 if s < 1e-12 else (v - m) / (s + 1e-6) for v in x]

    want = [
        za + 0.5 * zb
        for za, zb in zip(z([1, 2, 3]) + z([5, 5, 5]), z([100, 300, 200]) + z([0, 10, 20]), strict=True)
    ]
    assert got.tolist() == pytest.approx(want)
    assert stats["adv/a/zero_std_frac"] == 0.5 and stats["adv/b/zero_std_frac"] == 0.0
    with pytest.raises(ValueError, match=r"reward\.combine"):
        combine_rewards({"a": a}, {}, groups, "average")
