"""Flow-GRPO-Fast (yifan123/flow_grpo's fast mode), docs/algorithms.md §6.3: Flow-GRPO on a short random
SDE window.

Each rollout batch draws one window start uniformly, ``start ~ U{r0, ..., r1 - W}`` with
``sde_window_range = (r0, r1) = (0, 5)`` and ``W = sde_window_size = 2``; the rollout takes the Flow-GRPO
SDE step on steps [start, start + W) and the Euler ODE step elsewhere, recording only the window. The loss
is Flow-GRPO's clipped objective and KL to the reference (§6.1) on those W transitions:

    rho_j = exp(log p_theta(x_{j+1} | x_j) - log p_old_j),      j = start .. start + W - 1
    loss  = mean_j [ mean max(-A rho_j, -A clip(rho_j, 1 - eps, 1 + eps)) + beta KL_j ]

so the learner runs W transformer passes per image instead of ~N - 1.
"""

from __future__ import annotations

import numpy as np

from vgrpo.learner.objectives.flow_grpo import WindowedFlowGRPO
from vgrpo.proto.config import FlowGRPOFastConfig

WINDOW_STREAM = 0x5DE  # keeps the window's draws apart from the noise seeds' (driver.derive_seeds)


def fast_window_start(seed: int, step: int, size: int, window_range: tuple[int, int]) -> int:
    """The window start of training step ``step``: uniform on {r0, ..., r1 - size}, a pure function of
    (train.seed, step), so a resumed run (and a redone share of a step) draws the same window. Upstream
    draws it with Python's ``random.randint(r0, r1 - size)`` per batch."""
    r0, r1 = window_range
    if r1 - r0 < size:
        raise ValueError(f"sde_window_range {window_range} is narrower than sde_window_size = {size}")
    rng = np.random.default_rng([seed % 2**63, step, WINDOW_STREAM])
    return int(rng.integers(r0, r1 - size + 1))


class FlowGRPOFast(WindowedFlowGRPO):
    name = "flow_grpo_fast"

    cfg: FlowGRPOFastConfig

    def window_start(self, step: int, num_steps: int, seed: int) -> int:
        return fast_window_start(seed, step, self.cfg.sde_window_size, self.cfg.sde_window_range)
