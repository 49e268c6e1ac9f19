"""The GenEval-Shapes prompt grammar (docs/geneval-shapes.md "Prompts"): the six GenEval templates' wording
and the parser that turns a prompt into the clauses the reward checks. Prompt generation (random prompts,
scenes that satisfy them, the committed splits) lives with data loading in `vgrpo/shapes/prompts.py`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from vgrpo.reward_servers.shapes.spec import (
    COLORS,
    COUNTS,
    FAMILIES,
    RELATIONS,
    SHAPES,
    plural,
    with_article,
)

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_PLURAL_TO_SHAPE = {plural(s): s for s in SHAPES}
_COUNT_WORDS = {v: k for k, v in COUNTS.items()}


class PromptError(ValueError):
    """A prompt outside the GenEval-Shapes vocabulary or templates; the message names the offending word."""


@dataclass(frozen=True)
class Clause:
    """One checkable statement of a prompt: `present` (at least one `shape`), `count` (exactly `count` of
    `shape`), `color` (some `shape` coloured `color`) or `relation` (some `shape` is `relation` some
    `other`)."""

    kind: str
    shape: str
    count: int = 1
    color: str | None = None
    relation: str | None = None
    other: str | None = None

    @property
    def description(self) -> str:
        if self.kind == "present":
            return f"{with_article(self.shape)} is present"
        if self.kind == "count":
            return f"exactly {self.count} {plural(self.shape)}"
        if self.kind == "color":
            return f"{with_article(f'{self.color} {self.shape}')}"
        return f"{with_article(self.shape)} {self.relation} {with_article(str(self.other))}"


@dataclass
class ParsedPrompt:
    """A prompt, its GenEval family and its clauses (the training reward is the fraction that hold)."""

    family: str
    text: str
    clauses: list[Clause] = field(default_factory=list)

    def metadata(self) -> dict:
        """The prompt as a row of GenEval's `evaluation_metadata.jsonl` (tag, include, exclude, prompt)."""
        include: list[dict] = []
        exclude: list[dict] = []
        for c in self.clauses:
            if c.kind == "count":
                include = [{"class": c.shape, "count": c.count}]
                exclude = [{"class": c.shape, "count": c.count + 1}]
            elif c.kind == "color":
                next(i for i in include if i["class"] == c.shape)["color"] = c.color
            elif c.kind == "relation":  # GenEval lists the reference object first
                include = [
                    {"class": c.other, "count": 1},
                    {"class": c.shape, "count": 1, "position": [c.relation, 0]},
                ]
            elif c.kind == "present" and self.family != "counting":
                include.append({"class": c.shape, "count": 1})
        return {"tag": self.family, "include": include, "exclude": exclude, "prompt": self.text}


def _unknown(word: str, text: str) -> PromptError:
    return PromptError(
        f"unknown word {word!r} in prompt {text!r}; known shapes: {', '.join(SHAPES)}; "
        f"colours: {', '.join(COLORS)}; counts: {', '.join(COUNTS)}; relations: {', '.join(RELATIONS)}"
    )


_VOCAB = {
    "a",
    "an",
    "photo",
    "of",
    "and",
    "left",
    "right",
    "above",
    "below",
    *SHAPES,
    *_PLURAL_TO_SHAPE,
    *COLORS,
    *COUNTS,
}


def _noun_phrase(words: list[str], text: str) -> tuple[str, str | None, int | None]:
    """`a|an [colour] shape` or `count shapes` -> (shape, colour, count or None)."""
    template = f"prompt {text!r} does not follow a GenEval-Shapes template (e.g. 'a photo of a red circle')"
    if len(words) < 2:
        raise PromptError(template)
    head, rest = words[0], words[1:]
    if head not in ("a", "an") and head not in COUNTS:
        raise PromptError(f"{template}: expected 'a', 'an' or a count before {' '.join(rest)!r}")
    color = None
    if rest[0] in COLORS and len(rest) == 2:
        color, rest = rest[0], rest[1:]
    if len(rest) != 1 or (rest[0] not in SHAPES and rest[0] not in _PLURAL_TO_SHAPE):
        raise PromptError(f"{template}: expected a shape, got {' '.join(rest)!r}")
    shape = _PLURAL_TO_SHAPE.get(rest[0], rest[0])
    if head in COUNTS:
        if color is not None:
            raise PromptError(f"{template}: a counting prompt names no colour")
        return shape, None, COUNTS[head]
    return shape, color, None


