"""Held-out evaluation of a policy on GenEval-Shapes, scored as GenEval scores (Ghosh et al., 2023).

Every prompt gets ``images_per_prompt`` images from fixed seeds (image j of prompt i: ``seed +
i·images_per_prompt + j``) with the deterministic ODE sampler, so two evaluations of the same weights
agree exactly. An image scores 1 when every clause of its prompt holds (docs/geneval-shapes.md); a family's
score is the mean over its images, and ``overall`` is the mean over families (GenEval's table).

``evaluate_policy`` takes a loaded pipeline, so the same function scores the shipped model, a hub model
or a run directory's checkpoint once its weights are in the pipeline.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from vgrpo.policy import Sampler, StableDiffusion3Pipeline, sample

FAMILY_ORDER = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
BUILTIN_PREFIX = "builtin:shapes/"


def load_prompt_rows(
    spec: str | Path, max_prompts: int | None = None, strict: bool = True
) -> list[dict[str, Any]]:
    """Prompt rows ``{"prompt", "tag", ...}`` from ``builtin:shapes/<split>``, a ``.jsonl`` file (GenEval
    metadata: one object a line with ``prompt`` and ``tag``) or a ``.txt`` file (one prompt a line, the
    family parsed from the GenEval-Shapes grammar). ``strict``: a prompt outside that grammar without a
    ``tag`` is an error (evaluation); otherwise it is kept untagged (training prompts of any reward)."""
    from vgrpo.shapes.prompts import PromptError, load_split, parse_prompt

    text = str(spec)
    if text.startswith(BUILTIN_PREFIX):
        rows = [dict(r) for r in load_split(text[len(BUILTIN_PREFIX) :])]
    else:
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(
                f"prompt file {text!r} does not exist; fix: give a .jsonl/.txt file or builtin:shapes/heldout"
            )
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            rows = [{"prompt": line.strip()} for line in path.read_text().splitlines() if line.strip()]
        for row in rows:
            if "tag" not in row:
                try:
                    row["tag"] = _family_of(parse_prompt, row["prompt"])
                except PromptError:
                    if strict:
                        raise
    return rows[:max_prompts] if max_prompts else rows


def _family_of(parse_prompt: Any, prompt: str) -> str:
    parsed = parse_prompt(prompt)
    for attr in ("family", "tag"):
        if hasattr(parsed, attr):
            return str(getattr(parsed, attr))
    if isinstance(parsed, dict):
        return str(parsed.get("family") or parsed.get("tag"))
    return "unknown"


def _clause_failures(verdict: Any) -> list[str]:
    """The clauses an image failed, each with the detector's reason (``vgrpo.shapes.reward.Verdict``)."""
    return [f"{c.description}: {c.why}" for c in verdict.clauses if not c.passed]


def _sampled_chunks(
    pipe: StableDiffusion3Pipeline,
    rows: list[dict[str, Any]],
    images_per_prompt: int,
    seed: int,
    batch_size: int,
    num_steps: int,
    guidance_scale: float,
    sampler: Sampler,
    shift: float | None,
) -> Any:
    """Yields ``(chunk, prompts, seeds, images_bhwc)`` over every (prompt i, image j) in batches; image
    (i, j) has seed ``seed + i * images_per_prompt + j`` whatever the batch size (comparable runs)."""
    jobs = [(i, j) for i in range(len(rows)) for j in range(images_per_prompt)]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        prompts = [rows[i]["prompt"] for i, _ in chunk]
        seeds = [seed + i * images_per_prompt + j for i, j in chunk]
        _, images_bhwc = sample(
            pipe,
            prompts,
            seeds,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            sampler=sampler,
            shift=shift,
        )
        yield chunk, prompts, seeds, images_bhwc


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
) -> dict[str, Any]:
    """Sample, detect, judge. Returns ``{"overall", "families", "prompts", "num_images", "settings"}``
    (and ``"images"``: uint8 ``(N, H, W, 3)`` in prompt-major order when ``keep_images``)."""
    from vgrpo.shapes.detector import detect
    from vgrpo.shapes.reward import evaluate

    all_images: list[np.ndarray] = []
    per_prompt: list[dict[str, Any]] = [
        {"prompt": r["prompt"], "tag": r.get("tag", "unknown"), "images": []} for r in rows
    ]
    for chunk, _, seeds, images_bhwc in _sampled_chunks(
        pipe, rows, images_per_prompt, seed, batch_size, num_steps, guidance_scale, sampler, shift
    ):
        for (i, _), s, image_hwc in zip(chunk, seeds, images_bhwc, strict=True):
            verdict = evaluate(rows[i]["prompt"], detect(image_hwc))
            per_prompt[i]["images"].append(
                {
                    "seed": s,
                    "score": float(verdict.score),
                    "reward": float(verdict.reward),
                    "failed": _clause_failures(verdict),
                }
            )
        if keep_images:
            all_images.append(images_bhwc)

    scores_by_family: dict[str, list[float]] = defaultdict(list)
    for p in per_prompt:
        p["score"] = float(np.mean([im["score"] for im in p["images"]]))
        p["reward"] = float(np.mean([im["reward"] for im in p["images"]]))
        scores_by_family[p["tag"]].extend(im["score"] for im in p["images"])
    ordered = [f for f in FAMILY_ORDER if f in scores_by_family] + sorted(
        f for f in scores_by_family if f not in FAMILY_ORDER
    )
    families = {f: float(np.mean(scores_by_family[f])) for f in ordered}
    result: dict[str, Any] = {
        "overall": float(np.mean(list(families.values()))) if families else 0.0,
        "families": families,
        "prompts": per_prompt,
        "num_images": len(rows) * images_per_prompt,
        "settings": {
            "images_per_prompt": images_per_prompt,
            "seed": seed,
            "num_steps": num_steps,
            "guidance_scale": guidance_scale,
            "sampler": sampler,
            "shift": shift,
        },
    }
    if keep_images:
        result["images"] = np.concatenate(all_images) if all_images else np.zeros((0, 1, 1, 3), np.uint8)
    return result


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
    """A PNG grid of images, each with its caption (wrapped) beneath, for looking at before trusting numbers."""
    from PIL import Image, ImageDraw

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


