"""The weight broadcast's code path (vgrpo/weight_sync.py) on gloo: two processes on CPU, learner rank 0
sends, a rollout rank receives. NCCL takes the same path with CUDA buffers; it needs two GPUs to run."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from vgrpo.weight_sync import ALIGN, init_weight_sync_group, plan_buckets


def make_state(version: int) -> dict[str, torch.Tensor]:
    """A state dict with the dtypes and shapes a policy has (bf16 LoRA pairs, fp32 norms, a scalar, an
    int buffer, an odd-sized tensor), different per version."""
    g = torch.Generator().manual_seed(1234 + version)
    return {
        "transformer.blocks.0.attn.to_q.lora_A.weight": torch.randn(8, 96, generator=g).to(torch.bfloat16),
        "transformer.blocks.0.attn.to_q.lora_B.weight": torch.randn(96, 8, generator=g).to(torch.bfloat16),
        "transformer.norm.weight": torch.randn(96, generator=g),
        "transformer.proj_out.weight": torch.randn(37, 41, generator=g),  # 6068 bytes: not a multiple of 16
        "scale": torch.tensor(float(version) + 0.5),
        "steps": torch.arange(5, dtype=torch.int64) * (version + 1),
        "empty": torch.zeros(0, 3),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    group = init_weight_sync_group("127.0.0.1", port, rank, world_size, backend="gloo", timeout_s=60)
    results = {}
    # full weights in small buckets (several collectives), then LoRA one shot, then into existing tensors
    for version, bucket_mb in ((1, 0.004), (2, None), (3, 0.001)):
        if rank == 0:
            v, _ = group.broadcast(make_state(version), version=version, bucket_mb=bucket_mb)
        elif version == 3:
            out = {k: torch.full_like(t, -7) for k, t in make_state(0).items()}
            v, got = group.broadcast(out=out)
            assert all(got[k] is out[k] for k in out), "received values must land in the given tensors"
        else:
            v, got = group.broadcast()
        if rank != 0:
            results[version] = (v, {k: t.clone() for k, t in got.items()})
    if rank != 0:
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    torch.save({"bytes": group.bytes_sent}, Path(out_dir) / f"bytes{rank}.pt")


def test_plan_buckets_respects_the_limit_and_alignment() -> None:
    state = make_state(1)
    entries, sizes = plan_buckets(state, bucket_mb=0.004)  # 4194 bytes
    assert len(sizes) > 2
    for e in entries:
        assert e.offset % ALIGN == 0
        assert e.offset + e.nbytes <= sizes[e.bucket]
        t = state[e.name]
        assert e.nbytes == t.numel() * t.element_size()
    limit = int(0.004 * 2**20)
    for b, size in enumerate(sizes):
        members = [e for e in entries if e.bucket == b]
        assert size <= limit or len(members) == 1  # only a tensor larger than the limit exceeds it
    one_entries, one_sizes = plan_buckets(state, bucket_mb=None)
    assert len(one_sizes) == 1 and {e.bucket for e in one_entries} == {0}


def test_gloo_broadcast_two_processes(tmp_path: Path) -> None:
    port = _free_port()
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    results = torch.load(tmp_path / "rank1.pt")
    assert sorted(results) == [1, 2, 3]
    for version in (1, 2, 3):
        v, got = results[version]
        sent = make_state(version)
        assert v == version
        assert list(got) == list(sent)
        for k, t in sent.items():
            assert got[k].dtype == t.dtype and got[k].shape == t.shape, k
            assert torch.equal(got[k], t), f"version {version}: {k} differs"
    assert not torch.equal(results[1][1]["transformer.norm.weight"], results[2][1]["transformer.norm.weight"])
    sent_bytes = torch.load(tmp_path / "bytes0.pt")["bytes"]
    recv_bytes = torch.load(tmp_path / "bytes1.pt")["bytes"]
    assert sent_bytes == recv_bytes > 0
