"""Model families beyond SD3 (core/families, docs/families.md): FLUX.1 (dev, schnell), Qwen-Image and
Wan2.1, each a tiny random-weight pipeline from `vgrpo tiny-model`. The family code is checked against
diffusers' own pipelines — their packing, position ids, timestep scaling, guidance, shift schedule, text
masks and decode — by sampling the same noise both ways; then the rollout, the rewards of a clip, the
export and a 2-step Ray run per family."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vgrpo.core import policy as P
from vgrpo.core.families import FAMILIES, FamilyError, TextCond, family_of, resolve_family
from vgrpo.core.flow import ode_sample, sd3_sigmas
from vgrpo.proto.config import load_config

PROMPTS = ["a photo of a red circle", "a photo of two blue squares"]
TEXT_LEN = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``tiny(family, variant)`` -> the folder of that tiny pipeline, built once per module."""
    from vgrpo.tiny_families import build_tiny

    built: dict[tuple[str, str | None], str] = {}

    def get(family: str, variant: str | None = None) -> str:
        if (family, variant) not in built:
            out = tmp_path_factory.mktemp(f"{family}-{variant or 'base'}")
            built[(family, variant)] = str(build_tiny(family, out, variant)["path"])
        return built[(family, variant)]

    return get


# ----------------------------------------------------------------------------------------- detection


def test_the_family_is_read_from_model_index_and_model_family_overrides_it(tiny, tmp_path):
    for family in ("flux", "qwen_image", "wan"):
        assert resolve_family(tiny(family)).name == family
    assert resolve_family(P.resolve_model_path("builtin:tiny-sd3")).name == "sd3"
    assert resolve_family(tiny("flux"), "sd3").name == "sd3"  # an explicit model.family wins
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(FamilyError, match=r"KandinskyPipeline.*flux: FluxPipeline.*model\.family"):
        resolve_family(str(tmp_path))
    with pytest.raises(FamilyError, match=r"model\.family to one of sd3, flux, qwen_image, wan"):
        resolve_family("nobody/not-a-cached-model")
    with pytest.raises(FamilyError, match=r"choose one of sd3, flux, qwen_image, wan"):
        resolve_family(tiny("flux"), "kandinsky")


def test_model_family_is_a_checked_config_field():
    from vgrpo.proto.config import ConfigError

    assert load_config(None, ["model.family=wan"]).model.family == "wan"
    with pytest.raises(ConfigError, match=r"model\.family"):
        load_config(None, ["model.family=kandinsky"])
    assert load_config(None, ["model.family=qwen_image", "model.max_sequence_length=1024"]).model.family
    with pytest.raises(ConfigError, match=r"model\.family flux takes at most 512.*max_sequence_length=512"):
        load_config(None, ["model.family=flux", "model.max_sequence_length=1024"])


def test_prompt_length_limits_fit_each_family(tiny):
    flux = P.load_pipeline(tiny("flux"))
    with pytest.raises(ValueError, match=r"model\.max_sequence_length = 1024: flux takes at most 512"):
        P.encode_prompts(flux, PROMPTS, 1024)
    assert FAMILIES["qwen_image"].max_text_tokens == 1024


@pytest.mark.parametrize("family", ["flux", "qwen_image", "wan"])
def test_the_learners_text_only_pipeline_encodes_as_the_whole_one(tiny, family):
    """The learner encodes the empty prompt with the text encoders alone (no transformer, no VAE)."""
    text = P.load_pipeline(tiny(family), text_only=True)
    assert text.transformer is None and text.vae is None
    a, b = (
        P.empty_prompt_embeds(text, TEXT_LEN),
        P.empty_prompt_embeds(P.load_pipeline(tiny(family)), TEXT_LEN),
    )
    assert torch.equal(a.embeds, b.embeds) and torch.equal(a.pooled, b.pooled)


# ------------------------------------------------------------------------- against diffusers' pipelines


