"""The training around the objectives as their upstreams run it (docs/algorithms.md §10): the guided
training forward's gradient, the timestep's dtype, the rollout grid each objective samples on, DGPO's
shared training times and Flow-GRPO's zero-advantage drop."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from vgrpo.proto.config import load_config


class FakeTransformer(nn.Module):
    """Stands in for SD3Transformer2DModel in ``policy.velocity``: v = a * x + b * mean(pooled), with the
    timestep recorded, so that the gradient of a guided forward can be computed by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.7))
        self.b = nn.Parameter(torch.tensor(-0.3))
        self.timesteps: list[torch.Tensor] = []

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict):
        self.timesteps.append(timestep)
        bias = pooled_projections.mean(dim=1).view(-1, 1, 1, 1)
        return (self.a * hidden_states + self.b * bias,)


def test_guided_training_forward_differentiates_only_the_conditional_branch() -> None:
    """Flow-GRPO and DGPO detach v_u: d/dθ [v_u + w (v_c - v_u)] = w dv_c/dθ, not w dv_c - (w-1) dv_u."""
    from vgrpo.core.families import FAMILIES, TextCond
    from vgrpo.learner.engine import LearnerPolicy

    net = FakeTransformer()
    w = 4.5
    uncond = TextCond(torch.zeros(1, 3, 2), torch.full((1, 2), 2.0))  # empty-prompt embeds, pooled mean 2
    policy = LearnerPolicy(
        net, guidance_scale=w, uncond=uncond, old_module=net, ref_module=net, family=FAMILIES["sd3"]
    )
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    cond = TextCond(torch.zeros(2, 3, 2), torch.full((2, 2), -1.0))  # pooled mean -1
    v = policy.velocity(x, torch.full((2,), 0.5), cond)
    v.sum().backward()
    # v_c = a x + b (-1), v_u = a x + b 2: with v_u detached, dv/da = w x, dv/db = w (-1)
    n = x.numel() // 2
    assert net.a.grad is not None and net.b.grad is not None
    torch.testing.assert_close(net.a.grad, w * x.sum())
    torch.testing.assert_close(net.b.grad, torch.tensor(w * -1.0 * 2 * n))
    # and the value is the CFG combination
    v_c, v_u = net.a * x + net.b * -1.0, net.a * x + net.b * 2.0
    torch.testing.assert_close(v.detach(), (v_u + w * (v_c - v_u)).detach())


def test_the_timestep_reaches_the_transformer_in_float32() -> None:
    from vgrpo.core.families import FAMILIES, TextCond
    from vgrpo.core.policy import velocity

    net = FakeTransformer()
    cond = TextCond(torch.zeros(1, 3, 2), torch.zeros(1, 2))
    velocity(net, torch.zeros(1, 1, 2, 2), torch.tensor([0.123456]), cond, family=FAMILIES["sd3"])
    assert net.timesteps[-1].dtype == torch.float32
    assert float(net.timesteps[-1]) == pytest.approx(123.456, abs=1e-4)


@pytest.mark.parametrize(
    ("name", "grid"),
    [
        ("vgrpo", "uniform"),
        ("dgpo", "uniform"),
        ("flow_grpo", "diffusers"),
        ("flow_grpo_fast", "diffusers"),
        ("mixgrpo", "uniform"),
        ("nft", "diffusers"),
    ],
)
def test_each_objective_samples_on_its_upstreams_grid(name: str, grid: str) -> None:
    assert load_config(None, [f"algorithm.name={name}"]).sigma_grid() == grid
    assert (
        load_config(None, [f"algorithm.name={name}", "rollout.sigma_grid=uniform"]).sigma_grid() == "uniform"
    )


