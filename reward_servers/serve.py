"""Reward servers: each reward a Ray Serve deployment with its own replicas and dynamic batching, scaled
independently of the rollout workers, plus the client the driver scores with and the HTTP ingress of
`vgrpo serve-rewards`.

    driver / RewardClient ──one request per (reward, image)──▶ vgrpo-reward-<name>  (Serve app)
      retries · timeouts · checks                                RewardDeployment × num_replicas
                                                                   @serve.batch → Reward.score(batch)
    HTTP POST /score ──▶ vgrpo-reward-ingress (RewardIngress) ──same fan-out──▶ the reward apps

Why one request per image: Serve's batcher then assembles batches across callers (several rollout
workers, several HTTP clients) up to `max_batch_size`, and a failure or a dead replica costs a retry of
one image, not of a whole rollout batch. Why `max_ongoing_requests` >= `max_batch_size`: a replica
never holds more requests than that, so Serve's default of 5 silently caps every batch at 5.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import logging
import math
import os
import re
import signal
import socket
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse

from vgrpo.core import metrics
from vgrpo.proto.config import RewardConfig, RewardServerConfig
from vgrpo.proto.messages import RewardScores
from vgrpo.reward_servers import registry
from vgrpo.reward_servers.base import Reward, ScoredItem, flatten_clips
from vgrpo.reward_servers.http_client import (
    MAX_IMAGE_PIXELS,
    ImageFormatError,
    decode_image,
    to_uint8_rgb,
)

APP_PREFIX = "vgrpo-reward-"
INGRESS_APP = "vgrpo-reward-ingress"
MAX_HTTP_ITEMS = 4096  # items in one HTTP request: bigger bodies should be chunked by the client
DEPLOY_TIMEOUT_S = 300.0  # a reward that cannot start (unschedulable, failing constructor) says so by then

# Serve's decorators are typed for plain functions; through Any, mypy checks the classes they wrap
_deployment: Any = serve.deployment
_batch: Any = serve.batch


def _as_any(deployment: object) -> Any:
    """A @serve.deployment class, which mypy still sees as the plain class (without .options/.bind)."""
    return deployment


class RewardError(RuntimeError):
    """A reward could not score an image: after the retries, or because it answered an error, no value
    or a non-finite value. `reward`, `index` (position in the scored batch), `prompt` and `cause` say
    which and why; `failures` lists every failed (reward, index, cause) of the call."""

    def __init__(
        self, reward: str, index: int, prompt: str, cause: str, failures: list[tuple[str, int, str]]
    ) -> None:
        more = f" (and {len(failures) - 1} more failure(s))" if len(failures) > 1 else ""
        super().__init__(f"reward {reward!r} failed on image {index} (prompt {prompt!r}): {cause}{more}")
        self.reward = reward
        self.index = index
        self.prompt = prompt
        self.cause = cause
        self.failures = failures


class RewardFailure(RuntimeError):
    """Raised inside a replica for one image whose reward code raised or broke the Reward contract; it
    reaches the caller as a task error, which the caller retries like a dead replica."""


# --------------------------------------------------------------------------------------------- replicas


def _item_dict(item: ScoredItem, batch_size: int, replica: str) -> dict[str, Any]:
    value = None if item.value is None else float(item.value)  # numpy scalars -> float, or TypeError
    return {
        "value": value,
        "error": item.error,
        "details": dict(item.details or {}),
        "batch_size": batch_size,
        "replica": replica,
    }


@_deployment
class RewardDeployment:
    """One replica of one reward. `score` takes a single image; `@serve.batch` gathers concurrent calls
    (from every caller of every process) into one `Reward.score` batch of up to `max_batch_size`.

    The reward runs on a one-thread executor: the replica's event loop keeps accepting requests while a
    batch computes (so the next batch fills), and the model is only ever called from one thread."""

    def __init__(
        self,
        name: str,
        options: dict[str, Any],
        max_batch_size: int,
        batch_wait_timeout_s: float,
        factory: registry.RewardFactory | None = None,
    ) -> None:
        if factory is not None:  # a plug-in registered in the driver's process: register it here too
            registry.register_reward(name, factory, replace=True)
        self.name = name
        self.reward = registry.get_reward(name, options)
        self.max_batch_size = max_batch_size
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"reward-{name}")
        # the decorator's defaults are per class; each deployment sets its own at runtime
        self._score_batch.set_max_batch_size(max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (a unit test calling the class directly)
            self.replica = "local"
        # --- metrics (vgrpo.core.metrics): requests held by this replica = its queue depth
        self._in_flight = 0
        metrics.actor_started("reward", self.replica, error_kinds=("failure", "error"))
        metrics.reward_queue(self.name, self.replica, 0)

    async def score(self, image: Any, prompt: str, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Scores one image: {"value", "error", "details", "batch_size", "replica"}. Raises RewardFailure
        when the reward code raised on this image or returned a malformed answer."""
        t0 = time.perf_counter()
        self._in_flight += 1
        metrics.reward_queue(self.name, self.replica, self._in_flight)
        try:
            out = await self._score_batch(image, prompt, metadata)
        finally:
            self._in_flight -= 1
            metrics.reward_queue(self.name, self.replica, self._in_flight)
            metrics.reward_request(self.name, self.replica, time.perf_counter() - t0)
        if "failure" in out:
            raise RewardFailure(out["failure"])
        return out

    def describe(self) -> dict[str, Any]:
        """Who answers (for logs and for tests that kill a replica): the actor's name and pid."""
        return {
            "reward": self.name,
            "replica": self.replica,
            "actor_name": ray.get_runtime_context().get_actor_name(),
            "pid": os.getpid(),
            "max_batch_size": self.max_batch_size,
            "video": bool(getattr(self.reward, "video", False)),
        }

    @_batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _score_batch(
        self, images: list[Any], prompts: list[str], metadata: list[dict[str, Any] | None]
    ) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        out = await loop.run_in_executor(self._pool, self._score_now, images, prompts, metadata)
        metrics.reward_batch(self.name, self.replica, out, time.perf_counter() - t0)
        return out

    def _score_now(
        self, images: list[Any], prompts: list[str], metadata: list[dict[str, Any] | None]
    ) -> list[dict[str, Any]]:
        n = len(images)
        out: list[dict[str, Any] | None] = [None] * n
        arrays: list[np.ndarray] = []
        keep: list[int] = []
        video = bool(getattr(self.reward, "video", False))  # a video reward takes clips (F, H, W, 3)
        for i, image in enumerate(images):
            try:
                arrays.append(to_uint8_clip(image) if video else to_uint8_rgb(image))
                keep.append(i)
            except ImageFormatError as e:
                out[i] = {"failure": f"reward {self.name!r}: image unreadable: {e}"}
        if keep:
            ps = [prompts[i] for i in keep]
            meta = None if all(metadata[i] is None for i in keep) else [metadata[i] or {} for i in keep]
            try:
                items = self._call(arrays, ps, meta)
            except Exception:
                # the batch raised: score its images one by one, so that only the image that breaks the
                # reward fails (and its error names it), not every image that shared its batch
                for j, i in enumerate(keep):
                    try:
                        out[i] = self._call([arrays[j]], [ps[j]], None if meta is None else [meta[j]])[0]
                    except Exception as e:
                        out[i] = {"failure": self._describe_raise(e)}
            else:
                for j, i in enumerate(keep):
                    out[i] = items[j]
        return [o if o is not None else {"failure": "internal: no result"} for o in out]

    def _call(
        self, images: list[np.ndarray], prompts: list[str], metadata: list[dict[str, Any]] | None
    ) -> list[dict[str, Any]]:
        items = self.reward.score(images, prompts, metadata)
        if not isinstance(items, list) or len(items) != len(images):
            got = len(items) if isinstance(items, list) else type(items).__name__
            raise RewardFailure(
                f"reward {self.name!r} returned {got} results for a batch of {len(images)} images "
                "(Reward.score must return one ScoredItem per image)"
            )
        bad = [type(it).__name__ for it in items if not isinstance(it, ScoredItem)]
        if bad:
            raise RewardFailure(f"reward {self.name!r} returned {bad[0]} instead of ScoredItem")
        return [_item_dict(it, len(images), self.replica) for it in items]

    def _describe_raise(self, e: Exception) -> str:
        if isinstance(e, RewardFailure):
            return str(e)
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-3:]).strip()
        return f"reward {self.name!r} raised {type(e).__name__}: {e}\n{tb}"


