"""The learner engine: one rank of a DeepSpeed ZeRO group training the SD3 transformer with the configured
objective, and publishing its trainable weights with a version number.

Plain torch + DeepSpeed, no Ray: ``learner/actor.py`` is the thin Ray shell. Version bookkeeping
(DESIGN.md): the starting policy is version 0; the update of step N publishes version N.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vgrpo.core import policy as P
from vgrpo.core.adapters import (
    OLD_ADAPTER,
    TRAIN_ADAPTER,
    adapter_params,
    adapters_disabled,
    add_lora,
    load_weights,
    trainable_params,
    use_adapter,
)
from vgrpo.core.families import Family, TextCond
from vgrpo.learner.objectives import Objective, TrainBatch, build_objective
from vgrpo.learner.objectives.base import Which
from vgrpo.proto.config import AlgorithmConfig, LearnerConfig, ModelConfig, RolloutConfig
from vgrpo.proto.messages import TrainShard


class NonFiniteLossError(RuntimeError):
    """The objective produced NaN/inf: the update is refused rather than applied."""


class LearnerPolicy:
    """The :class:`FlowPolicy` of the learner: current = the trainable adapter (or the whole transformer),
    old = the frozen ``old`` adapter (or a copy), ref = adapters disabled (or a frozen copy of the base).
    ``cond`` is a :class:`TextCond`; with ``guidance_scale != 1`` every forward applies CFG with the
    empty-prompt conditioning (Flow-GRPO's training forward must match its rollout), the unconditional
    branch detached; a family with a guidance embedding (FLUX.1-dev) gets ``guidance_scale`` as its input
    instead, in every objective, as its rollout did."""

    def __init__(
        self,
        module: nn.Module,
        guidance_scale: float = 1.0,
        uncond: TextCond | None = None,
        old_module: nn.Module | None = None,
        ref_module: nn.Module | None = None,
        family: Family | None = None,
    ):
        self.module, self.guidance_scale, self.uncond = module, guidance_scale, uncond
        self.family = family  # None: told by the module's class
        self.old_module, self.ref_module = old_module, ref_module
        self.lora = old_module is None and ref_module is None
        self._old_is_current = True

    def old_is_current(self) -> bool:
        return self._old_is_current

    def _forward(self, net: Any, x: torch.Tensor, sigma_b: torch.Tensor, cond: TextCond) -> torch.Tensor:
        # the unconditional branch is a constant of the update, as upstream Flow-GRPO and DGPO detach it:
        # the gradient is w grad v_c, not w grad v_c - (w - 1) grad v_u (docs/algorithms.md)
        return P.guided_velocity(
            net, x, sigma_b, cond, self.guidance_scale, self.uncond, detach_uncond=True, family=self.family
        )

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
    if cfg.offload_optimizer:  # ZeRO-Offload: Adam's moments and step on the host
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.offload_params:  # ZeRO-Infinity: the partitioned parameters on the host too
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
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
        self.grad_norms: list[float] = []  # of the updates applied (the spike guard's reference)
        self.skipped_in_a_row = 0
        self.engine: Any = None
        self.ema_decay: float | None = None  # train.ema: an EMA of the policy for evaluation and export
        self.ema: dict[str, torch.Tensor] | None = None
        self.ema_updates = 0

    # ------------------------------------------------------------------------------------ setup

    def init_distributed(
        self, master_addr: str, master_port: int, max_staleness: int = 0, ema: float | None = None
    ) -> dict[str, Any]:
        """Join the DeepSpeed group (every rank at once). ``max_staleness`` (train.max_staleness) sizes the
        publish history: the current version and the ``max_staleness + 1`` before it stay available
        (``TrainConfig.kept_versions``), for a stale batch's behaviour policy and for a replacement rollout
        worker or the object-store catch-up."""
        self.kept_versions = max_staleness + 1
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
        fresh = not torch.distributed.is_initialized()
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        if fresh:
            # DeepSpeed caches its clone of the world group in a module global; a process that ran an
            # engine before (and destroyed its process group: `vgrpo plan --measure` after another local
            # loop, tests) would hand the new engine the dead group ("Group ... is not registered")
            from deepspeed.utils import groups as ds_groups

            ds_groups._WORLD_GROUP = None
        torch.manual_seed(self.seed)
        bf16 = self.cfg.precision == "bfloat16" or (
            self.cfg.precision == "auto" and self.device.type == "cuda"
        )
        path = P.resolve_model_path(self.model_cfg.path)
        self.family = P.resolve_family(path, self.model_cfg.family)
        transformer = self.family.load_transformer(path, torch.float32)
        self.ref_module = self.old_module = None
        if self.model_cfg.lora is not None:
            add_lora(transformer, self.model_cfg.lora, adapters=(TRAIN_ADAPTER, OLD_ADAPTER), seed=self.seed)
        else:
            transformer.requires_grad_(True)
            if self.objective.uses_ref():
                self.ref_module = self._frozen_copy(transformer, bf16)
            self.old_module = self._frozen_copy(transformer, bf16)
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
        # CFG inside the training forward: Flow-GRPO's SDE log-prob (and its windowed variants', MixGRPO and
        # Flow-GRPO-Fast) must match the rollout policy; V-GRPO may opt in (guided_training); the other
        # objectives train the unguided velocity (docs/algorithms.md §2.2)
        guided = self.objective.sampler in ("sde", "sde_window") or bool(
            getattr(self.objective.cfg, "guided_training", False)
        )
        embedded = self.family.guidance_mode(self.module) == "embedded"  # FLUX.1-dev: w is an input
        uncond = None
        if guided and not embedded and self.rollout_cfg.guidance_scale != 1.0:
            uncond = self._uncond_embeddings()
        guidance = self.rollout_cfg.guidance_scale if guided or embedded else 1.0
        self.policy = LearnerPolicy(
            self.module, guidance, uncond, self.old_module, self.ref_module, family=self.family
        )
        if max_staleness > 0:  # a stale batch of the first steps was sampled by version 0
            self.history[0] = self.get_weights()
        if ema is not None:
            self.ema_decay, self.ema, self.ema_updates = float(ema), self.get_weights(), 0
        n_train = sum(p.numel() for p in trainable_params(self.module).values())
        return {
            "rank": self.rank,
            "trainable_params": n_train,
            "backend": backend,
            "zero_stage": self.cfg.zero_stage,
        }

    def _frozen_copy(self, transformer: nn.Module, bf16: bool) -> nn.Module:
        """A frozen whole copy (the old or reference policy of full fine-tuning) in the precision the
        engine trains in: outside DeepSpeed it is not sharded, so a float32 copy of a 12B FLUX.1 would hold
        48 GB on every rank where bf16 holds 24 GB (the planner counts bf16: vgrpo/plan.py)."""
        frozen = copy.deepcopy(transformer).requires_grad_(False)
        return frozen.to(self.device, torch.bfloat16 if bf16 else torch.float32)

    def _uncond_embeddings(self) -> TextCond:
        """The empty prompt's conditioning for the guided training forward, encoded once on the host by
        the text encoders alone (no second transformer and no VAE on the learner's device: for FLUX.1 or
        Qwen-Image that would be tens of GB), then moved to the device."""
        pipe = P.load_pipeline(
            self.model_cfg.path,
            dtype=torch.float32,
            device="cpu",
            family=self.model_cfg.family,
            text_only=True,
        )
        empty = P.empty_prompt_embeds(pipe, self.model_cfg.max_sequence_length)
        return empty.to(self.device)

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

    def train_step(self, shard: TrainShard, step: int) -> dict[str, float]:
        """One update on this rank's share of the step's batch (whole prompt groups, a ``TrainShard``:
        proto/messages.py); every rank calls it."""
        shard.check(f"the driver (step {step}, learner rank {self.rank})")
        t0 = time.perf_counter()
        obj = self.objective
        behaviour = int(shard.policy_version)
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
        batch, subset_diags = obj.train_subset(self._to_batch(shard))
        # draws an objective shares across ranks (DGPO's grid times) come from (seed, step) alone
        batch.extras["step_seed"] = hash((self.seed, step)) & 0x7FFFFFFF
        gen = torch.Generator().manual_seed(hash((self.seed, step, self.rank)) & 0x7FFFFFFF)
        groups = torch.unique(batch.group_ids_b)
        chunks = [groups[i : i + self.micro_groups] for i in range(0, len(groups), self.micro_groups)]
        n_micro = self.grad_accum // obj.num_inner_steps()
        diags: dict[str, float] = dict(subset_diags)
        losses = []
        nonfinite = 0
        # the spike guard can undo this update: the state before it, gathered whole (megabytes with LoRA;
        # with full fine-tuning that would be three copies of the model a step, so the guard is LoRA's)
        window = self.grad_norms[-self.cfg.spike_window :]
        guard = self.cfg.spike_factor is not None and len(window) >= 5 and self.model_cfg.lora is not None
        before = self.consolidated_state() if guard else None
        for _inner in range(obj.num_inner_steps()):
            for j in range(n_micro):
                ids = chunks[j] if j < len(chunks) else groups[:0]  # none left (e.g. every group dropped)
                if len(ids) == 0:
                    # this rank has fewer groups than the accumulation schedule: a zero-loss micro step keeps
                    # every rank's collective calls in lockstep
                    loss = torch.stack([p.sum() for p in trainable_params(self.module).values()]).sum() * 0.0
                    diag: dict[str, float] = {}
                else:
                    mb = batch.select(torch.isin(batch.group_ids_b, ids).nonzero().squeeze(1))
                    loss, diag = obj.loss(self.policy, mb, gen)
                if not self._finite_everywhere(loss):
                    # a NaN/inf on any rank: every rank trains this micro step on a zero loss instead (its
                    # gradient is dropped, the collectives stay in step), and the step counts it
                    nonfinite += 1
                    loss = torch.stack([p.sum() for p in trainable_params(self.module).values()]).sum() * 0.0
                    diag = {}
                else:
                    losses.append(loss.item())
                self.engine.backward(loss)
                self.engine.step()
                for k, v in diag.items():
                    diags[k] = diags.get(k, 0.0) + v / max(1, n_micro * obj.num_inner_steps())
            if obj.old_policy == "behaviour":
                self.policy._old_is_current = False
        decay = obj.old_decay(step)
        if decay is not None:
            self._ema_old(decay)
        self.version = step
        grad_norm = self.engine.get_global_grad_norm()
        norm = float(grad_norm) if grad_norm is not None else 0.0
        skipped = ""
        if not losses:
            skipped = f"the loss was NaN or inf on every micro step ({nonfinite})"
        elif before is not None and norm > self.cfg.spike_factor * float(np.median(window)):  # type: ignore[operator]
            skipped = (
                f"gradient norm {norm:.3g} > {self.cfg.spike_factor:g} x the median {float(np.median(window)):.3g} "
                f"of the last {len(window)} updates"
            )
            self.load_consolidated(before)  # the weights, moments and schedule of before the update
            self.version = step  # the step still publishes (the same weights), so versions stay one per step
        if skipped:
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row >= self.cfg.max_skipped_updates:
                raise NonFiniteLossError(
                    f"learner rank {self.rank}, step {step}: {self.skipped_in_a_row} updates skipped in a row "
                    f"(last: {skipped}); fix: lower learner.lr or check the rewards for NaN/inf, then "
                    "--resume from the last checkpoint"
                )
        else:
            self.skipped_in_a_row = 0
            self.grad_norms = [*self.grad_norms, norm][-self.cfg.spike_window :]
        out = {
            "loss": float(np.mean(losses)) if losses else 0.0,
            "grad_norm": norm,
            "lr": float(self.engine.get_lr()[0]),
            "learner_seconds": time.perf_counter() - t0,
            "learner/skipped_update": float(bool(skipped)),
            "learner/nonfinite_micro_steps": float(nonfinite),
        }
        out.update({f"learner/{k}": v for k, v in diags.items()})
        return out

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank (one small all-reduce: the ranks must agree on what
        they skip, or their collectives fall out of step)."""
        flag = torch.tensor([1.0 if bool(torch.isfinite(loss.detach())) else 0.0], device=self.device)
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def publish(self) -> dict[str, torch.Tensor]:
        """The weights the rollout workers sample the current version with (every rank calls; rank 0's are
        broadcast): the trainable ones, or the objective's old copy where it samples with that
        (``Objective.rollout_policy``: DiffusionNFT; DGPO after switch_ema_ref). The history keeps the last
        ``kept_versions`` versions before it (see :meth:`init_distributed`); train.ema averages the
        trainable weights either way."""
        current = self.get_weights()
        state = self.sampling_weights(current)
        self.history[self.version] = state
        for v in [v for v in self.history if v < self.version - self.kept_versions]:
            del self.history[v]
        if self.ema_decay is not None:
            self._update_ema(current)
        return state

    def sampling_weights(self, current: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """What the rollout samples the current version with, keyed as the trainable weights (collective
        under ZeRO-3: call on every rank)."""
        if self.objective.rollout_policy(self.version) == "current":
            return current if current is not None else self.get_weights()
        if self.old_module is not None:
            return {
                k: p.detach().to("cpu", torch.float32).clone() for k, p in self.old_module.named_parameters()
            }
        old = adapter_params(self.module, OLD_ADAPTER)
        with self._gathered(list(old.values())):
            return {k: p.detach().to("cpu", torch.float32).clone() for k, p in old.items()}

    # ------------------------------------------------------------------------------------ EMA

    def ema_decay_at(self, t: int) -> float:
        """The decay of EMA update ``t`` (0-based): Flow-GRPO's warm-up min(decay, (1 + t) / (10 + t)), so
        the first updates follow the policy closely instead of dragging the starting weights along."""
        assert self.ema_decay is not None
        return min(self.ema_decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def _update_ema(self, state: dict[str, torch.Tensor]) -> None:
        """ema <- d ema + (1 - d) published weights, once per published version (every rank holds the same
        copy: ``state`` is the gathered payload, so no extra collective)."""
        assert self.ema is not None
        d = self.ema_decay_at(self.ema_updates)
        for k, v in state.items():
            self.ema[k].mul_(d).add_(v.to(self.ema[k].dtype), alpha=1 - d)
        self.ema_updates += 1

    def get_ema(self) -> dict[str, torch.Tensor] | None:
        """The EMA of the trainable weights (None without train.ema)."""
        return None if self.ema is None else {k: v.clone() for k, v in self.ema.items()}

    def _to_batch(self, shard: TrainShard) -> TrainBatch:
        t = lambda a: torch.as_tensor(a).to(self.device)  # noqa: E731
        return TrainBatch(
            latents_bchw=t(shard.latents).float(),
            cond=TextCond(
                t(shard.prompt_embeds),
                t(shard.pooled),
                t(shard.prompt_mask) if shard.prompt_mask is not None else None,
            ),
            group_ids_b=t(shard.group_ids).long(),
            advantages_b=t(shard.advantages).float(),
            sigmas=torch.as_tensor(shard.sigmas, dtype=torch.float64),
            shift=float(shard.shift),
            trajectory_btchw=t(shard.trajectory) if shard.trajectory is not None else None,
            logp_old_bt=t(shard.logp) if shard.logp is not None else None,
            window_start=int(shard.window_start),
        )

    # ------------------------------------------------------------------------------------ checkpoints

    def _client_state(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "history": self.history,
            "ema": self.ema,
            "ema_updates": self.ema_updates,
        }

    def _set_client_state(self, client: dict[str, Any]) -> None:
        self.version = int(client["version"])
        self.history = client.get("history", {})
        if self.ema_decay is not None:
            if client.get("ema") is not None:
                self.ema, self.ema_updates = client["ema"], int(client.get("ema_updates", 0))
            else:  # train.ema turned on at resume: the average starts from the resumed weights
                self.ema, self.ema_updates = self.get_weights(), 0

    def save_checkpoint(self, folder: str) -> None:
        """The learner's whole state with no sharding (every trainable weight, the frozen ``old`` copy,
        Adam's moments and step, the LR schedule, the kept versions, the EMA), gathered by every rank (a
        collective) and written by rank 0 as safetensors + JSON (:data:`STATE_TENSORS`,
        :data:`STATE_JSON`): nothing a checkpoint holds can execute code when it is read (DeepSpeed's own
        checkpoint files are pickles, so they are not written), and a group of any size or ZeRO stage
        loads it."""
        state = self.consolidated_state()
        if self.rank == 0:
            write_state(Path(folder), state)

    def load_checkpoint(self, folder: str) -> int:
        """Load :meth:`save_checkpoint`'s state (every rank calls; any group size or ZeRO stage)."""
        self.load_consolidated(read_state(Path(folder)))
        return self.version

    # consolidated state: every trainable weight, Adam moment and the schedule as whole fp32 tensors

    def _base_optimizer(self) -> torch.optim.Optimizer:
        opt = self.engine.optimizer
        return getattr(opt, "optimizer", opt)  # ZeRO wraps the torch optimizer; stage 0 may not

    def _optimizer_step_count(self) -> int:
        for st in self._base_optimizer().state.values():
            if "step" in st:
                return int(st["step"])
        return 0

    def _full_fp32(self, p: nn.Parameter) -> torch.Tensor:
        """The fp32 master weight of ``p`` (ZeRO keeps it partitioned; a collective), else ``p`` itself."""
        from deepspeed.utils import safe_get_full_fp32_param

        full = safe_get_full_fp32_param(p)
        if full is None:
            with self._gathered([p]):
                full = p.detach().clone()
        return full.to("cpu", torch.float32).clone()

    def _full_moment(self, p: nn.Parameter, key: str) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_optimizer_state

        full = safe_get_full_optimizer_state(p, key)
        if full is None:  # no ZeRO: the torch optimizer holds the parameter's state itself
            full = self._base_optimizer().state[p][key]
        return full.to("cpu", torch.float32).clone()

    def consolidated_state(self) -> dict[str, Any]:
        """The learner's whole state with no sharding: a collective (every rank calls, rank 0 saves)."""
        params = trainable_params(self.module)
        steps = self._optimizer_step_count()
        moments: dict[str, dict[str, torch.Tensor]] = {"exp_avg": {}, "exp_avg_sq": {}}
        weights = {}
        for name, p in params.items():  # the same order on every rank: the collectives pair up
            weights[name] = self._full_fp32(p)
            if steps > 0:
                for key in moments:
                    moments[key][name] = self._full_moment(p, key)
        if self.old_module is not None:
            old = {k: v.detach().to("cpu").clone() for k, v in self.old_module.state_dict().items()}
        else:
            old_params = adapter_params(self.module, OLD_ADAPTER)
            with self._gathered(list(old_params.values())):
                old = {k: p.detach().to("cpu", torch.float32).clone() for k, p in old_params.items()}
        return {
            "format": 1,
            "world_size": self.world_size,
            "zero_stage": self.cfg.zero_stage,
            "weights": weights,
            "old": old,
            "optimizer": {"step": steps, **moments},
            "scheduler": self.engine.lr_scheduler.state_dict(),
            "global_steps": int(self.engine.global_steps),
            "client": self._client_state(),
        }

    def _dummy_step(self) -> None:
        """One optimizer step with a zero loss (a real forward, so every ZeRO hook runs): Adam's state
        tensors exist only after a step, and :meth:`load_consolidated` overwrites all it changed."""
        x, cond = self.family.dummy_inputs(self.module, self.device)
        for _ in range(self.grad_accum):
            v = P.velocity(
                self.module, x, torch.full((1,), 0.5, device=self.device), cond, family=self.family
            )
            self.engine.backward(v.float().sum() * 0.0)
            self.engine.step()

    @torch.no_grad()
    def _set_full(self, p: nn.Parameter, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(p, value.to(self.device, torch.float32))  # the master copy (ZeRO)
        with self._gathered([p]):  # and the module's own (low-precision, maybe partitioned) copy
            p.data.copy_(value.to(p.device, p.dtype))

    def load_consolidated(self, state: dict[str, Any]) -> None:
        """Load :meth:`consolidated_state` of a group of any size or ZeRO stage (every rank calls)."""
        from deepspeed.utils import safe_set_full_optimizer_state

        params = trainable_params(self.module)
        missing = sorted(set(params) ^ set(state["weights"]))
        if missing:
            raise ValueError(f"consolidated learner state does not match the model: {missing[:3]} ...")
        steps = int(state["optimizer"]["step"])
        if steps > 0:
            self._dummy_step()
        for name, p in params.items():
            self._set_full(p, state["weights"][name])
            if steps > 0:
                for key in ("exp_avg", "exp_avg_sq"):
                    value = state["optimizer"][key][name].to(self.device, torch.float32)
                    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):  # ZeRO: each rank its slice
                        safe_set_full_optimizer_state(p, value, key)
                    else:  # no ZeRO: the torch optimizer holds the parameter's state itself
                        self._base_optimizer().state[p][key].copy_(value)
        for st in self._base_optimizer().state.values():
            if "step" in st:
                st["step"] = (
                    torch.tensor(float(steps), dtype=st["step"].dtype)
                    if torch.is_tensor(st["step"])
                    else steps
                )
        self.engine.lr_scheduler.load_state_dict(state["scheduler"])
        rates = self.engine.lr_scheduler.get_last_lr()
        for group, lr in zip(self._base_optimizer().param_groups, rates, strict=True):
            group["lr"] = lr  # the schedule's state alone sets the rate only at its next step
        self.engine.global_steps = int(state["global_steps"])
        if self.old_module is not None:
            self.old_module.load_state_dict(state["old"])
        else:
            self._set_old(state["old"])
        self._set_client_state(state["client"])


STATE_TENSORS = "state.safetensors"  # in a checkpoint's learner/ folder: every tensor of the state
STATE_JSON = "state.json"  # beside it: the numbers (format, layout, optimizer step, LR schedule, versions)
STATE_FORMAT = 2


def _flatten(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """:meth:`LearnerEngine.consolidated_state` -> (tensors by prefixed name, JSON numbers). A tensor
    that shares memory with one already taken (safetensors refuses aliases) is cloned."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, Any]] = set()

    def put(prefix: str, group: dict[str, torch.Tensor] | None) -> None:
        for name, t in (group or {}).items():
            t = t.detach().to("cpu").contiguous()
            key = (t.untyped_storage().data_ptr(), t.storage_offset())
            tensors[f"{prefix}/{name}"] = t.clone() if key in seen else t
            seen.add(key)

    client = state["client"]
    put("weights", state["weights"])
    put("old", state["old"])
    for moment in ("exp_avg", "exp_avg_sq"):
        put(f"optimizer/{moment}", state["optimizer"].get(moment))
    put("ema", client.get("ema"))
    for version, kept in (client.get("history") or {}).items():
        put(f"history/{int(version)}", kept)
    meta = {
        "format": STATE_FORMAT,
        "world_size": state["world_size"],
        "zero_stage": state["zero_stage"],
        "optimizer_step": int(state["optimizer"]["step"]),
        "scheduler": state["scheduler"],
        "global_steps": int(state["global_steps"]),
        "version": int(client["version"]),
        "ema_updates": int(client.get("ema_updates") or 0),
        "has_ema": client.get("ema") is not None,
        "history": sorted(int(v) for v in (client.get("history") or {})),
    }
    return tensors, meta


def _unflatten(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    def group(prefix: str) -> dict[str, torch.Tensor]:
        p = prefix + "/"
        return {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}

    return {
        "format": meta["format"],
        "world_size": meta["world_size"],
        "zero_stage": meta["zero_stage"],
        "weights": group("weights"),
        "old": group("old"),
        "optimizer": {
            "step": meta["optimizer_step"],
            "exp_avg": group("optimizer/exp_avg"),
            "exp_avg_sq": group("optimizer/exp_avg_sq"),
        },
        "scheduler": meta["scheduler"],
        "global_steps": meta["global_steps"],
        "client": {
            "version": meta["version"],
            "history": {v: group(f"history/{v}") for v in meta["history"]},
            "ema": group("ema") if meta["has_ema"] else None,
            "ema_updates": meta["ema_updates"],
        },
    }


def write_state(folder: Path, state: dict[str, Any]) -> None:
    """The learner state as :data:`STATE_TENSORS` + :data:`STATE_JSON` (each written then renamed)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors, meta = _flatten(state)
    try:
        text = json.dumps(meta)
    except TypeError as e:  # a scheduler whose state is not plain numbers: say so rather than pickle it
        raise TypeError(
            f"learner state: a value is not JSON ({e}); the LR schedule must be plain numbers"
        ) from e
    tmp = folder / (STATE_TENSORS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": str(STATE_FORMAT)})
    os.replace(tmp, folder / STATE_TENSORS)
    tmp = folder / (STATE_JSON + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, folder / STATE_JSON)


def read_state(folder: Path) -> dict[str, Any]:
    """:func:`write_state`'s files back (safetensors and JSON only: reading runs no code). A missing or
    unreadable file is a ValueError naming it."""
    from safetensors.torch import load_file

    tensors_path, meta_path = folder / STATE_TENSORS, folder / STATE_JSON
    for path in (tensors_path, meta_path):
        if not path.is_file():
            raise ValueError(
                f"{path} does not exist: this checkpoint was not written by this vgrpo (older ones kept "
                "DeepSpeed's pickled shards, which are never read because they can execute code); fix: "
                "resume from a checkpoint this version wrote, or start a new run"
            )
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, want {STATE_FORMAT}")
    except (ValueError, OSError) as e:
        raise ValueError(f"{meta_path} is not a learner state ({e})") from None
    try:
        tensors = load_file(str(tensors_path))
    except Exception as e:  # safetensors' own error types: a truncated or foreign file
        raise ValueError(f"{tensors_path} is not a readable safetensors file ({e})") from None
    return _unflatten(tensors, meta)


def save_policy_weights(state: dict[str, torch.Tensor], path: str | Path, version: int, lora: bool) -> None:
    """The trainable weights in safetensors, readable without DeepSpeed (eval, export)."""
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(path),
        metadata={"policy_version": str(version), "kind": "lora" if lora else "full"},
    )
