"""Weight broadcast from learner rank 0 to the rollout workers over a collective group of their own.

    learner rank 0 (rank 0 of this group) ──broadcast──▶ rollout worker 0 … R-1 (ranks 1 … R)
        manifest: names, shapes, dtypes, bucket layout (a length, then the bytes, as two broadcasts)
        buckets:  every tensor's bytes packed into flat uint8 buffers of ≤ bucket_mb each (full weights),
                  or one buffer for everything (LoRA: megabytes, one collective)

The group is not torch.distributed's default group: the learner ranks already use that one for their
DeepSpeed ZeRO group, and the rollout workers are not part of it. So the group is built directly from a
TCPStore (hosted by rank 0) and a backend object (``ProcessGroupNCCL`` on GPU, ``ProcessGroupGloo`` on
CPU): a group beside the default one, as RL trainers such as OpenRLHF keep for weight updates; nothing
here touches ``init_process_group``. Packing bytes (not typed values) makes one code path serve every
dtype (bf16, fp32, int64) on both backends.

Use (every rank calls each function at the same time: these are collectives):

    group = init_weight_sync_group(host, port, rank, world_size)      # host:port = learner rank 0's
    version, state = group.broadcast(lora_state, version=k, bucket_mb=None)   # rank 0: LoRA, one shot
    version, state = group.broadcast(out=dict(transformer.named_parameters()))  # workers: in place

The object-store path (``ray.put`` of the state dict) stays the fallback; this module has no Ray in it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from pydantic import ValidationError

from vgrpo.proto.messages import WeightEntry, WeightManifest

ALIGN = 16  # bytes: every tensor starts at a multiple of this inside a bucket, so views of any dtype work
STORE_PREFIX = "vgrpo-weight-sync"


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32", "bfloat16", ...
    bucket: int
    offset: int  # bytes into the bucket
    nbytes: int


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"weight manifest names an unknown dtype {name!r}")
    return dt


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_buckets(state: Mapping[str, torch.Tensor], bucket_mb: float | None) -> tuple[list[Entry], list[int]]:
    """Assigns each tensor (in the state dict's order) a byte range in a bucket of at most ``bucket_mb``
    MiB; a tensor larger than that gets a bucket of its own. ``bucket_mb=None``: one bucket (one shot).
    Returns (entries, bucket sizes in bytes)."""
    limit = None if bucket_mb is None else max(1, int(bucket_mb * 2**20))
    entries: list[Entry] = []
    sizes: list[int] = []
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        need = _aligned(nbytes)
        if not sizes or (limit is not None and sizes[-1] > 0 and sizes[-1] + need > limit):
            sizes.append(0)
        dtype = str(t.dtype).removeprefix("torch.")
        entries.append(Entry(name, tuple(t.shape), dtype, len(sizes) - 1, sizes[-1], nbytes))
        sizes[-1] += need
    return entries, sizes


class WeightSyncGroup:
    """One rank of the weight-broadcast group. Rank 0 (learner rank 0) sends, every other rank receives.
    Every rank must call :meth:`broadcast` the same number of times (it is a collective)."""

    def __init__(self, backend: Any, rank: int, world_size: int, device: torch.device, timeout_s: float):
        self.backend, self.rank, self.world_size = backend, rank, world_size
        self.device = device
        self.timeout = timedelta(seconds=timeout_s)
        self.bytes_sent = 0
        self._store: Any = None  # rank 0 hosts the TCPStore: keep it alive as long as the group

    def _bcast(self, tensor: torch.Tensor, src: int) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        opts.timeout = self.timeout
        self.backend.broadcast([tensor], opts).wait()

    def _bcast_manifest(self, manifest: WeightManifest | None, src: int) -> WeightManifest:
        """The manifest as JSON bytes (a length, then the bytes), validated on every receiver."""
        if self.rank == src:
            assert manifest is not None
            raw = manifest.model_dump_json().encode()
            length = torch.tensor([len(raw)], dtype=torch.int64, device=self.device)
        else:
            length = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._bcast(length, src)
        if self.rank == src:
            payload = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(self.device)
        else:
            payload = torch.empty(int(length.item()), dtype=torch.uint8, device=self.device)
        self._bcast(payload, src)
        text = bytes(payload.cpu().numpy().tobytes()).decode()
        try:
            return WeightManifest.model_validate_json(text)
        except ValidationError as e:
            raise ValueError(f"weight manifest from rank {src} of the weight-sync group: {e}") from None

    def broadcast(
        self,
        state: Mapping[str, torch.Tensor] | None = None,
        version: int = 0,
        bucket_mb: float | None = 256.0,
        out: Mapping[str, torch.Tensor] | None = None,
        src: int = 0,
        exact: bool = False,
    ) -> tuple[int, dict[str, torch.Tensor]]:
        """Rank ``src`` sends ``state`` (policy ``version``); the others receive it. ``bucket_mb``: bucket
        size for full weights, None for one shot (LoRA). A receiver may pass ``out`` (e.g. its model's
        parameters by name) to have the values copied into those tensors in place. Returns (version,
        state dict) on every rank: on receivers new tensors on this group's device unless ``out`` holds
        the name; on the sender ``state`` itself.

        ``exact`` (receivers with ``out``): the manifest must name exactly the tensors of ``out`` with
        their shapes; if it does not, the receiver still takes part in every collective (so the others do
        not hang) but writes nothing into ``out``, and raises ValueError once the broadcast is over."""
        if self.rank == src:
            if state is None:
                raise ValueError("the sending rank must pass the state dict")
            entries, sizes = plan_buckets(state, bucket_mb)
            manifest: WeightManifest | None = WeightManifest(
                version=version,
                sizes=sizes,
                entries=[WeightEntry(**(e.__dict__ | {"shape": list(e.shape)})) for e in entries],
            )
        else:
            manifest = None
        manifest = self._bcast_manifest(manifest, src)
        entries = [Entry(**(e.model_dump() | {"shape": tuple(e.shape)})) for e in manifest.entries]
        mismatch = None
        if exact and out is not None and self.rank != src:
            mismatch = _mismatch(entries, out)
            if mismatch is not None:
                out = None  # receive into scratch tensors: the receiver's model stays as it was
        received: dict[str, torch.Tensor] = {}
        for b, size in enumerate(manifest.sizes):
            in_bucket = [e for e in entries if e.bucket == b]
            bucket = torch.empty(size, dtype=torch.uint8, device=self.device)
            if self.rank == src:
                assert state is not None
                for e in in_bucket:
                    flat = state[e.name].detach().contiguous().reshape(-1).view(torch.uint8)
                    bucket[e.offset : e.offset + e.nbytes].copy_(flat, non_blocking=True)
            self._bcast(bucket, src)
            self.bytes_sent += size
            if self.rank == src:
                continue
            for e in in_bucket:
                value = bucket[e.offset : e.offset + e.nbytes].view(_dtype(e.dtype)).reshape(e.shape)
                target = out.get(e.name) if out is not None else None
                if target is not None:
                    if tuple(target.shape) != e.shape:
                        raise ValueError(
                            f"weight {e.name}: received shape {e.shape}, the receiving tensor has "
                            f"{tuple(target.shape)}; do the learner and the rollout workers load one model?"
                        )
                    with torch.no_grad():
                        target.copy_(value)
                    received[e.name] = target
                else:
                    received[e.name] = value.clone()
        if self.rank == src:
            assert state is not None
            return manifest.version, dict(state)
        if mismatch is not None:
            raise ValueError(f"weight broadcast of version {manifest.version}: {mismatch}")
        return manifest.version, received

    def close(self) -> None:
        """Drop this rank's handle on the group (a rebuilt group replaces it); rank 0 frees its store."""
        self.backend = None
        self._store = None

    def abort(self) -> None:
        """Leave a broadcast that failed on this rank: abort the backend (NCCL communicators, gloo pairs)
        and drop it. Its peers still waiting in that broadcast then fail at once (measured on gloo: a
        receiver errors in ~0.01 s instead of waiting the group's timeout) rather than hanging."""
        backend = self.backend
        self.close()
        if backend is not None and hasattr(backend, "abort"):
            # already broken: dropping it (and its sockets) is what is left to do
            with contextlib.suppress(Exception):
                backend.abort()


def _mismatch(entries: list[Entry], out: Mapping[str, torch.Tensor]) -> str | None:
    """Why a manifest does not fit the receiving tensors (names, shapes), or None when it does."""
    names = {e.name for e in entries}
    missing, extra = sorted(set(out) - names), sorted(names - set(out))
    if missing or extra:
        return (
            f"does not match the model: {len(missing)} missing (e.g. {missing[:2]}), {len(extra)} "
            f"unexpected (e.g. {extra[:2]}); do the learner and the rollout workers load one model?"
        )
    for e in entries:
        if tuple(out[e.name].shape) != e.shape:
            return f"weight {e.name}: received shape {e.shape}, the model has {tuple(out[e.name].shape)}"
    return None


def init_weight_sync_group(
    host: str,
    port: int,
    rank: int,
    world_size: int,
    backend: str = "auto",
    timeout_s: float = 600.0,
) -> WeightSyncGroup:
    """Joins the weight-broadcast group: rank 0 (learner rank 0) hosts a TCPStore on host:port, ranks
    1..world_size-1 (rollout workers) connect to it. ``backend``: nccl, gloo, or auto (nccl when CUDA is
    available). Under Ray each actor's visible GPU is device 0 of its process (Ray sets
    CUDA_VISIBLE_DEVICES), so NCCL uses ``cuda:current_device()``."""
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
    prefixed = dist.PrefixStore(STORE_PREFIX, store)
    if backend == "nccl":
        if not hasattr(dist, "ProcessGroupNCCL"):
            raise RuntimeError("this torch build has no NCCL; use backend='gloo'")
        device = torch.device("cuda", torch.cuda.current_device())
        pg: Any = dist.ProcessGroupNCCL(prefixed, rank, world_size, dist.ProcessGroupNCCL.Options())
    elif backend == "gloo":
        device = torch.device("cpu")
        pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    else:
        raise ValueError(f"weight sync backend {backend!r}: want nccl, gloo or auto")
    group = WeightSyncGroup(pg, rank, world_size, device, timeout_s)
    group._store = store
    return group


class WeightSyncMember:
    """What the learner rank 0 and rollout worker actors share: membership of the weight-broadcast group
    (``self.weight_sync``), joined — or re-joined, a rebuilt group replacing the old one — by
    :meth:`join_weight_sync`, a collective every member calls at once (rank 0 hosts it at host:port)."""

    weight_sync: WeightSyncGroup | None = None

    def join_weight_sync(
        self,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        backend: str = "gloo",
        timeout_s: float = 600.0,
    ) -> dict[str, Any]:
        if self.weight_sync is not None:
            self.weight_sync.close()
            self.weight_sync = None
        self.weight_sync = init_weight_sync_group(host, port, rank, world_size, backend, timeout_s)
        return {"rank": rank, "device": str(self.weight_sync.device)}
