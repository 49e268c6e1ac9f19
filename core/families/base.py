"""What a model family is to vgrpo (docs/families.md): the few calls in which SD3, FLUX.1, Qwen-Image and
Wan2.1 differ. Everything else — the samplers, every objective, LoRA, weight sync — works on the family's
*unpacked* latents, ``(B, C, h, w)`` for images and ``(B, C, F, h, w)`` for video, whatever layout the
transformer itself wants: the family packs and unpacks inside :meth:`Family.velocity`.

Conventions (docs/algorithms.md §1): flow time ``sigma`` in [0, 1] (1 = noise), ``x_sigma = (1 - sigma)
x0 + sigma eps``, the network predicts ``v = eps - x0``; latents are stored *normalised* (what the
transformer sees), the family's :meth:`Family.decode` undoes the normalisation before the VAE.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

from vgrpo.core.flow import apply_cfg


class TextCond(NamedTuple):
    """A batch's text conditioning: ``embeds`` (B, L, D) token features, ``pooled`` (B, P) pooled
    features (P = 0 for a family without them), ``mask`` (B, L) bool where a family masks padding
    (Qwen-Image), else None. A NamedTuple, so the learner's ``index_cond`` selects its rows."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor | None = None

    def rows(self, idx: torch.Tensor) -> TextCond:
        return TextCond(self.embeds[idx], self.pooled[idx], None if self.mask is None else self.mask[idx])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TextCond:
        mask = None if self.mask is None else self.mask.to(device)
        return TextCond(self.embeds.to(device, dtype), self.pooled.to(device, dtype), mask)

    @staticmethod
    def cat(parts: list[TextCond]) -> TextCond:
        """Rows of several conditionings (e.g. ``[uncond; cond]`` for CFG); token lengths that differ are
        zero-padded to the longest, the padding masked out (a mask is built where one is missing)."""
        length = max(int(p.embeds.shape[1]) for p in parts)
        masked = any(p.mask is not None for p in parts) or any(p.embeds.shape[1] != length for p in parts)
        embeds, masks = [], []
        for p in parts:
            b, n = int(p.embeds.shape[0]), int(p.embeds.shape[1])
            embeds.append(torch.nn.functional.pad(p.embeds, (0, 0, 0, length - n)))
            if masked:
                m = (
                    p.mask
                    if p.mask is not None
                    else torch.ones(b, n, dtype=torch.bool, device=p.embeds.device)
                )
                masks.append(torch.nn.functional.pad(m.bool(), (0, length - n), value=False))
        pooled = torch.cat([p.pooled for p in parts])
        return TextCond(torch.cat(embeds), pooled, torch.cat(masks) if masked else None)

    def expand(self, b: int) -> TextCond:
        """A one-row conditioning (the empty prompt's) repeated for ``b`` rows."""
        mask = None if self.mask is None else self.mask.expand(b, -1)
        return TextCond(self.embeds.expand(b, -1, -1), self.pooled.expand(b, -1), mask)