# ------------------------------------------------------------------------------- scoring with retries


@dataclass
class _Outcome:
    value: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 0
    error: str | None = None  # why there is no usable value
    retries: int = 0


def _why(e: BaseException) -> str:
    """A one-line cause for a failed request: the reward's own exception rather than Ray's wrapper."""
    cause = getattr(e, "cause", None) or e
    if isinstance(cause, RewardFailure):
        return str(cause).split("\n", 1)[0]
    if isinstance(e, ray.exceptions.RayActorError):
        return f"the replica died ({type(e).__name__})"
    text = str(cause).strip().split("\n", 1)[0]
    return f"{type(cause).__name__}: {text[:300]}"


async def _await(response: Any) -> Any:
    return await response


async def _score_one(
    handle: DeploymentHandle,
    image: np.ndarray,
    prompt: str,
    metadata: dict[str, Any] | None,
    timeout_s: float,
    retries: int,
) -> _Outcome:
    """One (reward, image) request: each attempt bounded by `timeout_s`; a timeout, a dead replica or a
    raising reward is retried `retries` times with a short backoff (time for Serve to replace the
    replica); an item error or a bad value is final (retrying cannot change a deterministic answer)."""
    attempt, last = 0, ""
    while True:
        response = handle.score.remote(image, prompt, metadata)
        try:
            out = await asyncio.wait_for(_await(response), timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            last = f"no answer within reward.timeout_s={timeout_s:g} s"
        except Exception as e:  # a dead replica, a raising reward, Serve's own errors: all retried
            last = _why(e)
        else:
            return _check(out, attempt)
        if attempt >= retries:
            return _Outcome(error=f"failed after {attempt + 1} attempt(s): {last}", retries=attempt)
        attempt += 1
        await asyncio.sleep(min(0.25 * 2**attempt, 5.0))


def to_uint8_clip(clip: Any) -> np.ndarray:
    """A clip ``(F, H, W, C)`` (any image format `to_uint8_rgb` takes, per frame) -> uint8 ``(F, H, W, 3)``."""
    arr = np.asarray(clip)
    if arr.ndim != 4:
        raise ImageFormatError(f"a video reward takes clips (F, H, W, C), got shape {tuple(arr.shape)}")
    return np.stack([to_uint8_rgb(frame) for frame in arr])


def _mean_outcome(frames: list[_Outcome]) -> _Outcome:
    """A clip's outcome from its frames': the mean value, the first frame's details with ``frames``, the
    first failure (named by its frame) if any."""
    retries = sum(f.retries for f in frames)
    for j, f in enumerate(frames):
        if f.error:
            return _Outcome(error=f"frame {j}: {f.error}", retries=retries, batch_size=f.batch_size)
    value = float(np.mean([f.value for f in frames]))  # type: ignore[arg-type]
    details = {**frames[0].details, "frames": len(frames)}
    return _Outcome(value=value, details=details, batch_size=frames[0].batch_size, retries=retries)


def _check(out: dict[str, Any], retries: int) -> _Outcome:
    value, error = out.get("value"), out.get("error")
    details, batch = out.get("details") or {}, int(out.get("batch_size", 0))
    if error:
        return _Outcome(error=str(error), details=details, batch_size=batch, retries=retries)
    if value is None:
        return _Outcome(error="returned no value and no error", batch_size=batch, retries=retries)
    if not math.isfinite(value):
        return _Outcome(error=f"returned a non-finite value ({value})", batch_size=batch, retries=retries)
    return _Outcome(value=float(value), details=details, batch_size=batch, retries=retries)


async def _score_items(
    handles: dict[str, DeploymentHandle],
    images: Sequence[np.ndarray],
    prompts: Sequence[str],
    metadata: Sequence[dict[str, Any] | None],
    timeout_s: float,
    retries: int,
) -> dict[str, list[_Outcome]]:
    """Every (reward, image) request at once, so that each reward's replicas see the whole batch."""
    names = list(handles)
    coros = [
        _score_one(handles[name], images[i], prompts[i], metadata[i], timeout_s, retries)
        for name in names
        for i in range(len(images))
    ]
    flat = await asyncio.gather(*coros)
    n = len(images)
    return {name: list(flat[k * n : (k + 1) * n]) for k, name in enumerate(names)}


def _blocking(make: Callable[[], Any]) -> Any:
    """Runs the coroutine ``make()`` builds to completion from synchronous code (from a thread that runs an
    event loop, in a helper thread: Serve's blocking calls refuse to run inside one)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


class RewardClient:
    """The driver's side of the reward servers: `score` sends every image to every reward at once and
    returns per-reward values and their weighted total, or raises RewardError — never a batch with an
    image silently missing. Weights come from `reward_cfg.weights` (1.0 for a served reward it omits)."""

    def __init__(self, handles: dict[str, DeploymentHandle], reward_cfg: RewardConfig) -> None:
        if not handles:
            raise ValueError("RewardClient needs at least one reward handle (see deploy_rewards)")
        self.handles = dict(handles)
        self.weights = {name: float(reward_cfg.weights.get(name, 1.0)) for name in self.handles}
        self._video: set[str] | None = None  # rewards that score whole clips (asked when clips first come)
        self.timeout_s = reward_cfg.timeout_s
        self.retries = reward_cfg.retries

    def score(
        self,
        images_bhwc: np.ndarray | Sequence[Any],
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
        keep_failures: bool = False,
    ) -> RewardScores:
        """Blocking form of `score_async`."""
        return _blocking(lambda: self.score_async(images_bhwc, prompts, metadata, keep_failures))

    async def score_async(
        self,
        images_bhwc: np.ndarray | Sequence[Any],
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
        keep_failures: bool = False,
    ) -> RewardScores:
        """Every image scored by every reward (after `reward.retries`). An image that still fails raises
        RewardError, or with ``keep_failures`` is marked in ``failed`` (its values NaN) and its cause
        listed in ``errors`` — for `reward.on_failure=drop_group`, whose caller drops its group. Clips
        ``(F, H, W, 3)`` (a video family's samples): a video reward scores each clip whole, an image
        reward each frame, the clip getting the frames' mean (a frame that fails fails its clip)."""
        t0 = time.perf_counter()
        if len(images_bhwc) != len(prompts) or (metadata is not None and len(metadata) != len(prompts)):
            raise ValueError(
                f"{len(images_bhwc)} images, {len(prompts)} prompts and "
                f"{'no' if metadata is None else len(metadata)} metadata rows: pass one per image"
            )
        meta: list[dict[str, Any] | None] = list(metadata) if metadata is not None else [None] * len(prompts)
        clips = len(images_bhwc) > 0 and np.asarray(images_bhwc[0]).ndim == 4
        if clips:
            outcomes = await self._score_clips(images_bhwc, list(prompts), meta)
        else:
            images = []
            for i, image in enumerate(images_bhwc):
                try:
                    images.append(to_uint8_rgb(image))
                except ImageFormatError as e:
                    raise ValueError(f"image {i} (prompt {prompts[i]!r}): {e}") from e
            outcomes = await _score_items(
                self.handles, images, list(prompts), meta, self.timeout_s, self.retries
            )
        failures = [
            (name, i, o.error) for name, outs in outcomes.items() for i, o in enumerate(outs) if o.error
        ]
        failures.sort(key=lambda f: f[1])
        what = "clip" if clips else "image"
        if failures and not keep_failures:
            name, i, cause = failures[0]
            raise RewardError(name, i, prompts[i], str(cause), [(n, j, str(c)) for n, j, c in failures])
        nan = float("nan")  # a failed image's value: never a number that could pass for a reward
        values = {
            name: np.array([nan if o.error else o.value for o in outs], dtype=np.float64)
            for name, outs in outcomes.items()
        }
        total = np.zeros(len(prompts), dtype=np.float64)
        for name, v in values.items():
            total += self.weights[name] * v
        failed = np.zeros(len(prompts), dtype=bool)
        for _, i, _ in failures:
            failed[i] = True
        return RewardScores(
            failed=failed if keep_failures else None,
            errors=[
                f"reward {n!r} failed on {what} {i} (prompt {prompts[i]!r}): {c}" for n, i, c in failures
            ],
            values=values,
            total=total,
            details={name: [o.details for o in outs] for name, outs in outcomes.items()},
            batch_sizes={name: [o.batch_size for o in outs] for name, outs in outcomes.items()},
            seconds=time.perf_counter() - t0,
            retries=sum(o.retries for outs in outcomes.values() for o in outs),
        )

    async def _video_rewards(self) -> set[str]:
        """The served rewards that score whole clips (each deployment says, once)."""
        if self._video is None:
            infos = await asyncio.gather(*(h.describe.remote() for h in self.handles.values()))
            self._video = {name for name, info in zip(self.handles, infos, strict=True) if info.get("video")}
        return self._video

    async def _score_clips(
        self, clips: np.ndarray | Sequence[Any], prompts: list[str], meta: list[dict[str, Any] | None]
    ) -> dict[str, list[_Outcome]]:
        """Per-reward outcomes of clips: video rewards get the clips, image rewards every frame (then the
        mean of the clip's frames, or the first frame's failure)."""
        video = await self._video_rewards()
        frames, owner = flatten_clips(clips)
        frame_handles = {n: h for n, h in self.handles.items() if n not in video}
        clip_handles = {n: h for n, h in self.handles.items() if n in video}
        by_frame = await _score_items(
            frame_handles, [to_uint8_rgb(f) for f in frames], [prompts[k] for k in owner],
            [meta[k] for k in owner], self.timeout_s, self.retries,
        )  # fmt: skip
        whole = await _score_items(
            clip_handles, [to_uint8_clip(c) for c in clips], prompts, meta, self.timeout_s, self.retries
        )
        out = dict(whole)
        for name, outs in by_frame.items():
            per_clip: list[list[_Outcome]] = [[] for _ in clips]
            for o, k in zip(outs, owner, strict=True):
                per_clip[k].append(o)
            out[name] = [_mean_outcome(fs) for fs in per_clip]
        return {name: out[name] for name in self.handles}


class ServedReward(Reward):
    """One served reward behind the plain `Reward` interface: every image goes to that reward's
    replicas (with the client's timeout and retries) and comes back as a ScoredItem, a per-image failure
    as an item error rather than an exception. The driver scores held-out images with it, so evaluation
    uses the reward servers as training does."""

    def __init__(self, client: RewardClient, name: str) -> None:
        if name not in client.handles:
            raise ValueError(f"reward {name!r} is not served here (served: {', '.join(client.handles)})")
        self.name, self.client = name, client
        self.video = False  # whether the deployment scores whole clips: asked when the first clips come

    def score_samples(
        self, samples: list[np.ndarray], prompts: list[str], metadata: list[dict] | None = None
    ) -> list[ScoredItem]:
        if samples and np.asarray(samples[0]).ndim == 4:
            self.video = self.name in _blocking(lambda: self.client._video_rewards())
        return super().score_samples(samples, prompts, metadata)

    def score(
        self, images: list[np.ndarray], prompts: list[str], metadata: list[dict] | None = None
    ) -> list[ScoredItem]:
        self.check_batch(images, prompts, metadata)
        meta: list[dict[str, Any] | None] = list(metadata) if metadata is not None else [None] * len(images)
        handles = {self.name: self.client.handles[self.name]}
        pixels = [to_uint8_clip(x) if self.video else to_uint8_rgb(x) for x in images]
        c = self.client
        outs = _blocking(lambda: _score_items(handles, pixels, list(prompts), meta, c.timeout_s, c.retries))
        return [
            ScoredItem(None, error=o.error) if o.error else ScoredItem(o.value, details=o.details)
            for o in outs[self.name]
        ]


# ---------------------------------------------------------------------------------------------- HTTP


def _bad(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _parse_items(body: Any) -> tuple[list[bytes], list[str], list[dict[str, Any] | None]] | str:
    """The request body -> (PNG bytes, prompts, metadata), or the message saying what is wrong."""
    if not isinstance(body, dict) or not isinstance(body.get("items"), list):
        return 'the body must be a JSON object with a list "items": {"items": [{"image_b64", "prompt"}]}'
    items = body["items"]
    if len(items) > MAX_HTTP_ITEMS:
        return f"{len(items)} items in one request; send at most {MAX_HTTP_ITEMS} per request"
    pngs, prompts, metadata = [], [], []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            return f"items[{i}] is not an object with image_b64 and prompt"
        if not isinstance(item.get("prompt"), str):
            return f"items[{i}].prompt is missing or not a string"
        if not isinstance(item.get("image_b64"), str):
            return f"items[{i}].image_b64 is missing or not a string (a base64-encoded PNG)"
        meta = item.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            return f"items[{i}].metadata must be an object"
        try:
            raw = base64.b64decode(item["image_b64"], validate=True)
        except ValueError as e:
            return f"items[{i}].image_b64 is not valid base64 ({e})"
        pngs.append(raw)
        prompts.append(item["prompt"])
        metadata.append(meta)
    return pngs, prompts, metadata


def _decode_all(pngs: list[bytes], max_pixels: int = MAX_IMAGE_PIXELS) -> list[np.ndarray] | str:
    images = []
    for i, raw in enumerate(pngs):
        try:
            images.append(decode_image(raw, max_pixels))
        except ImageFormatError as e:
            return f"items[{i}].image_b64 is {e}"
    return images


@_deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
class RewardIngress:
    """`POST /score` for other trainers: decodes the images, fans every item out to every reward app
    (the same requests, retries and checks as RewardClient) and answers in order. An item a reward
    cannot score gets {"error": ...} in its place; only a malformed body fails the whole request (400).
    `GET /` describes what is served."""

    def __init__(
        self,
        apps: dict[str, tuple[str, str]],
        weights: dict[str, float],
        timeout_s: float,
        retries: int,
        max_request_bytes: int = 64 << 20,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        self.handles = {
            name: serve.get_deployment_handle(dep, app_name=app) for name, (app, dep) in apps.items()
        }
        self.weights = {name: float(weights.get(name, 1.0)) for name in apps}
        self.timeout_s, self.retries = timeout_s, retries
        self.max_request_bytes, self.max_image_pixels = max_request_bytes, max_image_pixels

    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path.rstrip("/")
        if path == "" and request.method == "GET":
            return JSONResponse(
                {"rewards": list(self.handles), "weights": self.weights, "score": "POST /score"}
            )
        if path != "/score":
            return _bad(f"no route {request.url.path}; POST /score", 404)
        if request.method != "POST":
            return _bad(f"{request.method} /score: use POST", 405)
        cap = self.max_request_bytes
        too_big = f"the body is over reward.max_request_mb ({cap >> 20} MiB); send fewer items per request"
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            return _bad(f"{too_big} (content-length {declared})", 413)
        raw = bytearray()
        async for chunk in request.stream():  # counted as it arrives: a lying or absent length stops here
            raw.extend(chunk)
            if len(raw) > cap:
                return _bad(too_big, 413)
        try:
            body = json.loads(bytes(raw))
        except (ValueError, UnicodeDecodeError) as e:
            return _bad(f"the body is not JSON ({e})")
        parsed = _parse_items(body)
        if isinstance(parsed, str):
            return _bad(parsed)
        pngs, prompts, metadata = parsed
        images = await asyncio.to_thread(_decode_all, pngs, self.max_image_pixels)
        if isinstance(images, str):
            return _bad(images)
        outcomes = await _score_items(self.handles, images, prompts, metadata, self.timeout_s, self.retries)
        want_details = bool(body.get("details"))
        results: list[dict[str, Any]] = []
        for i in range(len(images)):
            errors = [f"{name}: {outs[i].error}" for name, outs in outcomes.items() if outs[i].error]
            if errors:
                results.append({"error": "; ".join(errors)})
                continue
            rewards = {name: outs[i].value for name, outs in outcomes.items()}
            row: dict[str, Any] = {
                "rewards": rewards,
                "score": sum(self.weights[name] * float(v or 0.0) for name, v in rewards.items()),
            }
            if want_details:
                row["details"] = {name: outs[i].details for name, outs in outcomes.items()}
            results.append(row)
        return JSONResponse({"results": results})


# ----------------------------------------------------------------------------------- deploy / shutdown

_owned_apps: list[str] = []
_QUIET_LOGS = {"log_level": "WARNING", "enable_access_log": False}  # a server's console: errors only
_owns_serve = False


def app_name(reward: str) -> str:
    """The Serve application of a reward (Serve names allow letters, digits, `_.-`)."""
    return APP_PREFIX + re.sub(r"[^A-Za-z0-9_.-]", "_", reward)


def check_reward_names(names: Sequence[str], reward_cfg: RewardConfig | None = None) -> None:
    """Raises UnknownRewardError for a name that is neither available nor an importable
    `module:Class` — before anything is started, so that a typo costs a second, not a cluster. A
    `module:Class` whose server brings its own code (`runtime_env`) is resolved where it runs."""
    known = set(registry.available_rewards())
    for name in names:
        elsewhere = reward_cfg is not None and reward_cfg.server(name).own_code()
        if not registry.is_resolvable(name, known, elsewhere):
            raise registry.UnknownRewardError(
                f"unknown reward {name!r}; available: {', '.join(sorted(known))} "
                "(or a plug-in as package.module:ClassName)"
            )


def _deployment_options(name: str, cfg: RewardServerConfig) -> dict[str, Any]:
    """Serve options from `reward.servers.<name>`, refusing settings that would silently misbehave."""
    where = f"reward.servers.{name}"
    max_ongoing = cfg.max_ongoing_requests or 4 * cfg.max_batch_size
    if max_ongoing < cfg.max_batch_size:
        raise ValueError(
            f"{where}.max_ongoing_requests={max_ongoing} < max_batch_size={cfg.max_batch_size}: a replica "
            f"holds at most {max_ongoing} requests, so batches could never fill; fix: leave it unset "
            f"(4 x max_batch_size) or raise it"
        )
    opts: dict[str, Any] = {
        "name": f"reward-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}",
        "max_ongoing_requests": max_ongoing,
        "ray_actor_options": {"num_cpus": cfg.cpus, "num_gpus": cfg.gpus},
    }
    if cfg.custom_resources:
        opts["ray_actor_options"]["resources"] = dict(cfg.custom_resources)
    if cfg.runtime_env:  # the reward's own environment (its packages installed there, not in the trainer's)
        opts["ray_actor_options"]["runtime_env"] = dict(cfg.runtime_env)
    if cfg.num_replicas == "auto":
        if cfg.min_replicas > cfg.max_replicas:
            raise ValueError(
                f"{where}: min_replicas={cfg.min_replicas} > max_replicas={cfg.max_replicas}; fix one of them"
            )
        # scale on queue depth: more replicas once each holds more than one full batch
        opts["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas,
            "initial_replicas": max(1, cfg.min_replicas),
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.max_batch_size,
        }
    else:
        if cfg.num_replicas < 1:
            raise ValueError(f'{where}.num_replicas={cfg.num_replicas}: want >= 1, or "auto"')
        opts["num_replicas"] = cfg.num_replicas
    return opts


def _serve_is_running() -> bool:
    try:
        ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
        return True
    except ValueError:
        return False


def _upload_local_code(env: dict[str, Any]) -> dict[str, Any]:
    """A reward server's runtime_env with its local ``working_dir`` / ``py_modules`` paths uploaded to the
    cluster (``gcs://`` URIs). Serve takes a deployment's runtime_env as given and refuses a local path
    ("Expected URI but received path"); Ray uploads them only for a job's runtime_env, in ``ray.init``.
    The same upload functions ``ray.init`` calls (Ray 2.60's runtime_env packaging) do it here, so that
    a plug-in reward can ship from a folder beside the launch script. Remote URIs pass unchanged."""
    if not any(k in env for k in ("working_dir", "py_modules")):
        return env
    from ray._private import worker as ray_worker
    from ray._private.runtime_env.py_modules import upload_py_modules_if_needed
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    scratch = ray_worker.global_worker.node.get_runtime_env_dir_path()
    env = upload_py_modules_if_needed(dict(env), include_gitignore=True, scratch_dir=scratch)
    env = upload_working_dir_if_needed(env, include_gitignore=True, scratch_dir=scratch)
    env.pop("excludes", None)
    return env


def _start_serve(http: bool, host: str, port: int, quiet: bool) -> None:
    """Starts Serve (no HTTP proxy for training, so nothing listens on a port) or joins the running one."""
    global _owns_serve
    if _serve_is_running():
        if http:
            from ray.serve.context import _get_global_client

            client = _get_global_client()
            assert client is not None
            cfg = client.http_config
            if serve.status().proxies == {} or (cfg.host, cfg.port) != (host, port):
                raise RuntimeError(
                    f"Ray Serve already runs on this cluster (HTTP {cfg.host}:{cfg.port}, proxies: "
                    f"{len(serve.status().proxies)}); its HTTP settings cannot change while it runs: "
                    f"use --host {cfg.host} --port {cfg.port}, or a cluster without Serve"
                )
        return
    logging_config = _QUIET_LOGS if quiet else None
    if quiet:
        # Serve's client logs "Started Serve", "Connecting to existing Serve app" and its router's start
        # at INFO on every run: nothing a user acts on; its warnings and errors still show
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    if http:
        serve.start(
            proxy_location="HeadOnly",
            http_options={"host": host, "port": port},
            logging_config=logging_config,
        )
    else:
        serve.start(proxy_location="Disabled", logging_config=logging_config)
    _owns_serve = True


def _wait_running(apps: Sequence[str], timeout_s: float) -> None:
    """Waits until every app runs; raises with Serve's own explanation when one fails or is stuck
    (an unschedulable resource request, a constructor that raises), instead of hanging."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications
        pending = []
        for app in apps:
            st = status.get(app)
            state = str(getattr(st, "status", "NOT_STARTED"))
            if state.endswith("RUNNING"):
                continue
            msgs = [st.message] if st is not None and st.message else []
            if st is not None:
                msgs += [f"{d}: {ds.message}" for d, ds in st.deployments.items() if ds.message]
            if state.endswith(("DEPLOY_FAILED", "UNHEALTHY")):
                raise RuntimeError(f"Serve app {app} failed to start ({state}): {' | '.join(msgs)[:2000]}")
            pending.append(f"{app} ({state}{': ' + ' | '.join(msgs)[:500] if msgs else ''})")
        if not pending:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"reward servers not running after {timeout_s:g} s: {'; '.join(pending)} — "
                "check the resource requests (reward.servers.<name>.cpus / gpus) against the cluster"
            )
        time.sleep(0.5)


def deploy_rewards(
    reward_cfg: RewardConfig,
    names: Sequence[str] | None = None,
    http: bool = False,
    host: str = "127.0.0.1",
    port: int = 8000,
    quiet: bool = False,
    timeout_s: float = DEPLOY_TIMEOUT_S,
) -> dict[str, DeploymentHandle]:
    """Deploys each reward (default: the keys of `reward.weights`) as its own Serve application
    `vgrpo-reward-<name>` on the connected Ray cluster and returns {name: handle} once all run.
    With `http`, Serve's proxy listens on host:port and the `/score` ingress is deployed too.
    Unknown names and contradictory settings fail before anything starts; `shutdown_rewards` undoes it."""
    if not ray.is_initialized():
        raise RuntimeError("deploy_rewards needs a Ray connection: call ray.init(...) first")
    names = list(names) if names is not None else list(reward_cfg.weights)
    if not names:
        raise ValueError("no reward to deploy; fix: --rewards shapes or reward.weights")
    check_reward_names(names, reward_cfg)
    options = {name: _deployment_options(name, reward_cfg.server(name)) for name in names}
    for opts in options.values():
        actor = opts.get("ray_actor_options", {})
        if actor.get("runtime_env"):
            actor["runtime_env"] = _upload_local_code(actor["runtime_env"])
    _start_serve(http, host, port, quiet)
    targets, apps = [], {}
    logs = _QUIET_LOGS if quiet else None
    for name in names:
        cfg = reward_cfg.server(name)
        factory = registry.reward_factory(name)  # plug-ins registered in this process travel along
        bound = (
            _versioned(_as_any(RewardDeployment), name, options[name], cfg)
            .options(**options[name])
            .bind(name, dict(cfg.options), cfg.max_batch_size, cfg.batch_wait_timeout_s, factory)
        )
        targets.append(
            serve.RunTarget(target=bound, name=app_name(name), route_prefix=None, logging_config=logs)
        )
        apps[name] = (app_name(name), options[name]["name"])
    if http:
        ingress = _as_any(RewardIngress).bind(
            apps,
            dict(reward_cfg.weights),
            reward_cfg.timeout_s,
            reward_cfg.retries,
            int(reward_cfg.max_request_mb * (1 << 20)),
            reward_cfg.max_image_pixels,
        )
        targets.append(
            serve.RunTarget(target=ingress, name=INGRESS_APP, route_prefix="/", logging_config=logs)
        )
    _owned_apps.extend(t.name for t in targets if t.name not in _owned_apps)
    handles = serve.run_many(targets, wait_for_applications_running=False)
    _wait_running([t.name for t in targets], timeout_s)
    return {name: handles[k] for k, name in enumerate(names)}


# one per driver process: a redeploy from this process that changes only the replica count keeps the
# running replicas (Serve's lightweight update); a new process always gets fresh replicas (new code)
_DEPLOY_NONCE = os.urandom(4).hex()


def _versioned(deployment: Any, name: str, options: dict[str, Any], cfg: RewardServerConfig) -> Any:
    """The deployment with a version fixed by its settings other than the replica count. Serve gives an
    imperatively deployed app a random version on every ``serve.run``, so a redeploy that only changes
    ``num_replicas`` would restart every replica (measured with Ray 2.60: a 1 -> 2 replica change kept the
    running replica with a fixed version, restarted it without). ``Deployment.options(version=...)`` is
    reserved for Serve's own use (``_internal``); where a Ray release refuses it, the redeploy restarts."""
    import hashlib

    fixed = {k: v for k, v in options.items() if k not in ("num_replicas", "autoscaling_config")}
    key = json.dumps(
        [name, fixed, cfg.model_dump(mode="json", exclude={"num_replicas"})], sort_keys=True, default=str
    )
    version = f"{_DEPLOY_NONCE}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    try:
        return deployment.options(version=version, _internal=True)
    except (TypeError, ValueError):  # a Ray release without it: redeploys restart the replicas
        return deployment


def rescale_reward(
    reward_cfg: RewardConfig, name: str, replicas: int, timeout_s: float = DEPLOY_TIMEOUT_S
) -> None:
    """Reward ``name`` (deployed by :func:`deploy_rewards` from this process) redeployed with ``replicas``
    replicas: Serve starts the new ones or stops the extra ones and keeps the others serving."""
    server = reward_cfg.server(name).model_copy(update={"num_replicas": replicas})
    servers = {**reward_cfg.servers, name: server}
    deploy_rewards(
        reward_cfg.model_copy(update={"servers": servers}), names=[name], quiet=True, timeout_s=timeout_s
    )


def shutdown_rewards() -> None:
    """Deletes the applications `deploy_rewards` made, and Serve itself when `deploy_rewards` started
    it. Safe to call twice, or after Ray is gone."""
    global _owns_serve
    try:
        if ray.is_initialized():
            if _owns_serve:
                serve.shutdown()
            else:
                for app in _owned_apps:
                    serve.delete(app)
    finally:
        _owned_apps.clear()
        _owns_serve = False


# --------------------------------------------------------------------------------- vgrpo serve-rewards


class _Stop(Exception):
    """SIGTERM, raised in the main thread so that the cleanup below always runs."""


@contextlib.contextmanager
def _ray_keeps_our_sigterm_handler() -> Iterator[None]:
    """ray.init installs SIGTERM handlers (exit at once; kill the node's processes) through
    `ray._private.utils.set_sigterm_handler`; while this is active that call does nothing, so the
    caller's handler stays in charge and shuts Serve and Ray down in order."""
    import ray._private.utils as ray_utils

    original = ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = original


def _port_free(host: str, port: int) -> str | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return str(e)
    return None


def _wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the HTTP ingress did not answer on {url} within {timeout_s:g} s")
        time.sleep(0.5)


def serve_forever(
    reward_cfg: RewardConfig, names: Sequence[str] | None, host: str, port: int, log: Callable[[str], None]
) -> int:
    """`vgrpo serve-rewards`: joins RAY_ADDRESS (or starts a local Ray of its own), deploys the rewards
    with the HTTP ingress, prints the URL and blocks. SIGTERM -> exit 0, Ctrl-C -> 130, each after
    Serve and (when it started it) the local Ray are shut down, so no process is left running.
    Returns the exit code; 2 for a problem found before anything started."""
    import shutil
    import tempfile

    names = list(names) if names else list(reward_cfg.weights)
    try:
        check_reward_names(names, reward_cfg)
        for name in names:
            _deployment_options(name, reward_cfg.server(name))
    except (ValueError, KeyError) as e:
        log(f"error: {e}")
        return 2
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        busy = _port_free(host, port)
        if busy:
            log(f"error: cannot listen on {host}:{port} ({busy}); fix: --port <a free port>")
            return 2

    # A signal during ray.init would interrupt it half-way: Ray's agents, started but not yet watching
    # their raylet, then outlive it by a minute. So while Ray starts, a signal is only recorded (and
    # Ray is kept from installing its own SIGTERM handler, which would exit at once); it acts after.
    state: dict[str, Any] = {"starting": True, "pending": None}

    def on_signal(signum: int, frame: Any) -> None:
        if state["starting"]:
            state["pending"] = signum
            return
        raise _Stop() if signum == signal.SIGTERM else KeyboardInterrupt()

    signal.signal(signal.SIGTERM, on_signal)
    # explicit, because a shell starting us in the background hands us SIGINT ignored
    signal.signal(signal.SIGINT, on_signal)
    temp_dir = None
    code = 0
    try:
        with _ray_keeps_our_sigterm_handler():
            if address:
                ray.init(address=address)
            else:
                temp_dir = tempfile.mkdtemp(prefix="vgrpo-serve-", dir="/tmp")  # short: socket paths
                ray.init(include_dashboard=False, _temp_dir=temp_dir)
        # Ray's core worker installs a C-level failure handler for SIGTERM during ray.init (it prints a
        # stack and aborts); registering ours again puts Python's handler back in front
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        state["starting"] = False
        if state["pending"] is not None:
            on_signal(state["pending"], None)
        deploy_rewards(reward_cfg, names, http=True, host=host, port=port, quiet=True)
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        _wait_http(f"http://{shown}:{port}/", 120.0)
        log(f"serving {', '.join(names)} on http://{shown}:{port}/score  (Ctrl-C or SIGTERM to stop)")
        while True:
            time.sleep(3600)
    except _Stop:
        log("SIGTERM: shutting the reward servers down")
    except KeyboardInterrupt:
        log("interrupted: shutting the reward servers down")
        code = 130
    except (RuntimeError, ValueError) as e:
        log(f"error: {e}")
        code = 1
    finally:
        # a second signal must not cut the cleanup short and leave Ray's processes behind
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            shutdown_rewards()
        except Exception as e:  # Ray may already be gone
            log(f"warning: Serve shutdown: {type(e).__name__}: {e}")
        ray.shutdown()
        if temp_dir is not None:
            if code == 1:
                log(f"Ray's logs: {temp_dir}")
            else:
                shutil.rmtree(temp_dir, ignore_errors=True)
    return code
