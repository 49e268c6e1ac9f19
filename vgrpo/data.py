"""Prompt sources for training: a prompt file read once, shuffled per epoch from the run's seed, handed
out in steps of ``prompts_per_step`` and resumable from its position (epoch, index)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from vgrpo.evaluate import load_prompt_rows
from vgrpo.proto.messages import PromptItem


@dataclass
class PromptSource:
    rows: list[dict[str, Any]]
    seed: int = 0
    shuffle: bool = True
    epoch: int = 0
    index: int = 0

    @classmethod
    def from_spec(cls, spec: str, seed: int = 0, shuffle: bool = True) -> PromptSource:
        rows = load_prompt_rows(spec)
        if not rows:
            raise ValueError(f"data.train_prompts = {spec!r} holds no prompt")
        return cls(rows, seed, shuffle)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.rows))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def next(self, n: int) -> list[PromptItem]:
        """The next ``n`` prompts; an epoch boundary reshuffles (each prompt once per epoch)."""
        out: list[PromptItem] = []
        order = self._order(self.epoch)
        while len(out) < n:
            if self.index >= len(order):
                self.epoch, self.index = self.epoch + 1, 0
                order = self._order(self.epoch)
            i = int(order[self.index])
            row = self.rows[i]
            meta = {k: v for k, v in row.items() if k != "prompt"}
            out.append(PromptItem(prompt=row["prompt"], prompt_id=i, metadata=meta))
            self.index += 1
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
