"""`vgrpo score`: scores existing images with named rewards (DESIGN.md "What a user touches"). Each input
line `{"image": "path.png", "prompt": "..."}` (paths relative to the manifest's folder) becomes an output
line carrying back every input field plus `"rewards": {name: value}`, `"score"` (the weighted sum) and
the rewards' `"details"`, or `"error"` saying why that line could not be scored."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from vgrpo.reward_servers.base import Reward, ScoredItem
from vgrpo.reward_servers.http_client import MAX_IMAGE_PIXELS, open_checked
from vgrpo.reward_servers.registry import UnknownRewardError, get_reward

BATCH = 64  # images held in memory at once
BATCH_PIXELS = 64 * 1024 * 1024  # and at most this many pixels (~200 MB of uint8 RGB): a flush comes first


def _load_image(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    with open_checked(path, max_pixels) as im:  # the pixel cap from the header, before decoding
        return np.asarray(im.convert("RGB"))


def _read_line(
    text: str, lineno: int, root: Path, max_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[dict[str, Any], np.ndarray | None]:
    """One manifest line -> (the row to write back, the image) or (the row with `error`, None)."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return {"line": lineno, "error": f"line {lineno} is not JSON ({e.msg}): {text.strip()[:80]}"}, None
    if not isinstance(row, dict):
        return {"line": lineno, "error": f"line {lineno} is not a JSON object"}, None
    missing = [k for k in ("image", "prompt") if not isinstance(row.get(k), str)]
    if missing:
        return {**row, "error": f"line {lineno} lacks the string field(s) {', '.join(missing)}"}, None
    path = Path(row["image"]).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        return {**row, "error": f"image not found: {path}"}, None
    try:
        return row, _load_image(path, max_pixels)
    except (OSError, ValueError) as e:
        return {**row, "error": f"cannot read image {path}: {e}"}, None


def _score_batch(
    batch: list[tuple[dict[str, Any], np.ndarray]], rewards: list[Reward], weights: dict[str, float]
) -> list[dict[str, Any]]:
    images, prompts = [b[1] for b in batch], [b[0]["prompt"] for b in batch]
    # every other field of a line (e.g. GenEval's tag / include / exclude) is the item's metadata
    metadata = [{k: v for k, v in b[0].items() if k not in ("image", "prompt")} for b in batch]
    per_reward: dict[str, list[ScoredItem]] = {}
    for r in rewards:
        try:
            per_reward[r.name] = r.score(images, prompts, metadata)
        except Exception as e:  # a reward's own failure: every line of the batch says so, the run goes on
            per_reward[r.name] = [ScoredItem(None, error=f"{type(e).__name__}: {e}") for _ in batch]
    out = []
    for i, (row, _) in enumerate(batch):
        items = {name: res[i] for name, res in per_reward.items()}
        errors = [
            f"{name}: {it.error or 'no value'}" for name, it in items.items() if it.error or it.value is None
        ]
        if errors:
            out.append({**row, "error": "; ".join(errors)})
            continue
        values = {name: float(it.value) for name, it in items.items() if it.value is not None}
        score = sum(weights.get(name, 1.0) * v for name, v in values.items())
        details = {name: it.details for name, it in items.items() if it.details}
        out.append({**row, "rewards": values, "score": score, **({"details": details} if details else {})})
    return out


def score_manifest(
    rewards: list[str],
    manifest: Path,
    out: Path | None,
    weights: dict[str, float] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    max_pixels: int | None = None,
) -> int:
    """Scores every line of `manifest` with `rewards` (weights default to 1 each) and writes JSON lines to
    `out` or stdout. Returns 0 when every line was handled (some may carry `error`), 2 when nothing could
    be (an unknown reward, an unreadable manifest), printing why to stderr."""

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    if not rewards:
        return fail("no reward named; fix: --reward shapes")
    try:
        models = [get_reward(name, (options or {}).get(name) or {}) for name in rewards]
    except (UnknownRewardError, ValueError, TypeError) as e:
        return fail(str(e))
    unknown = sorted(set(weights or {}) - set(rewards))
    if unknown:
        return fail(f"weights given for reward(s) not scored: {', '.join(unknown)}")
    try:
        lines = manifest.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        return fail(f"cannot read manifest {manifest}: {e}")
    sink: TextIO = sys.stdout
    try:
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            sink = out.open("w")
    except OSError as e:
        return fail(f"cannot write --out {out}: {e}")
    try:
        root = manifest.resolve().parent
        pending: list[tuple[dict[str, Any], np.ndarray]] = []
        order: list[dict[str, Any] | None] = []  # None marks a line waiting in `pending`

        def flush() -> None:
            scored = iter(_score_batch(pending, models, weights or {}))
            for row in order:
                sink.write(json.dumps(row if row is not None else next(scored)) + "\n")
            order.clear()
            pending.clear()

        for lineno, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            row, image = _read_line(text, lineno, root, max_pixels or MAX_IMAGE_PIXELS)
            if image is None:
                order.append(row)
            else:
                order.append(None)
                pending.append((row, image))
                held = sum(int(im.shape[0]) * int(im.shape[1]) for _, im in pending)
                if len(pending) >= BATCH or held >= BATCH_PIXELS:
                    flush()
        flush()
    finally:
        if sink is not sys.stdout:
            sink.close()
    return 0
