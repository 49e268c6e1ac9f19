"""The rollout engine: holds policy version v_k, samples G images per prompt, applies weight updates.

Plain torch, no Ray: the Ray actor (``rollout_workers/actor.py``) is a thin shell around it, so the same
code can be timed in-process on a GPU machine without Ray.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Literal, cast

import torch

from vgrpo.core import policy as P
from vgrpo.core.adapters import add_lora, load_weights, trainable_params
from vgrpo.core.flow import (
    ode_sample,
    sde_sample,
    sde_window_sample,
)
from vgrpo.core.heldout import sample_heldout
from vgrpo.proto.config import ModelConfig, RolloutConfig
from vgrpo.proto.messages import RolloutBatch, WeightUpdate


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class RolloutEngine:
    """One inference device's policy. ``sample`` and ``update_weights`` are serialised by a lock, so no
    batch ever mixes two versions (and a Ray actor runs one method at a time anyway)."""

    def __init__(
        self,
        model: ModelConfig,
        rollout: RolloutConfig,
        sampler: Literal["dpm2", "euler", "sde", "sde_window"],
        noise_level: float = 0.7,
        seed: int = 0,
        device: str | None = None,
        sigma_grid: Literal["uniform", "diffusers"] = "uniform",
    ):
        self.model_cfg, self.cfg, self.sampler, self.noise_level = model, rollout, sampler, noise_level
        self.device = torch.device(device) if device else default_device()
        self.dtype = resolve_dtype(model.dtype, self.device)
        self.pipe: Any = cast(
            Any, P.load_pipeline(model.path, dtype=self.dtype, device=self.device, family=model.family)
        )
        self.pipe.transformer.requires_grad_(False)
        P.check_prompt_length(self.pipe, model.max_sequence_length)
        if model.lora is not None:
            add_lora(self.pipe.transformer, model.lora, seed=seed)
            self.pipe.transformer.requires_grad_(False)
        self.version = 0
        self.incomplete = False  # a broadcast broke off midway: the weights are not one version
        self._lock = threading.Lock()
        # one sample's latent shape and the sigma shift (the family's, size-dependent for FLUX/Qwen-Image)
        self.latent_shape, self.shift = P.sample_geometry(
            self.pipe, rollout.height, rollout.width, model.frames, rollout.shift
        )
        self.sigmas = P.sigma_grid(self.pipe, rollout.num_steps, self.shift, sigma_grid)

    # ------------------------------------------------------------------------------------ weights

    def update_weights(self, update: WeightUpdate) -> int:
        """Apply a published update atomically (under the sampling lock) and adopt its version."""
        update.check("the driver (update_weights)")
        with self._lock:
            load_weights(self.pipe.transformer, update.tensors)
            self.version = int(update.version)
            self.incomplete = False  # every trainable weight was just written
        return self.version

    def receive_weights_from(self, group: Any) -> int:
        """Take part in a weight broadcast (``core/weight_sync.py``: a collective, learner rank 0 sends)
        and adopt its version. The values land in place in the transformer's trainable parameters, under
        the sampling lock, and the version changes in the same critical section: a batch never mixes
        versions. A manifest that does not fit the model writes nothing (ValueError). A broadcast that
        breaks off midway (a peer died, a timeout) may leave some tensors of the new version: the worker
        is then marked incomplete and refuses to sample until a full :meth:`update_weights` arrives (the
        driver's object-store fallback)."""
        with self._lock:
            params = trainable_params(self.pipe.transformer)
            try:
                version, _ = group.broadcast(out=params, exact=True)
            except ValueError:  # the manifest did not fit: nothing was written
                raise
            except BaseException:
                self.incomplete = True
                raise
            self.version = int(version)
            self.incomplete = False
        return self.version

    def get_version(self) -> int:
        return self.version

    # ------------------------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        group_size: int,
        seeds: list[int],
        window: tuple[int, int] | None = None,
    ) -> RolloutBatch:
        """G samples for each prompt (sample j of prompt i at index i*G + j, its noise from seeds[i*G + j]),
        as a ``RolloutBatch`` (proto/messages.py): final latents, images (video: clips), per-prompt text
        features, the sampler's grid, and for the SDE sampler the trajectory (B, N+1, *latent) and
        log-probs (B, N).
        The ``sde_window`` sampler (MixGRPO, Flow-GRPO-Fast) takes ``window = (start, W)``, the same for
        every image of the call, and records the window's trajectory (B, W+1, C, h, w) and log-probs
        (B, W) from ``window_start``."""
        n = len(prompts) * group_size
        if len(seeds) != n:
            raise ValueError(
                f"sample: {len(prompts)} prompts x G={group_size} needs {n} seeds, got {len(seeds)}"
            )
        if (self.sampler == "sde_window") != (window is not None):
            raise ValueError(
                f"sample: window = {window} with the {self.sampler!r} sampler; the sde_window sampler needs "
                "window=(start, size) (the driver computes it per step), the others take none"
            )
        with self._lock:
            if self.incomplete:
                raise RuntimeError(
                    f"rollout worker holds a partial weight update (a broadcast after version {self.version} "
                    "broke off); it samples again after a full update_weights"
                )
            t0 = time.perf_counter()
            version = self.version
            pipe = self.pipe
            cond_p = P.encode_prompts(pipe, prompts, self.model_cfg.max_sequence_length)
            index_b = torch.arange(len(prompts)).repeat_interleave(group_size)
            out: dict[str, list[torch.Tensor]] = {"latents": [], "trajectory": [], "logp": []}
            gen = torch.Generator().manual_seed(int(seeds[0]) + 1)  # SDE noise, deterministic per batch
            for lo in range(0, n, self.cfg.batch_size):
                idx = index_b[lo : lo + self.cfg.batch_size]
                x1 = P.initial_noise(list(seeds[lo : lo + len(idx)]), self.latent_shape).to(self.device)
                v_fn = self._velocity_fn(cond_p.rows(idx))
                if self.sampler == "sde":
                    x0, traj, logp = sde_sample(v_fn, x1, self.sigmas, self.noise_level, generator=gen)
                    out["trajectory"].append(traj.cpu())
                    out["logp"].append(logp.cpu())
                elif window is not None:
                    x0, traj, logp = sde_window_sample(
                        v_fn, x1, self.sigmas, window, self.noise_level, generator=gen
                    )
                    out["trajectory"].append(traj.cpu())
                    out["logp"].append(logp.cpu())
                else:
                    x0 = ode_sample(v_fn, x1, self.sigmas, solver=self.sampler)
                out["latents"].append(x0.float().cpu())
            latents = torch.cat(out["latents"])
            images = P.decode(pipe, latents)
            recorded = bool(out["trajectory"])
            return RolloutBatch(
                group_size=group_size,
                policy_version=version,
                latents=latents.numpy(),
                images=images,
                prompt_embeds=cond_p.embeds.float().cpu().numpy(),
                pooled=cond_p.pooled.float().cpu().numpy(),
                prompt_mask=None if cond_p.mask is None else cond_p.mask.cpu().numpy(),
                sigmas=self.sigmas.numpy(),
                shift=self.shift,
                seconds=time.perf_counter() - t0,
                trajectory=torch.cat(out["trajectory"]).numpy() if recorded else None,
                logp=torch.cat(out["logp"]).numpy() if recorded else None,
                window_start=int(window[0]) if window is not None else None,
            )

    def _velocity_fn(self, cond_b: P.TextCond):
        transformer, w = self.pipe.transformer, self.cfg.guidance_scale
        uncond = P.empty_prompt_embeds(self.pipe, self.model_cfg.max_sequence_length) if w != 1.0 else None
        return lambda x, s: P.guided_velocity(transformer, x, s, cond_b, w, uncond)

    # ------------------------------------------------------------------------------------ evaluation

    def sample_heldout(self, prompts: list[str], **kwargs: Any) -> dict:
        """The held-out images of ``prompts`` with this worker's current weights (``core.heldout``: fixed
        seeds, the deterministic ODE sampler); the driver scores and tabulates them."""
        with self._lock:
            result = sample_heldout(self.pipe, prompts, **self.heldout_geometry(kwargs))
            result["policy_version"] = self.version
            return result

    def heldout_geometry(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Held-out sampling at the rollout's size, frames and prompt length unless ``kwargs`` says."""
        geometry = {
            "height": self.cfg.height,
            "width": self.cfg.width,
            "frames": self.model_cfg.frames,
            "max_sequence_length": self.model_cfg.max_sequence_length,
        }
        return {**geometry, **kwargs}
