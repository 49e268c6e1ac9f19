"""MixGRPO and Flow-GRPO-Fast (docs/algorithms.md §6.2, §6.3): the window rules, the windowed loss against
the equations, and the window's way from the driver to the learner."""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vgrpo.core.flow import sd3_sigmas
from vgrpo.learner.objectives import FlowGRPOFast, MixGRPO, TrainBatch, build_objective
from vgrpo.learner.objectives.flow_grpo_fast import fast_window_start
from vgrpo.learner.objectives.mixgrpo import mixgrpo_window_start
from vgrpo.proto.config import (
    AlgorithmConfig,
    ConfigError,
    FlowGRPOFastConfig,
    MixGRPOConfig,
    load_config,
)
from vgrpo.proto.messages import RolloutBatch, TrainShard
from vgrpo.toy.train import rollout

WINDOWED = ("mixgrpo", "flow_grpo_fast")


# ---------------------------------------------------------------------------------------------- window rules


def test_fast_window_start_is_uniform_on_its_range_and_a_function_of_seed_and_step():
    starts = [fast_window_start(0, step, 2, (0, 5)) for step in range(1, 4001)]
    counts = Counter(starts)
    assert set(counts) == {0, 1, 2, 3}  # U{r0, ..., r1 - W}
    assert all(abs(c / 4000 - 0.25) < 0.03 for c in counts.values()), counts
    assert starts == [fast_window_start(0, step, 2, (0, 5)) for step in range(1, 4001)]  # a resume redraws
    assert starts != [fast_window_start(1, step, 2, (0, 5)) for step in range(1, 4001)]
    assert {fast_window_start(3, step, 3, (2, 7)) for step in range(1, 400)} == {2, 3, 4}
    assert {fast_window_start(0, step, 2, (4, 6)) for step in range(1, 50)} == {4}


def test_mixgrpo_window_sweeps_a_10_step_schedule_within_the_default_run_and_rolls_back():
    """W = 2 of 10, K = 16: starts 0..7 (the last whose window ends before the step to sigma = 0), each for
    16 steps, all reached within the default 160-step run, then back to 0."""
    c = MixGRPOConfig()
    starts = [
        mixgrpo_window_start(step, 10, c.sde_window_size, c.shift_every, c.shift_step, c.max_start)
        for step in range(1, 161)
    ]
    assert starts[:16] == [0] * 16 and starts[16:32] == [1] * 16
    assert starts[112:128] == [7] * 16 and starts[128] == 0  # step 129 rolls back
    assert set(starts) == set(range(8)) and max(starts) + c.sde_window_size <= 9
    assert [mixgrpo_window_start(s, 10, 2, 1) for s in range(1, 11)] == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]


def test_mixgrpo_window_on_the_papers_25_steps():
    """Upstream: 25 steps, W = 4, moves by 1 every 25 iterations; here the whole window must fit before the
    last step, so starts run 0..20 and roll back after start 20."""
    at = lambda step, **kw: mixgrpo_window_start(step, 25, 4, 25, **kw)  # noqa: E731
    assert [at(s) for s in (1, 25, 26, 50, 51)] == [0, 0, 1, 1, 2]
    assert at(500) == 19 and at(501) == 20 and at(525) == 20 and at(526) == 0
    assert {at(s) for s in range(1, 526)} == set(range(21))
    # prog_overlap_step 2 visits 0, 2, ..., 20; an explicit max_start rolls back after it
    assert {at(s, shift_step=2) for s in range(1, 1000)} == set(range(0, 21, 2))
    assert [at(s, max_start=2) for s in (1, 26, 51, 76, 101)] == [0, 1, 2, 0, 1]


