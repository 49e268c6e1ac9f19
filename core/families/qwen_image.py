"""Qwen-Image (MMDiT, 20B): Qwen2.5-VL's last hidden states of the prompt in a chat template (up to 1024
tokens, padding masked), 16-channel latents of a video VAE with one frame, normalised per channel
``(z - mean) / std``, packed into 2×2-patch tokens, ``timestep = sigma``, true CFG with the norm
rescaling of diffusers' QwenImagePipeline, and a resolution-dependent shift (``dynamic_shift``) whose
grid is stretched to the scheduler's ``shift_terminal`` (0.02)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vgrpo.core.families.base import (
    JOINT_ATTENTION,
    PackedFamily,
    TextCond,
    channel_stats,
    pack_2x2,
    pixels,
    unpack_2x2,
)
from vgrpo.core.flow import apply_cfg


class QwenImage(PackedFamily):
    name = "qwen_image"
    pipeline_class = "QwenImagePipeline"
    transformer_class = "QwenImageTransformer2DModel"
    lora_targets = JOINT_ATTENTION
    max_text_tokens = 1024

    def encode(self, pipe: Any, prompts: list[str], max_sequence_length: int) -> TextCond:
        """diffusers' ``encode_prompt``: the template's prompt tokens (B, L, D), L the batch's longest,
        shorter prompts padded and masked; no pooled vector (P = 0)."""
        embeds_bld, mask_bl = pipe.encode_prompt(
            prompt=list(prompts), device=pipe.text_encoder.device, max_sequence_length=max_sequence_length
        )
        pooled = embeds_bld.new_zeros(embeds_bld.shape[0], 0)
        return TextCond(embeds_bld, pooled, None if mask_bl is None else mask_bl.bool())

    def velocity(
        self,
        transformer: Any,
        x: torch.Tensor,
        sigma_b: torch.Tensor,
        cond: TextCond,
        guidance: float | None = None,
    ) -> torch.Tensor:
        b, _, h, w = x.shape
        dtype = transformer.dtype
        out = transformer(
            hidden_states=pack_2x2(x).to(dtype),
            timestep=sigma_b.to(device=x.device, dtype=torch.float32),
            encoder_hidden_states=cond.embeds.to(dtype),
            encoder_hidden_states_mask=cond.mask,
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return unpack_2x2(out, h, w)

    def combine_cfg(self, v_u: torch.Tensor, v_c: torch.Tensor, scale: float) -> torch.Tensor:
        """True CFG, then each 2×2-patch token rescaled to the conditional prediction's norm (diffusers'
        QwenImagePipeline: ``comb * |v_c| / |comb|`` over the packed token's features)."""
        comb = apply_cfg(v_u, v_c, scale)
        if scale == 1.0:
            return comb
        h, w = comb.shape[-2:]
        packed_c, packed = pack_2x2(v_c), pack_2x2(comb)
        rescaled = packed * (packed_c.norm(dim=-1, keepdim=True) / packed.norm(dim=-1, keepdim=True))
        return unpack_2x2(rescaled, h, w)

    def decode(self, vae: Any, latents: torch.Tensor) -> np.ndarray:
        """``z = latent · std + mean`` with a frame axis of 1, the video VAE, its one frame."""
        z = latents.to(device=vae.device, dtype=vae.dtype).unsqueeze(2)
        mean, std = channel_stats(vae, z.ndim)
        return pixels(vae.decode(z * std + mean, return_dict=False)[0][:, :, 0])

    def dummy_inputs(self, transformer: Any, device: torch.device) -> tuple[torch.Tensor, TextCond]:
        c = transformer.config
        x = torch.zeros(1, int(c.in_channels) // 4, 2, 2, device=device)
        cond = TextCond(
            torch.zeros(1, 1, int(c.joint_attention_dim), device=device), torch.zeros(1, 0, device=device)
        )
        return x, cond
