"""The policy as rollout workers, the learner and the evaluator all see it: one diffusers SD3 pipeline.

Loading, prompt encoding, the velocity call, latent <-> image conversion and the deterministic sampler
live here once (DESIGN.md "Conventions": what two roles share lives in a module both import). Plain
torch, no Ray. Conventions follow docs/algorithms.md §1: flow time ``sigma`` in [0, 1] (1 = noise), the SD3
transformer is fed ``timestep = 1000·sigma`` and predicts the velocity ``v = eps - x0``; latents are SD3-
normalised, ``latent = (z - shift_factor)·scaling_factor`` with ``z`` the VAE posterior.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from vgrpo.core.flow import apply_cfg, ode_sample, sd3_sigmas

# diffusers' lazily imported classes defeat static typing; these aliases name what each argument is
StableDiffusion3Pipeline = Any  # diffusers.StableDiffusion3Pipeline
SD3Transformer2DModel = Any  # diffusers.SD3Transformer2DModel
AutoencoderKL = Any  # diffusers.AutoencoderKL

BUILTIN_TINY = "builtin:tiny-sd3"
Sampler = Literal["dpm2", "euler"]


class ModelPathError(ValueError):
    """``model.path`` names nothing loadable; the message says what was tried and how to get weights."""


def builtin_tiny_path() -> Path:
    """The tiny SD3 pipeline shipped inside the package (``core/assets/tiny_sd3``)."""
    return Path(__file__).resolve().parent / "assets" / "tiny_sd3"


def resolve_model_path(path: str | Path) -> str:
    """``builtin:tiny-sd3`` -> the shipped folder; an existing local folder -> itself; ``owner/name`` -> a
    hub id (returned unchanged for diffusers to fetch or find in its cache). Anything that looks like a
    local path but does not exist raises :class:`ModelPathError` naming ``model.path`` and the fix."""
    text = str(path)
    if text == BUILTIN_TINY:
        folder = builtin_tiny_path()
        if not (folder / "model_index.json").is_file():
            raise ModelPathError(
                f"model.path = {BUILTIN_TINY!r} but the shipped model is missing from {folder}; "
                "fix: rebuild it with `vgrpo pretrain-tiny --out " + str(folder) + "`"
            )
        return str(folder)
    if text.startswith("builtin:"):
        raise ModelPathError(f"model.path = {text!r}: unknown builtin model; fix: use {BUILTIN_TINY!r}")
    local = Path(text).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise ModelPathError(
                f"model.path = {text!r} is a folder without model_index.json (not a diffusers pipeline); "
                "fix: point it at a folder saved with pipe.save_pretrained(...)"
            )
        return str(local.resolve())
    looks_local = text.startswith((".", "/", "~")) or text.count("/") != 1
    if looks_local or local.exists():
        raise ModelPathError(
            f"model.path = {text!r} does not exist; fix: give a local diffusers folder, a hub id such as "
            "'stabilityai/stable-diffusion-3.5-medium' (download it first with "
            f"`huggingface-cli download <id>` on a machine with network), or {BUILTIN_TINY!r}"
        )
    return text  # a hub id: owner/name


def load_pipeline(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> StableDiffusion3Pipeline:
    """``StableDiffusion3Pipeline.from_pretrained`` on the resolved path; a folder without T5 (no
    ``text_encoder_3`` in its model_index.json, or a null entry) is loaded with ``text_encoder_3=None,
    tokenizer_3=None``, which diffusers requires for the omitted slots (docs/stack-notes.md)."""
    from diffusers import StableDiffusion3Pipeline as Pipeline

    resolved = resolve_model_path(path)
    kwargs: dict = {"dtype": dtype}
    index = Path(resolved) / "model_index.json"
    if index.is_file():
        import json

        entry = json.loads(index.read_text()).get("text_encoder_3")
        if entry is None or entry == [None, None]:
            kwargs.update(text_encoder_3=None, tokenizer_3=None)
    pipe = Pipeline.from_pretrained(resolved, **kwargs)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------- prompts

_EMPTY_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def encode_prompts(
    pipe: StableDiffusion3Pipeline, prompts: list[str], max_sequence_length: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3 conditioning through diffusers' own ``encode_prompt``: joint tokens ``(B, L, D)`` (the two
    CLIPs' penultimate states concatenated on features, then the T5 tokens) and pooled ``(B, P)``.

    Without a T5 encoder diffusers would append ``max_sequence_length`` rows of zeros, which carry no
    prompt information and dominate attention cost at tiny sizes; the slot is then dropped (length 0),
    which is also how the shipped tiny model was trained. Gradients flow (no ``no_grad`` here)."""
    t5_len = max_sequence_length if pipe.text_encoder_3 is not None else 0
    prompt_embeds_bld, _, pooled_bd, _ = pipe.encode_prompt(
        prompt=list(prompts),
        prompt_2=None,
        prompt_3=None,
        device=pipe.transformer.device,
        do_classifier_free_guidance=False,
        max_sequence_length=t5_len,
    )
    return prompt_embeds_bld, pooled_bd


