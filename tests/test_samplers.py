"""Samplers against independent computations (docs/algorithms.md §1, §2, §6.1)."""

from __future__ import annotations

import math

import pytest
import torch

from vgrpo.core.flow import (
    DPMSolver2M,
    apply_cfg,
    euler_step,
    ode_sample,
    sd3_sigmas,
    sde_std,
    sde_step_with_logprob,
    sde_window_sample,
    shift_sigma,
)


def gaussian_velocity(m: torch.Tensor, s: torch.Tensor):
    """Exact probability-flow velocity for data x0 ~ N(m, s^2) (per dimension) under x_t = (1-t) x0 + t eps:
    v = E[eps - x0 | x_t] = (t - a s^2) / var (x - a m) - m with a = 1 - t, var = a^2 s^2 + t^2.
    Linear in x but varying in t, so the ODE paths curve."""

    def v(x: torch.Tensor, sigma_b: torch.Tensor) -> torch.Tensor:
        t = sigma_b.double().view(-1, *([1] * (x.ndim - 1)))
        a = 1 - t
        var = a**2 * s**2 + t**2
        return ((t - a * s**2) / var * (x.double() - a * m) - m).to(x.dtype)

    return v


def exact_endpoint(eps: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    # the flow keeps the standardised value (x_t - a m)/sqrt(var) constant: eps at t = 1 ends at m + s eps
    return m + s * eps


@pytest.fixture
def gaussian():
    torch.manual_seed(0)
    m = torch.tensor([1.5, -0.7, 0.3], dtype=torch.float64)
    s = torch.tensor([0.2, 0.5, 1.3], dtype=torch.float64)
    eps = torch.randn(64, 3, dtype=torch.float64)
    return m, s, eps


def test_schedule_endpoints_and_shift():
    for grid in ("uniform", "diffusers"):
        sig = sd3_sigmas(10, 3.0, grid)
        assert sig.shape == (11,)
        assert sig[0] == 1.0 and sig[-1] == 0.0
        assert torch.all(sig[1:] < sig[:-1])
    # shift pushes steps toward high noise: the shifted midpoint is above 1/2
    assert float(shift_sigma(0.5, 3.0)) == pytest.approx(0.75)
    assert torch.allclose(sd3_sigmas(4, 1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("solver", ["euler", "dpm2"])
def test_ode_converges_to_closed_form(gaussian, solver):
    m, s, eps = gaussian
    v = gaussian_velocity(m, s)
    errs = []
    for n in (5, 10, 40):
        x0 = ode_sample(v, eps.clone(), sd3_sigmas(n, 3.0), solver)
        errs.append(float((x0 - exact_endpoint(eps, m, s)).pow(2).mean().sqrt()))
    assert errs[0] > errs[1] > errs[2]  # converges with more steps
    assert errs[2] < (0.05 if solver == "euler" else 0.01)


def test_dpm_solver_beats_euler_at_equal_steps(gaussian):
    m, s, eps = gaussian
    v = gaussian_velocity(m, s)
    target = exact_endpoint(eps, m, s)
    # on SD3's shifted grid the last, first-order step from sigma_{N-1} = shift(1/N) dominates both errors;
    # on an unshifted grid the second-order steps show: several times more accurate
    for n in (6, 10, 20):
        for shift, factor in ((3.0, 0.9), (1.0, 0.5)):
            sig = sd3_sigmas(n, shift)
            err_euler = float((ode_sample(v, eps.clone(), sig, "euler") - target).pow(2).mean().sqrt())
            err_dpm = float((ode_sample(v, eps.clone(), sig, "dpm2") - target).pow(2).mean().sqrt())
            assert err_dpm < factor * err_euler, (n, shift, err_dpm, err_euler)


def test_dpm_first_step_equals_euler_and_last_step_returns_data_prediction():
    sig = sd3_sigmas(4, 3.0)
    x = torch.randn(2, 3)
    v = torch.randn(2, 3)
    dpm = DPMSolver2M(sig)
    assert torch.allclose(dpm.step(0, x, v), euler_step(x, v, float(sig[0]), float(sig[1])), atol=1e-6)
    dpm2 = DPMSolver2M(sig)
    for i in range(3):
        dpm2.step(i, x, v)
    last = dpm2.step(3, x, v)
    assert torch.allclose(last, x - float(sig[3]) * v, atol=1e-6)  # x_N = D_{N-1}


def test_cfg():
    vu, vc = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(apply_cfg(vu, vc, 1.0), vc)
    assert torch.allclose(apply_cfg(vu, vc, 4.5), vu + 4.5 * (vc - vu))
    assert torch.allclose(apply_cfg(vu, vc, 0.0), vu)


def test_sde_logprob_matches_torch_normal():
    torch.manual_seed(1)
    sig = sd3_sigmas(10, 3.0)
    x = torch.randn(5, 4, 3, 3)
    v = torch.randn(5, 4, 3, 3)
    for i in (0, 3, 8):
        s, s_next, s1 = float(sig[i]), float(sig[i + 1]), float(sig[1])
        x_next, logp, mu, std = sde_step_with_logprob(x, v, s, s_next, s1, 0.7)
        # independent: mean from the SDE drift, std = a sqrt(sigma/(1-min(sigma, sigma_1))) sqrt(-dt)
        dt = s_next - s
        a_std = 0.7 * math.sqrt(s / (1 - min(s, s1)))
        mean = x + (v + a_std**2 / (2 * s) * (x + (1 - s) * v)) * dt
        normal = torch.distributions.Normal(mean, a_std * math.sqrt(-dt))
        expected = normal.log_prob(x_next).mean(dim=(1, 2, 3))
        assert torch.allclose(logp, expected, atol=1e-5)
        assert std == pytest.approx(a_std * math.sqrt(-dt))
        assert torch.allclose(mu, mean, atol=1e-6)


def test_sde_first_step_is_finite_and_clamped():
    # a first sigma of exactly 1 (and one just below it) must not blow up the std (pitfall §9.1)
    s1 = 0.96
    assert math.isfinite(sde_std(1.0, s1, 0.7))
    assert sde_std(0.9999, s1, 0.7) == pytest.approx(sde_std(1.0, s1, 0.7) * math.sqrt(0.9999))


def test_sde_replay_scores_given_sample_and_zero_noise_is_euler():
    sig = sd3_sigmas(10, 3.0)
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    s, s_next, s1 = float(sig[2]), float(sig[3]), float(sig[1])
    x_next, logp, _, _ = sde_step_with_logprob(
        x, v, s, s_next, s1, 0.7, generator=torch.Generator().manual_seed(0)
    )
    _, logp2, _, _ = sde_step_with_logprob(x, v, s, s_next, s1, 0.7, prev_sample=x_next)
    assert torch.allclose(logp, logp2)
    # noise level 0: the SDE mean is the Euler step
    x_det, _, _, _ = sde_step_with_logprob(x, v, s, s_next, s1, 1e-8, noise=torch.zeros_like(x))
    assert torch.allclose(x_det, euler_step(x, v, s, s_next), atol=1e-5)


# ---------------------------------------------------------------------------------------------- SDE window


@pytest.mark.parametrize("window", [(0, 2), (3, 2), (5, 4), (8, 1)])
def test_sde_window_is_the_ode_outside_and_the_sde_step_inside(gaussian, window):
    """MixGRPO / Flow-GRPO-Fast (§6.2, §6.3): Euler ODE before and after the window, the Flow-GRPO SDE step
    on it; replayed step by step with the same noise draws, against the existing functions."""
    m, s, eps = gaussian
    v = gaussian_velocity(m, s)
    x1 = eps[:6].float()
    sig = sd3_sigmas(10, 3.0)
    start, size = window
    x0, traj, logp = sde_window_sample(v, x1, sig, window, 0.7, generator=torch.Generator().manual_seed(7))
    assert traj.shape == (6, size + 1, 3) and logp.shape == (6, size)
    # before the window: the Euler ODE from sigma_0 to sigma_start
    assert torch.equal(traj[:, 0], ode_sample(v, x1, sig[: start + 1], "euler"))
    # inside: one Flow-GRPO step per window step, the noise drawn in order from the same generator
    gen = torch.Generator().manual_seed(7)
    sigma_1 = float(sig[1])
    for k in range(size):
        i = start + k
        x_k = traj[:, k]
        sigma_b = torch.full((6,), float(sig[i]), dtype=torch.float32)
        noise = torch.randn(x_k.shape, generator=gen, dtype=torch.float32)
        x_next, logp_k, _, _ = sde_step_with_logprob(
            x_k, v(x_k, sigma_b), float(sig[i]), float(sig[i + 1]), sigma_1, 0.7, noise=noise
        )
        assert torch.equal(traj[:, k + 1], x_next) and torch.equal(logp[:, k], logp_k)
        assert not torch.allclose(x_next, euler_step(x_k, v(x_k, sigma_b), float(sig[i]), float(sig[i + 1])))
    # after: the Euler ODE from sigma_{start+W} to sigma_N = 0
    assert torch.equal(x0, ode_sample(v, traj[:, -1], sig[start + size :], "euler"))


def test_sde_window_of_size_zero_is_the_euler_ode(gaussian):
    m, s, eps = gaussian
    v = gaussian_velocity(m, s)
    x1 = eps[:5].float()
    sig = sd3_sigmas(10, 3.0)
    x0, traj, logp = sde_window_sample(v, x1, sig, (4, 0), generator=torch.Generator().manual_seed(0))
    assert torch.equal(x0, ode_sample(v, x1, sig, "euler"))
    assert traj.shape == (5, 1, 3) and logp.shape == (5, 0)
    assert torch.equal(traj[:, 0], ode_sample(v, x1, sig[:5], "euler"))


def test_sde_window_must_end_before_the_step_to_sigma_zero():
    v = lambda x, s: torch.zeros_like(x)  # noqa: E731
    sig = sd3_sigmas(10, 3.0)
    x = torch.randn(2, 3)
    sde_window_sample(v, x, sig, (7, 2))  # steps 7, 8: the last SDE-able ones
    for bad in [(8, 2), (9, 1), (-1, 2), (0, 10)]:
        with pytest.raises(ValueError, match=r"must lie within steps 0\.\.8"):
            sde_window_sample(v, x, sig, bad)
