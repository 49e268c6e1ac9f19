"""A reward computed by any HTTP service that takes images + prompts and returns scores, with a timeout and
retries. Two wire formats:

- `format: vgrpo` (default) — another `vgrpo serve-rewards` (or anything speaking its format):
  `POST {url}/score {"items": [{"image_b64", "prompt", "metadata"?}]}` → `{"results": [{"rewards",
  "score"} | {"error"}]}`; the value is the result's `score` (or `rewards[key]` when `key` is set).
- `format: json` — the simplest service to write: `POST {url} {"images": [<PNG, base64>...],
  "prompts": [...], "metadata": [...] | null}` → `{"scores": [float | null, ...]}` in order (a null or a
  missing score is an item error; `{"errors": [str | null, ...]}` may say why).

Options (`reward.servers.remote.options`, or those of any name whose config uses
`vgrpo.reward_servers.remote:RemoteReward`): url (required), format, key, timeout_s (30), retries (2),
backoff_s (0.5, doubled after each retry), chunk_size (64 images per request), headers (extra HTTP
headers, e.g. an authorisation token). Connection errors, timeouts and HTTP 5xx/429 are retried; other
4xx are the caller's bug and raise at once.
"""

from __future__ import annotations

import base64
import json
import math
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np

from vgrpo.reward_servers.base import Reward, ScoredItem
from vgrpo.reward_servers.http_client import RewardHTTPClient, RewardHTTPError, encode_png

FORMATS = ("vgrpo", "json")


class RemoteRewardError(RuntimeError):
    """The remote service could not be reached or answered badly after the retries."""


def _retryable(e: BaseException) -> bool:
    if isinstance(e, RewardHTTPError):
        return e.status >= 500 or e.status == 429
    if isinstance(e, urllib.error.HTTPError):
        return e.code >= 500 or e.code == 429
    return isinstance(e, urllib.error.URLError | TimeoutError | ConnectionError | OSError)


class RemoteReward(Reward):
    """Scores by calling an HTTP service (see the module docstring for the formats and options)."""

    name = "remote"

    def __init__(
        self,
        url: str,
        format: str = "vgrpo",
        key: str | None = None,
        timeout_s: float = 30.0,
        retries: int = 2,
        backoff_s: float = 0.5,
        chunk_size: int = 64,
        headers: dict[str, str] | None = None,
        name: str | None = None,
    ) -> None:
        where = "reward.servers.remote.options"
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"{where}.url={url!r}: want an http:// or https:// URL of the scoring service")
        if format not in FORMATS:
            raise ValueError(f"{where}.format={format!r}: want one of {', '.join(FORMATS)}")
        if not timeout_s > 0 or retries < 0:
            raise ValueError(f"{where}: timeout_s must be > 0 and retries >= 0 (got {timeout_s}, {retries})")
        self.url = url
        self.format = format
        self.key = key
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.chunk_size = max(1, int(chunk_size))
        self.headers = dict(headers or {})
        if name:
            self.name = name
        self._client = RewardHTTPClient(url, timeout_s=self.timeout_s, chunk_size=self.chunk_size)

    # -------------------------------------------------------------------------------------------- calls

    def _with_retries(self, call: Any) -> Any:
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return call()
            except Exception as e:
                if attempt == self.retries or not _retryable(e):
                    raise RemoteRewardError(
                        f"remote reward {self.name!r} at {self.url}: {type(e).__name__}: {e} "
                        f"(after {attempt + 1} attempt(s), timeout {self.timeout_s} s each)"
                    ) from e
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _post_json(self, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            self.url,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **self.headers},
        )
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            answer = json.loads(resp.read())
        if not isinstance(answer, dict):
            raise RemoteRewardError(f"remote reward {self.name!r}: the answer is not a JSON object")
        return answer

    def _score_json(
        self, images: list[np.ndarray], prompts: list[str], metadata: list[dict] | None
    ) -> list[ScoredItem]:
        body = {
            "images": [base64.b64encode(encode_png(im)).decode("ascii") for im in images],
            "prompts": list(prompts),
            "metadata": metadata,
        }
        answer = self._with_retries(lambda: self._post_json(body))
        scores = answer.get("scores")
        if not isinstance(scores, list) or len(scores) != len(images):
            raise RemoteRewardError(
                f"remote reward {self.name!r} at {self.url}: want {{'scores': [...]}} with {len(images)} "
                f"values, got {json.dumps(answer)[:200]}"
            )
        errors = answer.get("errors") or [None] * len(scores)
        out = []
        for i, s in enumerate(scores):
            why = errors[i] if i < len(errors) else None
            if isinstance(s, int | float) and not isinstance(s, bool) and math.isfinite(s):
                out.append(ScoredItem(float(s)))
            else:
                out.append(ScoredItem(None, error=f"{self.name}: {why or f'no score ({s!r})'}"))
        return out

    def _score_vgrpo(
        self, images: list[np.ndarray], prompts: list[str], metadata: list[dict] | None
    ) -> list[ScoredItem]:
        if self.headers:
            self._client._post = self._post_with_headers  # type: ignore[method-assign]
        results = self._with_retries(lambda: self._client.score(images, prompts, metadata))
        out = []
        for r in results:
            if r.get("error"):
                out.append(ScoredItem(None, error=f"{self.name}: {r['error']}"))
                continue
            value = (r.get("rewards") or {}).get(self.key) if self.key else r.get("score")
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                out.append(ScoredItem(float(value), details={"rewards": r.get("rewards", {})}))
            else:
                out.append(
                    ScoredItem(None, error=f"{self.name}: no value{f' for {self.key!r}' if self.key else ''}")
                )
        return out

    def _post_with_headers(self, body: dict[str, Any]) -> dict[str, Any]:
        url = self._client.url
        req = urllib.request.Request(
            url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **self.headers}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise RewardHTTPError(e.code, e.read().decode(errors="replace")[:500]) from None

    def score(
        self, images: list[np.ndarray], prompts: list[str], metadata: list[dict] | None = None
    ) -> list[ScoredItem]:
        self.check_batch(images, prompts, metadata)
        if not images:
            return []
        out: list[ScoredItem] = []
        for start in range(0, len(images), self.chunk_size):
            stop = start + self.chunk_size
            meta = metadata[start:stop] if metadata is not None else None
            fn = self._score_json if self.format == "json" else self._score_vgrpo
            out.extend(fn(list(images[start:stop]), list(prompts[start:stop]), meta))
        return out
