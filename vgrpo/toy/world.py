"""A toy world that proves the objectives learn, without images or Ray.

Each of K conditions ("prompts") has a 2-D target distribution: an equal mixture of two Gaussian modes
on a circle, at angles phi_k - delta and phi_k + delta. A small conditional flow-matching MLP pretrained on
it samples both modes equally; the reward prefers the ``+delta`` mode (a Gaussian bump around it), so the
mean reward of the pretrained policy is about half of the attainable one and RL must move mass between
modes, as RL on a text-to-image model moves mass towards images that satisfy the prompt.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from vgrpo.core.flow import interpolate
from vgrpo.learner.objectives.base import Which


@dataclass(frozen=True)
class ToyWorld:
    num_conditions: int = 4
    radius: float = 2.5
    delta: float = 0.6  # half the angle between a condition's two modes (radians)
    mode_std: float = 0.25
    reward_width: float = 0.5

    def modes(self, cond_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(good_b2, bad_b2): the rewarded and the unrewarded mode centre of each condition."""
        phi_b = 2 * math.pi * cond_b.double() / self.num_conditions
        good = self.radius * torch.stack([torch.cos(phi_b + self.delta), torch.sin(phi_b + self.delta)], -1)
        bad = self.radius * torch.stack([torch.cos(phi_b - self.delta), torch.sin(phi_b - self.delta)], -1)
        return good.float(), bad.float()

    def sample_data(self, cond_b: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        good, bad = self.modes(cond_b)
        pick_b1 = torch.rand(len(cond_b), 1, generator=generator) < 0.5
        centre = torch.where(pick_b1, good, bad)
        return centre + self.mode_std * torch.randn(centre.shape, generator=generator)

    def reward(self, x_b2: torch.Tensor, cond_b: torch.Tensor) -> torch.Tensor:
        """exp(-|x - good|^2 / (2 w^2)) in (0, 1]."""
        good, _ = self.modes(cond_b)
        return torch.exp(-((x_b2.float() - good) ** 2).sum(-1) / (2 * self.reward_width**2))


class ToyFlowMLP(nn.Module):
    """v_theta(x, sigma, cond): an MLP on [x, sinusoidal(sigma), embedding(cond)]."""

    def __init__(self, num_conditions: int, dim: int = 2, hidden: int = 128, time_features: int = 16):
        super().__init__()
        self.time_features = time_features
        self.embed = nn.Embedding(num_conditions, 16)
        self.net = nn.Sequential(
            nn.Linear(dim + time_features + 16, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, dim),
        )

    def forward(self, x_bd: torch.Tensor, sigma_b: torch.Tensor, cond_b: torch.Tensor) -> torch.Tensor:
        freqs = torch.arange(self.time_features // 2, dtype=torch.float32, device=x_bd.device)
        angles = sigma_b.float()[:, None] * (2.0**freqs)[None] * math.pi
        t_emb = torch.cat([torch.sin(angles), torch.cos(angles)], -1)
        return self.net(torch.cat([x_bd.float(), t_emb, self.embed(cond_b)], -1))


class ToyPolicy:
    """The FlowPolicy of the toy: the trainable MLP, an old copy (behaviour or EMA) and a frozen reference."""

    def __init__(self, model: ToyFlowMLP):
        self.current = model
        self.ref = copy.deepcopy(model).requires_grad_(False)
        self.old = copy.deepcopy(model).requires_grad_(False)
        self._old_is_current = True

    def velocity(
        self, x_bchw: torch.Tensor, sigma_b: torch.Tensor, cond, which: Which = "current"
    ) -> torch.Tensor:
        net = {"current": self.current, "old": self.old, "ref": self.ref}[which]
        return net(x_bchw, sigma_b, cond)

    def old_is_current(self) -> bool:
        return self._old_is_current

    def sync_old(self) -> None:
        """old := current (the behaviour policy of the batch about to be trained on)."""
        self.old.load_state_dict(self.current.state_dict())
        self._old_is_current = True

    @torch.no_grad()
    def ema_old(self, decay: float) -> None:
        """old <- d old + (1 - d) current (DiffusionNFT, DGPO)."""
        for p_old, p in zip(self.old.parameters(), self.current.parameters(), strict=True):
            p_old.mul_(decay).add_(p.detach(), alpha=1 - decay)
        self._old_is_current = decay == 0.0

    def mark_updated(self) -> None:
        self._old_is_current = False


@lru_cache(maxsize=4)
def _pretrained_state(world: ToyWorld, seed: int, steps: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ToyFlowMLP(world.num_conditions)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(steps):
        cond_b = torch.randint(0, world.num_conditions, (256,), generator=gen)
        x0 = world.sample_data(cond_b, gen)
        eps = torch.randn(x0.shape, generator=gen)
        t_b = torch.rand(256, generator=gen)
        x_t = interpolate(x0, eps, t_b[:, None])
        loss = ((model(x_t, t_b, cond_b) - (eps - x0)) ** 2).mean()  # rectified-flow regression v* = eps - x0
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def pretrained_model(world: ToyWorld, seed: int = 0, steps: int = 1500) -> ToyFlowMLP:
    """The conditional flow model pretrained on the world's data (cached per process: a few seconds)."""
    model = ToyFlowMLP(world.num_conditions)
    model.load_state_dict(_pretrained_state(world, seed, steps))
    return model
