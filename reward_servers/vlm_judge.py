"""A VLM judge as a reward: any OpenAI-compatible chat-completions endpoint (sglang, vLLM, a hosted API;
UnifiedReward served by sglang as yifan123/flow_grpo's ``unifiedreward_score_sglang`` does) is shown the
image and a rubric, and the score is parsed from its answer.

    POST {endpoint}/chat/completions
      {"model": ..., "temperature": 0, "max_tokens": ...,
       "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
                                                 {"type": "text", "text": rubric.format(prompt=...)}]}]}
    value = (score - score_min) / (score_max - score_min), clipped to [0, 1]

The default rubric and score pattern are UnifiedReward's (a 1-5 "Final Score:"; upstream divides by 5).
Requests run ``max_concurrency`` at a time, each bounded by ``timeout_s`` and retried ``retries`` times
on a timeout, a refused connection, HTTP 429 or 5xx (with backoff); an answer without a score is an item
error carrying the answer's start. The API key is read from the environment variable ``api_key_env``,
never from a config file. Answers are parsed as JSON (nothing from the server is unpickled) and read up
to 1 MB.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from vgrpo.reward_servers.base import Reward, ScoredItem

UNIFIEDREWARD_RUBRIC = (
    "<image>\nYou are given a text caption and a generated image based on that caption. Your task is to "
    "evaluate this image based on two key criteria:\n1. Alignment with the Caption: Assess how well this "
    "image aligns with the provided caption. Consider the accuracy of depicted objects, their "
    "relationships, and attributes as described in the caption.\n2. Overall Image Quality: Examine the "
    "visual quality of this image, including clarity, detail preservation, color accuracy, and overall "
    "aesthetic appeal.\nBased on the above criteria, assign a score from 1 to 5 after 'Final Score:'.\n"
    "Your task is provided as follows:\nText Caption: [{prompt}]"
)
SCORE_PATTERN = r"Final Score:\s*([0-9]+(?:\.[0-9]+)?)"
MAX_ANSWER_BYTES = 1 << 20


class _Retryable(Exception):
    pass


class VlmJudgeReward(Reward):
    """Options (``reward.servers.vlm_judge.options``): endpoint (base URL, e.g. http://127.0.0.1:30000/v1),
    model, rubric (with ``{prompt}``), score_pattern (a regex whose group 1 is the score), score_min /
    score_max (1 / 5), image_size (512: the long side the image is resized to, 0 = as is), timeout_s
    (60), retries (2), max_concurrency (8), max_tokens (512), api_key_env (OPENAI_API_KEY)."""

    name = "vlm_judge"

    def __init__(
        self,
        endpoint: str = "http://127.0.0.1:30000/v1",
        model: str = "UnifiedReward-7b-v1.5",
        rubric: str = UNIFIEDREWARD_RUBRIC,
        score_pattern: str = SCORE_PATTERN,
        score_min: float = 1.0,
        score_max: float = 5.0,
        image_size: int = 512,
        timeout_s: float = 60.0,
        retries: int = 2,
        max_concurrency: int = 8,
        max_tokens: int = 512,
        api_key_env: str = "OPENAI_API_KEY",
    ) -> None:
        key = "reward.servers.vlm_judge.options."
        if not endpoint.startswith(("http://", "https://")):
            raise ValueError(
                f"{key}endpoint={endpoint!r}: want an http(s) base URL such as http://127.0.0.1:30000/v1"
            )
        if "{prompt}" not in rubric:
            raise ValueError(f"{key}rubric must contain {{prompt}}, where the caption goes")
        try:
            self.pattern = re.compile(score_pattern)
        except re.error as e:
            raise ValueError(f"{key}score_pattern={score_pattern!r} is not a regex ({e})") from None
        if self.pattern.groups < 1:
            raise ValueError(f"{key}score_pattern needs a group for the score, e.g. {SCORE_PATTERN!r}")
        if not score_max > score_min:
            raise ValueError(f"{key}score_max={score_max} must exceed score_min={score_min}")
        if not (timeout_s > 0 and retries >= 0 and max_concurrency >= 1 and image_size >= 0):
            raise ValueError(f"{key}: timeout_s > 0, retries >= 0, max_concurrency >= 1, image_size >= 0")
        self.url = endpoint.rstrip("/") + "/chat/completions"
        self.model, self.rubric = model, rubric
        self.lo, self.hi = float(score_min), float(score_max)
        self.image_size, self.timeout_s, self.retries = int(image_size), float(timeout_s), int(retries)
        self.max_concurrency, self.max_tokens = int(max_concurrency), int(max_tokens)
        self.api_key = os.environ.get(api_key_env, "")

    def _data_url(self, image: np.ndarray) -> str:
        im = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
        if self.image_size and max(im.size) != self.image_size:
            w, h = im.size
            s = self.image_size / max(w, h)
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def _ask(self, image: np.ndarray, prompt: str) -> str:
        body = {
            "model": self.model,
            "temperature": 0,
            "max_tokens": self.max_tokens,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": self._data_url(image)}},
                        {"type": "text", "text": self.rubric.format(prompt=prompt)},
                    ],
                }
            ],
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                raw = r.read(MAX_ANSWER_BYTES + 1)
        except urllib.error.HTTPError as e:
            if e.code == 429 or e.code >= 500:
                raise _Retryable(f"HTTP {e.code}") from None
            raise ValueError(f"HTTP {e.code}: {e.read(300).decode(errors='replace')}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            raise _Retryable(str(getattr(e, "reason", e))) from None
        if len(raw) > MAX_ANSWER_BYTES:
            raise ValueError("the answer is over 1 MB")
        try:
            return str(json.loads(raw)["choices"][0]["message"]["content"])
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise ValueError(f"not a chat-completions answer ({e}): {raw[:200]!r}") from None

    def _one(self, image: np.ndarray, prompt: str) -> ScoredItem:
        last = ""
        for attempt in range(self.retries + 1):
            try:
                answer = self._ask(image, prompt)
                break
            except _Retryable as e:
                last = str(e)
                if attempt < self.retries:
                    time.sleep(min(4.0, 0.5 * 2**attempt))
            except ValueError as e:
                return ScoredItem(None, error=f"vlm_judge at {self.url}: {e}")
        else:
            return ScoredItem(
                None, error=f"vlm_judge at {self.url}: {last} after {self.retries + 1} attempts"
            )
        m = self.pattern.search(answer)
        if m is None:
            return ScoredItem(None, error=f"vlm_judge: no score in the answer {answer[:160]!r}")
        raw = float(m.group(1))
        value = min(1.0, max(0.0, (raw - self.lo) / (self.hi - self.lo)))
        return ScoredItem(value, details={"raw": raw, "answer": answer[:500]})

    def score(
        self, images: list[np.ndarray], prompts: list[str], metadata: list[dict] | None = None
    ) -> list[ScoredItem]:
        self.check_batch(images, prompts, metadata)
        with ThreadPoolExecutor(min(self.max_concurrency, max(1, len(images)))) as pool:
            return list(pool.map(self._one, images, prompts))
