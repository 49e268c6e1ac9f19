"""Held-out evaluation of a policy: GenEval-Shapes (scored as GenEval scores, Ghosh et al., 2023), GenEval,
OCR and PickScore.

Sampling is the shared core's (`core/heldout.py`: fixed seeds, the deterministic ODE sampler, so two
evaluations of the same weights agree exactly); scoring is a reward server's `Reward` (`shapes`:
`reward_servers/shapes/`, an image scores 1 when every clause of its prompt holds, docs/geneval-shapes.md);
this module tabulates: a family's score is the mean over its images, and ``overall`` is the mean over
families (GenEval's table) or over images (OCR, PickScore). During training a rollout worker samples and
the driver scores and tabulates (`HeldoutTable`); `vgrpo eval` does all three in one process.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from vgrpo.core.heldout import heldout_seeds, heldout_settings, sample_chunks
from vgrpo.core.policy import Sampler, StableDiffusion3Pipeline

FAMILY_ORDER = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
BUILTIN_PREFIX = "builtin:shapes/"


def load_prompt_rows(
    spec: str | Path, max_prompts: int | None = None, strict: bool = True
) -> list[dict[str, Any]]:
    """Prompt rows ``{"prompt", "tag", ...}`` from ``builtin:shapes/<split>``, a ``.jsonl`` file (GenEval
    metadata: one object a line with ``prompt`` and ``tag``) or a ``.txt`` file (one prompt a line, the
    family parsed from the GenEval-Shapes grammar). ``strict``: a prompt outside that grammar without a
    ``tag`` is an error (evaluation); otherwise it is kept untagged (training prompts of any reward)."""
    from vgrpo.reward_servers.shapes.grammar import PromptError, parse_prompt
    from vgrpo.shapes.prompts import load_split

    text = str(spec)
    if text.startswith(BUILTIN_PREFIX):
        rows = [dict(r) for r in load_split(text[len(BUILTIN_PREFIX) :])]
    else:
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(
                f"prompt file {text!r} does not exist; fix: give a .jsonl/.txt file or builtin:shapes/heldout"
            )
        try:
            lines = path.read_text().splitlines()
        except UnicodeDecodeError:
            raise ValueError(f"prompt file {text!r} is not UTF-8 text") from None
        numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
        if path.suffix == ".jsonl":
            rows = []
            for n, line in numbered:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n} is not JSON ({e.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                    raise ValueError(
                        f"{path} line {n} has no string 'prompt'; fix: one object a line with it"
                    )
                rows.append(row)
        else:
            rows = [{"prompt": line.strip()} for _, line in numbered]
        for (n, _), row in zip(numbered, rows, strict=True):
            if "tag" not in row:
                try:
                    row["tag"] = _family_of(parse_prompt, row["prompt"])
                except PromptError as e:
                    if strict:
                        raise PromptError(f"{path} line {n}: {e}") from None
    if not rows:
        raise ValueError(f"prompt file {text!r} holds no prompts; fix: give a file with one prompt a line")
    return rows[:max_prompts] if max_prompts else rows


def _family_of(parse_prompt: Any, prompt: str) -> str:
    parsed = parse_prompt(prompt)
    for attr in ("family", "tag"):
        if hasattr(parsed, attr):
            return str(getattr(parsed, attr))
    if isinstance(parsed, dict):
        return str(parsed.get("family") or parsed.get("tag"))
    return "unknown"


def format_table(result: dict[str, Any], title: str = "GenEval-Shapes") -> Any:
    """A GenEval-like table (rich): one row per family with its score, then the overall mean."""
    from rich.table import Table

    counts: dict[str, int] = defaultdict(int)
    for p in result["prompts"]:
        counts[p["tag"]] += len(p["images"])
    table = Table(title=f"{title} ({result['num_images']} images)")
    table.add_column("task")
    table.add_column("images", justify="right")
    table.add_column("score", justify="right")
    for family, score in result["families"].items():
        table.add_row(family, str(counts[family]), f"{score:.3f}")
    table.add_section()
    table.add_row("overall", str(result["num_images"]), f"{result['overall']:.3f}", style="bold")
    return table


def print_table(result: dict[str, Any], title: str = "GenEval-Shapes") -> None:
    """Print :func:`format_table` to the terminal."""
    from rich.console import Console

    Console().print(format_table(result, title))


def save_grid(
    images_nhwc: np.ndarray, captions: list[str], path: str | Path, columns: int = 8, scale: int = 2
) -> None:
    """A PNG grid of images (clips as frame strips), each with its caption (wrapped) beneath, for looking at
    before trusting numbers."""
    from PIL import Image, ImageDraw

    from vgrpo.run_dir import frame_strips

    images_nhwc = frame_strips(np.asarray(images_nhwc))
    n = len(images_nhwc)
    h, w = images_nhwc.shape[1] * scale, images_nhwc.shape[2] * scale
    cap_h = 34
    rows = (n + columns - 1) // columns
    canvas = Image.new("RGB", (columns * w, rows * (h + cap_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (image, caption) in enumerate(zip(images_nhwc, captions, strict=True)):
        x, y = (k % columns) * w, (k // columns) * (h + cap_h)
        canvas.paste(Image.fromarray(image).resize((w, h), Image.Resampling.NEAREST), (x, y))
        words, lines, line = caption.removeprefix("a photo of ").split(), [], ""
        for word in words:
            if len(line) + len(word) + 1 > w // 6:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        for li, text in enumerate(lines[:3]):
            draw.text((x + 2, y + h + 1 + 10 * li), text, fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def strip_images(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON-serialisable part of a result (without the ``images`` array)."""
    return {k: v for k, v in result.items() if k != "images"}


