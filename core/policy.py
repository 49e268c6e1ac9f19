"""The policy as rollout workers, the learner and the evaluator all see it: one diffusers pipeline of a
model family (SD3/SD3.5, FLUX.1, Qwen-Image, Wan2.1: ``core/families``, docs/families.md).

Loading, prompt encoding, the (guided) velocity call, latent -> image conversion and the deterministic
sampler live here once (DESIGN.md "Conventions": what two roles share lives in a module both import),
each dispatched to the pipeline's family. Plain torch, no Ray. Conventions follow docs/algorithms.md §1:
flow time ``sigma`` in [0, 1] (1 = noise), the network predicts the velocity ``v = eps - x0``; latents
are the family's normalised, unpacked latents (SD3: ``(z - shift_factor)·scaling_factor`` with ``z`` the
VAE posterior).
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from vgrpo.core.families import FAMILIES, Family, TextCond, family_of
from vgrpo.core.families import resolve_family as resolve_family
from vgrpo.core.flow import ode_sample, sd3_sigmas

# diffusers' lazily imported classes defeat static typing; these aliases name what each argument is
StableDiffusion3Pipeline = Any  # diffusers.StableDiffusion3Pipeline
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
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    family: str = "auto",
    text_only: bool = False,
) -> Any:
    """The diffusers pipeline of the checkpoint at ``path``, loaded as its family's class (``family``:
    ``model.family``; ``auto`` reads model_index.json — a FamilyError names the families otherwise).
    ``text_only``: the text encoders and tokenizers alone (no transformer, no VAE), for encoding."""
    import diffusers
    import transformers

    # diffusers' "Loading pipeline components" and transformers' "Loading weights" bars, one per component
    # and process, report nothing a user acts on (loading fails loudly when it fails)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    resolved = resolve_model_path(path)
    pipe = resolve_family(resolved, family).load_pipeline(resolved, dtype, text_only)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------- prompts

_EMPTY_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def encode_prompts(pipe: Any, prompts: list[str], max_sequence_length: int = 256) -> TextCond:
    """The family's text conditioning of ``prompts`` (docs/families.md), one row per prompt; gradients
    flow (no ``no_grad`` here). ``max_sequence_length`` bounds the long text encoder's tokens (T5, UMT5,
    Qwen2.5-VL) and must fit the family."""
    check_prompt_length(pipe, max_sequence_length)
    return family_of(pipe).encode(pipe, list(prompts), max_sequence_length)


def check_prompt_length(pipe: Any, max_sequence_length: int) -> None:
    """A ValueError naming model.max_sequence_length when the pipeline's family takes fewer tokens (the
    rollout worker checks it as it starts, before any step)."""
    family = family_of(pipe)
    if max_sequence_length > family.max_text_tokens:
        raise ValueError(
            f"model.max_sequence_length = {max_sequence_length}: {family.name} takes at most "
            f"{family.max_text_tokens} prompt tokens; fix: set model.max_sequence_length <= {family.max_text_tokens}"
        )


def empty_prompt_embeds(pipe: Any, max_sequence_length: int = 256) -> TextCond:
    """The unconditional (empty-prompt) conditioning for CFG (docs/algorithms.md §2.2), one row, computed
    once per pipeline and prompt length and cached. Stale if the text encoders are trained."""
    length = min(max_sequence_length, family_of(pipe).max_text_tokens)
    by_length = _EMPTY_CACHE.setdefault(pipe, {})
    if length not in by_length:
        with torch.no_grad():
            by_length[length] = encode_prompts(pipe, [""], length)
    return by_length[length]


# ------------------------------------------------------------------------------------------- network


def velocity(
    transformer: Any,
    x: torch.Tensor,
    sigma_b: torch.Tensor,
    cond: TextCond,
    guidance: float | None = None,
    family: Family | None = None,
) -> torch.Tensor:
    """``v_theta(x_sigma, sigma, c)`` through the transformer's family (``family`` names it for a module
    whose class is not a diffusers transformer, e.g. a test stand-in), in the network's dtype."""
    family = family or family_of(transformer)
    return family.velocity(transformer, x, sigma_b, cond, guidance)


