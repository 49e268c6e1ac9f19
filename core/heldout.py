"""Held-out sampling, shared by evaluation during training (a rollout worker samples, the driver scores
and tabulates) and by `vgrpo eval` (all in one process): every prompt gets ``images_per_prompt`` images
from fixed seeds with the deterministic ODE sampler, image j of prompt i from seed
``seed + i·images_per_prompt + j`` whatever the batch size, so two evaluations of the same weights agree
exactly (docs/training.md "Held-out evaluation")."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from vgrpo.core.policy import Sampler, sample

Pipeline = Any  # a diffusers pipeline of any family (core/families)


def heldout_seeds(num_prompts: int, images_per_prompt: int, seed: int) -> list[tuple[int, int, int]]:
    """``(prompt index i, image index j, seed)`` of every held-out image, in prompt-major order."""
    return [
        (i, j, seed + i * images_per_prompt + j) for i in range(num_prompts) for j in range(images_per_prompt)
    ]


def sample_chunks(
    pipe: Pipeline,
    prompts: list[str],
    images_per_prompt: int,
    seed: int,
    batch_size: int,
    num_steps: int,
    guidance_scale: float,
    sampler: Sampler,
    shift: float | None,
    **geometry: Any,
) -> Iterator[tuple[list[tuple[int, int, int]], np.ndarray]]:
    """Yields ``(jobs, images_bhwc)`` in batches of ``batch_size`` over :func:`heldout_seeds`; ``geometry``
    (height, width, frames, max_sequence_length) goes to :func:`core.policy.sample` as the rollout's."""
    jobs = heldout_seeds(len(prompts), images_per_prompt, seed)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        _, images_bhwc = sample(
            pipe,
            [prompts[i] for i, _, _ in chunk],
            [s for _, _, s in chunk],
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            sampler=sampler,
            shift=shift,
            **geometry,
        )
        yield chunk, images_bhwc


def sample_heldout(
    pipe: Pipeline,
    prompts: list[str],
    images_per_prompt: int = 4,
    seed: int = 0,
    num_steps: int = 10,
    guidance_scale: float = 1.0,
    sampler: Sampler = "dpm2",
    shift: float | None = None,
    batch_size: int = 32,
    **geometry: Any,
) -> dict[str, Any]:
    """Every held-out image at once: ``{"images": uint8 (N, H, W, 3) (clips: (N, F, H, W, 3)), "seeds":
    [N], "settings": {...}}`` in prompt-major order (N = len(prompts) · images_per_prompt)."""
    images: list[np.ndarray] = []
    seeds: list[int] = []
    for chunk, images_bhwc in sample_chunks(
        pipe,
        prompts,
        images_per_prompt,
        seed,
        batch_size,
        num_steps,
        guidance_scale,
        sampler,
        shift,
        **geometry,
    ):
        images.append(images_bhwc)
        seeds.extend(s for _, _, s in chunk)
    return {
        "images": np.concatenate(images) if images else np.zeros((0, 1, 1, 3), np.uint8),
        "seeds": seeds,
        "settings": heldout_settings(images_per_prompt, seed, num_steps, guidance_scale, sampler, shift),
    }


def heldout_settings(
    images_per_prompt: int,
    seed: int,
    num_steps: int,
    guidance_scale: float,
    sampler: str,
    shift: float | None,
) -> dict[str, Any]:
    """The sampling settings an evaluation result records beside its scores."""
    return {
        "images_per_prompt": images_per_prompt,
        "seed": seed,
        "num_steps": num_steps,
        "guidance_scale": guidance_scale,
        "sampler": sampler,
        "shift": shift,
    }
