"""The GenEval-Shapes reward (docs/geneval-shapes.md): the programmatic detector + GenEval's rules. `value`
is the training reward (the fraction of the prompt's clauses that hold); `details` carries the binary
evaluation `score`, each clause's outcome and the detections."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from vgrpo.reward_servers.base import Reward, ScoredItem
from vgrpo.reward_servers.shapes.detector import detect
from vgrpo.reward_servers.shapes.grammar import PromptError, parse_prompt
from vgrpo.reward_servers.shapes.rules import evaluate
from vgrpo.reward_servers.shapes.spec import REFERENCE_SIZE

# partial: the fraction of clauses that hold (docs/geneval-shapes.md's training reward); binary: GenEval's
# evaluation score; mixed: their mean (a pass is worth twice any near-miss, so partial credit alone
# cannot outbid composing the scene right).
MODES = ("partial", "binary", "mixed")


def _value(verdict_reward: float, verdict_score: float, mode: str) -> float:
    if mode == "binary":
        return verdict_score
    if mode == "mixed":
        return 0.5 * (verdict_reward + verdict_score)
    return verdict_reward


class ShapesReward(Reward):
    """Scores images of any size against GenEval-Shapes prompts (images are resized to `size` first)."""

    name = "shapes"

    def __init__(self, size: int = REFERENCE_SIZE, mode: str = "partial") -> None:
        if not isinstance(size, int) or size < 16:
            raise ValueError(
                f"shapes reward option size={size!r}: want an int >= 16 (the spec image size, 64)"
            )
        if mode not in MODES:
            raise ValueError(f"shapes reward option mode={mode!r}: want one of {', '.join(MODES)}")
        self.size = size
        self.mode = mode

    def score(
        self, images: list[np.ndarray], prompts: list[str], metadata: list[dict] | None = None
    ) -> list[ScoredItem]:
        self.check_batch(images, prompts, metadata)
        out = []
        for image, prompt in zip(images, prompts, strict=True):
            try:
                parsed = parse_prompt(prompt)
            except PromptError as e:
                out.append(ScoredItem(None, error=str(e)))
                continue
            dets = detect(image, self.size)
            verdict = evaluate(parsed, dets)
            details = {
                "score": verdict.score,
                "family": verdict.family,
                "clauses": verdict.to_dict()["clauses"],
                "detections": [asdict(d) for d in dets],
            }
            out.append(ScoredItem(_value(verdict.reward, verdict.score, self.mode), details=details))
        return out