def test_the_diffusers_grid_is_flow_match_euler_schedulers() -> None:
    """FlowMatchEulerDiscreteScheduler(shift=3).set_timesteps(N) gives the sigmas Flow-GRPO and DiffusionNFT
    sample SD3 with (last non-zero sigma 0.0089 at N = 10)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from vgrpo.core.flow import sd3_sigmas

    for n in (10, 40):
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        sched.set_timesteps(n)
        torch.testing.assert_close(
            sd3_sigmas(n, 3.0, grid="diffusers").float(), sched.sigmas.float(), atol=1e-6, rtol=0
        )
    assert float(sd3_sigmas(10, 3.0, grid="diffusers")[-2]) == pytest.approx(0.0089, abs=1e-4)


class RecordingPolicy:
    """A FlowPolicy whose velocity is a fixed linear map; records the sigma of every forward."""

    def __init__(self) -> None:
        self.sigmas: list[float] = []
        self.w = nn.Parameter(torch.tensor(0.5))

    def velocity(
        self, x: torch.Tensor, sigma_b: torch.Tensor, cond: Any, which: str = "current"
    ) -> torch.Tensor:
        if which == "current":
            self.sigmas.append(float(sigma_b[0]))
        scale = self.w if which == "current" else self.w.detach() * 0.9
        return scale * x

    def old_is_current(self) -> bool:
        return False


def _batch(n_groups: int = 2, g: int = 2, adv: list[float] | None = None) -> Any:
    from vgrpo.core.flow import sd3_sigmas
    from vgrpo.learner.objectives import TrainBatch

    b = n_groups * g
    gen = torch.Generator().manual_seed(1)
    return TrainBatch(
        latents_bchw=torch.randn(b, 2, 2, 2, generator=gen),
        cond=torch.zeros(b, 1),
        group_ids_b=torch.arange(n_groups).repeat_interleave(g),
        advantages_b=torch.tensor(adv if adv is not None else [1.0, -1.0] * n_groups),
        sigmas=sd3_sigmas(10, 3.0),
    )


def test_dgpo_draws_its_training_times_once_per_update_for_every_rank_and_micro_batch() -> None:
    """Upstream draws the M grid times on rank 0 and broadcasts them: two ranks (different generators)
    and two micro-batches of one update train on the same times; another update draws others."""
    from vgrpo.learner.objectives import build_objective

    obj = build_objective(load_config(None, ["algorithm.name=dgpo"]).algorithm)
    times = []
    for rank in (0, 1):
        batch = _batch()
        batch.extras["step_seed"] = 1234
        pol = RecordingPolicy()
        obj.loss(pol, batch, torch.Generator().manual_seed(rank))
        times.append(pol.sigmas)
    assert times[0] == times[1] and len(times[0]) == 4
    other = _batch()
    other.extras["step_seed"] = 99
    pol = RecordingPolicy()
    obj.loss(pol, other, torch.Generator().manual_seed(0))
    grid = [float(s) for s in _batch().sigmas[:5]]
    assert all(any(abs(t - s) < 1e-6 for s in grid) for t in pol.sigmas)  # high-noise indices 0..4 only


def test_flow_grpo_trains_only_on_images_with_a_nonzero_advantage() -> None:
    from vgrpo.learner.objectives import build_objective

    obj = build_objective(load_config(None, ["algorithm.name=flow_grpo"]).algorithm)
    batch = _batch(n_groups=3, adv=[1.0, -1.0, 0.0, 0.0, 0.5, -0.5])
    kept, diag = obj.train_subset(batch)
    assert kept.group_ids_b.tolist() == [0, 0, 2, 2]
    assert diag["zero_adv_dropped"] == pytest.approx(1 / 3)
    keep_all = build_objective(
        load_config(
            None, ["algorithm.name=flow_grpo", "algorithm.flow_grpo.drop_zero_advantage=false"]
        ).algorithm
    )
    assert len(keep_all.train_subset(batch)[0]) == 6


def test_sample_std_divides_by_n_minus_one_as_torch_does() -> None:
    """MixGRPO normalises by torch's Tensor.std (n - 1); the others by np.std (n)."""
    from vgrpo.learner.advantages import group_advantages
    from vgrpo.proto.config import AdvantageConfig

    r = torch.tensor([0.1, 0.9, 0.4, 0.2, 0.5, 0.5, 0.7, 0.3], dtype=torch.float64)
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    for std, unbiased in (("population", False), ("sample", True)):
        adv, _ = group_advantages(r, g, AdvantageConfig(norm="group", eps=1e-8, clip=None, std=std))
        want = torch.cat([(x - x.mean()) / (x.std(unbiased=unbiased) + 1e-8) for x in r.view(2, 4)])
        torch.testing.assert_close(adv.double(), want, rtol=1e-6, atol=1e-6)


def test_mixgrpo_defaults_to_the_unbiased_std_and_the_others_to_numpys() -> None:
    from vgrpo.proto.config import AlgorithmConfig

    a = AlgorithmConfig()
    assert a.mixgrpo.advantage.std == "sample" and a.mixgrpo.advantage.eps == 1e-8
    for name in ("vgrpo", "dgpo", "flow_grpo", "flow_grpo_fast", "nft"):
        assert getattr(a, name).advantage.std == "population", name
