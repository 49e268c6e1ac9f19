"""`vgrpo export`: what diffusers loads must generate exactly what the run's policy generates."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import save_file

from vgrpo.checkpoints import export_policy, load_run_pipeline
from vgrpo.core.adapters import add_lora, trainable_params
from vgrpo.core.policy import load_pipeline, sample
from vgrpo.proto.config import RunConfig, dump_config

PROMPT = ["a photo of a red circle and a blue square"]


def fake_run(tmp_path):
    """A run directory with one checkpoint whose LoRA weights are random (so they change the images)."""
    cfg = RunConfig()
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_3"
    ckpt.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    pipe = load_pipeline(cfg.model.path)
    assert cfg.model.lora is not None
    add_lora(pipe.transformer, cfg.model.lora)
    g = torch.Generator().manual_seed(0)
    state = {
        k: 0.05 * torch.randn(p.shape, generator=g) for k, p in trainable_params(pipe.transformer).items()
    }
    save_file(state, str(ckpt / "policy.safetensors"))
    (ckpt / "driver_state.json").write_text(json.dumps({"step": 3}))
    return run


def test_export_lora_and_merged_pipeline_match_the_policy(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    run = fake_run(tmp_path)
    policy, _, step = load_run_pipeline(run, None)
    assert step == 3
    _, ref = sample(policy, PROMPT, [7], num_steps=4)
    base = load_pipeline(RunConfig().model.path)
    _, base_img = sample(base, PROMPT, [7], num_steps=4)
    assert np.abs(ref.astype(int) - base_img.astype(int)).max() > 0  # the checkpoint changes the images

    export_policy(run, None, tmp_path / "lora")
    pipe = load_pipeline(RunConfig().model.path)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    _, img = sample(pipe, PROMPT, [7], num_steps=4)
    assert np.abs(img.astype(int) - ref.astype(int)).max() <= 1

    export_policy(run, None, tmp_path / "merged", merge=True)
    merged = StableDiffusion3Pipeline.from_pretrained(
        str(tmp_path / "merged"), text_encoder_3=None, tokenizer_3=None
    )
    _, img2 = sample(merged, PROMPT, [7], num_steps=4)
    assert np.abs(img2.astype(int) - ref.astype(int)).max() <= 1
