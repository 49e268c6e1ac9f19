"""MixGRPO (Li et al., arXiv 2507.21802; Tencent-Hunyuan/MixGRPO), docs/algorithms.md §6.2: Flow-GRPO
on a sliding SDE window.

The rollout takes the Flow-GRPO SDE step (a = 0.7, log-prob recorded) on the W steps [w, w + W) and the
deterministic Euler ODE step elsewhere (MixGRPO-Flash's compressed DPM-Solver++ tail after the window is
not implemented). The window starts at 0 and moves by ``shift_step`` (upstream prog_overlap_step 1) every
``shift_every`` training steps (upstream iters_per_group 25); past ``max_start`` it rolls back to 0. The
loss is Flow-GRPO's clipped objective (§6.1) on the window's W transitions, with clip 1e-4, |A| <= 5,
per-group z-scored advantages (eps 1e-8) and no KL by default:

    rho_j = exp(log p_theta(x_{j+1} | x_j) - log p_old_j),      j = w .. w + W - 1
    loss  = mean_j mean max(-A rho_j, -A clip(rho_j, 1 - eps, 1 + eps))      (+ beta KL_j if kl_beta > 0)
"""

from __future__ import annotations

from vgrpo.learner.objectives.flow_grpo import WindowedFlowGRPO
from vgrpo.proto.config import MixGRPOConfig


def mixgrpo_window_start(
    step: int,
    num_steps: int,
    size: int,
    shift_every: int,
    shift_step: int = 1,
    max_start: int | None = None,
) -> int:
    """The window start of training step ``step`` (1-based): 0 for the first ``shift_every`` steps, then
    ``shift_step`` further every ``shift_every`` steps, back to 0 once it would pass ``max_start`` (None:
    ``num_steps - 1 - size``, the last start whose window ends before the final step to sigma = 0).

    Upstream's GRPOTrainingStates with roll_back: ``cur += prog_overlap_step`` every iters_per_group
    iterations, back to 0 when past its maximum. A pure function of the step, so a resumed run continues
    the sweep where it was."""
    last = num_steps - 1 - size if max_start is None else max_start
    if last < 0:
        raise ValueError(f"an SDE window of {size} steps does not fit a {num_steps}-step schedule")
    positions = last // shift_step + 1  # starts 0, s, 2s, ... <= last
    return ((step - 1) // shift_every % positions) * shift_step


class MixGRPO(WindowedFlowGRPO):
    name = "mixgrpo"

    cfg: MixGRPOConfig

    def window_start(self, step: int, num_steps: int, seed: int) -> int:
        c = self.cfg
        return mixgrpo_window_start(
            step, num_steps, c.sde_window_size, c.shift_every, c.shift_step, c.max_start
        )
