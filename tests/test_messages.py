"""The typed messages of proto/messages.py: each check names the message, the field and the sender, and
a shard split keeps whole groups and every per-image array in step."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from vgrpo.core.flow import sd3_sigmas
from vgrpo.proto.messages import (
    MessageError,
    RewardScores,
    RolloutBatch,
    TrainShard,
    WeightManifest,
    WeightUpdate,
    split_evenly,
)


def batch(p: int = 3, g: int = 2, sde: bool = False, steps: int = 4) -> RolloutBatch:
    b = p * g
    rng = np.random.default_rng(0)
    return RolloutBatch(
        group_size=g,
        policy_version=2,
        latents=rng.standard_normal((b, 2, 4, 4)).astype(np.float32),
        images=np.zeros((b, 8, 8, 3), np.uint8),
        prompt_embeds=np.arange(p, dtype=np.float32)[:, None, None] * np.ones((p, 3, 5), np.float32),
        pooled=np.arange(p, dtype=np.float32)[:, None] * np.ones((p, 5), np.float32),
        sigmas=sd3_sigmas(steps, 3.0).numpy(),
        shift=3.0,
        trajectory=np.zeros((b, steps + 1, 2, 4, 4), np.float32) if sde else None,
        logp=np.zeros((b, steps), np.float32) if sde else None,
    )


def test_a_well_formed_rollout_batch_passes_and_concat_keeps_prompt_order():
    a, b = batch(2).check("worker 0", num_prompts=2), batch(1).check("worker 1", num_prompts=1)
    joined = RolloutBatch.concat([a, b])
    assert joined.num_prompts == 3 and len(joined.latents) == 6
    assert np.array_equal(joined.pooled[:, 0], [0, 1, 0])
    joined.check("the driver")


@pytest.mark.parametrize(
    "change, field, words",
    [
        (dict(latents=np.zeros((5, 2, 4, 4), np.float32)), "latents", "5 rows"),
        (dict(images=np.zeros((6, 8, 8, 3), np.float32)), "images", "dtype float32"),
        (dict(pooled=np.zeros((2, 5), np.float32)), "pooled", "2 rows"),
        (dict(sigmas=np.array([1.0, 0.5, 0.6, 0.0])), "sigmas", "decreasing"),
        (dict(latents=np.full((6, 2, 4, 4), np.nan, np.float32)), "latents", "non-finite"),
        (dict(logp=np.zeros((6, 4), np.float32)), "trajectory", "together"),
        (dict(policy_version=-1), "policy_version", ">= 0"),
    ],
)
def test_a_malformed_rollout_batch_names_field_and_sender(change, field, words):
    bad = replace(batch(), **change)
    with pytest.raises(MessageError, match=words) as e:
        bad.check("rollout worker 1 (step 7)")
    assert e.value.field == field and "rollout worker 1 (step 7)" in str(e.value)


def test_a_batch_for_other_prompts_or_a_window_past_the_grid_is_refused():
    with pytest.raises(MessageError, match="asked for 4"):
        batch(3).check("w", num_prompts=4)
    windowed = replace(batch(sde=True), trajectory=np.zeros((6, 3, 2, 4, 4), np.float32))
    windowed = replace(windowed, logp=np.zeros((6, 2), np.float32), window_start=3)
    with pytest.raises(MessageError, match="window_start"):
        windowed.check("w")
    replace(windowed, window_start=2).check("w")


def test_train_shards_hold_whole_groups_with_their_rows():
    full = batch(3, 2, sde=True)
    adv = np.arange(6, dtype=np.float32)
    shards = TrainShard.split(full, adv, 2, policy_version=1)
    assert [len(s) for s in shards] == [4, 2]
    for s, (lo, hi) in zip(shards, split_evenly(3, 2), strict=True):
        s.check("the driver")
        assert np.array_equal(s.group_ids, np.repeat(np.arange(lo, hi), 2))
        assert np.array_equal(s.advantages, adv[lo * 2 : hi * 2])
        assert np.array_equal(s.pooled[:, 0], np.repeat(np.arange(lo, hi), 2))  # text features follow
        assert s.trajectory is not None and np.array_equal(s.latents, full.latents[lo * 2 : hi * 2])
        assert s.policy_version == 1
    torn = replace(shards[0], group_ids=np.array([0, 0, 0, 1]))
    with pytest.raises(MessageError, match="whole groups"):
        torn.check("the driver (step 3, learner rank 0)")
    with pytest.raises(MessageError, match="advantages holds non-finite"):
        replace(shards[1], advantages=np.array([np.inf, 0.0], np.float32)).check("d")


def test_reward_scores_and_weight_messages():
    ok = RewardScores({"shapes": np.ones(4)}, np.ones(4), {}, {}, 0.1, 0)
    ok.check("the reward servers", 4)
    with pytest.raises(MessageError, match="3 rows"):
        replace(ok, total=np.ones(3)).check("the reward servers", 4)
    WeightUpdate(3, {"w": torch.zeros(2)}).check("the driver")
    with pytest.raises(MessageError, match="version"):
        WeightUpdate(-1, {"w": torch.zeros(2)}).check("the driver")
    with pytest.raises(MessageError, match="empty"):
        WeightUpdate(1, {}).check("the driver")
    m = WeightManifest(version=2, sizes=[32], entries=[dict(name="w", shape=[2], dtype="float32", bucket=0, offset=0, nbytes=8)])  # fmt: skip
    assert WeightManifest.model_validate_json(m.model_dump_json()) == m
    with pytest.raises(ValueError, match="version"):
        WeightManifest.model_validate_json('{"version": -1, "sizes": [], "entries": []}')


def test_dropping_failed_groups_keeps_every_array_in_step():
    """reward.on_failure=drop_group: the failed images' groups leave batch and scores together, and a
    failure is NaN (never a zero that could pass for a reward) outside the mask only finite values pass."""
    b = batch(p=3, g=2, sde=True)
    b.latents[:] = np.arange(6, dtype=np.float32)[:, None, None, None]
    kept = b.select_groups(np.array([0, 2])).check("test", num_prompts=2)
    assert kept.latents[:, 0, 0, 0].tolist() == [0, 1, 4, 5]
    assert kept.prompt_embeds[:, 0, 0].tolist() == [0, 2] and kept.pooled[:, 0].tolist() == [0, 2]
    assert kept.trajectory is not None and kept.trajectory.shape[0] == 4 and kept.logp.shape[0] == 4
    values = np.array([0.1, 0.2, np.nan, 0.4, 0.5, 0.6])
    s = RewardScores({"r": values}, values.copy(), {"r": [{"i": i} for i in range(6)]}, {"r": [6] * 6}, 0.0, 0,
                     failed=np.isnan(values), errors=["reward 'r' failed on image 2"])  # fmt: skip
    s.check("the reward servers", 6)  # NaN where marked failed passes
    with pytest.raises(MessageError, match="total"):
        replace(s, failed=np.zeros(6, bool)).check("the reward servers", 6)
    with pytest.raises(MessageError, match="errors"):
        replace(s, errors=[]).check("the reward servers", 6)
    sel = s.select(np.array([True, True, False, False, True, True]))
    assert sel.total.tolist() == [0.1, 0.2, 0.5, 0.6] and [d["i"] for d in sel.details["r"]] == [0, 1, 4, 5]
    assert sel.failed is not None and not sel.failed.any()


def test_drop_group_leaves_the_failed_groups_out_and_stops_when_too_few_remain(
    caplog: pytest.LogCaptureFixture,
):
    from vgrpo.driver import TrainingError, drop_failed_groups
    from vgrpo.proto.config import RunConfig

    assert RunConfig().reward.on_failure == "stop"  # the default: a failure ends the run, naming it
    b = batch(p=3, g=2)
    prompts = [f"p{i // 2}" for i in range(6)]
    v = np.array([0.1, 0.2, 0.3, np.nan, 0.5, 0.6])
    scores = RewardScores({"r": v}, v.copy(), {}, {}, 0.0, 0, failed=np.isnan(v), errors=["reward 'r' failed on image 3"])  # fmt: skip
    with caplog.at_level("WARNING", logger="vgrpo"):
        kept, kp, ks, dropped = drop_failed_groups(7, b, prompts, scores, num_ranks=1)
    assert dropped == 1 and kp == ["p0", "p0", "p2", "p2"] and ks.total.tolist() == [0.1, 0.2, 0.5, 0.6]
    assert (
        kept.num_prompts == 2
        and "failed on image 3" in caplog.text
        and "1 prompt group(s) dropped" in caplog.text
    )
    with pytest.raises(TrainingError, match="1 left for 2 learner rank"):
        drop_failed_groups(
            7, b, prompts, replace_failed(scores, [True, False, False, True, False, False]), num_ranks=2
        )
    clean = RewardScores({"r": np.ones(6)}, np.ones(6), {}, {}, 0.0, 0)
    assert drop_failed_groups(7, b, prompts, clean, num_ranks=2)[3] == 0


def replace_failed(scores: RewardScores, mask: list[bool]) -> RewardScores:
    m = np.array(mask)
    return replace(scores, failed=m, total=np.where(m, np.nan, 1.0))
