"""FLUX.1 (dev and schnell): CLIP-L pooled vector + T5 tokens, 16-channel latents ``(z - shift_factor)·
scaling_factor`` packed into 2×2-patch tokens with (0, row, col) position ids, the transformer fed
``timestep = sigma``. FLUX.1-dev distils CFG into a guidance embedding (one forward, w fed to the
network); schnell has none (and samples CFG-free). The shift is resolution dependent (``dynamic_shift``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vgrpo.core.families.base import (
    JOINT_ATTENTION,
    PackedFamily,
    TextCond,
    pack_2x2,
    pixels,
    unpack_2x2,
)


def image_ids(h: int, w: int, device: torch.device) -> torch.Tensor:
    """``(h/2 · w/2, 3)`` position ids of the packed tokens: (0, row, col), FLUX's
    ``_prepare_latent_image_ids``."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device)


class Flux(PackedFamily):
    name = "flux"
    pipeline_class = "FluxPipeline"
    transformer_class = "FluxTransformer2DModel"
    # the attention projections of the double-stream blocks (image and text streams) and of the
    # single-stream blocks (to_q/k/v), as Flow-GRPO's FLUX recipes target them
    lora_targets = JOINT_ATTENTION

    def encode(self, pipe: Any, prompts: list[str], max_sequence_length: int) -> TextCond:
        """diffusers' ``encode_prompt``: T5 tokens (B, L, D) and CLIP's pooled vector (B, P)."""
        embeds_bld, pooled_bd, _ = pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            device=pipe.text_encoder.device,
            max_sequence_length=max_sequence_length,
        )
        return TextCond(embeds_bld, pooled_bd)

    def guidance_mode(self, transformer: Any) -> str:
        return "embedded" if transformer.config.guidance_embeds else "cfg"

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
        g = None
        if transformer.config.guidance_embeds:  # FLUX.1-dev: w is an input (the pipeline's default 3.5)
            g = torch.full((b,), 3.5 if guidance is None else float(guidance), device=x.device)
        out = transformer(
            hidden_states=pack_2x2(x).to(dtype),
            timestep=sigma_b.to(device=x.device, dtype=torch.float32),
            guidance=g,
            pooled_projections=cond.pooled.to(dtype),
            encoder_hidden_states=cond.embeds.to(dtype),
            txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=x.device),
            img_ids=image_ids(h, w, x.device),
            return_dict=False,
        )[0]
        return unpack_2x2(out, h, w)

    def decode(self, vae: Any, latents: torch.Tensor) -> np.ndarray:
        shift = vae.config.shift_factor or 0.0
        z = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + shift
        return pixels(vae.decode(z, return_dict=False)[0])

    def dummy_inputs(self, transformer: Any, device: torch.device) -> tuple[torch.Tensor, TextCond]:
        c = transformer.config
        x = torch.zeros(1, int(c.in_channels) // 4, 2, 2, device=device)
        cond = TextCond(
            torch.zeros(1, 1, int(c.joint_attention_dim), device=device),
            torch.zeros(1, int(c.pooled_projection_dim), device=device),
        )
        return x, cond
