"""The messages that cross an actor or process boundary (docs/architecture.md "Messages").

| message | sender → receiver | built in | checked in |
|---|---|---|---|
| `PromptItem` | prompt source → driver → rollout workers | `vgrpo/data.py` | pydantic |
| `RolloutBatch` | rollout worker → driver | `RolloutEngine.sample` | `Trainer.collect` (`check`) |
| `TrainShard` | driver → learner rank | `TrainShard.split` | `LearnerEngine.train_step` (`check`) |
| `RewardScores` | reward servers (through `RewardClient`) → driver | `RewardClient.score_async` | there |
| `WeightUpdate` | learner → rollout workers (object store) | `Trainer.store_weights` | `RolloutEngine.update_weights` |
| `WeightManifest` | learner rank 0 → rollout workers (collective group) | `WeightSyncGroup.broadcast` | there |

Messages that carry tensors are plain dataclasses of numpy arrays / torch tensors: Ray moves them through
its object store as buffers (zero-copy for numpy), and `check(sender)` validates shapes, dtypes, group
structure and versions at the receiving side in microseconds, raising `MessageError` naming the field
and the sender. The small JSON-like messages are pydantic models (validated on construction).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class MessageError(ValueError):
    """A message that does not match its contract: names the message, the field and the sender."""

    def __init__(self, message: str, sender: str, field_name: str, problem: str):
        super().__init__(f"{message} from {sender}: {field_name} {problem}")
        self.message, self.sender, self.field = message, sender, field_name


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class PromptItem(Message):
    prompt: str
    prompt_id: int = Field(description="stable index in the prompt file (group-shared noise keys on it)")
    metadata: dict[str, Any] = Field(default_factory=dict, description="e.g. GenEval's tag/include")


def _shape(arr: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in arr.shape)


class _Checker:
    """Collects a message's field checks; the first failure raises `MessageError`."""

    def __init__(self, message: str, sender: str):
        self.message, self.sender = message, sender

    def fail(self, field_name: str, problem: str) -> None:
        raise MessageError(self.message, self.sender, field_name, problem)

    def array(
        self,
        field_name: str,
        arr: Any,
        ndim: int | tuple[int, ...],
        dtypes: Sequence[str],
        lead: int | None = None,
    ) -> tuple[int, ...]:
        if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
            self.fail(field_name, f"is {type(arr).__name__}, want an array")
        shape = _shape(arr)
        ndims = (ndim,) if isinstance(ndim, int) else ndim
        if len(shape) not in ndims:
            want = " or ".join(str(n) for n in ndims)
            self.fail(field_name, f"has shape {shape}, want {want} dimensions")
        dtype = str(arr.dtype).removeprefix("torch.")
        if dtype not in dtypes:
            self.fail(field_name, f"has dtype {dtype}, want {' or '.join(dtypes)}")
        if lead is not None and shape[0] != lead:
            self.fail(field_name, f"has {shape[0]} rows (shape {shape}), want {lead}")
        return shape

    def finite(self, field_name: str, arr: np.ndarray) -> None:
        if not np.all(np.isfinite(arr)):
            self.fail(field_name, "holds non-finite values")

    def sigmas(self, arr: np.ndarray) -> None:
        self.array("sigmas", arr, 1, ("float64", "float32"))
        if len(arr) < 2 or arr[0] > 1.0 + 1e-9 or arr[-1] != 0.0 or np.any(np.diff(arr) >= 0):
            self.fail("sigmas", f"= {np.round(arr, 4).tolist()}, want a decreasing grid from <= 1 to 0")


FLOATS = ("float32",)
LATENT_NDIM = (4, 5)  # images (B, C, h, w); video (B, C, F, h, w)
TRAJ_DTYPES = ("float32", "float64")


