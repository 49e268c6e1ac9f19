"""Judges detections against a prompt with GenEval's rules (docs/geneval-shapes.md "Prompts", docs/algorithms.md
§7.1): every clause of the prompt gets an outcome and a reason; the evaluation score is 1 iff all hold
(GenEval's binary metric) and the training reward is the fraction that hold (partial credit)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from vgrpo.reward_servers.shapes.detector import Detection
from vgrpo.reward_servers.shapes.grammar import Clause, ParsedPrompt, parse_prompt
from vgrpo.reward_servers.shapes.spec import plural, relations


@dataclass(frozen=True)
class ClauseOutcome:
    """One clause of the prompt, whether it holds in the image, and why (what was found)."""

    kind: str
    description: str
    passed: bool
    why: str


@dataclass
class Verdict:
    """A prompt judged on one image: the per-clause outcomes, `score` (1 iff every clause holds, GenEval's
    evaluation metric) and `reward` (the fraction of clauses that hold: the dense training reward, exactly
    1 when the image passes)."""

    prompt: str
    family: str
    clauses: list[ClauseOutcome] = field(default_factory=list)

    @property
    def score(self) -> float:
        return float(all(c.passed for c in self.clauses))

    @property
    def reward(self) -> float:
        return sum(c.passed for c in self.clauses) / len(self.clauses) if self.clauses else 0.0

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "family": self.family,
            "score": self.score,
            "reward": self.reward,
            "clauses": [{"clause": c.description, "passed": c.passed, "why": c.why} for c in self.clauses],
        }


def _name(d: Detection) -> str:
    return f"{d.color} {d.shape} at ({d.cx:g}, {d.cy:g})"


def _found(dets: Sequence[Detection]) -> str:
    return ", ".join(f"{d.color} {d.shape}" for d in dets) or "nothing"


def check_clause(clause: Clause, dets: Sequence[Detection]) -> ClauseOutcome:
    """One clause under the spec's rules: `present` needs at least one instance, `count` exactly `count`
    (GenEval's include count + exclude count + 1), `color` some instance of that colour, `relation` some
    pair standing in GenEval's relation (box widths on x, heights on y, y down)."""
    inst = [d for d in dets if d.shape == clause.shape]
    missing = f"no {clause.shape} found (found: {_found(dets)})"
    if clause.kind == "present":
        ok, why = bool(inst), (f"found {len(inst)}" if inst else missing)
    elif clause.kind == "count":
        ok = len(inst) == clause.count
        why = f"found {len(inst)} {plural(clause.shape)}, want exactly {clause.count}"
    elif clause.kind == "color":
        hits = [d for d in inst if d.color == clause.color]
        ok = bool(hits)
        if hits:
            why = f"{_name(hits[0])}"
        else:
            why = (
                f"the {plural(clause.shape)} found are {', '.join(d.color for d in inst)}"
                if inst
                else missing
            )
    else:
        refs = [d for d in dets if d.shape == clause.other]
        ok, why = False, missing if not inst else f"no {clause.other} found (found: {_found(dets)})"
        for a in inst:
            for b in refs:
                rel = relations((a.cx, a.cy), (a.width, a.height), (b.cx, b.cy), (b.width, b.height))
                ok = clause.relation in rel
                why = f"{_name(a)} is {' and '.join(sorted(rel)) or 'not clearly placed'} relative to {_name(b)}"
                if ok:
                    break
            if ok:
                break
    return ClauseOutcome(clause.kind, clause.description, ok, why)


def evaluate(prompt: str | ParsedPrompt, detections: Sequence[Detection]) -> Verdict:
    """The prompt's clauses judged on the detections of one image (raises PromptError for a prompt
    outside the vocabulary)."""
    p = prompt if isinstance(prompt, ParsedPrompt) else parse_prompt(prompt)
    return Verdict(p.text, p.family, [check_clause(c, detections) for c in p.clauses])