# ------------------------------------------------------------------- GenEval / OCR / PickScore benchmarks

REWARD_BENCHMARKS = ("geneval", "ocr", "pickscore")
BENCHMARKS = ("shapes", *REWARD_BENCHMARKS)


def load_benchmark_rows(
    spec: str | Path, benchmark: str, max_prompts: int | None = None
) -> list[dict[str, Any]]:
    """Prompt rows for a reward benchmark: a ``.jsonl`` file (one object a line with ``prompt``; for
    GenEval its own metadata format with ``tag``, ``include``, ``exclude``) or a text file (one prompt a
    line). ``tag`` defaults to the benchmark's name. Raises ValueError naming the first unusable row:
    GenEval rows without their metadata, OCR prompts without quoted text."""
    path = Path(str(spec))
    if not path.is_file():
        raise FileNotFoundError(
            f"--prompts {str(spec)!r} does not exist; fix: give the benchmark's prompt file "
            "(GenEval: its evaluation_metadata.jsonl; OCR/PickScore: .jsonl with 'prompt' or .txt)"
        )
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(lines, start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n} is not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path} line {n} has no string 'prompt'")
            rows.append(row)
    else:
        rows = [{"prompt": line.strip()} for line in lines]
    if not rows:
        raise ValueError(f"{path} holds no prompts; fix: give the benchmark's prompt file")
    rows = rows[:max_prompts] if max_prompts else rows
    for row in rows:
        row.setdefault("tag", benchmark)
    if benchmark == "geneval":
        from vgrpo.reward_servers.geneval import metadata_problem

        for n, row in enumerate(rows):
            problem = metadata_problem(row)
            if problem:
                raise ValueError(f"{path} row {n} ({row['prompt']!r}): {problem}")
    elif benchmark == "ocr":
        from vgrpo.reward_servers.ocr import validate_prompts

        validate_prompts([r["prompt"] for r in rows])
    return rows