# LoRA targets (peft names or dotted suffixes): the attention projections of a block, and of an MMDiT
# joint block (its text stream's projections too), as Flow-GRPO targets them (docs/algorithms.md §6.1)
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
JOINT_ATTENTION = (*ATTENTION, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class FamilyError(ValueError):
    """The family of a checkpoint is unknown or cannot be told; the message lists the families."""


def sidecar(path: str | None) -> dict[str, Any]:
    """``vgrpo.json`` beside a pipeline's model_index.json (written by ``vgrpo tiny-model``): the native
    height, width and frames the model was built for; {} for any other checkpoint."""
    if not path:
        return {}
    f = Path(path) / "vgrpo.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def dynamic_shift(config: Any, image_seq_len: int) -> float:
    """FLUX / Qwen-Image's resolution-dependent shift as an SD3 shift ``s = exp(mu)``: diffusers'
    exponential time shift ``exp(mu) / (exp(mu) + (1/sigma - 1))`` equals ``s sigma / (1 + (s - 1) sigma)``,
    with ``mu`` linear in the image's token count between (base_image_seq_len, base_shift) and
    (max_image_seq_len, max_shift) (diffusers' ``calculate_shift``). Without dynamic shifting, the
    scheduler's fixed ``shift``."""
    get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
    if not get("use_dynamic_shifting", False):
        return float(get("shift", 1.0))
    base_len, max_len = float(get("base_image_seq_len", 256)), float(get("max_image_seq_len", 4096))
    base_shift, max_shift = float(get("base_shift", 0.5)), float(get("max_shift", 1.15))
    slope = (max_shift - base_shift) / (max_len - base_len)
    mu = image_seq_len * slope + (base_shift - slope * base_len)
    return math.exp(mu)


class Family:
    """One model family. Subclasses set the class attributes and override what differs from SD3's
    defaults; an instance holds no state (the registry keeps one of each)."""

    name: ClassVar[str]
    pipeline_class: ClassVar[str]  # diffusers pipeline class in model_index.json
    transformer_class: ClassVar[str]
    lora_targets: ClassVar[tuple[str, ...]]
    video: ClassVar[bool] = False
    max_text_tokens: ClassVar[int] = 512  # the longest prompt the family's long text encoder takes

    # ------------------------------------------------------------------------------------ loading

    def load_pipeline(self, path: str, dtype: torch.dtype, text_only: bool = False) -> Any:
        """The pipeline; ``text_only``: without its transformer and VAE (what encoding prompts needs)."""
        import diffusers

        cls = getattr(diffusers, self.pipeline_class)
        skip = {"transformer": None, "vae": None} if text_only else {}
        return cls.from_pretrained(path, dtype=dtype, **skip)

    def load_transformer(self, path: str, dtype: torch.dtype = torch.float32) -> Any:
        import diffusers

        cls = getattr(diffusers, self.transformer_class)
        return cls.from_pretrained(path, subfolder="transformer", dtype=dtype)

    # ------------------------------------------------------------------------------------ text

    def encode(self, pipe: Any, prompts: list[str], max_sequence_length: int) -> TextCond:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ latents

    def native_size(self, pipe: Any) -> tuple[int, int, int]:
        """(height, width, frames) the family generates by default for this checkpoint."""
        raise NotImplementedError

    def latent_shape(self, pipe: Any, height: int, width: int, frames: int) -> tuple[int, ...]:
        """One sample's unpacked latent shape, ``(C, h, w)`` or ``(C, F', h, w)``; a size the family
        cannot take is a ValueError naming rollout.height / rollout.width (or model.frames)."""
        raise NotImplementedError

    def shift(self, pipe: Any, latent_shape: tuple[int, ...]) -> float:
        """The sigma shift of the family's scheduler for a sample of ``latent_shape``."""
        return float(pipe.scheduler.config.get("shift", 1.0))

    def sigma_terminal(self, pipe: Any) -> float | None:
        """The scheduler's ``shift_terminal`` (Qwen-Image: 0.02), the last nonzero sigma; None: none."""
        value = pipe.scheduler.config.get("shift_terminal")
        return float(value) if value else None

    def decode(self, vae: Any, latents: torch.Tensor) -> np.ndarray:
        """Normalised latents -> uint8 images ``(B, H, W, 3)`` (video: ``(B, F, H, W, 3)``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ network

    def guidance_mode(self, transformer: Any) -> str:
        """``cfg``: a guidance scale w != 1 means two forwards combined ``v_u + w (v_c - v_u)``;
        ``embedded``: w is fed to the transformer's guidance embedding (FLUX.1-dev), one forward."""
        return "cfg"

    def velocity(
        self,
        transformer: Any,
        x: torch.Tensor,
        sigma_b: torch.Tensor,
        cond: TextCond,
        guidance: float | None = None,
    ) -> torch.Tensor:
        """``v_theta(x_sigma, sigma, c)`` on unpacked latents, in the network's dtype; ``guidance`` is the
        embedded guidance value (FLUX.1-dev), ignored by families without one."""
        raise NotImplementedError

    def combine_cfg(self, v_u: torch.Tensor, v_c: torch.Tensor, scale: float) -> torch.Tensor:
        return apply_cfg(v_u, v_c, scale)

    def dummy_inputs(self, transformer: Any, device: torch.device) -> tuple[torch.Tensor, TextCond]:
        """A one-sample zero input the transformer accepts (the learner's state-creating dummy step)."""
        raise NotImplementedError


class PackedFamily(Family):
    """A family whose transformer takes 2×2-patch tokens of 4-channel-per-patch latents (FLUX.1,
    Qwen-Image): latent channels = in_channels / 4, sizes multiples of 2 × the VAE factor, the native size
    diffusers' ``default_sample_size × vae_scale_factor`` (or a tiny model's ``vgrpo.json``) and the
    resolution-dependent shift of the packed token count."""

    def native_size(self, pipe: Any) -> tuple[int, int, int]:
        side = sidecar(pipe.name_or_path)
        default = int(pipe.default_sample_size) * int(pipe.vae_scale_factor)
        return int(side.get("height", default)), int(side.get("width", default)), 1

    def latent_shape(self, pipe: Any, height: int, width: int, frames: int) -> tuple[int, ...]:
        scale = int(pipe.vae_scale_factor)
        for key, v in (("rollout.height", height), ("rollout.width", width)):
            check_divisible(key, v, 2 * scale, f"a multiple of {2 * scale} (VAE factor x 2x2 packing)")
        return (int(pipe.transformer.config.in_channels) // 4, height // scale, width // scale)

    def shift(self, pipe: Any, latent_shape: tuple[int, ...]) -> float:
        return dynamic_shift(pipe.scheduler.config, (latent_shape[-2] // 2) * (latent_shape[-1] // 2))


def pixels(x_bchw: torch.Tensor) -> np.ndarray:
    """VAE output in [-1, 1], ``(B, 3, H, W)`` -> uint8 ``(B, H, W, 3)``."""
    x = ((x_bchw.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return x.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


def channel_stats(vae: Any, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A video VAE's per-channel latent mean and std (Qwen-Image's, Wan's), shaped to broadcast over
    ``ndim``-dimensional latents."""
    shape = (1, int(vae.config.z_dim)) + (1,) * (ndim - 2)
    mean = torch.tensor(vae.config.latents_mean).view(shape)
    std = torch.tensor(vae.config.latents_std).view(shape)
    return mean.to(vae.device, vae.dtype), std.to(vae.device, vae.dtype)


def pack_2x2(x_bchw: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, h/2 · w/2, 4C)`` tokens of 2×2 latent patches (FLUX's and Qwen-Image's
    ``_pack_latents``)."""
    b, c, h, w = x_bchw.shape
    x = x_bchw.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_2x2(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_2x2`."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def check_divisible(name: str, value: int, by: int, fix: str) -> None:
    if value % by:
        raise ValueError(f"{name} = {value} is not a multiple of {by}; fix: {fix}")
