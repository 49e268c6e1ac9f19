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
    video: bool = False  # a video reward scores whole clips (F, H, W, 3); an image reward scores frames

    def score_samples(
        self, samples: list[np.ndarray], prompts: list[str], metadata: list[dict] | None = None
    ) -> list[ScoredItem]:
        """`score` for images, and for clips ``(F, H, W, 3)`` (a video family's samples): a video reward
        gets each clip whole, an image reward scores every frame and the clip gets the frames' mean
        (:func:`mean_over_frames`)."""
        if self.video or not samples or np.asarray(samples[0]).ndim != 4:
            return self.score(samples, prompts, metadata)
        frames, owner = flatten_clips(samples)
        meta = None if metadata is None else [metadata[k] for k in owner]
        items = self.score(frames, [prompts[k] for k in owner], meta)
        return mean_over_frames(items, owner, len(samples))

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


def flatten_clips(clips: np.ndarray | Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
    """Every frame of ``clips`` (each ``(F, H, W, 3)``) in order, and the clip index of each frame."""
    frames: list[np.ndarray] = []
    owner: list[int] = []
    for k, clip in enumerate(clips):
        frames.extend(np.asarray(clip))
        owner.extend([k] * len(clip))
    return frames, owner


def mean_over_frames(items: Sequence[ScoredItem], owner: Sequence[int], n: int) -> list[ScoredItem]:
    """One item per clip from its frames' items: the mean value, numeric details averaged (others from
    the first frame) with ``frames`` = the count; a frame that could not be scored fails its clip."""
    by_clip: list[list[ScoredItem]] = [[] for _ in range(n)]
    for item, k in zip(items, owner, strict=True):
        by_clip[k].append(item)
    out = []
    for frames in by_clip:
        bad = next(((j, it) for j, it in enumerate(frames) if it.value is None or it.error), None)
        if bad is not None or not frames:
            j, it = bad if bad is not None else (0, ScoredItem(None, "no frames"))
            out.append(ScoredItem(None, error=f"frame {j}: {it.error or 'no value'}"))
            continue
        details = dict(frames[0].details)
        for key in frames[0].details:
            values = [f.details.get(key) for f in frames]
            if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values):
                details[key] = float(np.mean([float(x) for x in values]))  # type: ignore[arg-type]
        details["frames"] = len(frames)
        out.append(ScoredItem(float(np.mean([f.value for f in frames])), details=details))  # type: ignore[misc]
    return out