def _image_record(benchmark: str, item: Any) -> dict[str, Any]:
    """One image's entry in the table: ``score`` (the number the benchmark averages: GenEval's and
    GenEval-Shapes' binary correctness, the OCR reward, PickScore's raw score rather than the /26 training
    reward), ``reward`` (the training reward) and the benchmark's explanation of a miss."""
    if benchmark in ("shapes", "geneval"):
        record: dict[str, Any] = {"score": float(item.details["score"]), "reward": float(item.value)}
        if benchmark == "shapes":
            record["failed"] = [
                f"{c['clause']}: {c['why']}" for c in item.details.get("clauses", []) if not c["passed"]
            ]
        else:
            record["failed"] = [r for r in str(item.details.get("reason", "")).split("\n") if r]
        return record
    if benchmark == "pickscore":
        return {"score": float(item.details.get("raw", item.value)), "reward": float(item.value)}
    record = {"score": float(item.value), "reward": float(item.value)}
    if benchmark == "ocr":
        record["recognized"] = item.details.get("recognized", "")
    return record


class HeldoutTable:
    """Scores held-out images with a ``Reward`` (``vgrpo.reward_servers.base``; each row is passed as the
    image's metadata) as they arrive, in any number of batches, and tabulates them (:meth:`result`).

    - ``shapes`` / ``geneval``: per-family accuracy of the binary correctness; ``overall`` = the mean of
      the families' accuracies (GenEval's table); ``reward_mean`` = the partial-credit training reward.
    - ``ocr``: ``overall`` = the mean OCR reward; ``exact_match`` = the fraction of images scoring 1.
    - ``pickscore``: ``overall`` = the mean raw PickScore.

    An image the reward cannot score counts 0 and is listed with its error (``num_errors``)."""

    def __init__(
        self, rows: list[dict[str, Any]], reward: Any, benchmark: str, settings: dict[str, Any]
    ) -> None:
        if benchmark not in BENCHMARKS:
            raise ValueError(f"benchmark {benchmark!r}: want one of {', '.join(BENCHMARKS)}")
        self.rows, self.reward, self.benchmark, self.settings = rows, reward, benchmark, settings
        self.per_prompt: list[dict[str, Any]] = [
            {"prompt": r["prompt"], "tag": r.get("tag", benchmark), "images": []} for r in rows
        ]
        self.values: list[float] = []
        self.errors = 0

    def add(self, jobs: list[tuple[int, int, int]], images_bhwc: np.ndarray) -> None:
        """Scores one batch: ``jobs`` are ``(prompt index, image index, seed)`` of ``images_bhwc``."""
        prompts = [self.rows[i]["prompt"] for i, _, _ in jobs]
        items = self.reward.score_samples(list(images_bhwc), prompts, [self.rows[i] for i, _, _ in jobs])
        for (i, _, s), item in zip(jobs, items, strict=True):
            record: dict[str, Any] = {"seed": s}
            if item.value is None or item.error:
                self.errors += 1
                record.update(score=0.0, error=item.error or "no value")
            else:
                record.update(_image_record(self.benchmark, item))
                self.values.append(float(item.value))
            self.per_prompt[i]["images"].append(record)

    def result(self) -> dict[str, Any]:
        scores_by_tag: dict[str, list[float]] = defaultdict(list)
        for p in self.per_prompt:
            p["score"] = float(np.mean([im["score"] for im in p["images"]])) if p["images"] else 0.0
            rewards = [im["reward"] for im in p["images"] if "reward" in im]
            p["reward"] = float(np.mean(rewards)) if rewards else 0.0
            scores_by_tag[p["tag"]].extend(im["score"] for im in p["images"])
        ordered = [f for f in FAMILY_ORDER if f in scores_by_tag] + sorted(
            f for f in scores_by_tag if f not in FAMILY_ORDER
        )
        families = {f: float(np.mean(scores_by_tag[f])) for f in ordered}
        all_scores = [im["score"] for p in self.per_prompt for im in p["images"]]
        if self.benchmark in ("shapes", "geneval"):
            overall = float(np.mean(list(families.values()))) if families else 0.0
        else:
            overall = float(np.mean(all_scores)) if all_scores else 0.0
        result: dict[str, Any] = {
            "benchmark": self.benchmark,
            "overall": overall,
            "families": families,
            "reward_mean": float(np.mean(self.values)) if self.values else 0.0,
            "num_errors": self.errors,
            "prompts": self.per_prompt,
            "num_images": len(all_scores),
            "settings": self.settings,
        }
        if self.benchmark == "ocr":
            result["exact_match"] = float(np.mean([s == 1.0 for s in all_scores])) if all_scores else 0.0
        return result


