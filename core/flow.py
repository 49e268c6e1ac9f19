"""Flow-matching samplers as pure torch functions (docs/algorithms.md §1, §2, §6.1).

Convention: flow time ``sigma`` in [0, 1], ``sigma = 1`` is pure noise, ``sigma = 0`` is data;
``x_sigma = (1 - sigma) x0 + sigma eps``; the network predicts the velocity ``v = eps - x0``.
Step math runs in float32 (or float64 for the schedule) whatever dtype the network uses (§9.2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_bchw, sigma_b) -> v_bchw


def shift_sigma(u: torch.Tensor | float, shift: float) -> torch.Tensor:
    """SD3's time shift: sigma(u) = s u / (1 + (s - 1) u) (§1). Pushes steps toward high noise for s > 1."""
    u = torch.as_tensor(u, dtype=torch.float64)
    return shift * u / (1 + (shift - 1) * u)


def sd3_sigmas(
    num_steps: int,
    shift: float = 3.0,
    grid: Literal["uniform", "diffusers"] = "uniform",
    terminal: float | None = None,
) -> torch.Tensor:
    """The N-step schedule sigma_0 = 1 > ... > sigma_{N-1} > sigma_N = 0, float64, shape (N+1,).

    ``uniform``: u = linspace(1, 1/N, N) (DiffusionNFT / Rethinking); ``diffusers``: u = linspace(1,
    u_min, N) with diffusers' already-shifted training minimum u_min = 1/1000 mapped back (Flow-GRPO).
    ``terminal`` (Qwen-Image's scheduler ``shift_terminal``, 0.02): the shifted sigmas stretched so that
    sigma_{N-1} = terminal, ``1 - (1 - sigma) (1 - terminal) / (1 - sigma_{N-1})`` as diffusers does.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if grid == "uniform":
        u = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    else:
        sigma_min = shift * 1e-3 / (1 + (shift - 1) * 1e-3)
        u = torch.linspace(1.0, sigma_min, num_steps, dtype=torch.float64)
    sigmas = shift_sigma(u, shift)
    if terminal:
        one_minus = 1.0 - sigmas
        sigmas = 1.0 - one_minus * (1.0 - terminal) / one_minus[-1]
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """The forward process x_t = (1 - t) x0 + t eps (§1); ``t`` a float or a tensor broadcast against
    ``x0`` (e.g. ``(B, 1, 1, 1)``)."""
    return (1 - t) * x0 + t * eps


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """The clean sample a velocity predicts: x0_hat = x_t - t v (§1, with v = eps - x0)."""
    return x_t - t * v


def apply_cfg(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance v = v_u + w (v_c - v_u) (§2.2); w = 1 returns v_c exactly."""
    if scale == 1.0:
        return v_cond
    return v_uncond + scale * (v_cond - v_uncond)


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v (§2.1)."""
    return (x.float() + (sigma_next - sigma) * v.float()).to(x.dtype)


@dataclass
class DPMSolver2M:
    """DPM-Solver++(2M) for rectified flow (§2.1): alpha = 1 - sigma, lambda = log((1 - sigma) / sigma).

    First order at the first step and at the last (sigma_{i+1} = 0, where it reduces to x_N = D_{N-1});
    second order ("midpoint" correction D + D1/2) in between. Call :meth:`step` with i = 0, 1, ... in order.
    """

    sigmas: torch.Tensor  # (N+1,) float64
    _d_prev: torch.Tensor | None = None

    @staticmethod
    def _lam(sigma: float) -> float:
        return float(torch.log(torch.tensor((1 - sigma) / sigma, dtype=torch.float64)))

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s, s_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        x32 = x.float()
        d = x32 - s * v.float()  # data prediction D_i = x_i - sigma_i v
        if s_next == 0.0:
            out = d  # lambda = +inf: first order gives x_N = D_{N-1}
        elif s == 1.0:
            # lambda(1) = -inf, so e^{-h} = 0: the first-order update is sigma' x + alpha' D (= the Euler step)
            out = s_next * x32 + (1 - s_next) * d
        else:
            h = self._lam(s_next) - self._lam(s)
            alpha_next = 1 - s_next
            coeff = -alpha_next * torch.expm1(torch.tensor(-h, dtype=torch.float64)).item()
            if self._d_prev is None or i == 0:
                out = (s_next / s) * x32 + coeff * d
            else:
                s_prev = float(self.sigmas[i - 1])
                h_prev = self._lam(s) - self._lam(s_prev) if s_prev < 1.0 else None
                if h_prev is None:  # the previous step started at sigma = 1 (lambda = -inf): stay first order
                    out = (s_next / s) * x32 + coeff * d
                else:
                    r = h_prev / h
                    d1 = (d - self._d_prev) / r
                    out = (s_next / s) * x32 + coeff * (d + 0.5 * d1)
        self._d_prev = d
        return out.to(x.dtype)


def ode_sample(
    velocity: VelocityFn,
    x_init: torch.Tensor,
    sigmas: torch.Tensor,
    solver: Literal["euler", "dpm2"] = "dpm2",
) -> torch.Tensor:
    """Integrate the probability-flow ODE from sigma_0 to sigma_N = 0 with Euler or DPM-Solver++(2M)."""
    x = x_init
    dpm = DPMSolver2M(sigmas) if solver == "dpm2" else None
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        sigma_b = torch.full((x.shape[0],), s, dtype=torch.float32, device=x.device)
        v = velocity(x, sigma_b)
        x = dpm.step(i, x, v) if dpm is not None else euler_step(x, v, s, s_next)
    return x


def sde_std(sigma: float, sigma_1: float, noise_level: float) -> float:
    """Flow-GRPO's s_i = a sqrt(sigma / (1 - sigma')), sigma' = min(sigma, sigma_1): Flow-GRPO substitutes
    sigma_1 at sigma = 1; a clamp instead of an equality test also survives a first sigma of 0.9998 (§9.1)."""
    sigma_c = min(sigma, sigma_1)
    return noise_level * (sigma / (1 - sigma_c)) ** 0.5


def sde_step_with_logprob(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float,
    sigma_next: float,
    sigma_1: float,
    noise_level: float = 0.7,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """One Flow-GRPO SDE step (§6.1), all in float32.

        mu = x + [v + s^2/(2 sigma) (x + (1 - sigma) v)] dt,   dt = sigma_next - sigma < 0
        x_next = mu + s sqrt(-dt) eps
        log p(x_next | x) = mean_d [ -(x_next - mu)^2 / (2 s^2 (-dt)) - log(s sqrt(-dt)) - log(2 pi)/2 ]

    With ``prev_sample`` given, that sample is scored instead of drawing a new one (the training replay).
    Returns (x_next_bchw, logp_b, mu_bchw, std) where std = s sqrt(-dt) is the transition's std.
    """
    x32, v32 = x.float(), v.float()
    dt = sigma_next - sigma
    s = sde_std(sigma, sigma_1, noise_level)
    mu = x32 + (v32 + (s**2 / (2 * sigma)) * (x32 + (1 - sigma) * v32)) * dt
    std = s * (-dt) ** 0.5
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(x32.shape, generator=generator, device=x.device, dtype=torch.float32)
        x_next = mu + std * noise.float()
    else:
        x_next = prev_sample.float()
    logp = (
        -((x_next.detach() - mu) ** 2) / (2 * std**2)
        - torch.log(torch.tensor(std))
        - 0.5 * torch.log(torch.tensor(2 * torch.pi))
    )
    return x_next, logp.mean(dim=tuple(range(1, logp.ndim))), mu, std


def sde_sample(
    velocity: VelocityFn,
    x_init: torch.Tensor,
    sigmas: torch.Tensor,
    noise_level: float = 0.7,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flow-GRPO's rollout (§6.1): SDE steps recording every latent and each transition's log-prob.

    Returns (x0_bchw, trajectory_btchw with x at sigma_0..sigma_N, logp_bt of the N transitions). The last
    step (to sigma_N = 0) is taken deterministically (x_N = x - sigma v, logp 0): its SDE std would leave
    noise in the final image, and Flow-GRPO does not train on it (timestep_fraction 0.9 of 10 steps).
    """
    x = x_init.float()
    sigma_1 = float(sigmas[1])
    trajectory, logps = [x], []
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        v = velocity(x, torch.full((x.shape[0],), s, dtype=torch.float32, device=x.device)).float()
        if s_next == 0.0:
            x, logp = x - s * v, torch.zeros(x.shape[0], device=x.device)
        else:
            x, logp, _, _ = sde_step_with_logprob(x, v, s, s_next, sigma_1, noise_level, generator=generator)
        trajectory.append(x)
        logps.append(logp)
    return x, torch.stack(trajectory, 1), torch.stack(logps, 1)