def _pipe_latents(out) -> torch.Tensor:
    return out.images if hasattr(out, "images") else out.frames


@pytest.mark.parametrize(("variant", "guidance"), [("dev", 3.5), ("schnell", 1.0)])
def test_flux_sampling_matches_diffusers_flux_pipeline(tiny, variant, guidance):
    """Our Euler ODE on the family's grid == FluxPipeline on the same packed noise: dev feeds w to the
    guidance embedding (one forward), schnell has none; the shift is FLUX's resolution-dependent one."""
    from diffusers import FluxPipeline

    pipe = P.load_pipeline(tiny("flux", variant))
    assert family_of(pipe).guidance_mode(pipe.transformer) == ("embedded" if variant == "dev" else "cfg")
    h, w, _ = P.native_shape(pipe)
    shape, _ = P.sample_geometry(pipe)
    lat, images = P.sample(
        pipe,
        PROMPTS[:1],
        [5],
        num_steps=3,
        guidance_scale=guidance,
        sampler="euler",
        max_sequence_length=TEXT_LEN,
    )
    x1 = P.initial_noise([5], shape)
    packed = FluxPipeline._pack_latents(x1, 1, shape[0], shape[1], shape[2])
    kw = dict(height=h, width=w, num_inference_steps=3, guidance_scale=guidance, max_sequence_length=TEXT_LEN)
    ref = pipe(PROMPTS[0], latents=packed, output_type="latent", **kw).images
    ref = FluxPipeline._unpack_latents(ref, h, w, pipe.vae_scale_factor)
    torch.testing.assert_close(lat, ref.float(), atol=1e-5, rtol=1e-4)
    ref_np = pipe(PROMPTS[0], latents=packed, output_type="np", **kw).images
    assert np.abs(images.astype(np.float64) / 255 - ref_np).max() <= 1 / 255 + 1e-3


def test_qwen_image_sampling_with_true_cfg_matches_diffusers_qwen_image_pipeline(tiny):
    """True CFG against the empty prompt, with the norm rescaling, the padding masks of two prompts of
    different lengths batched as [uncond; cond], and Qwen-Image's dynamic shift."""
    from diffusers import QwenImagePipeline

    pipe = P.load_pipeline(tiny("qwen_image"))
    h, w, _ = P.native_shape(pipe)
    shape, _ = P.sample_geometry(pipe)
    lat, _ = P.sample(
        pipe, PROMPTS[1:], [3], num_steps=3, guidance_scale=4.0, sampler="euler", max_sequence_length=TEXT_LEN
    )
    packed = QwenImagePipeline._pack_latents(P.initial_noise([3], shape), 1, shape[0], shape[1], shape[2])
    ref = pipe(
        PROMPTS[1], negative_prompt="", true_cfg_scale=4.0, latents=packed, height=h, width=w,
        num_inference_steps=3, max_sequence_length=TEXT_LEN, output_type="latent",
    ).images  # fmt: skip
    ref = QwenImagePipeline._unpack_latents(ref, h, w, pipe.vae_scale_factor)[:, :, 0]
    torch.testing.assert_close(lat, ref.float(), atol=1e-5, rtol=1e-4)


