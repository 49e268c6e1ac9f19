"""GPU tests (issue 10, item 7): an SD3.5-Medium-shaped transformer built from its published config with
random weights (nothing is downloaded) runs the project's rollout and learner code at 512², bf16, LoRA.

No Ray and no DeepSpeed (the GPU machine has neither): the rollout is what ``RolloutEngine.sample`` runs
per batch (``P.initial_noise`` -> ``ode_sample`` over ``P.velocity`` -> ``P.decode_latents``) with random
prompt embeddings of the real shapes; the learner step is the V-GRPO objective through
``LearnerPolicy`` on a batch laid out as ``LearnerEngine._to_batch`` lays it (on the device), with a
plain torch AdamW on an fp32 LoRA over bf16 base weights under bf16 autocast.

    pytest -m gpu tests/test_gpu.py        # on a CUDA machine; docs/benchmarks.md has the device command

Skipped without CUDA, and deselected by the default ``-m 'not slow and not gpu'``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from vgrpo.core import policy as P
from vgrpo.core.adapters import (
    OLD_ADAPTER,
    TRAIN_ADAPTER,
    adapter_params,
    adapters_disabled,
    add_lora,
    load_weights,
    trainable_params,
)
from vgrpo.core.families import TextCond
from vgrpo.core.flow import ode_sample, sd3_sigmas
from vgrpo.learner.engine import LearnerPolicy
from vgrpo.learner.objectives.base import TrainBatch
from vgrpo.learner.objectives.vgrpo import VGRPO
from vgrpo.model_configs import SD35_VAE, SD35M_TRANSFORMER
from vgrpo.proto.config import AdvantageConfig, LoraConfig, VGRPOConfig

if not torch.cuda.is_available():
    pytest.skip(
        "GPU tests need CUDA (torch.cuda.is_available() is False); see docs/benchmarks.md for the GPU command",
        allow_module_level=True,
    )

DEVICE = torch.device("cuda")
SD35M = SD35M_TRANSFORMER
IMAGE = 512
LATENT = (16, IMAGE // 8, IMAGE // 8)  # 16 x 64 x 64
TEXT_LEN = 77 + 128  # CLIP tokens + T5 max_sequence_length of configs/sd35m_*.yaml
LORA = LoraConfig(rank=32, alpha=64.0)  # configs/sd35m_vgrpo_*.yaml


def build_transformer(seed: int = 0) -> Any:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    with torch.device(DEVICE):
        model: Any = SD3Transformer2DModel(**SD35M)
    return model.to(device=DEVICE, dtype=torch.bfloat16).eval().requires_grad_(False)


def cond(b: int, seed: int = 0) -> TextCond:
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(b, TEXT_LEN, SD35M["joint_attention_dim"], generator=g)  # type: ignore[call-overload]
    pooled = torch.randn(b, SD35M["pooled_projection_dim"], generator=g)  # type: ignore[call-overload]
    return TextCond(embeds.to(DEVICE, torch.bfloat16), pooled.to(DEVICE, torch.bfloat16))


def lora_state(model: Any, adapter: str = TRAIN_ADAPTER) -> dict[str, torch.Tensor]:
    """``LearnerEngine.get_weights``' payload: host fp32 clones under canonical names."""
    return {k: p.detach().to("cpu", torch.float32).clone() for k, p in adapter_params(model, adapter).items()}


@pytest.fixture(scope="module")
def rollout_model() -> Any:
    """The rollout side as ``RolloutEngine`` holds it: bf16 transformer, bf16 LoRA ``default``, no grads."""
    model = build_transformer(seed=0)
    add_lora(model, LORA, seed=0)
    return model.requires_grad_(False)


@pytest.fixture(scope="module")
def vae() -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    with torch.device(DEVICE):
        model: Any = AutoencoderKL(**SD35_VAE)
    return model.to(device=DEVICE, dtype=torch.bfloat16).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def learner_model() -> Any:
    """The learner side: the same base weights, LoRA ``default`` (trained, fp32) and ``old`` (frozen)."""
    model = build_transformer(seed=0)
    add_lora(model, LORA, adapters=(TRAIN_ADAPTER, OLD_ADAPTER), seed=0)
    for p in adapter_params(model, TRAIN_ADAPTER).values():
        p.data = p.data.float()
    return model