@dataclass
class RolloutBatch:
    """A rollout worker's samples for one step's share of prompts: G per prompt, sample j of prompt i at
    row i·G + j. Arrays: ``latents`` (B, C, h, w) float32 final samples (video: (B, C, F, h, w)),
    ``images`` (B, H, W, 3) uint8 (video: clips (B, F, H, W, 3)), ``prompt_embeds`` (P, L, D) and
    ``pooled`` (P, Dp) float32 per prompt (Dp may be 0), ``prompt_mask`` (P, L) bool where the family
    masks text padding (Qwen-Image) else None, the sampler's ``sigmas`` (N+1,); with an SDE sampler
    ``trajectory`` (B, T+1, *latent) and ``logp`` (B, T) over its T recorded steps (all N, or the window
    starting at ``window_start``)."""

    group_size: int
    policy_version: int
    latents: np.ndarray
    images: np.ndarray
    prompt_embeds: np.ndarray
    pooled: np.ndarray
    sigmas: np.ndarray
    shift: float
    seconds: float = 0.0
    trajectory: np.ndarray | None = None
    logp: np.ndarray | None = None
    window_start: int | None = None
    prompt_mask: np.ndarray | None = None

    @property
    def num_prompts(self) -> int:
        return int(self.prompt_embeds.shape[0])

    def check(self, sender: str, num_prompts: int | None = None) -> RolloutBatch:
        c = _Checker("RolloutBatch", sender)
        if self.group_size < 1:
            c.fail("group_size", f"= {self.group_size}, want >= 1")
        if self.policy_version < 0:
            c.fail("policy_version", f"= {self.policy_version}, want >= 0")
        p = self.num_prompts
        if num_prompts is not None and p != num_prompts:
            c.fail("prompt_embeds", f"has {p} prompts, the driver asked for {num_prompts}")
        b = p * self.group_size
        lat = c.array("latents", self.latents, LATENT_NDIM, FLOATS, lead=b)
        img = c.array("images", self.images, (4, 5), ("uint8",), lead=b)
        if img[-1] != 3 or (len(img) == 5) != (len(lat) == 5):
            c.fail(
                "images", f"has shape {img}, want (B, H, W, 3), or clips (B, F, H, W, 3) with video latents"
            )
        emb = c.array("prompt_embeds", self.prompt_embeds, 3, FLOATS)
        c.array("pooled", self.pooled, 2, FLOATS, lead=p)
        if self.prompt_mask is not None:
            mask = c.array("prompt_mask", self.prompt_mask, 2, ("bool",), lead=p)
            if mask[1] != emb[1]:
                c.fail("prompt_mask", f"has shape {mask}, want (P, L) with prompt_embeds {emb}")
        c.sigmas(self.sigmas)
        c.finite("latents", self.latents)
        if (self.trajectory is None) != (self.logp is None):
            c.fail("trajectory", "and logp come together (an SDE sampler records both) or not at all")
        if self.trajectory is not None and self.logp is not None:
            traj = c.array("trajectory", self.trajectory, (5, 6), TRAJ_DTYPES, lead=b)
            logp = c.array("logp", self.logp, 2, TRAJ_DTYPES, lead=b)
            if traj[1] != logp[1] + 1 or traj[2:] != lat[1:]:
                c.fail("trajectory", f"has shape {traj}, want (B, T+1) + latent {lat[1:]} with logp {logp}")
            steps = len(self.sigmas) - 1
            start = self.window_start or 0
            if start < 0 or start + logp[1] > steps:
                c.fail("window_start", f"= {self.window_start} with {logp[1]} recorded steps of {steps}")
        return self

    def select_groups(self, groups: np.ndarray) -> RolloutBatch:
        """The batch of the prompt groups ``groups`` (indices, in order): a step that drops the groups a
        reward could not score (``reward.on_failure=drop_group``)."""
        groups = np.asarray(groups, dtype=np.int64)
        rows = (groups[:, None] * self.group_size + np.arange(self.group_size)).reshape(-1)
        return replace(
            self,
            latents=self.latents[rows],
            images=self.images[rows],
            prompt_embeds=self.prompt_embeds[groups],
            pooled=self.pooled[groups],
            prompt_mask=None if self.prompt_mask is None else self.prompt_mask[groups],
            trajectory=None if self.trajectory is None else self.trajectory[rows],
            logp=None if self.logp is None else self.logp[rows],
        )

    @staticmethod
    def concat(parts: Sequence[RolloutBatch]) -> RolloutBatch:
        """The step's batch from the workers' shares (in prompt order); they must share a version, the
        sampler grid and the window (the driver checks the version first, with its own message)."""
        first = parts[0]
        cat = lambda k: np.concatenate([getattr(p, k) for p in parts])  # noqa: E731
        embeds, mask = join_text([p.prompt_embeds for p in parts], [p.prompt_mask for p in parts])
        return replace(
            first,
            latents=cat("latents"),
            images=cat("images"),
            prompt_embeds=embeds,
            prompt_mask=mask,
            pooled=cat("pooled"),
            seconds=max(p.seconds for p in parts),
            trajectory=cat("trajectory") if first.trajectory is not None else None,
            logp=cat("logp") if first.logp is not None else None,
        )