def test_objectives_give_the_driver_one_window_per_step():
    mix = build_objective(AlgorithmConfig(name="mixgrpo"))
    fast = build_objective(AlgorithmConfig(name="flow_grpo_fast"))
    assert isinstance(mix, MixGRPO) and isinstance(fast, FlowGRPOFast)
    assert mix.rollout_window(17, 10, 0) == (1, 2)
    assert fast.rollout_window(5, 10, 3) == (fast_window_start(3, 5, 2, (0, 5)), 2)
    assert build_objective(AlgorithmConfig(name="flow_grpo")).rollout_window(1, 10, 0) is None
    for obj in (mix, fast):
        assert obj.sampler == "sde_window" and obj.old_policy == "none"
    assert not mix.uses_ref() and fast.uses_ref()  # MixGRPO: KL 0, no reference forwards


def test_paper_defaults():
    m, f = MixGRPOConfig(), FlowGRPOFastConfig()
    assert (m.clip_range, m.kl_beta, m.noise_level, m.shift_step) == (1e-4, 0.0, 0.7, 1)
    assert (m.advantage.norm, m.advantage.eps, m.advantage.clip) == ("group", 1e-8, 5.0)
    assert (f.clip_range, f.kl_beta, f.sde_window_size, f.sde_window_range) == (1e-4, 0.04, 2, (0, 5))
    assert (f.advantage.norm, f.advantage.clip) == ("global_std", 5.0)


# ---------------------------------------------------------------------------------------------- the loss


def grads(module):
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


def window_batch(world, policy, obj, window, groups=3, group_size=4):
    gen = torch.Generator().manual_seed(0)
    cond_b = torch.arange(groups).repeat_interleave(group_size) % world.num_conditions
    group_b = torch.arange(groups).repeat_interleave(group_size)
    sigmas = sd3_sigmas(10, 1.0)
    x0, traj, logp = rollout(policy, obj, cond_b, sigmas, gen, window=window)
    adv, _ = obj.advantages(world.reward(x0, cond_b), group_b)
    return TrainBatch(x0, cond_b, group_b, adv, sigmas, 1.0, traj, logp, window_start=window[0])


@pytest.mark.parametrize("name", WINDOWED)
def test_window_replay_gives_ratio_one_and_the_loss_flips_with_the_advantage(world, policy, name):
    """§9.3: replaying the window's recorded transitions at theta = theta_old reproduces their log-probs
    exactly (rho = 1), and the policy loss's gradient flips sign with A."""
    algo = AlgorithmConfig(name=name)
    algo.params().kl_beta = 0.0  # type: ignore[attr-defined]
    obj = build_objective(algo)
    batch = window_batch(world, policy, obj, (3, 2))
    assert batch.trajectory_btchw is not None and batch.trajectory_btchw.shape[1] == 3
    assert batch.logp_old_bt is not None and batch.logp_old_bt.shape[1] == 2
    loss, diag = obj.loss(policy, batch, torch.Generator())
    assert diag["ratio_max_dev"] == 0.0 and diag["clip_frac"] == 0.0
    assert loss.item() == pytest.approx(-float(batch.advantages_b.double().mean()), abs=1e-6)
    loss.backward()
    g_pos = grads(policy.current).clone()
    assert g_pos.abs().sum() > 0
    policy.current.zero_grad()
    batch.advantages_b = -batch.advantages_b
    loss2, _ = obj.loss(policy, batch, torch.Generator())
    loss2.backward()
    assert torch.allclose(grads(policy.current), -g_pos, atol=1e-7)


class LinearPolicy:
    """v_theta(x, sigma) = w x (1 + sigma) + b per dimension; the frozen reference has its own (w, b)."""

    def __init__(self) -> None:
        self.w = torch.nn.Parameter(torch.tensor([0.5, -0.3, 0.8]))
        self.b = torch.nn.Parameter(torch.tensor([0.1, 0.2, -0.4]))
        self.w_ref, self.b_ref = torch.tensor([0.4, -0.2, 0.9]), torch.tensor([0.0, 0.3, -0.5])

    def velocity(self, x_bd, sigma_b, cond, which="current"):
        w, b = (self.w, self.b) if which == "current" else (self.w_ref, self.b_ref)
        return w * x_bd * (1 + sigma_b[:, None]) + b

    def old_is_current(self) -> bool:
        return True