def test_wan_clip_sampling_matches_diffusers_wan_pipeline(tiny):
    """Wan2.1 with CFG on video latents (B, C, F', h, w): our Euler on diffusers' grid == WanPipeline
    with FlowMatchEulerDiscreteScheduler at the same flow shift; decoded to (F, H, W, 3) clips."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = P.load_pipeline(tiny("wan"))
    h, w, frames = P.native_shape(pipe)
    assert frames == 5
    shape, shift = P.sample_geometry(pipe)
    assert len(shape) == 4 and shape[1] == 2  # 5 frames -> 2 latent frames
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    x1 = P.initial_noise([11], shape)
    cond = P.encode_prompts(pipe, PROMPTS[:1], TEXT_LEN)
    uncond = P.empty_prompt_embeds(pipe, TEXT_LEN)
    with torch.no_grad():
        lat = ode_sample(
            lambda x, s: P.guided_velocity(pipe.transformer, x, s, cond, 5.0, uncond),
            x1, sd3_sigmas(3, shift, grid="diffusers"), solver="euler",
        )  # fmt: skip
        clips = P.decode(pipe, lat)
    kw = dict(height=h, width=w, num_frames=frames, num_inference_steps=3, guidance_scale=5.0)
    ref = pipe(PROMPTS[0], latents=x1, output_type="latent", max_sequence_length=TEXT_LEN, **kw).frames
    torch.testing.assert_close(lat, ref.float(), atol=1e-5, rtol=1e-4)
    ref_np = pipe(PROMPTS[0], latents=x1, output_type="np", max_sequence_length=TEXT_LEN, **kw).frames
    assert clips.shape == (1, frames, h, w, 3) == ref_np.shape
    assert np.abs(clips.astype(np.float64) / 255 - ref_np).max() <= 1 / 255 + 1e-3


def test_text_cond_cat_pads_and_masks_different_lengths():
    a = TextCond(torch.ones(1, 2, 3), torch.zeros(1, 0))
    b = TextCond(
        torch.full((2, 4, 3), 2.0), torch.zeros(2, 0), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    )
    both = TextCond.cat([a, b])
    assert both.embeds.shape == (3, 4, 3) and both.mask is not None
    assert both.mask.tolist() == [[True, True, False, False], [True, True, True, False], [True] * 4]
    assert float(both.embeds[0, 2:].abs().sum()) == 0.0


# ----------------------------------------------------------------------------------------- rollout


def test_wan_rollout_samples_clips_and_image_rewards_average_their_frames(tiny):
    from vgrpo.reward_servers.base import Reward, ScoredItem
    from vgrpo.rollout_workers.engine import RolloutEngine

    cfg = load_config(None, [f"model.path={tiny('wan')}", "rollout.num_steps=2", "rollout.guidance_scale=1"])
    engine = RolloutEngine(cfg.model, cfg.rollout, "dpm2", device="cpu")
    batch = engine.sample(PROMPTS, 2, [1, 2, 3, 4]).check("test", num_prompts=2)
    assert batch.images.shape == (4, 5, 32, 32, 3) and batch.latents.ndim == 5  # frames > 1
    assert batch.pooled.shape == (2, 0)

    class Brightness(Reward):  # an image reward: one frame's mean pixel
        name = "brightness"

        def score(self, images, prompts, metadata=None):
            return [ScoredItem(float(np.asarray(im).mean()), details={"n": 1.0}) for im in images]

    items = Brightness().score_samples(list(batch.images), [p for p in PROMPTS for _ in range(2)])
    want = batch.images.reshape(4, 5, -1).mean(axis=2).mean(axis=1)  # per frame, then over frames
    assert [it.value for it in items] == pytest.approx(want.tolist())
    assert all(it.details["frames"] == 5 for it in items)


# ----------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("family", ["flux", "qwen_image", "wan"])
def test_export_loads_in_the_familys_pipeline_and_reproduces_the_policy(tiny, tmp_path, family):
    """A run's LoRA policy exported, loaded with diffusers' own pipeline (load_lora_weights, and a merged
    from_pretrained): the transformer's output on a fixed input equals the policy's to 1e-5 and differs
    from the base model's."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    from vgrpo.checkpoints import export_policy, load_run_pipeline
    from vgrpo.core.adapters import add_lora, trainable_params
    from vgrpo.proto.config import dump_config

    cfg = load_config(None, [f"model.path={tiny(family)}"])
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_2"
    ckpt.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    pipe = P.load_pipeline(cfg.model.path)
    assert cfg.model.lora is not None
    add_lora(pipe.transformer, cfg.model.lora)
    g = torch.Generator().manual_seed(0)
    state = {
        k: 0.2 * torch.randn(p.shape, generator=g) for k, p in trainable_params(pipe.transformer).items()
    }
    save_file(state, str(ckpt / "policy.safetensors"))
    (ckpt / "driver_state.json").write_text(json.dumps({"step": 2}))

    policy, _, _ = load_run_pipeline(run, None)
    fam = family_of(policy)
    shape, _ = P.sample_geometry(policy)
    x = P.initial_noise([0], shape)
    cond = P.encode_prompts(policy, PROMPTS[:1], TEXT_LEN)

    def v(p) -> torch.Tensor:
        with torch.no_grad():
            return P.guided_velocity(p.transformer, x, torch.tensor([0.6]), cond, 2.0, family=fam)

    want = v(policy)
    base = DiffusionPipeline.from_pretrained(cfg.model.path)
    assert (v(base) - want).abs().max() > 1e-3  # the policy is not the base model
    export_policy(run, None, tmp_path / "lora")
    base.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(v(base), want, atol=1e-5, rtol=1e-5)
    export_policy(run, None, tmp_path / "merged", merge=True)
    merged = DiffusionPipeline.from_pretrained(str(tmp_path / "merged"))
    assert type(merged).__name__ == fam.pipeline_class
    torch.testing.assert_close(v(merged), want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- on Ray


def _train(
    ray_cluster, tmp_path, path: str, algorithm: str, steps: int = 2, resume: bool = False
) -> list[dict]:
    from vgrpo.driver import train

    cfg = load_config(
        None,
        [
            f"model.path={path}", f"algorithm.name={algorithm}", f"train.steps={steps}",
            "rollout.prompts_per_step=2", "rollout.group_size=2",
            # Flow-GRPO-Fast's default window range [0, 5] needs 6 sampler steps; the others run 4
            f"rollout.num_steps={6 if algorithm == 'flow_grpo_fast' else 4}",
            "train.checkpoint_every=2", "train.samples_every=2", "observability.progress=plain",
        ],
    )  # fmt: skip
    run = tmp_path / "run"
    assert train(cfg, run, resume=resume) == steps
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["reward_mean"]) for r in rows), rows
    assert (run / "samples" / "step_2" / "grid.png").is_file()
    return rows