def sde_window_sample(
    velocity: VelocityFn,
    x_init: torch.Tensor,
    sigmas: torch.Tensor,
    window: tuple[int, int],
    noise_level: float = 0.7,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MixGRPO's / Flow-GRPO-Fast's rollout (docs/algorithms.md §6.2, §6.3): the Flow-GRPO SDE step
    (noise level a, log-prob recorded) on the W steps [start, start + W) of ``window = (start, W)``, the
    deterministic Euler ODE step on every other step, before the window and after it. Euler after the window
    is what both upstreams do (MixGRPO-Flash's compressed DPM-Solver++ tail is not implemented), and it
    makes W = 0 exactly ``ode_sample(..., solver="euler")``.

    Only the window is recorded: returns (x0_bchw, trajectory_bwchw with x at sigma_start ..
    sigma_{start+W} (W + 1 latents; W = 0 keeps x_start alone), logp_bw of the W SDE transitions). The window must end before the last
    step (start + W <= N - 1): an SDE step to sigma_N = 0 would leave noise in the final image. Noise is
    drawn on the CPU from ``generator`` (one (B, ...) draw per window step) and moved to x's device, so a
    rollout is the same on every device.
    """
    start, size = window
    n = len(sigmas) - 1
    if start < 0 or size < 0 or start + size > n - 1:
        raise ValueError(
            f"SDE window (start {start}, size {size}) must lie within steps 0..{n - 2} of the {n}-step "
            "schedule (the last step, to sigma = 0, stays deterministic)"
        )
    x_bchw = x_init.float()
    b, sigma_1 = x_bchw.shape[0], float(sigmas[1])
    latents: list[torch.Tensor] = []  # x_start .. x_{start+W}, each (B, C, h, w)
    logps: list[torch.Tensor] = []  # W of them, each (B,)
    for i in range(n):
        if i == start:
            latents.append(x_bchw)
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        sigma_b = torch.full((b,), s, dtype=torch.float32, device=x_bchw.device)
        v_bchw = velocity(x_bchw, sigma_b).float()
        if start <= i < start + size:
            noise_bchw = torch.randn(x_bchw.shape, generator=generator, dtype=torch.float32).to(x_bchw.device)
            x_bchw, logp_b, _, _ = sde_step_with_logprob(
                x_bchw, v_bchw, s, s_next, sigma_1, noise_level, noise=noise_bchw
            )
            latents.append(x_bchw)
            logps.append(logp_b)
        else:
            x_bchw = euler_step(x_bchw, v_bchw, s, s_next)
    logp_bw = torch.stack(logps, 1) if logps else torch.zeros((b, 0), device=x_bchw.device)
    return x_bchw, torch.stack(latents, 1), logp_bw
