"""The reward interface every reward server implements (the shapes detector, GenEval, PickScore, OCR,
user plug-ins), in-process or behind a Ray Serve deployment: a batch of images and prompts in, one
ScoredItem per input out, in the same order."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class ScoredItem:
    """One image's reward: `value` (None when it could not be scored), `error` (why not: a per-item
    problem such as a prompt outside the vocabulary, never an exception for the whole batch) and
    reward-specific `details` (JSON-serialisable)."""

    value: float | None
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Reward(ABC):
    """A reward model. `score` takes uint8 H x W x 3 images of any size and their prompts (and optional
    per-item metadata, e.g. GenEval's include/exclude rows) and returns one ScoredItem per input."""

    name: str = ""

    @abstractmethod
    def score(
        self, images: list[np.ndarray], prompts: list[str], metadata: list[dict] | None = None
    ) -> list[ScoredItem]: ...

    def check_batch(self, images: list[np.ndarray], prompts: list[str], metadata: list[dict] | None) -> None:
        """Raises ValueError when the batch itself is malformed (a caller's bug, not an item's problem)."""
        if len(images) != len(prompts) or (metadata is not None and len(metadata) != len(images)):
            n_meta = "none" if metadata is None else len(metadata)
            raise ValueError(
                f"reward {self.name!r}: {len(images)} images, {len(prompts)} prompts and {n_meta} metadata rows; "
                "pass one prompt (and metadata row) per image"
            )


def batches(
    images: Sequence[Any], prompts: Sequence[str], size: int
) -> Iterator[tuple[list[Any], list[str]]]:
    """Consecutive slices of at most ``size`` images with their prompts: a reward model's forward batches."""
    for start in range(0, len(images), size):
        yield list(images[start : start + size]), list(prompts[start : start + size])
