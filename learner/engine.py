"""The learner engine: one rank of a DeepSpeed ZeRO group training the SD3 transformer with the configured
objective, and publishing its trainable weights with a version number.

Plain torch + DeepSpeed, no Ray: ``learner/actor.py`` is the thin Ray shell. Version bookkeeping
(DESIGN.md): the starting policy is version 0; the update of step N publishes version N.
"""

from __future__ import annotations

import copy
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vgrpo import policy as P
from vgrpo.adapters import (
    OLD_ADAPTER,
    TRAIN_ADAPTER,
    adapter_params,
    adapters_disabled,
    add_lora,
    load_weights,
    trainable_params,
    use_adapter,
)
from vgrpo.learner.objectives import Objective, TrainBatch, build_objective
from vgrpo.learner.objectives.base import Which
from vgrpo.proto.config import AlgorithmConfig, LearnerConfig, ModelConfig, RolloutConfig
from vgrpo.rollout_workers.samplers import apply_cfg


class NonFiniteLossError(RuntimeError):
    """The objective produced NaN/inf: the update is refused rather than applied."""


class SD3LearnerPolicy:
    """The :class:`FlowPolicy` of the learner: current = the trainable adapter (or the whole transformer),
    old = the frozen ``old`` adapter (or a copy), ref = adapters disabled (or a frozen copy of the base).
    ``cond`` is ``(prompt_embeds_bld, pooled_bd)``; with ``guidance_scale != 1`` every forward applies CFG
    with the empty-prompt embedding (Flow-GRPO's training forward must match its rollout, §9.3)."""

    def __init__(
        self,
        module: nn.Module,
        guidance_scale: float = 1.0,
        uncond: tuple[torch.Tensor, torch.Tensor] | None = None,
        old_module: nn.Module | None = None,
        ref_module: nn.Module | None = None,
    ):
        self.module, self.guidance_scale, self.uncond = module, guidance_scale, uncond
        self.old_module, self.ref_module = old_module, ref_module
        self.lora = old_module is None and ref_module is None
        self._old_is_current = True

    def old_is_current(self) -> bool:
        return self._old_is_current

    def _forward(self, net: Any, x: torch.Tensor, sigma_b: torch.Tensor, cond: Any) -> torch.Tensor:
        embeds_bld, pooled_bd = cond
        if self.guidance_scale == 1.0 or self.uncond is None:
            return P.velocity(net, x, sigma_b, embeds_bld, pooled_bd).float()
        b = x.shape[0]
        empty_ld, empty_pooled = self.uncond
        embeds = torch.cat([empty_ld.expand(b, -1, -1).to(embeds_bld), embeds_bld])
        pooled = torch.cat([empty_pooled.expand(b, -1).to(pooled_bd), pooled_bd])
        v_u, v_c = P.velocity(net, torch.cat([x, x]), sigma_b.repeat(2), embeds, pooled).float().chunk(2)
        return apply_cfg(v_u, v_c, self.guidance_scale)

    def velocity(
        self, x_bchw: torch.Tensor, sigma_b: torch.Tensor, cond: Any, which: Which = "current"
    ) -> torch.Tensor:
        if which == "current":
            return self._forward(self.module, x_bchw, sigma_b, cond)
        with torch.no_grad():
            if which == "old":
                if self.lora:
                    with use_adapter(self.module, OLD_ADAPTER):
                        return self._forward(self.module, x_bchw, sigma_b, cond)
                assert self.old_module is not None
                return self._forward(self.old_module, x_bchw, sigma_b, cond)
            if self.lora:
                with adapters_disabled(self.module):
                    return self._forward(self.module, x_bchw, sigma_b, cond)
            assert self.ref_module is not None
            return self._forward(self.ref_module, x_bchw, sigma_b, cond)


