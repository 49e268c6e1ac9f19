"""The learner's own state, in-process on one rank (no Ray): the consolidated checkpoint that lets a run
resume on another number of ranks or ZeRO stage, and the EMA of the policy (``train.ema``)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vgrpo.proto.config import load_config
from vgrpo.proto.messages import TrainShard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    """One gloo group of one rank for the module (torch.distributed is per process); torn down after."""
    yield _free_port()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _engine(port: int, *sets: str) -> Any:
    from vgrpo.learner.engine import LearnerEngine

    cfg = load_config(None, ["rollout.prompts_per_step=2", "rollout.group_size=2", "learner.lr=0.01", *sets])
    eng = LearnerEngine(
        cfg.model, cfg.learner, cfg.algorithm, cfg.rollout, 0, 1, total_steps=8, seed=0, device="cpu"
    )
    eng.init_distributed("127.0.0.1", port, max_staleness=1, ema=cfg.train.ema)
    return eng


def _shard(eng: Any, step: int, data: int | None = None) -> TrainShard:
    """Step ``step``'s shard of random latents and text features (drawn from seed ``data``, default
    ``step``)."""
    from vgrpo.core.flow import sd3_sigmas

    c = eng.module.config
    rng = np.random.default_rng(step if data is None else data)
    b = 4
    return TrainShard(
        group_size=2,
        policy_version=step - 1,
        latents=rng.standard_normal((b, c.in_channels, c.sample_size, c.sample_size)).astype(np.float32),
        prompt_embeds=rng.standard_normal((b, 3, c.joint_attention_dim)).astype(np.float32),
        pooled=rng.standard_normal((b, c.pooled_projection_dim)).astype(np.float32),
        group_ids=np.array([0, 0, 1, 1]),
        advantages=np.array([1.0, -1.0, 0.5, -0.5], dtype=np.float32),
        sigmas=sd3_sigmas(4, shift=3.0).numpy(),
        shift=3.0,
    )


def _step(eng: Any, step: int) -> dict[str, torch.Tensor]:
    eng.train_step(_shard(eng, step), step)
    return eng.publish()


@pytest.mark.slow  # two DeepSpeed engines on gloo, ~2 min on 2 shared cores
def test_consolidated_state_resumes_in_another_zero_layout(port: int, tmp_path: Path) -> None:
    """ZeRO-2 trains 2 steps and checkpoints; a ZeRO-3 group (another layout, as another rank count is)
    loads the consolidated state instead of the shards: the same weights, Adam moments, step count and
    LR schedule, so its next update equals the one the original group makes."""
    from vgrpo.learner.engine import STATE_JSON, STATE_TENSORS

    a = _engine(port, "learner.zero_stage=2", "learner.lr_schedule=cosine")
    for step in (1, 2):
        _step(a, step)
    a.save_checkpoint(str(tmp_path / "learner"))
    assert (tmp_path / "learner" / STATE_TENSORS).is_file() and (tmp_path / "learner" / STATE_JSON).is_file()
    assert not list((tmp_path / "learner").rglob("*.pt"))  # no pickle in a checkpoint
    state = a.consolidated_state()
    assert state["optimizer"]["step"] == 2 and set(state["optimizer"]["exp_avg"]) == set(state["weights"])
    assert any(v.abs().sum() > 0 for v in state["optimizer"]["exp_avg_sq"].values())

    b = _engine(port, "learner.zero_stage=3", "learner.lr_schedule=cosine")
    assert b.load_checkpoint(str(tmp_path / "learner")) == 2
    got = b.consolidated_state()
    assert got["optimizer"]["step"] == 2
    for k in state["weights"]:
        torch.testing.assert_close(got["weights"][k], state["weights"][k])
        for m in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got["optimizer"][m][k], state["optimizer"][m][k])
    assert b.engine.get_lr() == a.engine.get_lr()
    assert sorted(b.history) == sorted(a.history)

    wa, wb = _step(a, 3), _step(b, 3)
    moved = max(float((wa[k] - state["weights"][k]).abs().max()) for k in wa)
    assert moved > 0
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)


def test_ema_follows_the_policy_with_warmup_and_survives_a_checkpoint(port: int, tmp_path: Path) -> None:
    a = _engine(port, "train.ema=0.9")
    w0 = {k: v.clone() for k, v in a.get_ema().items()}
    ws = [_step(a, s) for s in (1, 2)]
    # update t uses min(0.9, (1 + t) / (10 + t)): 0.1 then 2/11
    want = {k: 0.1 * w0[k] + 0.9 * ws[0][k] for k in w0}
    want = {k: (2 / 11) * want[k] + (9 / 11) * ws[1][k] for k in w0}
    ema = a.get_ema()
    for k in w0:
        torch.testing.assert_close(ema[k], want[k])
    assert a.ema_decay_at(100) == 0.9
    a.save_checkpoint(str(tmp_path / "learner"))
    b = _engine(port, "train.ema=0.9")
    b.load_checkpoint(str(tmp_path / "learner"))
    assert b.ema_updates == 2
    for k in w0:
        torch.testing.assert_close(b.get_ema()[k], ema[k])
    assert _engine(port).get_ema() is None


def test_eval_and_export_read_the_ema_weights_when_the_run_kept_them(tmp_path: Path) -> None:
    from vgrpo.checkpoints import policy_weights
    from vgrpo.learner.engine import save_policy_weights

    folder = tmp_path / "checkpoints" / "step_3"
    folder.mkdir(parents=True)
    save_policy_weights({"w": torch.zeros(2)}, folder / "policy.safetensors", 3, lora=True)
    (folder / "driver_state.json").write_text("{}")
    assert torch.equal(policy_weights(tmp_path, None)[1]["w"], torch.zeros(2))  # type: ignore[index]
    save_policy_weights({"w": torch.ones(2)}, folder / "ema.safetensors", 3, lora=True)
    step, weights = policy_weights(tmp_path, None)
    assert step == 3 and weights is not None and torch.equal(weights["w"], torch.ones(2))
    assert torch.equal(policy_weights(tmp_path, 3, ema=False)[1]["w"], torch.zeros(2))  # type: ignore[index]


def _old_adapter(eng: Any) -> dict[str, torch.Tensor]:
    from vgrpo.core.adapters import OLD_ADAPTER, adapter_params

    return {k: p.detach().clone() for k, p in adapter_params(eng.module, OLD_ADAPTER).items()}


def test_the_rollout_samples_with_the_policy_the_objective_names(port: int) -> None:
    """DiffusionNFT samples with its old (EMA) policy, as upstream train_nft_sd3.py does: the published
    weights are the old adapter's, not the trained ones (the trained ones still checkpoint and evaluate);
    DGPO switches to its EMA copy after switch_ema_ref updates; V-GRPO publishes the trained weights."""
    nft = _engine(port, "algorithm.name=nft", "algorithm.nft.old_decay_rate=0.25")
    published = _step(nft, 1)
    old, current = _old_adapter(nft), nft.get_weights()
    assert set(published) == set(current)
    for k in published:
        torch.testing.assert_close(published[k], old[k])
    assert max(float((published[k] - current[k]).abs().max()) for k in current) > 0

    dgpo = _engine(port, "algorithm.name=dgpo", "algorithm.dgpo.switch_ema_ref=1")
    first = _step(dgpo, 1)  # version 1: not past switch_ema_ref yet -> the trained weights
    for k, v in dgpo.get_weights().items():
        torch.testing.assert_close(first[k], v)
    second = _step(dgpo, 2)  # version 2 > 1 -> the EMA copy
    old = _old_adapter(dgpo)
    for k in second:
        torch.testing.assert_close(second[k], old[k])
    assert max(float((second[k] - dgpo.get_weights()[k]).abs().max()) for k in second) > 0

    vgrpo = _engine(port)
    got = _step(vgrpo, 1)
    for k, v in vgrpo.get_weights().items():
        torch.testing.assert_close(got[k], v)


def test_a_nan_loss_or_a_gradient_spike_skips_the_update_and_too_many_stop(port: int) -> None:
    """A NaN loss on every micro step skips the update (counted, not fatal); a gradient norm far above the
    recent median is undone (the weights stay those before it); max_skipped_updates in a row stop."""
    from vgrpo.learner.engine import NonFiniteLossError

    # six ordinary updates, the guard's reference: one batch, a small step (random batches of this
    # untrained model give gradient norms 600x apart, which the guard rightly calls spikes)
    eng = _engine(port, "learner.max_skipped_updates=2", "learner.lr=1e-4")
    for step in range(1, 7):
        out = eng.train_step(_shard(eng, step, data=1), step)
        assert out["learner/skipped_update"] == 0.0, (step, eng.grad_norms)
    real_loss = eng.objective.loss

    eng.objective.loss = lambda policy, mb, gen: (torch.tensor(float("nan"), requires_grad=True), {})
    out = eng.train_step(_shard(eng, 7, data=1), 7)
    assert out["learner/skipped_update"] == 1.0 and out["learner/nonfinite_micro_steps"] >= 1
    assert eng.version == 7 and all(torch.isfinite(v).all() for v in eng.get_weights().values())

    def spiky(policy, mb, gen):  # the real loss, scaled up a thousandfold: a gradient spike
        loss, diag = real_loss(policy, mb, gen)
        return loss * 1000.0, diag

    eng.objective.loss = spiky
    before = {k: v.clone() for k, v in eng.get_weights().items()}
    with pytest.raises(NonFiniteLossError, match="2 updates skipped in a row"):
        eng.train_step(_shard(eng, 8, data=1), 8)
    after = eng.get_weights()
    assert all(torch.equal(after[k], before[k]) for k in before)  # the spike was undone
    eng.objective.loss = real_loss