def parse_prompt(text: str) -> ParsedPrompt:
    """Parses one of the six templates (either article, singular or plural shapes, any case and spacing)
    into its family and clauses; raises PromptError naming the first word outside the vocabulary."""
    words = re.sub(r"[.,!]", " ", text.lower()).split()
    for w in words:
        if w not in _VOCAB:
            raise _unknown(w, text)
    if words[:3] != ["a", "photo", "of"]:
        raise PromptError(f"prompt {text!r} does not start with 'a photo of' (GenEval's templates all do)")
    body = words[3:]
    relation = next((r for r in RELATIONS if f" {r} " in f" {' '.join(body)} "), None)
    if relation is not None:
        n = len(relation.split())
        i = next(j for j in range(len(body)) if body[j : j + n] == relation.split())
        (s1, c1, k1), (s2, c2, k2) = _noun_phrase(body[:i], text), _noun_phrase(body[i + n :], text)
        if c1 or c2 or k1 or k2:
            raise PromptError(f"prompt {text!r}: a position prompt is 'a photo of a SHAPE RELATION a SHAPE'")
        if s1 == s2:
            raise PromptError(f"prompt {text!r}: the two shapes of a position prompt must differ")
        return ParsedPrompt(
            "position",
            text,
            [
                Clause("present", s1),
                Clause("present", s2),
                Clause("relation", s1, relation=relation, other=s2),
            ],
        )
    if "and" in body:
        i = body.index("and")
        (s1, c1, k1), (s2, c2, k2) = _noun_phrase(body[:i], text), _noun_phrase(body[i + 1 :], text)
        if k1 or k2 or (c1 is None) != (c2 is None):
            raise PromptError(f"prompt {text!r}: two objects take an article each, and a colour each or none")
        if s1 == s2:
            raise PromptError(
                f"prompt {text!r}: the two shapes must differ (GenEval's two_object/color_attr)"
            )
        if c1 is None:
            return ParsedPrompt("two_object", text, [Clause("present", s1), Clause("present", s2)])
        if c1 == c2:
            raise PromptError(f"prompt {text!r}: the two colours of a color_attr prompt must differ")
        clauses = [Clause("present", s1), Clause("present", s2)]
        return ParsedPrompt(
            "color_attr", text, [*clauses, Clause("color", s1, color=c1), Clause("color", s2, color=c2)]
        )
    shape, color, count = _noun_phrase(body, text)
    if count is not None:
        return ParsedPrompt("counting", text, [Clause("present", shape), Clause("count", shape, count=count)])
    if color is not None:
        return ParsedPrompt("colors", text, [Clause("present", shape), Clause("color", shape, color=color)])
    return ParsedPrompt("single_object", text, [Clause("present", shape)])


def prompt_text(
    family: str, shapes: list[str], colors: list[str] | None = None, count: int = 1, relation: str = ""
) -> str:
    """The GenEval wording of a prompt (with GenEval's `with_article`)."""
    c = colors or []
    if family == "single_object":
        return f"a photo of {with_article(shapes[0])}"
    if family == "two_object":
        return f"a photo of {with_article(shapes[0])} and {with_article(shapes[1])}"
    if family == "counting":
        return f"a photo of {_COUNT_WORDS[count]} {plural(shapes[0])}"
    if family == "colors":
        return f"a photo of {with_article(f'{c[0]} {shapes[0]}')}"
    if family == "position":
        return f"a photo of {with_article(shapes[0])} {relation} {with_article(shapes[1])}"
    if family == "color_attr":
        return f"a photo of {with_article(f'{c[0]} {shapes[0]}')} and {with_article(f'{c[1]} {shapes[1]}')}"
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
