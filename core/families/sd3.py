"""Stable Diffusion 3 / 3.5 (MMDiT): two CLIPs + T5 joint tokens and a pooled vector, 16-channel latents
``(z - shift_factor)·scaling_factor`` patchified inside the transformer, ``timestep = 1000·sigma``, CFG,
the scheduler's fixed shift (3.0)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vgrpo.core.families.base import JOINT_ATTENTION, Family, TextCond, check_divisible, pixels


class SD3(Family):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    transformer_class = "SD3Transformer2DModel"
    # the attention projections of the joint blocks, as Flow-GRPO targets them (docs/algorithms.md §6.1)
    lora_targets = JOINT_ATTENTION

    def load_pipeline(self, path: str, dtype: torch.dtype, text_only: bool = False) -> Any:
        """A folder without T5 (no ``text_encoder_3`` in its model_index.json, or a null entry) is loaded
        with ``text_encoder_3=None, tokenizer_3=None``, which diffusers requires for the omitted slots
        (docs/stack-notes.md)."""
        from diffusers import StableDiffusion3Pipeline

        kwargs: dict = {"dtype": dtype}
        if text_only:  # the transformer stays: without T5, diffusers sizes its empty T5 slot from its config
            kwargs.update(vae=None)
        index = Path(path) / "model_index.json"
        if index.is_file():
            entry = json.loads(index.read_text()).get("text_encoder_3")
            if entry is None or entry == [None, None]:
                kwargs.update(text_encoder_3=None, tokenizer_3=None)
        return StableDiffusion3Pipeline.from_pretrained(path, **kwargs)

    def encode(self, pipe: Any, prompts: list[str], max_sequence_length: int) -> TextCond:
        """diffusers' own ``encode_prompt``: joint tokens (the two CLIPs' penultimate states concatenated
        on features, then the T5 tokens) and the pooled vector. Without a T5 encoder diffusers would
        append ``max_sequence_length`` rows of zeros, which carry no prompt information and dominate
        attention cost at tiny sizes; the slot is then dropped (length 0), which is also how the shipped
        tiny model was trained. Gradients flow (no ``no_grad`` here)."""
        t5_len = max_sequence_length if pipe.text_encoder_3 is not None else 0
        embeds_bld, _, pooled_bd, _ = pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=pipe.text_encoder.device,
            do_classifier_free_guidance=False,
            max_sequence_length=t5_len,
        )
        return TextCond(embeds_bld, pooled_bd)

    def native_size(self, pipe: Any) -> tuple[int, int, int]:
        side = int(pipe.transformer.config.sample_size) * int(pipe.vae_scale_factor)
        return side, side, 1

    def latent_shape(self, pipe: Any, height: int, width: int, frames: int) -> tuple[int, ...]:
        scale = int(pipe.vae_scale_factor) * int(pipe.transformer.config.patch_size)
        for key, v in (("rollout.height", height), ("rollout.width", width)):
            check_divisible(key, v, scale, f"a multiple of {scale} (VAE factor x patch size)")
        c = int(pipe.transformer.config.in_channels)
        return (c, height // int(pipe.vae_scale_factor), width // int(pipe.vae_scale_factor))

    def velocity(
        self,
        transformer: Any,
        x: torch.Tensor,
        sigma_b: torch.Tensor,
        cond: TextCond,
        guidance: float | None = None,
    ) -> torch.Tensor:
        """The SD3 transformer fed ``timestep = 1000·sigma`` in float32 whatever the network's dtype, as
        upstream feeds it (bf16 would move a 40-step grid's timesteps by up to 2/1000)."""
        dtype = transformer.dtype
        return transformer(
            hidden_states=x.to(dtype),
            timestep=(1000.0 * sigma_b).to(device=x.device, dtype=torch.float32),
            encoder_hidden_states=cond.embeds.to(dtype),
            pooled_projections=cond.pooled.to(dtype),
            return_dict=False,
        )[0]

    def decode(self, vae: Any, latents: torch.Tensor) -> np.ndarray:
        """``z = latent / scaling_factor + shift_factor``, then the VAE."""
        shift = vae.config.shift_factor or 0.0
        z = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + shift
        return pixels(vae.decode(z, return_dict=False)[0])

    def dummy_inputs(self, transformer: Any, device: torch.device) -> tuple[torch.Tensor, TextCond]:
        c = transformer.config
        side = int(c.sample_size)
        x = torch.zeros(1, int(c.in_channels), side, side, device=device)
        cond = TextCond(
            torch.zeros(1, 1, int(c.joint_attention_dim), device=device),
            torch.zeros(1, int(c.pooled_projection_dim), device=device),
        )
        return x, cond