def guided_velocity(
    transformer: Any,
    x: torch.Tensor,
    sigma_b: torch.Tensor,
    cond: TextCond,
    guidance_scale: float = 1.0,
    uncond: TextCond | None = None,
    detach_uncond: bool = False,
    family: Family | None = None,
) -> torch.Tensor:
    """The velocity with guidance ``w``, float32 (docs/algorithms.md §2.2). A family with a guidance
    embedding (FLUX.1-dev) takes ``w`` as an input: one forward. Otherwise CFG: with ``w != 1`` one
    batched forward of ``[uncond; cond]`` (``uncond``: :func:`empty_prompt_embeds`), combined by the
    family (``v_u + w (v_c - v_u)``; Qwen-Image rescales to the conditional norm); without ``uncond`` or
    at ``w = 1`` the conditional velocity alone. ``detach_uncond``: the unconditional branch is a constant
    of a training update (Flow-GRPO and DGPO detach it; the gradient is ``w grad v_c``). The one place
    the rollout, held-out sampling and the learner's guided forward compute it."""
    family = family or family_of(transformer)
    if family.guidance_mode(transformer) == "embedded":
        return family.velocity(transformer, x, sigma_b, cond, guidance_scale).float()
    if guidance_scale == 1.0 or uncond is None:
        return family.velocity(transformer, x, sigma_b, cond).float()
    b = x.shape[0]
    both = TextCond.cat([uncond.expand(b).to(cond.embeds.device, cond.embeds.dtype), cond])
    v_2b = family.velocity(transformer, torch.cat([x, x]), sigma_b.repeat(2), both).float()
    v_u, v_c = v_2b.chunk(2)
    return family.combine_cfg(v_u.detach() if detach_uncond else v_u, v_c, guidance_scale)


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
    """SD3-normalised latents -> uint8 images ``(B, H, W, 3)``: ``z = latent/scaling_factor + shift`` (an
    ``AutoencoderKL`` alone, as SD3 and FLUX normalise; :func:`decode` takes any family's pipeline)."""
    return FAMILIES["sd3"].decode(vae, latents_bchw)


# ------------------------------------------------------------------------------------------- sampling


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """``x_1 ~ N(0, I)`` per sample of latent ``shape``, sample k from
    ``torch.Generator().manual_seed(seeds[k])``: a seed always gives the same noise whatever batch it is
    drawn in."""
    noise = [torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.cat(noise, dim=0)


def native_shape(pipe: Any, frames: int | None = None) -> tuple[int, int, int]:
    """(height, width, frames) the pipeline generates by default (``frames`` overrides the family's; 1 for
    images): SD3 ``sample_size · vae_scale_factor``; a ``vgrpo tiny-model`` folder's recorded size;
    otherwise the family's diffusers default (docs/families.md)."""
    family = family_of(pipe)
    h, w, f = family.native_size(pipe)
    return h, w, (frames or f) if family.video else 1


def native_size(pipe: Any) -> tuple[int, int]:
    """(height, width) in pixels the pipeline generates by default."""
    h, w, _ = native_shape(pipe)
    return h, w


def sample_geometry(
    pipe: Any,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    shift: float | None = None,
) -> tuple[tuple[int, ...], float]:
    """One sample's unpacked latent shape and the sigma shift (``shift=None``: the family's, which for
    FLUX and Qwen-Image depends on the size) at the given or native size."""
    family = family_of(pipe)
    h0, w0, f0 = native_shape(pipe, frames)
    shape = family.latent_shape(pipe, height or h0, width or w0, f0)
    return shape, float(shift) if shift is not None else family.shift(pipe, shape)


def sigma_grid(
    pipe: Any, num_steps: int, shift: float, grid: Literal["uniform", "diffusers"] = "uniform"
) -> torch.Tensor:
    """The sampler's sigmas (N+1,) for the pipeline's family: :func:`core.flow.sd3_sigmas` at ``shift``,
    stretched to the scheduler's terminal sigma where it has one (Qwen-Image)."""
    return sd3_sigmas(num_steps, shift=shift, grid=grid, terminal=family_of(pipe).sigma_terminal(pipe))


def decode(pipe: Any, latents: torch.Tensor) -> np.ndarray:
    """Normalised latents -> uint8 samples through the pipeline's family: images ``(B, H, W, 3)``, clips
    ``(B, F, H, W, 3)``."""
    return family_of(pipe).decode(pipe.vae, latents)


@torch.no_grad()
def sample(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    num_steps: int = 10,
    guidance_scale: float = 1.0,
    sampler: Sampler = "dpm2",
    shift: float | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    max_sequence_length: int = 77,
) -> tuple[torch.Tensor, np.ndarray]:
    """Deterministic ODE sampling (docs/algorithms.md §2.1) of one sample per (prompt, seed), batched.

    Returns the final clean latents (float32, normalised: what V-GRPO's rollout stores, §2.3) and the
    decoded uint8 images ``(B, H, W, 3)`` (clips ``(B, F, H, W, 3)``). CFG (§2.2) batches ``[uncond;
    cond]`` in one forward pass when ``guidance_scale != 1``. ``shift=None`` reads the family's.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"sample: {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    transformer = pipe.transformer
    shape, shift = sample_geometry(pipe, height, width, frames, shift)
    sigmas = sigma_grid(pipe, num_steps, shift)

    # encode each distinct prompt once, then index (eval repeats a prompt for its images)
    unique = list(dict.fromkeys(prompts))
    cond_u = encode_prompts(pipe, unique, max_sequence_length)
    cond_b = cond_u.rows(torch.tensor([unique.index(p) for p in prompts]))
    uncond = empty_prompt_embeds(pipe, max_sequence_length) if guidance_scale != 1.0 else None

    def velocity_fn(x: torch.Tensor, sigma_b: torch.Tensor) -> torch.Tensor:
        return guided_velocity(transformer, x, sigma_b, cond_b, guidance_scale, uncond)

    x1 = initial_noise(list(seeds), shape).to(transformer.device)
    latents = ode_sample(velocity_fn, x1, sigmas, solver=sampler).float()
    return latents, decode(pipe, latents)