def empty_prompt_embeds(pipe: StableDiffusion3Pipeline) -> tuple[torch.Tensor, torch.Tensor]:
    """The unconditional (empty-prompt) embedding for CFG (docs/algorithms.md §2.2), computed once per
    pipeline and cached; shapes ``(1, L, D)`` and ``(1, P)``. Stale if the text encoders are trained."""
    cached = _EMPTY_CACHE.get(pipe)
    if cached is None:
        with torch.no_grad():
            cached = encode_prompts(pipe, [""])
        _EMPTY_CACHE[pipe] = cached
    return cached


# ------------------------------------------------------------------------------------------- network


def velocity(
    transformer: SD3Transformer2DModel,
    x_bchw: torch.Tensor,
    sigma_b: torch.Tensor,
    prompt_embeds_bld: torch.Tensor,
    pooled_bd: torch.Tensor,
) -> torch.Tensor:
    """``v_theta(x_sigma, sigma, c)``: the SD3 transformer fed ``timestep = 1000·sigma`` in float32 whatever
    the network's dtype, as upstream feeds it (bf16 would move a 40-step grid's timesteps by up to 2/1000);
    the transformer's sinusoidal embedding casts after computing in float32."""
    dtype = transformer.dtype
    timestep_b = (1000.0 * sigma_b).to(device=x_bchw.device, dtype=torch.float32)
    out = transformer(
        hidden_states=x_bchw.to(dtype),
        timestep=timestep_b,
        encoder_hidden_states=prompt_embeds_bld.to(dtype),
        pooled_projections=pooled_bd.to(dtype),
        return_dict=False,
    )[0]
    return out


def guided_velocity(
    transformer: SD3Transformer2DModel,
    x_bchw: torch.Tensor,
    sigma_b: torch.Tensor,
    prompt_embeds_bld: torch.Tensor,
    pooled_bd: torch.Tensor,
    guidance_scale: float = 1.0,
    uncond: tuple[torch.Tensor, torch.Tensor] | None = None,
    detach_uncond: bool = False,
) -> torch.Tensor:
    """The velocity with classifier-free guidance (docs/algorithms.md §2.2), float32: with ``w != 1`` one
    batched forward of ``[uncond; cond]`` (``uncond``: the empty prompt's ``(L, D)`` features and ``(Dp,)``
    pooled vector, :func:`empty_prompt_embeds`), then ``v_u + w (v_c - v_u)``; without ``uncond`` or at
    ``w = 1`` the conditional velocity alone. ``detach_uncond``: the unconditional branch is a constant
    of a training update (Flow-GRPO and DGPO detach it; the gradient is ``w grad v_c``). The one place the
    rollout, held-out sampling and the learner's guided forward compute it."""
    if guidance_scale == 1.0 or uncond is None:
        return velocity(transformer, x_bchw, sigma_b, prompt_embeds_bld, pooled_bd).float()
    b = x_bchw.shape[0]
    empty_ld, empty_pooled_d = uncond
    embeds_2b = torch.cat([empty_ld.expand(b, -1, -1).to(prompt_embeds_bld), prompt_embeds_bld])
    pooled_2b = torch.cat([empty_pooled_d.expand(b, -1).to(pooled_bd), pooled_bd])
    v_2bchw = velocity(transformer, torch.cat([x_bchw, x_bchw]), sigma_b.repeat(2), embeds_2b, pooled_2b)
    v_u, v_c = v_2bchw.float().chunk(2)
    return apply_cfg(v_u.detach() if detach_uncond else v_u, v_c, guidance_scale)


# --------------------------------------------------------------------------------- latents <-> images