@pytest.mark.gpu
def test_transformer_is_sd35_medium_shaped(rollout_model):
    c = rollout_model.config
    assert (c.num_layers, c.num_attention_heads, c.attention_head_dim) == (24, 24, 64)
    assert (c.joint_attention_dim, c.caption_projection_dim, c.pooled_projection_dim) == (4096, 1536, 2048)
    assert (c.in_channels, c.out_channels, c.patch_size, c.sample_size) == (16, 16, 2, 128)
    assert c.pos_embed_max_size == 384 and c.qk_norm == "rms_norm"
    blocks = rollout_model.transformer_blocks
    assert [b.attn2 is not None for b in blocks] == [i < 13 for i in range(24)]  # MMDiT-X dual attention
    base = sum(p.numel() for n, p in rollout_model.named_parameters() if "lora_" not in n)
    assert 2.2e9 < base < 2.3e9, base  # SD3.5-Medium's transformer: 2.24 B parameters
    lora = adapter_params(rollout_model)
    assert lora and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in lora.values())
    assert all(p.dtype == torch.bfloat16 for p in rollout_model.parameters())


@pytest.mark.gpu
@torch.no_grad()
def test_velocity_at_512_is_finite_and_lora_starts_as_identity(rollout_model):
    x = torch.randn(2, *LATENT, device=DEVICE)
    sigma = torch.tensor([1.0, 0.3])
    text = cond(2)
    v = P.velocity(rollout_model, x, sigma, text)
    assert v.shape == (2, *LATENT) and v.dtype == torch.bfloat16
    assert torch.isfinite(v).all() and v.float().abs().sum() > 0
    with adapters_disabled(rollout_model):  # LoRA B = 0 at version 0: the adapted model is the base
        v_base = P.velocity(rollout_model, x, sigma, text)
    torch.testing.assert_close(v, v_base)