def score_heldout(
    rows: list[dict[str, Any]], sampled: dict[str, Any], reward: Any, benchmark: str
) -> dict[str, Any]:
    """The table of images sampled elsewhere (``core.heldout.sample_heldout``'s result: a rollout worker's
    during training) scored with ``reward``."""
    n = len(rows)
    per = sampled["settings"]["images_per_prompt"]
    jobs = heldout_seeds(n, per, sampled["settings"]["seed"])
    if len(sampled["images"]) != len(jobs) or [s for _, _, s in jobs] != list(sampled["seeds"]):
        raise ValueError(
            f"held-out images: {len(sampled['images'])} images with seeds {list(sampled['seeds'])[:4]}... "
            f"for {n} prompts x {per}; the sampler and the table disagree on the prompt set"
        )
    table = HeldoutTable(rows, reward, benchmark, sampled["settings"])
    table.add(jobs, sampled["images"])
    return table.result()


def shapes_reward() -> Any:
    """The GenEval-Shapes benchmark's scorer: the shapes reward server's model (its binary evaluation
    score is the table's number, its partial-credit value the ``reward`` column)."""
    from vgrpo.reward_servers.shapes import ShapesReward

    return ShapesReward()


def evaluate_policy(
    pipe: StableDiffusion3Pipeline,
    rows: list[dict[str, Any]],
    images_per_prompt: int = 4,
    seed: int = 0,
    num_steps: int = 10,
    guidance_scale: float = 1.0,
    sampler: Sampler = "dpm2",
    shift: float | None = None,
    batch_size: int = 32,
    keep_images: bool = False,
    **geometry: Any,
) -> dict[str, Any]:
    """GenEval-Shapes: sample, detect, judge (:func:`evaluate_with_reward` with the shapes reward)."""
    return evaluate_with_reward(
        pipe, rows, shapes_reward(), "shapes", images_per_prompt, seed, num_steps, guidance_scale,
        sampler, shift, batch_size, keep_images, **geometry,
    )  # fmt: skip


def evaluate_with_reward(
    pipe: StableDiffusion3Pipeline,
    rows: list[dict[str, Any]],
    reward: Any,
    benchmark: str,
    images_per_prompt: int = 4,
    seed: int = 0,
    num_steps: int = 10,
    guidance_scale: float = 1.0,
    sampler: Sampler = "dpm2",
    shift: float | None = None,
    batch_size: int = 32,
    keep_images: bool = False,
    **geometry: Any,
) -> dict[str, Any]:
    """Samples ``images_per_prompt`` images per prompt (``core.heldout``: image j of prompt i from seed
    ``seed + i·images_per_prompt + j``; ``geometry``: height, width, frames, max_sequence_length as the
    run's rollout) and scores each batch as it comes (:class:`HeldoutTable`; a clip's frames each, then
    their mean). Returns the table (and ``"images"``: uint8 ``(N, H, W, 3)`` (clips ``(N, F, H, W, 3)``)
    in prompt-major order when ``keep_images``)."""
    settings = heldout_settings(images_per_prompt, seed, num_steps, guidance_scale, sampler, shift)
    table = HeldoutTable(rows, reward, benchmark, settings)
    all_images: list[np.ndarray] = []
    for jobs, images_bhwc in sample_chunks(
        pipe, [r["prompt"] for r in rows], images_per_prompt, seed, batch_size, num_steps,
        guidance_scale, sampler, shift, **geometry,
    ):  # fmt: skip
        table.add(jobs, images_bhwc)
        if keep_images:
            all_images.append(images_bhwc)
    result = table.result()
    if keep_images:
        result["images"] = np.concatenate(all_images) if all_images else np.zeros((0, 1, 1, 3), np.uint8)
    return result