def deepspeed_config(cfg: LearnerConfig, grad_accum: int, micro_batch: int, bf16: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        # small models: keep every parameter partitioned and gathered per layer; no persistence threshold
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def lr_lambda(cfg: LearnerConfig, total_steps: int):
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1.0 - progress

    return f


class LearnerEngine:
    """One rank. Construct on every rank, then :meth:`init_distributed` on all ranks at once."""

    def __init__(
        self,
        model: ModelConfig,
        learner: LearnerConfig,
        algorithm: AlgorithmConfig,
        rollout: RolloutConfig,
        rank: int,
        world_size: int,
        total_steps: int,
        seed: int = 0,
        device: str | None = None,
    ):
        self.model_cfg, self.cfg, self.algo_cfg, self.rollout_cfg = model, learner, algorithm, rollout
        self.rank, self.world_size, self.total_steps, self.seed = rank, world_size, total_steps, seed
        self.device = (
            torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.objective: Objective = build_objective(algorithm)
        self.version = 0
        self.history: dict[int, dict[str, torch.Tensor]] = {}  # published weights kept for stale batches
        self.engine: Any = None

    # ------------------------------------------------------------------------------------ setup

    def init_distributed(self, master_addr: str, master_port: int, keep_history: int = 0) -> dict[str, Any]:
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0",
        )
        import deepspeed

        backend = (
            self.cfg.backend
            if self.cfg.backend != "auto"
            else ("nccl" if self.device.type == "cuda" else "gloo")
        )
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        torch.manual_seed(self.seed)
        bf16 = self.cfg.precision == "bfloat16" or (
            self.cfg.precision == "auto" and self.device.type == "cuda"
        )
        from diffusers import SD3Transformer2DModel

        path = P.resolve_model_path(self.model_cfg.path)
        transformer = SD3Transformer2DModel.from_pretrained(
            path, subfolder="transformer", torch_dtype=torch.float32
        )
        self.ref_module = self.old_module = None
        if self.model_cfg.lora is not None:
            add_lora(transformer, self.model_cfg.lora, adapters=(TRAIN_ADAPTER, OLD_ADAPTER), seed=self.seed)
        else:
            transformer.requires_grad_(True)
            if self.objective.uses_ref():
                self.ref_module = copy.deepcopy(transformer).requires_grad_(False).to(self.device)
            self.old_module = copy.deepcopy(transformer).requires_grad_(False).to(self.device)
        if self.cfg.activation_checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.to(self.device)
        params = [p for p in transformer.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=self.cfg.lr, betas=self.cfg.betas, eps=self.cfg.eps, weight_decay=self.cfg.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.cfg, self.total_steps))
        self.micro_groups = max(1, self.cfg.micro_batch_size // self.rollout_cfg.group_size)
        groups_per_rank = math.ceil(self.rollout_cfg.prompts_per_step / self.world_size)
        self.grad_accum = math.ceil(groups_per_rank / self.micro_groups) * self.objective.num_inner_steps()
        ds_cfg = deepspeed_config(
            self.cfg, self.grad_accum, self.micro_groups * self.rollout_cfg.group_size, bf16
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=transformer, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg
        )
        self.module = self.engine.module
        uncond = None
        if self.objective.sampler == "sde" and self.rollout_cfg.guidance_scale != 1.0:
            uncond = self._uncond_embeddings()
        guidance = self.rollout_cfg.guidance_scale if self.objective.sampler == "sde" else 1.0
        self.policy = SD3LearnerPolicy(self.module, guidance, uncond, self.old_module, self.ref_module)
        if keep_history > 0:  # a stale batch of the first steps was sampled by version 0
            self.history[0] = self.get_weights()
        n_train = sum(p.numel() for p in trainable_params(self.module).values())
        return {
            "rank": self.rank,
            "trainable_params": n_train,
            "backend": backend,
            "zero_stage": self.cfg.zero_stage,
        }

    def _uncond_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        pipe = P.load_pipeline(self.model_cfg.path, dtype=torch.float32, device=self.device)
        empty = P.empty_prompt_embeds(pipe)
        return empty[0].detach(), empty[1].detach()

    # ------------------------------------------------------------------------------------ weights

    def _gathered(self, params: list[nn.Parameter]):
        if self.cfg.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
        return nullcontext()

    def get_weights(self) -> dict[str, torch.Tensor]:
        """The trainable weights as CPU tensors (collective under ZeRO-3: call on every rank)."""
        params = trainable_params(self.module)
        with self._gathered(list(params.values())):
            return {k: p.detach().to("cpu", torch.float32).clone() for k, p in params.items()}

    def _set_old(self, state: dict[str, torch.Tensor]) -> None:
        if self.old_module is not None:
            load_weights(self.old_module, state)
            return
        params = adapter_params(self.module, OLD_ADAPTER)
        with self._gathered(list(params.values())):
            load_weights(self.module, state, adapter=OLD_ADAPTER)

    @torch.no_grad()
    def _ema_old(self, decay: float) -> None:
        """old <- d old + (1 - d) current (DGPO's EMA copy, DiffusionNFT's old adapter)."""
        cur = trainable_params(self.module)
        old = (
            dict(self.old_module.named_parameters())
            if self.old_module is not None
            else adapter_params(self.module, OLD_ADAPTER)
        )
        with self._gathered(list(cur.values()) + list(old.values())):
            for name, p_old in old.items():
                p_old.mul_(decay).add_(cur[name].detach().to(p_old.dtype), alpha=1 - decay)

    # ------------------------------------------------------------------------------------ training

    def train_step(self, shard: dict[str, Any], step: int) -> dict[str, float]:
        """One update on this rank's share of the step's batch (whole prompt groups); every rank calls it.

        ``shard`` holds numpy arrays ``latents`` (B,C,h,w), ``prompt_embeds`` (B,L,D), ``pooled`` (B,Dp),
        ``group_ids`` (B,), ``advantages`` (B,), ``sigmas``, ``shift``, ``policy_version`` (the version that
        sampled it) and for Flow-GRPO ``trajectory`` and ``logp``."""
        t0 = time.perf_counter()
        obj = self.objective
        behaviour = int(shard["policy_version"])
        if obj.old_policy == "behaviour":
            # theta_old = the exact weights that sampled the batch (§4.3); loaded into the old adapter when
            # they differ from the current ones, or when later inner steps will move the current ones
            if behaviour != self.version or obj.num_inner_steps() > 1:
                state = self.get_weights() if behaviour == self.version else self.history.get(behaviour)
                if state is None:
                    raise RuntimeError(
                        f"learner rank {self.rank}: no weights kept for behaviour version {behaviour} (holding "
                        f"{sorted(self.history)}); the batch is staler than train.max_staleness allows"
                    )
                self._set_old(state)
            self.policy._old_is_current = behaviour == self.version
        elif obj.old_policy == "ema":
            self.policy._old_is_current = self.version == 0
        batch = self._to_batch(shard)
        gen = torch.Generator().manual_seed(hash((self.seed, step, self.rank)) & 0x7FFFFFFF)
        groups = torch.unique(batch.group_ids_b)
        chunks = [groups[i : i + self.micro_groups] for i in range(0, len(groups), self.micro_groups)]
        n_micro = self.grad_accum // obj.num_inner_steps()
        diags: dict[str, float] = {}
        losses = []
        for _inner in range(obj.num_inner_steps()):
            for j in range(n_micro):
                ids = chunks[j] if j < len(chunks) else chunks[0][:0]
                if len(ids) == 0:
                    # this rank has fewer groups than the accumulation schedule: a zero-loss micro step keeps
                    # every rank's collective calls in lockstep
                    loss = torch.stack([p.sum() for p in trainable_params(self.module).values()]).sum() * 0.0
                    diag: dict[str, float] = {}
                else:
                    mb = batch.select(torch.isin(batch.group_ids_b, ids).nonzero().squeeze(1))
                    loss, diag = obj.loss(self.policy, mb, gen)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"learner rank {self.rank}, step {step}: {obj.name} loss is {loss.item()}; the update was "
                        "not applied. Lower learner.lr or check the rewards for NaN/inf"
                    )
                self.engine.backward(loss)
                self.engine.step()
                losses.append(loss.item())
                for k, v in diag.items():
                    diags[k] = diags.get(k, 0.0) + v / max(1, n_micro * obj.num_inner_steps())
            if obj.old_policy == "behaviour":
                self.policy._old_is_current = False
        decay = obj.old_decay(step)
        if decay is not None:
            self._ema_old(decay)
        self.version = step
        grad_norm = self.engine.get_global_grad_norm()
        out = {
            "loss": float(np.mean(losses)),
            "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
            "lr": float(self.engine.get_lr()[0]),
            "learner_seconds": time.perf_counter() - t0,
        }
        out.update({f"learner/{k}": v for k, v in diags.items()})
        return out

    def publish(self, keep_history: int) -> dict[str, torch.Tensor]:
        """The trainable weights of the current version (every rank calls; rank 0's are broadcast); the last
        ``keep_history`` versions are kept for stale batches and for the behaviour policy."""
        state = self.get_weights()
        if keep_history > 0:
            self.history[self.version] = state
            for v in [v for v in self.history if v < self.version - keep_history]:
                del self.history[v]
        return state

    def _to_batch(self, shard: dict[str, Any]) -> TrainBatch:
        t = lambda k: torch.as_tensor(shard[k]).to(self.device)  # noqa: E731
        opt = lambda k: t(k) if shard.get(k) is not None else None  # noqa: E731
        return TrainBatch(
            latents_bchw=t("latents").float(),
            cond=(t("prompt_embeds"), t("pooled")),
            group_ids_b=t("group_ids").long(),
            advantages_b=t("advantages").float(),
            sigmas=torch.as_tensor(shard["sigmas"], dtype=torch.float64),
            shift=float(shard["shift"]),
            trajectory_btchw=opt("trajectory"),
            logp_old_bt=opt("logp"),
        )

    # ------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, folder: str) -> None:
        """DeepSpeed's own checkpoint (module, optimizer and scheduler shards of every rank), plus the
        learner's bookkeeping. Every rank calls it."""
        self.engine.save_checkpoint(
            folder, tag="learner", client_state={"version": self.version, "history": self.history}
        )

    def load_checkpoint(self, folder: str) -> int:
        _, client = self.engine.load_checkpoint(folder, tag="learner")
        self.version = int(client["version"])
        self.history = client.get("history", {})
        return self.version


def save_policy_weights(state: dict[str, torch.Tensor], path: str | Path, version: int, lora: bool) -> None:
    """The trainable weights in safetensors, readable without DeepSpeed (eval, export)."""
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(path),
        metadata={"policy_version": str(version), "kind": "lora" if lora else "full"},
    )