@pytest.mark.gpu
@torch.no_grad()
def test_rollout_samples_and_decodes_512_images(rollout_model, vae):
    seeds = [3, 4]
    text = cond(2, seed=1)
    sigmas = sd3_sigmas(4, shift=3.0)

    def v_fn(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:  # RolloutEngine._velocity_fn, CFG off
        return P.velocity(rollout_model, x, s, text).float()

    x1 = P.initial_noise(seeds, LATENT).to(DEVICE)
    latents = ode_sample(v_fn, x1, sigmas, solver="dpm2").float().cpu()
    assert latents.shape == (2, *LATENT) and torch.isfinite(latents).all()
    again = ode_sample(v_fn, P.initial_noise(seeds, LATENT).to(DEVICE), sigmas, solver="dpm2").float().cpu()
    torch.testing.assert_close(again, latents, atol=1e-2, rtol=1e-2)  # a seed gives the same sample
    images = P.decode_latents(vae, latents)
    assert images.shape == (2, IMAGE, IMAGE, 3) and images.dtype.name == "uint8"


def vgrpo_batch(b: int, group: int, seed: int = 0) -> TrainBatch:
    """A micro batch as ``LearnerEngine._to_batch`` builds it: every tensor on the device."""
    g = torch.Generator().manual_seed(seed)
    text = cond(b, seed)
    rewards = torch.randn(b, generator=g)
    group_ids = torch.arange(b) // group
    adv, _ = VGRPO(VGRPOConfig()).advantages(rewards, group_ids)  # the driver's side, on the host
    return TrainBatch(
        latents_bchw=torch.randn(b, *LATENT, generator=g).to(DEVICE),
        cond=(text),
        group_ids_b=group_ids.to(DEVICE),
        advantages_b=adv.to(DEVICE),
        sigmas=sd3_sigmas(10, shift=3.0),
        shift=3.0,
    )


def loss_and_backward(obj: VGRPO, policy: LearnerPolicy, batch: TrainBatch, seed: int):
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss, diag = obj.loss(policy, batch, torch.Generator().manual_seed(seed))
    assert loss.ndim == 0 and torch.isfinite(loss), loss
    loss.backward()
    return loss, diag


@pytest.mark.gpu
def test_vgrpo_learner_step_trains_only_the_lora(learner_model):
    model = learner_model
    model.disable_gradient_checkpointing()
    train = adapter_params(model, TRAIN_ADAPTER)
    old = adapter_params(model, OLD_ADAPTER)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in train.values())
    trained = {id(p) for p in train.values()}
    assert not any(p.requires_grad for p in model.parameters() if id(p) not in trained)
    opt = torch.optim.AdamW(list(train.values()), lr=1e-3, weight_decay=0.0)
    obj = VGRPO(VGRPOConfig(n_mc=2, kl_beta=0.01, advantage=AdvantageConfig(norm="group", soft_clip=3.0)))
    policy = LearnerPolicy(model)
    batch = vgrpo_batch(4, group=2, seed=0)  # two prompt groups of two images, 512²
    v0 = lora_state(model)

    # step 1, on-policy (theta_old = theta): ratio 1; B = 0 at init, so only lora_B gets a gradient
    policy._old_is_current = True
    _, diag = loss_and_backward(obj, policy, batch, seed=1)
    assert diag["ratio_mean"] == pytest.approx(1.0)
    grads = {k: p.grad for k, p in train.items()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert sum(float(g.norm()) for k, g in grads.items() if "lora_B" in k) > 0
    assert all(p.grad is None for p in old.values())
    torch.nn.utils.clip_grad_norm_(list(train.values()), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    v1 = lora_state(model)
    assert any(not torch.equal(v0[k], v1[k]) for k in v0 if "lora_B" in k)
    assert all(torch.equal(v0[k], w) for k, w in lora_state(model, OLD_ADAPTER).items())

    # step 2, off-policy (max_staleness 1): the behaviour weights v0 sit in the frozen ``old`` adapter
    load_weights(model, v0, adapter=OLD_ADAPTER)
    policy._old_is_current = False
    _, diag = loss_and_backward(obj, policy, batch, seed=2)
    assert all(torch.isfinite(torch.tensor(v)) for v in diag.values())
    assert diag["kl"] > 0 and abs(diag["ratio_mean"] - 1.0) < 0.5
    grads = {k: p.grad for k, p in train.items()}
    assert sum(float(g.norm()) for k, g in grads.items() if "lora_A" in k) > 0  # B != 0 now
    opt.step()
    opt.zero_grad(set_to_none=True)
    v2 = lora_state(model)
    assert any(not torch.equal(v1[k], v2[k]) for k in v1 if "lora_A" in k)
    assert all(torch.equal(v0[k], w) for k, w in lora_state(model, OLD_ADAPTER).items())


@pytest.mark.gpu
def test_activation_checkpointing_same_gradient_less_memory(learner_model):
    model = learner_model
    train = adapter_params(model, TRAIN_ADAPTER)
    obj = VGRPO(VGRPOConfig(n_mc=1))
    policy = LearnerPolicy(model)
    policy._old_is_current = True
    batch = vgrpo_batch(2, group=2, seed=5)
    runs = {}
    for ckpt in (False, True):
        if ckpt:
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()
        for p in train.values():
            p.grad = None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss, _ = loss_and_backward(obj, policy, batch, seed=7)
        peak = torch.cuda.max_memory_allocated() - before
        grad = torch.cat([p.grad.flatten() for p in train.values()])  # type: ignore[union-attr]
        runs[ckpt] = (float(loss.detach()), grad, peak)
    model.disable_gradient_checkpointing()
    for p in train.values():
        p.grad = None
    (l0, g0, m0), (l1, g1, m1) = runs[False], runs[True]
    assert l0 == pytest.approx(l1, rel=1e-3, abs=1e-4)
    assert g0.norm() > 0 and torch.cosine_similarity(g0, g1, dim=0) > 0.99
    assert m1 < 0.5 * m0, (m0, m1)


@pytest.mark.gpu
@torch.no_grad()
def test_lora_payload_moves_from_learner_to_rollout(learner_model, rollout_model):
    """The weight broadcast's payload: learner ``default`` (fp32) -> host -> rollout ``default`` (bf16)."""
    state = lora_state(learner_model)
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}  # B != 0
    assert state.keys() == trainable_params(rollout_model).keys()
    x = torch.randn(1, *LATENT, device=DEVICE)
    text = cond(1)
    sigma = torch.tensor([0.5])
    before = P.velocity(rollout_model, x, sigma, text)
    load_weights(rollout_model, state)
    for k, p in adapter_params(rollout_model).items():
        torch.testing.assert_close(p.float().cpu(), state[k].to(torch.bfloat16).float())
    after = P.velocity(rollout_model, x, sigma, text)
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    with adapters_disabled(rollout_model):
        torch.testing.assert_close(P.velocity(rollout_model, x, sigma, text), before)
