"""Wan2.1 text-to-video: UMT5 tokens (zero-padded to the sequence length, no pooled vector), video latents
``(B, 16, F', h, w)`` with ``F' = (F - 1) / 4 + 1`` of a causal video VAE, normalised per channel
``(z - mean) / std``, patchified (1, 2, 2) inside the transformer, ``timestep = 1000·sigma``, CFG, and the
scheduler's fixed ``flow_shift``. Samples are clips ``(F, H, W, 3)``: image rewards score each frame and
average, a video reward gets the clip (docs/families.md)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vgrpo.core.families.base import ATTENTION, Family, TextCond, channel_stats, check_divisible, sidecar


class Wan(Family):
    name = "wan"
    pipeline_class = "WanPipeline"
    transformer_class = "WanTransformer3DModel"
    lora_targets = ATTENTION  # self- and cross-attention of every block
    video = True

    def encode(self, pipe: Any, prompts: list[str], max_sequence_length: int) -> TextCond:
        embeds_bld, _ = pipe.encode_prompt(
            prompt=list(prompts),
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
            device=pipe.text_encoder.device,
        )
        return TextCond(embeds_bld, embeds_bld.new_zeros(embeds_bld.shape[0], 0))

    def native_size(self, pipe: Any) -> tuple[int, int, int]:
        side = sidecar(pipe.name_or_path)
        return int(side.get("height", 480)), int(side.get("width", 832)), int(side.get("frames", 81))

    def latent_shape(self, pipe: Any, height: int, width: int, frames: int) -> tuple[int, ...]:
        spatial, temporal = int(pipe.vae_scale_factor_spatial), int(pipe.vae_scale_factor_temporal)
        patch = tuple(pipe.transformer.config.patch_size)
        for key, v in (("rollout.height", height), ("rollout.width", width)):
            by = spatial * int(patch[1])
            check_divisible(key, v, by, f"a multiple of {by} (VAE factor x patch size)")
        check_divisible("model.frames - 1", frames - 1, temporal, f"frames = {temporal}k + 1, e.g. 5, 33, 81")
        c = int(pipe.transformer.config.in_channels)
        return (c, (frames - 1) // temporal + 1, height // spatial, width // spatial)

    def shift(self, pipe: Any, latent_shape: tuple[int, ...]) -> float:
        cfg = pipe.scheduler.config
        return float(cfg.get("flow_shift") or cfg.get("shift", 1.0))

    def velocity(
        self,
        transformer: Any,
        x: torch.Tensor,
        sigma_b: torch.Tensor,
        cond: TextCond,
        guidance: float | None = None,
    ) -> torch.Tensor:
        dtype = transformer.dtype
        return transformer(
            hidden_states=x.to(dtype),
            timestep=(1000.0 * sigma_b).to(device=x.device, dtype=torch.float32),
            encoder_hidden_states=cond.embeds.to(dtype),
            return_dict=False,
        )[0]

    def decode(self, vae: Any, latents: torch.Tensor) -> np.ndarray:
        """``z = latent · std + mean``, the video VAE -> uint8 clips ``(B, F, H, W, 3)``."""
        z = latents.to(device=vae.device, dtype=vae.dtype)
        mean, std = channel_stats(vae, z.ndim)
        video = vae.decode(z * std + mean, return_dict=False)[0]  # (B, 3, F, H, W) in [-1, 1]
        x = ((video.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
        return x.permute(0, 2, 3, 4, 1).to(torch.uint8).cpu().numpy()

    def dummy_inputs(self, transformer: Any, device: torch.device) -> tuple[torch.Tensor, TextCond]:
        c = transformer.config
        p = tuple(c.patch_size)
        x = torch.zeros(1, int(c.in_channels), int(p[0]), int(p[1]), int(p[2]), device=device)
        cond = TextCond(torch.zeros(1, 1, int(c.text_dim), device=device), torch.zeros(1, 0, device=device))
        return x, cond
