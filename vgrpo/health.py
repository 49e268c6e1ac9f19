"""Training health from the metrics rows (docs/training.md "Training health"): alarms a user can act on
while a run goes on, written into ``metrics.jsonl`` as ``health/<signal>`` (1 raised, 0 not) and exported
as the ``vgrpo_health`` gauge (the dashboard's "Training health" row).

- ``reward_hacking``: over the last ``window`` held-out evaluations the held-out score fell by more than
  ``margin`` while the mean training reward between them rose by more than ``margin`` — the policy found
  what the reward pays for and the task does not (the partial-credit shapes reward without its reference
  KL did exactly that: docs/training.md).
- ``no_signal``: for ``flat_steps`` steps in a row at least ``flat_frac`` of the prompt groups had every
  image scored alike (``adv/zero_std_frac``), so group-relative advantages are zero: the reward saturated
  (all pass) or collapsed (all fail), and updates carry no signal.

Each alarm is logged once when it is raised and once when it clears; it never stops the run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger("vgrpo")


@dataclass
class HealthWatch:
    window: int = 3  # evaluations compared (the first and the last of them)
    margin: float = 0.02  # how much the held-out score must fall, and the training reward rise
    flat_steps: int = 10
    flat_frac: float = 0.95
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, eval/overall)
    rewards: list[tuple[int, float]] = field(default_factory=list)  # (step, reward_mean)
    flat_run: int = 0
    raised: dict[str, bool] = field(default_factory=dict)

    def update(self, row: dict[str, Any]) -> dict[str, float]:
        """The ``health/*`` values for this step's row (with its ``eval/overall`` when it has one)."""
        step = int(row["step"])
        self.rewards.append((step, float(row["reward_mean"])))
        if "eval/overall" in row:
            self.evals.append((step, float(row["eval/overall"])))
        zero = float(row.get("adv/zero_std_frac", 0.0))
        self.flat_run = self.flat_run + 1 if zero >= self.flat_frac else 0
        out = {
            "health/reward_hacking": float(self._hacking()),
            "health/no_signal": float(self.flat_run >= self.flat_steps),
        }
        for key, value in out.items():
            self._say(key[7:], bool(value), step)
        return out

    def _hacking(self) -> bool:
        """The held-out score at the last evaluation is more than ``margin`` below the one ``window``
        evaluations back, while the mean training reward of the steps just before the last evaluation is
        more than ``margin`` above that of the steps just before the first (half an evaluation interval
        each)."""
        if len(self.evals) < self.window:
            return False
        (s0, e0), (s1, e1) = self.evals[-self.window], self.evals[-1]
        half = max(1, (s1 - s0) // (2 * (self.window - 1)))
        before = [r for s, r in self.rewards if s0 - half < s <= s0]
        after = [r for s, r in self.rewards if s1 - half < s <= s1]
        if not before or not after:
            return False
        return e1 < e0 - self.margin and float(np.mean(after)) - float(np.mean(before)) > self.margin

    def _say(self, signal: str, now: bool, step: int) -> None:
        was = self.raised.get(signal, False)
        if now and not was:
            why = {
                "reward_hacking": "the held-out score fell while the training reward rose over the last "
                f"{self.window} evaluations; look at samples/ before trusting the reward (a reference KL, "
                "a stricter reward, or an earlier checkpoint)",
                "no_signal": f"for {self.flat_steps} steps nearly every prompt group scored all its images "
                "alike: the advantages are zero (reward saturated or collapsed); raise group_size, change "
                "the prompt mix or the reward",
            }[signal]
            log.warning("training health, step %d: %s (health/%s)", step, why, signal)
        elif was and not now:
            log.warning("training health, step %d: health/%s cleared", step, signal)
        self.raised[signal] = now