@pytest.mark.parametrize(
    ("family", "variant", "algorithm"),
    [
        ("flux", "dev", "vgrpo"),
        ("flux", "schnell", "dgpo"),
        ("qwen_image", None, "nft"),
        ("wan", None, "flow_grpo"),
    ],
)
def test_two_steps_on_ray(ray_cluster, tmp_path, tiny, family, variant, algorithm):
    rows = _train(ray_cluster, tmp_path, tiny(family, variant), algorithm)
    if family == "wan":  # the sample grid shows each clip as a strip of its 5 frames
        from PIL import Image

        grid = Image.open(tmp_path / "run" / "samples" / "step_2" / "grid.png")
        assert grid.size == (2 * 5 * 32, 2 * 32)
    assert rows[-1]["policy_version"] == 2


OBJECTIVES = ["vgrpo", "dgpo", "flow_grpo", "flow_grpo_fast", "mixgrpo", "nft"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "qwen_image", "wan"])
def test_a_family_run_resumes_from_its_checkpoint(ray_cluster, tmp_path, tiny, family):
    _train(ray_cluster, tmp_path, tiny(family), "vgrpo", steps=2)
    rows = _train(ray_cluster, tmp_path, tiny(family), "vgrpo", steps=4, resume=True)
    assert [r["policy_version"] for r in rows] == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", OBJECTIVES)
@pytest.mark.parametrize("family", ["flux", "qwen_image", "wan"])
def test_every_objective_trains_every_family(ray_cluster, tmp_path, tiny, family, algorithm):
    _train(ray_cluster, tmp_path, tiny(family), algorithm)