def images_to_tensor(images_bhwc: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` -> float ``(B, 3, H, W)`` in [-1, 1] (the VAE's input range)."""
    t = torch.as_tensor(np.asarray(images_bhwc))
    return t.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_images(x_bchw: torch.Tensor) -> np.ndarray:
    """float ``(B, 3, H, W)`` in [-1, 1] -> uint8 ``(B, H, W, 3)``."""
    x = ((x_bchw.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return x.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


def encode_images(
    vae: AutoencoderKL, images_bhwc: np.ndarray | torch.Tensor, sample: bool = False
) -> torch.Tensor:
    """uint8 images -> SD3-normalised latents ``(z - shift_factor)·scaling_factor`` (§1); the posterior
    mode unless ``sample``."""
    x_bchw = images_to_tensor(images_bhwc).to(device=vae.device, dtype=vae.dtype)
    dist = vae.encode(x_bchw).latent_dist
    z_bchw = dist.sample() if sample else dist.mode()
    shift = vae.config.shift_factor or 0.0
    return (z_bchw - shift) * vae.config.scaling_factor


def decode_latents(vae: AutoencoderKL, latents_bchw: torch.Tensor) -> np.ndarray:
    """SD3-normalised latents -> uint8 images ``(B, H, W, 3)``: ``z = latent/scaling_factor + shift``."""
    shift = vae.config.shift_factor or 0.0
    z_bchw = latents_bchw.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + shift
    return tensor_to_images(vae.decode(z_bchw, return_dict=False)[0])


# ------------------------------------------------------------------------------------------- sampling


def initial_noise(seeds: list[int], shape_chw: tuple[int, int, int]) -> torch.Tensor:
    """``x_1 ~ N(0, I)`` per image, image k from ``torch.Generator().manual_seed(seeds[k])``: a seed always
    gives the same noise whatever batch it is drawn in."""
    noise = [torch.randn((1, *shape_chw), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.cat(noise, dim=0)


def native_size(pipe: StableDiffusion3Pipeline) -> tuple[int, int]:
    """(height, width) in pixels the pipeline generates by default: ``sample_size · vae_scale_factor``."""
    side = int(pipe.transformer.config.sample_size) * int(pipe.vae_scale_factor)
    return side, side


@torch.no_grad()
def sample(
    pipe: StableDiffusion3Pipeline,
    prompts: list[str],
    seeds: list[int],
    num_steps: int = 10,
    guidance_scale: float = 1.0,
    sampler: Sampler = "dpm2",
    shift: float | None = None,
    height: int | None = None,
    width: int | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """Deterministic ODE sampling (docs/algorithms.md §2.1) of one image per (prompt, seed), batched.

    Returns the final clean latents ``(B, C, h, w)`` (float32, SD3-normalised: what V-GRPO's rollout
    stores, §2.3) and the decoded uint8 images ``(B, H, W, 3)``. CFG (§2.2) batches ``[uncond; cond]`` in
    one forward pass when ``guidance_scale != 1``. ``shift=None`` reads the scheduler config's shift.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"sample: {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    transformer, vae = pipe.transformer, pipe.vae
    default_h, default_w = native_size(pipe)
    height, width = height or default_h, width or default_w
    scale = int(pipe.vae_scale_factor)
    shape_chw = (int(transformer.config.in_channels), height // scale, width // scale)
    if shift is None:
        shift = float(pipe.scheduler.config.get("shift", 1.0))
    sigmas = sd3_sigmas(num_steps, shift=shift)

    # encode each distinct prompt once, then index (eval repeats a prompt for its images)
    unique = list(dict.fromkeys(prompts))
    embeds_ul, pooled_u = encode_prompts(pipe, unique)
    index_b = torch.tensor([unique.index(p) for p in prompts])
    cond_bld, cond_pooled_bd = embeds_ul[index_b], pooled_u[index_b]
    uncond = empty_prompt_embeds(pipe) if guidance_scale != 1.0 else None

    def velocity_fn(x_bchw: torch.Tensor, sigma_b: torch.Tensor) -> torch.Tensor:
        return guided_velocity(
            transformer, x_bchw, sigma_b, cond_bld, cond_pooled_bd, guidance_scale, uncond
        )  # fmt: skip

    x1_bchw = initial_noise(list(seeds), shape_chw).to(transformer.device)
    latents_bchw = ode_sample(velocity_fn, x1_bchw, sigmas, solver=sampler).float()
    images_bhwc = decode_latents(vae, latents_bchw)
    return latents_bchw, images_bhwc
