"""The weight broadcast's code path (core/weight_sync.py) on gloo: two processes on CPU, learner rank 0
sends, a rollout rank receives. NCCL takes the same path with CUDA buffers; it needs two GPUs to run."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from vgrpo.core.weight_sync import ALIGN, init_weight_sync_group, plan_buckets
from vgrpo.proto.messages import WeightUpdate


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


def _sender(port: int, state_path: str) -> None:
    """Learner rank 0's side for the receive test: version 1 (fits the model), version 2 (one name short:
    refused without a write), version 3 (fits, sent after a pause), then version 4 broken off after its
    first bucket (this process exits, as a dead learner or a lost link would)."""
    import os
    import time

    states = torch.load(state_path)
    group = init_weight_sync_group("127.0.0.1", port, 0, 2, backend="gloo", timeout_s=60)
    group.broadcast(states[1], version=1, bucket_mb=None)
    short = dict(states[1])
    short.pop(next(iter(short)))
    group.broadcast(short, version=2, bucket_mb=None)
    time.sleep(1.0)  # the receiver holds its lock meanwhile: a sample asked for now must wait
    group.broadcast(states[3], version=3, bucket_mb=0.01)
    calls = [0]
    send = group._bcast

    def die_after_first_bucket(tensor: torch.Tensor, src: int) -> None:
        calls[0] += 1
        if calls[0] == 4:  # manifest length, manifest, bucket 0 went out; bucket 1 never does
            os._exit(0)
        send(tensor, src)

    group._bcast = die_after_first_bucket  # type: ignore[method-assign]
    group.broadcast(states[4], version=4, bucket_mb=0.01)


def test_receive_adopts_a_version_atomically(tmp_path: Path) -> None:
    """A rollout engine's receive_weights_from (the collective path): the values land in place and the
    version with them, under the sampling lock (a sample asked for mid-receive waits and gets the new
    version); a manifest that does not fit writes nothing; a broadcast that breaks off leaves the worker
    refusing to sample until a full update arrives."""
    import threading

    import pytest

    from vgrpo.core.adapters import trainable_params
    from vgrpo.proto.config import load_config
    from vgrpo.rollout_workers.engine import RolloutEngine

    cfg = load_config(None, ["rollout.num_steps=2"])
    eng = RolloutEngine(cfg.model, cfg.rollout, "dpm2", device="cpu")
    params = trainable_params(eng.pipe.transformer)
    assert len(params) > 2
    g = torch.Generator().manual_seed(7)
    states = {v: {k: torch.randn(p.shape, generator=g) for k, p in params.items()} for v in (1, 3, 4)}
    torch.save(states, tmp_path / "states.pt")
    port = _free_port()
    ctx = mp.get_context("spawn")
    sender = ctx.Process(target=_sender, args=(port, str(tmp_path / "states.pt")))
    sender.start()
    try:
        group = init_weight_sync_group("127.0.0.1", port, 1, 2, backend="gloo", timeout_s=60)
        assert eng.receive_weights_from(group) == 1
        assert eng.get_version() == 1
        assert all(torch.equal(p, states[1][k]) for k, p in params.items())
        ids = {k: p.data_ptr() for k, p in params.items()}  # in place: the same storage afterwards

        with pytest.raises(ValueError, match="does not match the model"):
            eng.receive_weights_from(group)
        assert eng.get_version() == 1 and not eng.incomplete
        assert all(torch.equal(p, states[1][k]) for k, p in params.items())

        got: dict[str, int] = {}
        receiver = threading.Thread(target=lambda: got.update(v=eng.receive_weights_from(group)))
        receiver.start()
        while not eng._lock.locked():  # the receive holds the sampling lock while the sender pauses
            time.sleep(0.01)
        out = eng.sample(["a photo of a red circle"], 2, [1, 2])  # waits for the receive to finish
        receiver.join(timeout=60)
        assert got == {"v": 3} and out.policy_version == 3
        assert all(torch.equal(p, states[3][k]) for k, p in params.items())
        assert {k: p.data_ptr() for k, p in params.items()} == ids

        with pytest.raises(Exception):  # noqa: B017  # gloo's error for a peer that went away
            eng.receive_weights_from(group)
        assert eng.incomplete and eng.get_version() == 3
        with pytest.raises(RuntimeError, match="partial weight update"):
            eng.sample(["a photo of a red circle"], 2, [1, 2])
        assert (
            eng.update_weights(WeightUpdate(4, states[4])) == 4
        )  # the object-store fallback makes it whole again
        assert not eng.incomplete
        assert eng.sample(["a photo of a red circle"], 2, [1, 2]).policy_version == 4
    finally:
        sender.join(timeout=30)
        if sender.is_alive():
            sender.kill()
