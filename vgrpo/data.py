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
    balance_by: str | None = None

    @classmethod
    def from_spec(
        cls, spec: str, seed: int = 0, shuffle: bool = True, balance_by: str | None = None
    ) -> PromptSource:
        rows = load_prompt_rows(spec, strict=False)
        if not rows:
            raise ValueError(f"data.train_prompts = {spec!r} holds no prompt")
        if balance_by is not None:
            missing = [i for i, r in enumerate(rows) if balance_by not in r]
            if missing:
                raise ValueError(
                    f"data.balance_by = {balance_by!r}: line {missing[0] + 1} of {spec} has no such field; "
                    "fix: give every prompt that metadata field or --set data.balance_by=null"
                )
        return cls(rows, seed, shuffle, balance_by=balance_by)

    def _order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        if self.balance_by is not None:
            return self._balanced_order(rng)
        if not self.shuffle:
            return np.arange(len(self.rows))
        return rng.permutation(len(self.rows))

    def _balanced_order(self, rng: np.random.Generator) -> np.ndarray:
        """Round-robin over the groups of ``balance_by`` (GenEval's families with ``tag``): every group is
        drawn equally often, whatever its size; an epoch ends when the largest group is exhausted and the
        smaller ones cycle (each reshuffled when it restarts)."""
        key_field = str(self.balance_by)
        groups: dict[str, list[int]] = {}
        for i, row in enumerate(self.rows):
            groups.setdefault(str(row[key_field]), []).append(i)
        longest = max(len(g) for g in groups.values())
        seqs = {}
        for key, idx in sorted(groups.items()):
            reps = -(-longest // len(idx))
            seqs[key] = np.concatenate(
                [rng.permutation(idx) if self.shuffle else np.array(idx) for _ in range(reps)]
            )[:longest]
        keys = sorted(seqs)
        rounds = [
            seqs[keys[j]][k]
            for k in range(longest)
            for j in (rng.permutation(len(keys)) if self.shuffle else range(len(keys)))
        ]
        return np.array(rounds, dtype=np.int64)

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