def _image_metric(benchmark: str, item: Any) -> float:
    """The number a benchmark averages for one image: GenEval's official binary correctness, the OCR
    reward, PickScore's raw score (not the /26 training reward)."""
    if benchmark == "geneval":
        return float(item.details["score"])
    if benchmark == "pickscore":
        return float(item.details.get("raw", item.value))
    return float(item.value)


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
) -> dict[str, Any]:
    """Samples ``images_per_prompt`` images per prompt with the same fixed seeds as ``evaluate_policy``
    (image j of prompt i: ``seed + i·images_per_prompt + j``) and scores them with ``reward`` (a
    ``vgrpo.reward_servers.base.Reward``; each row is passed as the image's metadata).

    - ``geneval``: per-tag accuracy of GenEval's official binary correctness; ``overall`` = the mean of
      the tags' accuracies (GenEval's table); ``reward_mean`` = the partial-credit training reward.
    - ``ocr``: ``overall`` = the mean OCR reward; ``exact_match`` = the fraction of images scoring 1.
    - ``pickscore``: ``overall`` = the mean raw PickScore.

    An image the reward cannot score counts 0 and is listed with its error (``num_errors``)."""
    if benchmark not in REWARD_BENCHMARKS:
        raise ValueError(f"benchmark {benchmark!r}: want one of {', '.join(REWARD_BENCHMARKS)}")
    per_prompt: list[dict[str, Any]] = [
        {"prompt": r["prompt"], "tag": r.get("tag", benchmark), "images": []} for r in rows
    ]
    all_images: list[np.ndarray] = []
    values: list[float] = []
    errors = 0
    for chunk, prompts, seeds, images_bhwc in _sampled_chunks(
        pipe, rows, images_per_prompt, seed, batch_size, num_steps, guidance_scale, sampler, shift
    ):
        items = reward.score(list(images_bhwc), prompts, [rows[i] for i, _ in chunk])
        for (i, _), s, item in zip(chunk, seeds, items, strict=True):
            record: dict[str, Any] = {"seed": s}
            if item.value is None or item.error:
                errors += 1
                record.update(score=0.0, error=item.error or "no value")
            else:
                record.update(score=_image_metric(benchmark, item), reward=float(item.value))
                values.append(float(item.value))
                if benchmark == "geneval":
                    record["failed"] = [r for r in str(item.details.get("reason", "")).split("\n") if r]
                elif benchmark == "ocr":
                    record["recognized"] = item.details.get("recognized", "")
            per_prompt[i]["images"].append(record)
        if keep_images:
            all_images.append(images_bhwc)

    scores_by_tag: dict[str, list[float]] = defaultdict(list)
    for p in per_prompt:
        p["score"] = float(np.mean([im["score"] for im in p["images"]])) if p["images"] else 0.0
        scores_by_tag[p["tag"]].extend(im["score"] for im in p["images"])
    ordered = [f for f in FAMILY_ORDER if f in scores_by_tag] + sorted(
        f for f in scores_by_tag if f not in FAMILY_ORDER
    )
    families = {f: float(np.mean(scores_by_tag[f])) for f in ordered}
    all_scores = [im["score"] for p in per_prompt for im in p["images"]]
    if benchmark == "geneval":
        overall = float(np.mean(list(families.values()))) if families else 0.0
    else:
        overall = float(np.mean(all_scores)) if all_scores else 0.0
    result: dict[str, Any] = {
        "benchmark": benchmark,
        "overall": overall,
        "families": families,
        "reward_mean": float(np.mean(values)) if values else 0.0,
        "num_errors": errors,
        "prompts": per_prompt,
        "num_images": len(rows) * images_per_prompt,
        "settings": {
            "images_per_prompt": images_per_prompt,
            "seed": seed,
            "num_steps": num_steps,
            "guidance_scale": guidance_scale,
            "sampler": sampler,
            "shift": shift,
        },
    }
    if benchmark == "ocr":
        result["exact_match"] = float(np.mean([s == 1.0 for s in all_scores])) if all_scores else 0.0
    if keep_images:
        result["images"] = np.concatenate(all_images) if all_images else np.zeros((0, 1, 1, 3), np.uint8)
    return result