@pytest.mark.parametrize("name", WINDOWED)
def test_windowed_loss_value_from_the_equations(name):
    """An independent computation of §6.1 on window steps 3, 4 of a 10-step shifted grid, with rho != 1,
    the clip active for some images and the KL on: value and gradient."""
    torch.manual_seed(3)
    sig = sd3_sigmas(10, 3.0)
    start, a, eps_clip, beta = 3, 0.7, 0.01, 0.1
    x_bwd = torch.randn(4, 3, 3)  # x at sigma_3, sigma_4, sigma_5
    adv_b = torch.tensor([1.0, -2.0, 0.5, -1.0])
    pol = LinearPolicy()

    def expected(logp_old_bw=None):
        terms, logps = [], []
        for j in range(2):
            s, s_next = float(sig[start + j]), float(sig[start + j + 1])
            dt = s_next - s
            std_s = a * math.sqrt(s / (1 - min(s, float(sig[1]))))
            x, x_next = x_bwd[:, j].double(), x_bwd[:, j + 1].double()
            t = torch.full((4, 1), s, dtype=torch.float64)
            v = pol.w.double() * x * (1 + t) + pol.b.double()
            v_ref = pol.w_ref.double() * x * (1 + t) + pol.b_ref.double()
            mu = x + (v + std_s**2 / (2 * s) * (x + (1 - s) * v)) * dt
            mu_ref = (x + (v_ref + std_s**2 / (2 * s) * (x + (1 - s) * v_ref)) * dt).detach()
            logp = torch.distributions.Normal(mu, std_s * math.sqrt(-dt)).log_prob(x_next).mean(-1)
            logps.append(logp)
            if logp_old_bw is None:
                continue
            rho = torch.exp(logp - logp_old_bw[:, j].double())
            pg = torch.maximum(-adv_b * rho, -adv_b * rho.clamp(1 - eps_clip, 1 + eps_clip)).mean()
            kl = (((mu - mu_ref) ** 2).mean(-1) / (2 * std_s**2)).mean()
            terms.append(pg + beta * kl)
        return torch.stack(logps, 1), (sum(terms) / 2 if terms else None)

    logp_theta, _ = expected()
    # rho_b = exp(delta_b): images 0 and 1 leave the trust region (clipped), 2 and 3 stay inside
    delta_b = torch.tensor([0.03, -0.04, 0.004, -0.002], dtype=torch.float64)[:, None]
    logp_old = (logp_theta - delta_b).detach().float()
    want, _ = expected(logp_old)[1], None
    assert want is not None
    want.backward()
    want_grads = torch.cat([pol.w.grad.clone(), pol.b.grad.clone()])
    pol.w.grad = pol.b.grad = None

    algo = AlgorithmConfig(name=name)
    for key, value in (("clip_range", eps_clip), ("kl_beta", beta), ("noise_level", a)):
        setattr(algo.params(), key, value)
    obj = build_objective(algo)
    batch = TrainBatch(
        x_bwd[:, -1], None, torch.arange(4), adv_b, sig, 3.0, x_bwd, logp_old, window_start=start
    )
    loss, diag = obj.loss(pol, batch, torch.Generator())
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert diag["clip_frac"] == pytest.approx(0.5) and diag["kl"] > 0
    loss.backward()
    assert torch.allclose(torch.cat([pol.w.grad, pol.b.grad]), want_grads.float(), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- config


def test_auto_sampler_and_validation():
    for name in WINDOWED:
        assert load_config(None, [f"algorithm.name={name}"]).sampler() == "sde_window"
    # another objective's short schedule is not checked against the windows it does not use
    assert load_config(None, ["rollout.num_steps=3"]).sampler() == "dpm2"
    cases = [
        (["algorithm.name=flow_grpo_fast", "rollout.num_steps=4"], "sde_window_range.*rollout.num_steps=6"),
        (["algorithm.name=flow_grpo_fast", "rollout.num_steps=5"], r"sde_window_range=\[0,4\]"),
        (["algorithm.name=mixgrpo", "rollout.num_steps=2"], "algorithm.mixgrpo.sde_window_size = 2"),
        (["algorithm.name=mixgrpo", "algorithm.mixgrpo.max_start=8"], "algorithm.mixgrpo.max_start=7"),
        (["algorithm.mixgrpo.sde_window_size=0"], "algorithm.mixgrpo.sde_window_size"),
        (["algorithm.flow_grpo_fast.sde_window_range=[3,4]"], "spans 1 steps, fewer than sde_window_size"),
        (["algorithm.flow_grpo_fast.sde_window_range=[4,2]"], "0 <= r0 < r1"),
        (["rollout.sampler=sde_window"], "does not fit algorithm.name = 'vgrpo'"),
        (["algorithm.name=mixgrpo", "rollout.sampler=dpm2"], "needs sde_window"),
        (["algorithm.name=mixgrpo", "rollout.sampler=sde"], "only serves algorithm.name = flow_grpo"),
    ]
    for sets, match in cases:
        with pytest.raises(ConfigError, match=match):
            load_config(None, sets)
    ok = load_config(None, ["algorithm.name=mixgrpo", "rollout.num_steps=3", "algorithm.mixgrpo.max_start=0"])
    assert ok.algorithm.mixgrpo.max_start == 0


# ---------------------------------------------------------------------------------------------- driver


class FakeWorker:
    """Records each ``sample.remote`` call and returns its result at once (no Ray)."""

    def __init__(self, calls):
        self.calls = calls
        self.sample = SimpleNamespace(remote=self._sample)

    def _sample(self, prompts, group_size, seeds, window):
        self.calls.append(window)
        b, w = len(prompts) * group_size, window[1]
        return RolloutBatch(
            group_size=group_size,
            policy_version=0,
            latents=np.zeros((b, 2, 4, 4), np.float32),
            images=np.zeros((b, 8, 8, 3), np.uint8),
            prompt_embeds=np.zeros((len(prompts), 3, 5), np.float32),
            pooled=np.zeros((len(prompts), 5), np.float32),
            sigmas=sd3_sigmas(10, 3.0).numpy(),
            shift=3.0,
            trajectory=np.zeros((b, w + 1, 2, 4, 4), np.float32),
            logp=np.zeros((b, w), np.float32),
            window_start=window[0],
        )


def test_the_window_is_decided_once_per_step_and_reaches_every_learner_shard(tmp_path):
    """launch draws the step's window once and gives it to every worker; a dead worker's redone share
    samples with the same window; the batch and every learner shard carry its start."""
    from vgrpo.driver import Trainer
    from vgrpo.run_dir import RunDir

    sets = ["algorithm.name=flow_grpo_fast", "rollout.prompts_per_step=3", "rollout.group_size=2"]
    cfg = load_config(None, [*sets, "train.seed=5"])
    calls: list = []
    roles = SimpleNamespace(
        workers=[FakeWorker(calls), FakeWorker(calls)], objective=build_objective(cfg.algorithm)
    )
    trainer = Trainer(cfg, RunDir(tmp_path / "run"))
    pending = trainer.launch(roles, step=4)  # type: ignore[arg-type]
    assert pending.window == (fast_window_start(5, 4, 2, (0, 5)), 2)

    def redo_everything(roles, fns, what, version, owners):  # each worker "dies" once: its share is redone
        return {i: (fn(owners[i]), fn(owners[i]))[1] for i, fn in fns.items()}

    trainer.on_workers = redo_everything  # type: ignore[method-assign]
    batch = trainer.collect(roles, pending)  # type: ignore[arg-type]
    assert calls == [pending.window] * 4  # two launched, two redone
    assert batch.window_start == pending.window[0] and batch.logp is not None and batch.logp.shape == (6, 2)
    shards = TrainShard.split(batch, np.zeros(6), 2, 0)
    assert [s.check("the test").window_start for s in shards] == [pending.window[0]] * 2
    assert [s.trajectory.shape[1] for s in shards if s.trajectory is not None] == [3, 3]
