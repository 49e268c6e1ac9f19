"""The loop's step in one process (vgrpo/local_loop.py): the same engines and messages as the actors,
used by the learnability probe and by `vgrpo plan --measure`."""

from __future__ import annotations

import numpy as np
import torch

from vgrpo.core.adapters import trainable_params
from vgrpo.driver import derive_seeds
from vgrpo.proto.config import load_config

SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.num_steps=2", "train.steps=2"]


def test_one_local_step_samples_scores_updates_and_publishes():
    from vgrpo.local_loop import LocalLoop

    cfg = load_config(None, SMALL)
    loop = LocalLoop(cfg)
    try:
        before = {k: p.detach().clone() for k, p in trainable_params(loop.rollout.pipe.transformer).items()}
        prompts = ["a photo of a red circle", "a photo of two squares"]
        done = loop.step(prompts, 1, derive_seeds(0, 1, 4))
        assert done.batch.images.shape[0] == 4 and done.batch.policy_version == 0
        assert done.scores.total.shape == (4,) and np.isfinite(done.scores.total).all()
        assert set(done.seconds) == {"rollout", "reward", "learner", "weight_sync"}
        assert loop.rollout.version == 1 and loop.learner.version == 1
        # an update with advantages that cannot all be zero moves the published weights
        adv = np.array([1.0, -1.0, 1.0, -1.0], np.float32)
        batch = loop.sample(prompts, 2, derive_seeds(0, 2, 4))
        loop.learn(batch, adv, 2, policy_version=1)
        loop.publish(2)
        after = trainable_params(loop.rollout.pipe.transformer)
        assert loop.rollout.version == 2
        assert max(float((after[k] - before[k]).abs().max()) for k in before) > 0
        assert all(torch.isfinite(p).all() for p in after.values())
    finally:
        loop.close()