def join_text(
    embeds: Sequence[np.ndarray], masks: Sequence[np.ndarray | None]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-part text features ``(P_k, L_k, D)`` (and masks) as one ``(sum P_k, max L_k, D)`` array: parts
    whose token lengths differ (Qwen-Image pads to each batch's longest prompt) are zero-padded and the
    padding masked; None when no part needed a mask."""
    length = max(int(e.shape[1]) for e in embeds)
    padded = [np.pad(e, ((0, 0), (0, length - e.shape[1]), (0, 0))) for e in embeds]
    if all(m is None for m in masks) and all(e.shape[1] == length for e in embeds):
        return np.concatenate(padded), None
    full = [
        np.ones(e.shape[:2], dtype=bool) if m is None else m.astype(bool)
        for e, m in zip(embeds, masks, strict=True)
    ]
    return np.concatenate(padded), np.concatenate(
        [np.pad(m, ((0, 0), (0, length - m.shape[1]))) for m in full]
    )


def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges covering range(n) in ``parts`` near-equal contiguous pieces (some may be empty)."""
    base, extra = divmod(n, parts)
    out, lo = [], 0
    for i in range(parts):
        hi = lo + base + (1 if i < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


@dataclass
class TrainShard:
    """One learner rank's share of a step (whole prompt groups): the final ``latents`` (B, C, h, w), the
    per-image text features ``prompt_embeds`` (B, L, D), ``pooled`` (B, Dp) and ``prompt_mask`` (B, L) or
    None (:class:`RolloutBatch`), ``group_ids`` (B,) and
    ``advantages`` (B,), the sampler's ``sigmas`` and ``shift``, the ``policy_version`` that sampled it,
    and the SDE ``trajectory`` / ``logp`` (with ``window_start``) when the sampler recorded them."""

    group_size: int
    policy_version: int
    latents: np.ndarray
    prompt_embeds: np.ndarray
    pooled: np.ndarray
    group_ids: np.ndarray
    advantages: np.ndarray
    sigmas: np.ndarray
    shift: float
    trajectory: np.ndarray | None = None
    logp: np.ndarray | None = None
    window_start: int = 0
    prompt_mask: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    @staticmethod
    def split(
        batch: RolloutBatch, advantages: np.ndarray, num_ranks: int, policy_version: int
    ) -> list[TrainShard]:
        """The step's batch cut into one shard per learner rank, whole groups each (the one place a
        shard is built: the driver's loop and the planner's measurement both call it)."""
        g = batch.group_size
        group_b = np.repeat(np.arange(batch.num_prompts), g)
        embeds = np.repeat(batch.prompt_embeds, g, axis=0)
        pooled = np.repeat(batch.pooled, g, axis=0)
        mask = None if batch.prompt_mask is None else np.repeat(batch.prompt_mask, g, axis=0)
        shards = []
        for lo, hi in split_evenly(batch.num_prompts, num_ranks):
            sl = slice(lo * g, hi * g)
            shards.append(
                TrainShard(
                    group_size=g,
                    policy_version=policy_version,
                    latents=batch.latents[sl],
                    prompt_embeds=embeds[sl],
                    pooled=pooled[sl],
                    prompt_mask=None if mask is None else mask[sl],
                    group_ids=group_b[sl],
                    advantages=np.asarray(advantages[sl]),
                    sigmas=batch.sigmas,
                    shift=batch.shift,
                    trajectory=batch.trajectory[sl] if batch.trajectory is not None else None,
                    logp=batch.logp[sl] if batch.logp is not None else None,
                    window_start=int(batch.window_start or 0),
                )
            )
        return shards

    def check(self, sender: str) -> TrainShard:
        c = _Checker("TrainShard", sender)
        if self.policy_version < 0:
            c.fail("policy_version", f"= {self.policy_version}, want >= 0")
        b = len(self)
        lat = c.array("latents", self.latents, LATENT_NDIM, FLOATS)
        emb = c.array("prompt_embeds", self.prompt_embeds, 3, FLOATS, lead=b)
        c.array("pooled", self.pooled, 2, FLOATS, lead=b)
        if self.prompt_mask is not None:
            mask = c.array("prompt_mask", self.prompt_mask, 2, ("bool",), lead=b)
            if mask[1] != emb[1]:
                c.fail("prompt_mask", f"has shape {mask}, want (B, L) with prompt_embeds {emb}")
        c.array("group_ids", self.group_ids, 1, ("int64", "int32"), lead=b)
        c.array("advantages", self.advantages, 1, ("float32", "float64"), lead=b)
        c.finite("advantages", self.advantages)
        c.sigmas(self.sigmas)
        if b:
            _, counts = np.unique(self.group_ids, return_counts=True)
            if self.group_size < 1 or np.any(counts != self.group_size):
                c.fail("group_ids", f"has groups of {sorted(set(counts.tolist()))} images, want whole groups "
                       f"of group_size {self.group_size}")  # fmt: skip
        if (self.trajectory is None) != (self.logp is None):
            c.fail("trajectory", "and logp come together or not at all")
        if self.trajectory is not None and self.logp is not None:
            traj = c.array("trajectory", self.trajectory, (5, 6), TRAJ_DTYPES, lead=b)
            logp = c.array("logp", self.logp, 2, TRAJ_DTYPES, lead=b)
            if traj[1] != logp[1] + 1 or traj[2:] != lat[1:]:
                c.fail("trajectory", f"has shape {traj}, want (B, T+1) + latent {lat[1:]} with logp {logp}")
        return self


@dataclass
class RewardScores:
    """The rewards of one batch: `values[name]` per image, `total` = sum of weight x value, each
    reward's `details` and the `batch_sizes` its replicas scored the images in, the wall-clock
    `seconds` and how many `retries` it took."""

    values: dict[str, np.ndarray]
    total: np.ndarray
    details: dict[str, list[dict[str, Any]]]
    batch_sizes: dict[str, list[int]]
    seconds: float
    retries: int
    failed: np.ndarray | None = None
    errors: list[str] = field(default_factory=list)

    def check(self, sender: str, num_images: int) -> RewardScores:
        c = _Checker("RewardScores", sender)
        c.array("total", self.total, 1, ("float64", "float32"), lead=num_images)
        ok = self.total if self.failed is None else self.total[~self.failed]
        c.finite("total", ok)
        if self.failed is not None:
            c.array("failed", self.failed, 1, ("bool",), lead=num_images)
            if self.failed.any() and not self.errors:
                c.fail("errors", "is empty while some images failed; want one cause per failure")
        for name, values in self.values.items():
            c.array(f"values[{name!r}]", values, 1, ("float64", "float32"), lead=num_images)
        return self

    def select(self, keep: np.ndarray) -> RewardScores:
        """The scores of the images where ``keep`` (a boolean mask) holds."""
        idx = np.flatnonzero(keep)
        return replace(
            self,
            values={k: v[idx] for k, v in self.values.items()},
            total=self.total[idx],
            details={k: [d[i] for i in idx] for k, d in self.details.items()},
            batch_sizes={k: [b[i] for i in idx] for k, b in self.batch_sizes.items()},
            failed=None if self.failed is None else self.failed[idx],
        )


@dataclass
class WeightUpdate:
    """Published weights through the object store: the trainable tensors by name and the ``version``
    (the step that produced them; 0 = the starting policy)."""

    version: int
    tensors: dict[str, Any]

    def check(self, sender: str) -> WeightUpdate:
        """The version and that every value is a tensor; whether the names and shapes fit the receiving
        model is the receiver's check (``core.adapters.load_weights``: a partial update would mix
        versions)."""
        c = _Checker("WeightUpdate", sender)
        if self.version < 0:
            c.fail("version", f"= {self.version}, want >= 0")
        if not isinstance(self.tensors, dict) or not self.tensors:
            c.fail("tensors", "is empty, want the trainable tensors by name")
        for name, value in self.tensors.items():
            if not hasattr(value, "shape"):
                c.fail(f"tensors[{name!r}]", f"is {type(value).__name__}, want a tensor")
        return self


class WeightEntry(Message):
    name: str
    shape: list[int]
    dtype: str = Field(description="torch dtype name: float32, bfloat16, ...")
    bucket: int = Field(ge=0)
    offset: int = Field(ge=0, description="bytes into the bucket")
    nbytes: int = Field(ge=0)


class WeightManifest(Message):
    """What precedes a collective weight broadcast (as JSON bytes): the version, the bucket sizes and
    where each tensor lies in them."""

    version: int = Field(ge=0)
    sizes: list[int]
    entries: list[WeightEntry]
