"""The whole run configuration: one pydantic tree, loaded from YAML, every field validated.

Each component receives only its own section (``cfg.rollout`` for rollout workers, ``cfg.learner`` for
the learner, ...). Each objective's hyper-parameters live in their own subsection of ``algorithm``, all
present with defaults, so that ``--set algorithm.name=X`` alone switches objective.

This module imports neither torch nor Ray: a bad configuration must fail in well under a second.
"""

from __future__ import annotations

import difflib
import logging
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

ALGORITHMS = ("vgrpo", "dgpo", "flow_grpo", "nft", "flow_grpo_fast", "mixgrpo")
# objectives that roll out with the windowed SDE sampler (rollout.sampler = sde_window)
log = logging.getLogger("vgrpo")

WINDOW_ALGORITHMS = ("flow_grpo_fast", "mixgrpo")
# objectives whose upstream samples on diffusers' FlowMatchEulerDiscreteScheduler grid (RunConfig.sigma_grid)
DIFFUSERS_GRID_ALGORITHMS = ("flow_grpo", "flow_grpo_fast", "nft")
AdvantageNorm = Literal["group", "global_std", "none"]


class Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are validated, and no number is
    infinite or NaN (an infinite learning rate or clip would train to NaN weights without a word)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def check_custom_resources(v: dict[str, float]) -> dict[str, float]:
    """Extra Ray resources of one actor: names other than CPU/GPU, finite amounts >= 0."""
    for name, amount in v.items():
        if name in RAY_BUILTIN_RESOURCES:
            raise ValueError(f"{name!r} is set by cpus/gpus fields, not custom_resources; remove it there")
        if not (math.isfinite(amount) and amount >= 0):
            raise ValueError(f"custom resource {name!r} = {amount}: want a finite amount >= 0")
    return v


CustomResources = Annotated[dict[str, float], AfterValidator(check_custom_resources)]


# ----------------------------------------------------------------------------------------------- model


class LoraConfig(Section):
    rank: int = Field(16, ge=1, description="LoRA rank r")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (scale = alpha / rank)")
    dropout: float = Field(0.0, ge=0, lt=1)
    init: Literal["gaussian", "default", "zeros"] = "gaussian"
    target_modules: list[str] | None = Field(
        None,
        description="linear layers to adapt (names or dotted suffixes); None: the model family's attention "
        "projections (docs/families.md; SD3: to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out as Flow-GRPO)",
    )


class ModelConfig(Section):
    path: str = Field(
        "builtin:tiny-sd3",
        description="diffusers pipeline: a local folder, a hub id, or builtin:tiny-sd3 (shipped)",
    )
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on GPU, float32 on CPU"
    )
    lora: LoraConfig | None = Field(
        default_factory=LoraConfig, description="null trains (and broadcasts) the full transformer"
    )
    family: Literal["auto", "sd3", "flux", "qwen_image", "wan"] = Field(
        "auto",
        description="model family (docs/families.md); auto: read from the checkpoint's model_index.json",
    )
    max_sequence_length: int = Field(
        77,
        ge=1,
        le=1024,
        description="prompt tokens of the family's long text encoder (SD3/FLUX T5 <= 512, Qwen-Image <= 1024, "
        "Wan UMT5 <= 512)",
    )
    frames: int | None = Field(
        None, ge=1, description="video frames per sample (Wan; None: the family's default, 1 for images)"
    )

    @model_validator(mode="after")
    def _prompt_length(self) -> ModelConfig:
        limit = {"sd3": 512, "flux": 512, "wan": 512, "qwen_image": 1024}.get(self.family)
        if limit is not None and self.max_sequence_length > limit:
            raise ValueError(
                f"model.max_sequence_length = {self.max_sequence_length}: model.family {self.family} takes at "
                f"most {limit} prompt tokens; fix: --set model.max_sequence_length={limit}"
            )
        return self


# ----------------------------------------------------------------------------------------------- data


class DataConfig(Section):
    train_prompts: str = Field(
        "builtin:shapes/train", description="prompt file: .txt (one a line) or .jsonl (GenEval metadata)"
    )
    eval_prompts: str = Field("builtin:shapes/heldout", description="held-out prompt file")
    shuffle: bool = True
    balance_by: str | None = Field(
        None,
        description="a metadata field (e.g. tag, GenEval's family) whose groups are drawn equally often; "
        "None: every prompt once per epoch",
    )
    eval_images_per_prompt: int = Field(4, ge=1, description="GenEval samples 4 images per prompt")
    eval_max_prompts: int | None = Field(None, ge=1, description="cap on held-out prompts (None: all)")
    eval_num_steps: int = Field(10, ge=1, description="held-out sampler steps (deterministic ODE)")
    eval_guidance_scale: float = Field(
        5.0,
        ge=0,
        description="held-out CFG w: GenEval scores SD3 with CFG (4.5 for SD3.5-M; 5 suits the tiny model)",
    )


# ----------------------------------------------------------------------------------------------- rollout


class RolloutConfig(Section):
    num_workers: int = Field(1, ge=1, description="rollout actors (one per inference device)")
    group_size: int = Field(8, description="G: images per prompt")
    prompts_per_step: int = Field(4, ge=1, description="P: prompt groups per training step")
    num_steps: int = Field(10, ge=1, description="sampler steps")
    sampler: Literal["auto", "euler", "dpm2", "sde", "sde_window"] = Field(
        "auto",
        description="auto follows the objective: dpm2 ODE for the ELBO family, sde for flow_grpo, "
        "sde_window (SDE steps in a window, Euler ODE elsewhere) for flow_grpo_fast and mixgrpo",
    )
    guidance_scale: float = Field(
        5.0,
        ge=0,
        description="classifier-free guidance w (1 = off); the embedded default samples with the held-out "
        "evaluation's w (data.eval_guidance_scale), as DGPO's default samples SD3.5-M with CFG 4.5",
    )
    shift: float | None = Field(None, gt=0, description="SD3 sigma shift; None reads the scheduler's")
    sigma_grid: Literal["auto", "uniform", "diffusers"] = Field(
        "auto",
        description="the rollout's sigma grid before the shift: diffusers = FlowMatchEulerDiscreteScheduler's "
        "(last sigma 0.0089 at shift 3; Flow-GRPO and DiffusionNFT sample on it), uniform = linspace(1, 1/N, "
        "N); auto follows the objective (docs/algorithms.md)",
    )
    height: int | None = Field(None, ge=8, description="None: the model's native size")
    width: int | None = Field(None, ge=8)
    batch_size: int = Field(32, ge=1, description="images per sampler forward pass")
    cpus_per_worker: float = Field(0.25, ge=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    custom_resources: CustomResources = Field(
        default_factory=dict,
        description="extra Ray resources per worker, e.g. {vgrpo_rollout: 1} to pin workers to a node group",
    )

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        if v < 2:
            raise ValueError(
                f"group_size must be >= 2 (got {v}): group-relative advantages need at least two "
                "images per prompt; fix: --set rollout.group_size=8"
            )
        return v


# ----------------------------------------------------------------------------------------------- reward


class RewardServerConfig(Section):
    num_replicas: int | Literal["auto"] = Field(
        1, description="Serve replicas, or auto (queue-depth autoscaling)"
    )
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="None: 4 x max_batch_size (Serve's default 5 caps batches at 5)"
    )
    cpus: float = Field(0.25, ge=0)
    gpus: float = Field(0.0, ge=0)
    options: dict[str, Any] = Field(default_factory=dict, description="reward-specific settings")
    custom_resources: CustomResources = Field(
        default_factory=dict, description="extra Ray resources per replica, e.g. {vgrpo_reward: 0.5}"
    )
    runtime_env: dict[str, Any] | None = Field(
        None,
        description="Ray runtime_env of this reward's replicas (pip packages, env_vars, working_dir, "
        "conda): a reward whose dependencies conflict with the trainer's runs in its own environment",
    )

    @field_validator("runtime_env")
    @classmethod
    def _runtime_env(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        known = {
            "pip",
            "uv",
            "conda",
            "env_vars",
            "working_dir",
            "py_modules",
            "container",
            "image_uri",
            "config",
        }
        unknown = sorted(set(v or {}) - known)
        if unknown:
            raise ValueError(f"runtime_env keys {unknown} are not Ray's; known: {', '.join(sorted(known))}")
        return v

    def own_code(self) -> bool:
        """Whether the replicas bring code the driver may not have (a runtime_env with packages or a
        working_dir): a ``module:Class`` reward is then resolved where it runs, not checked here."""
        code = ("pip", "uv", "conda", "working_dir", "py_modules", "container", "image_uri")
        return any(k in (self.runtime_env or {}) for k in code)


class RewardConfig(Section):
    weights: dict[str, float] = Field(
        default_factory=lambda: {"shapes": 1.0}, description="reward name -> weight in the scalar reward"
    )
    servers: dict[str, RewardServerConfig] = Field(
        default_factory=dict, description="per-reward serving settings (defaults apply to the rest)"
    )
    timeout_s: float = Field(120.0, gt=0, description="per request")
    retries: int = Field(2, ge=0, description="retries of a failed or timed-out reward request")
    max_image_pixels: int = Field(
        4096 * 4096,
        ge=1,
        description="largest image a reward server or `vgrpo score` decodes (refused from its header)",
    )
    max_request_mb: float = Field(64.0, gt=0, description="largest POST /score body of `vgrpo serve-rewards`")
    on_failure: Literal["stop", "drop_group"] = Field(
        "stop",
        description="an image a reward could not score after reward.retries: stop (the run ends naming it) "
        "or drop_group (its prompt group leaves that step's update; reward/dropped_groups counts them)",
    )
    combine: Literal["weighted_sum", "group_normalized"] = Field(
        "weighted_sum",
        description="weighted_sum: the objective's advantages of sum_k w_k r_k; group_normalized: each "
        "reward z-scored inside its prompt group first, then weighted (rewards of different scales count "
        "by their weights, not by their spread; docs/rewards.md)",
    )

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("at least one reward is needed; fix: --set reward.weights.shapes=1.0")
        for name, w in v.items():
            if not math.isfinite(w):
                raise ValueError(f"weight of reward {name!r} is {w}, not a finite number")
        if all(w == 0 for w in v.values()):
            raise ValueError("every reward weight is 0: the training signal would be constant")
        return v

    def server(self, name: str) -> RewardServerConfig:
        return self.servers.get(name, RewardServerConfig())


# ----------------------------------------------------------------------------------------------- algorithm


class AdvantageConfig(Section):
    """Group-relative advantages, docs/algorithms.md §3."""

    norm: AdvantageNorm = Field("group", description="group: per-group std; global_std: std of the batch")
    eps: float = Field(1e-4, gt=0)
    std: Literal["population", "sample"] = Field(
        "population",
        description="population: divide by n (numpy's np.std, as Flow-GRPO, DGPO and DiffusionNFT); sample: "
        "by n - 1 (torch's Tensor.std, as MixGRPO)",
    )
    clip: float | None = Field(5.0, gt=0, description="hard clip |A| <= clip (None: off)")
    soft_clip: float | None = Field(None, gt=0, description="eta: A <- eta * tanh(A / eta) (None: off)")


class VGRPOConfig(Section):
    """V-GRPO, docs/algorithms.md §4."""

    n_mc: int = Field(4, ge=1, description="(t, eps) pairs per image, shared by the prompt's group")
    clip_range: float = Field(
        0.01, ge=0, description="PPO ratio clip: rho in [1 - clip_range, 1 + clip_range]"
    )
    kl_beta: float = Field(0.0, ge=0, description="KL-to-old weight (active when the ratio != 1)")
    ref_kl_beta: float = Field(
        0.5,
        ge=0,
        description="weight of mean_d (x0_hat - x0_hat_ref)^2 to the frozen starting policy (LoRA off), "
        "as Flow-GRPO and DGPO regularise; guards a partial-credit reward against drift into fragments",
    )
    inner_steps: int = Field(1, ge=1, description="gradient steps per rollout batch")
    t_min: float = Field(0.02, ge=0, lt=1, description="training times avoid t=0 and t=1")
    t_max: float = Field(0.98, gt=0, le=1)
    guided_training: bool = Field(
        False,
        description="score samples with the CFG velocity the rollout used (rollout.guidance_scale): the "
        "trained object is what is sampled; doubles the learner's forwards",
    )

    @model_validator(mode="after")
    def _time_range(self) -> VGRPOConfig:
        if self.t_min >= self.t_max:
            raise ValueError(
                f"t_min = {self.t_min} >= t_max = {self.t_max}: the training times need a range; fix: t_min < t_max"
            )
        return self

    advantage: AdvantageConfig = Field(
        default_factory=lambda: AdvantageConfig(norm="group", clip=None, soft_clip=3.0)
    )


class DGPOConfig(Section):
    """DGPO, docs/algorithms.md §5.3."""

    beta_dpo: float = Field(100.0, gt=0)
    kl_beta: float = Field(0.02, ge=0)
    clip_range: float = Field(
        1e-2, ge=0, description="PPO-style ratio clip: a sample whose ratio leaves 1 +- clip_range drops"
    )
    num_timesteps: int = Field(4, ge=1, description="M grid times per epoch")
    trunc_steps: int = Field(4, ge=0, description="train on grid indices 0..trunc_steps (high noise)")
    ema_decay_max: float = Field(0.3, ge=0, lt=1, description="old copy: EMA decay min(max, 0.001 step)")
    switch_ema_ref: int | None = Field(
        200,
        ge=0,
        description="after this many updates the rollouts are sampled with the EMA copy (upstream: 200, 500 "
        "in its GenEval config); None: always the trained weights",
    )
    advantage: AdvantageConfig = Field(default_factory=lambda: AdvantageConfig(norm="group", clip=5.0))


class FlowGRPOConfig(Section):
    """Flow-GRPO, docs/algorithms.md §6.1."""

    noise_level: float = Field(0.7, ge=0, description="SDE noise level a")
    clip_range: float = Field(1e-4, gt=0)
    kl_beta: float = Field(0.04, ge=0, description="KL to the frozen reference")
    timestep_fraction: float = Field(0.9, gt=0, le=1, description="train on the first fraction of steps")
    inner_steps: int = Field(1, ge=1, description="optimiser steps per rollout batch")
    drop_zero_advantage: bool = Field(
        True, description="train only on images with A != 0 (upstream drops the others before the update)"
    )
    advantage: AdvantageConfig = Field(default_factory=lambda: AdvantageConfig(norm="global_std", clip=5.0))


class NFTConfig(Section):
    """DiffusionNFT, docs/algorithms.md §5.2."""

    beta: float = Field(1.0, gt=0, description="guidance strength of the implicit policies")
    kl_beta: float = Field(1e-4, ge=0)
    adv_clip_max: float = Field(5.0, gt=0)
    timestep_fraction: float = Field(0.99, gt=0, le=1)
    old_decay_rate: float = Field(
        0.001, ge=0, description="old <- d old + (1-d) theta, d = min(rate*step, max)"
    )
    old_decay_max: float = Field(0.5, ge=0, lt=1)
    sample_with_old: bool = Field(
        True, description="rollouts sample with the old (EMA) policy, as upstream; False: the trained one"
    )
    advantage: AdvantageConfig = Field(default_factory=lambda: AdvantageConfig(norm="global_std", clip=5.0))


class FlowGRPOFastConfig(Section):
    """Flow-GRPO-Fast (yifan123/flow_grpo's fast mode), docs/algorithms.md §6.3: Flow-GRPO's loss on a
    random window of W SDE steps per rollout batch, the Euler ODE on every other step."""

    noise_level: float = Field(0.7, ge=0, description="SDE noise level a inside the window (upstream 0.7)")
    clip_range: float = Field(1e-4, gt=0, description="ratio clip (upstream 1e-4)")
    kl_beta: float = Field(
        0.04, ge=0, description="KL to the frozen reference on the window's steps (Flow-GRPO's 0.04)"
    )
    sde_window_size: int = Field(
        2, ge=1, description="W: SDE (trained) steps per rollout (upstream sde_window_size 2; verl-omni 2-3)"
    )
    sde_window_range: tuple[int, int] = Field(
        (0, 5),
        description="(r0, r1): each rollout batch draws its window start uniformly from {r0, ..., r1 - W}, "
        "from (train.seed, step) (upstream sde_window_range (0, 5)); r1 <= rollout.num_steps - 1",
    )
    inner_steps: int = Field(1, ge=1, description="optimiser steps per rollout batch")
    drop_zero_advantage: bool = Field(
        True, description="train only on images with A != 0, as Flow-GRPO's training script"
    )
    advantage: AdvantageConfig = Field(default_factory=lambda: AdvantageConfig(norm="global_std", clip=5.0))

    @field_validator("sde_window_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(
                "want 0 <= r0 < r1 (window starts drawn from r0..r1 - W); fix: "
                "--set algorithm.flow_grpo_fast.sde_window_range=[0,5]"
            )
        return v

    @model_validator(mode="after")
    def _span(self) -> FlowGRPOFastConfig:
        r0, r1 = self.sde_window_range
        if r1 - r0 < self.sde_window_size:
            raise ValueError(
                f"sde_window_range {list(self.sde_window_range)} spans {r1 - r0} steps, fewer than "
                f"sde_window_size = {self.sde_window_size}; fix: --set "
                f"algorithm.flow_grpo_fast.sde_window_range=[{r0},{r0 + self.sde_window_size}] or a smaller "
                "sde_window_size"
            )
        return self


class MixGRPOConfig(Section):
    """MixGRPO (Tencent-Hunyuan/MixGRPO), docs/algorithms.md §6.2: Flow-GRPO's loss on a sliding window of
    W SDE steps, the Euler ODE elsewhere. The window starts at step 0 and moves by ``shift_step`` every
    ``shift_every`` training steps; past ``max_start`` it rolls back to 0. Upstream (FLUX, 25 steps):
    W = 4, moves by 1 every 25 iterations, 300 iterations. The embedded default's 10-step schedule keeps
    the proportion W = 2 of 10, and K = 16 sweeps the 8 starts 0..7 in 128 of its 160 steps, so every part
    of the schedule is trained at least once (upstream's 25 iterations per start would reach start 6)."""

    noise_level: float = Field(
        0.7, ge=0, description="SDE noise level a inside the window (upstream eta 0.7)"
    )
    clip_range: float = Field(1e-4, gt=0, description="ratio clip (upstream 1e-4)")
    kl_beta: float = Field(
        0.0,
        ge=0,
        description="KL to the frozen reference, Flow-GRPO's form (upstream kl_coeff 0, so no reference)",
    )
    sde_window_size: int = Field(
        2, ge=1, description="W: SDE (trained) steps per rollout (upstream group_size 4 of 25 steps)"
    )
    shift_every: int = Field(
        16,
        ge=1,
        description="K: training steps between window moves (upstream iters_per_group 25 at 25 steps; 16 "
        "makes the default 160-step run sweep the 10-step schedule once)",
    )
    shift_step: int = Field(1, ge=1, description="how far the window moves (upstream prog_overlap_step 1)")
    max_start: int | None = Field(
        None,
        ge=0,
        description="the last window start before the roll-back to 0; None: rollout.num_steps - 1 - W, the "
        "last whose window ends before the final step to sigma = 0 (upstream: the window is cut at index "
        "sampling_steps - 2, so its last trained transition is sampling_steps - 3)",
    )
    inner_steps: int = Field(1, ge=1, description="optimiser steps per rollout batch")
    drop_zero_advantage: bool = Field(
        False, description="train only on images with A != 0 (upstream MixGRPO trains on every image)"
    )
    advantage: AdvantageConfig = Field(
        default_factory=lambda: AdvantageConfig(norm="group", eps=1e-8, std="sample", clip=5.0),
        description="per-group z-score with eps 1e-8 and the unbiased (n - 1) std, |A| <= 5, as upstream",
    )


class AlgorithmConfig(Section):
    name: str = Field("vgrpo", description="one of " + ", ".join(ALGORITHMS))
    vgrpo: VGRPOConfig = Field(default_factory=VGRPOConfig)
    dgpo: DGPOConfig = Field(default_factory=DGPOConfig)
    flow_grpo: FlowGRPOConfig = Field(default_factory=FlowGRPOConfig)
    nft: NFTConfig = Field(default_factory=NFTConfig)
    flow_grpo_fast: FlowGRPOFastConfig = Field(default_factory=FlowGRPOFastConfig)
    mixgrpo: MixGRPOConfig = Field(default_factory=MixGRPOConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v not in ALGORITHMS:
            close = difflib.get_close_matches(v, ALGORITHMS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(
                f"unknown algorithm {v!r}{hint}; choose one of: {', '.join(ALGORITHMS)} "
                f"(default vgrpo); fix: --set algorithm.name=vgrpo"
            )
        return v

    def params(self) -> BaseModel:
        """The selected objective's own subsection."""
        return getattr(self, self.name)


# ----------------------------------------------------------------------------------------------- learner


class LearnerConfig(Section):
    num_ranks: int = Field(1, ge=1, description="learner actors in one DeepSpeed ZeRO group")
    zero_stage: Literal[0, 1, 2, 3] = 2
    optimizer: Literal["adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0, description="LoRA rate of the tiny default; the SD3.5-M recipes use 3e-4")
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam's (beta1, beta2), each in [0, 1)")
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, gt=0)
    spike_factor: float | None = Field(
        10.0,
        gt=1,
        description="undo an update whose gradient norm exceeds this multiple of the median of the last "
        "spike_window updates (None: off; LoRA runs only); the step still publishes, weights unchanged",
    )
    spike_window: int = Field(20, ge=5, description="updates whose gradient norms the spike guard compares")
    max_skipped_updates: int = Field(
        3,
        ge=1,
        description="updates skipped in a row (a gradient spike, or a NaN/inf loss on every micro step) "
        "that stop the run with the resume hint",
    )
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    micro_batch_size: int = Field(32, ge=1, description="images per learner forward/backward")
    precision: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bf16 on GPU")
    activation_checkpointing: bool = False
    offload_optimizer: bool = Field(
        False, description="ZeRO-Offload: Adam's state and step on the CPU (zero_stage >= 1)"
    )
    offload_params: bool = Field(False, description="ZeRO-Infinity: parameters on the CPU (zero_stage 3)")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas = {list(v)}: each must be in [0, 1), e.g. [0.9, 0.999]")
        return v

    @model_validator(mode="after")
    def _offload(self) -> LearnerConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(
                f"learner.offload_params needs learner.zero_stage 3 (got {self.zero_stage}); fix: set "
                "learner.zero_stage=3 or learner.offload_params=false"
            )
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError(
                "learner.offload_optimizer needs learner.zero_stage >= 1; fix: set learner.zero_stage=2"
            )
        return self

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    cpus_per_rank: float = Field(0.5, ge=0)
    gpus_per_rank: float = Field(0.0, ge=0)
    custom_resources: CustomResources = Field(
        default_factory=dict, description="extra Ray resources per rank, e.g. {vgrpo_learner: 1}"
    )


# ----------------------------------------------------------------------------------------------- train


class AutoscaleConfig(Section):
    """Re-planning rollout and reward capacity during a run (docs/training.md "Capacity during a run")."""

    enabled: bool = Field(
        False,
        description="every `every` steps, feed the measured per-phase seconds into the planner and add or "
        "remove rollout workers and reward replicas when the predicted images/s gain passes min_gain",
    )
    every: int = Field(10, ge=1, description="steps between re-plans")
    window: int = Field(
        3, ge=1, description="steps measured with the current split that a re-plan needs (their median)"
    )
    min_gain: float = Field(0.1, ge=0, description="predicted images/s gain (0.1 = +10 %) worth a move")
    max_rollout_workers: int | None = Field(None, ge=1, description="cap on rollout workers (None: none)")
    max_reward_replicas: int | None = Field(
        None, ge=1, description="cap on a reward's replicas (None: the reward's max_replicas)"
    )


class TrainConfig(Section):
    steps: int = Field(160, ge=1, description="training steps (each publishes a new policy version)")
    seed: int = 0
    max_staleness: int = Field(0, ge=0, description="0 = synchronous; k = rollouts may lag k versions")

    def kept_versions(self) -> int:
        """How many versions before the current one the learner's publish history and the driver's
        published weights keep: a batch lags at most max_staleness versions, plus the one a replacement or
        a catch-up of the object-store path may still ask for."""
        return self.max_staleness + 1

    checkpoint_every: int = Field(20, ge=1, description="steps; the last step is always checkpointed")
    eval_every: int = Field(0, ge=0, description="steps between held-out evaluations (0: never)")
    samples_every: int = Field(20, ge=1, description="steps between sample grids")
    keep_checkpoints: int = Field(3, ge=1)
    keep_best: bool = Field(
        False,
        description="also keep the checkpoint with the best held-out score (eval/overall; needs eval_every): "
        "an evaluation step that beats it is checkpointed, recorded in best.json and never deleted; "
        "`vgrpo eval/export --best` read it",
    )
    ema: float | None = Field(None, gt=0, lt=1, description="EMA decay of the policy for eval/export")
    run_name: str | None = None
    storage: str | None = Field(None, description="shared path or fsspec URL for the run directory")
    timeout_s: float = Field(600.0, gt=0, description="limit on any single remote wait")
    placement_wait_s: float = Field(
        120.0,
        gt=0,
        description="how long a replacement or added rollout worker waits for a node with room; past it a "
        "replacement is given up (the worker leaves the run, its share is redone on the others) and an "
        "addition is skipped",
    )
    autoscale: AutoscaleConfig = Field(default_factory=AutoscaleConfig)
    weight_sync: Literal["auto", "object_store", "collective"] = Field(
        "auto",
        description="how published weights reach the rollout workers: collective = a broadcast from learner "
        "rank 0 in a group with the workers (NCCL on GPU, gloo on CPU), object_store = ray.put + each worker "
        "fetches; auto = collective when rollout.gpus_per_worker > 0 and learner.gpus_per_rank > 0, else "
        "object_store. A failed broadcast falls back to the object store for that step",
    )
    weight_sync_bucket_mb: float = Field(
        256.0,
        gt=0,
        description="MiB per broadcast bucket for full weights (model.lora = null); LoRA goes in one shot",
    )


class ResourcesConfig(Section):
    num_cpus: float | None = Field(None, gt=0, description="CPUs of the embedded local Ray (None: all)")
    num_gpus: float | None = Field(None, ge=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK"] = "PACK"
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads per actor (None: the node's cores)"
    )


class ObservabilityConfig(Section):
    progress: Literal["auto", "rich", "plain", "off"] = "auto"

    @field_validator("progress", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # `progress: off` in a YAML file loads as False

    tensorboard: bool = True
    report: bool = True
    metrics_port: int | None = Field(None, ge=1, le=65535, description="driver Prometheus port (None: off)")
    bind: str = Field(
        "127.0.0.1",
        description="interface the driver's metrics port listens on; 0.0.0.0 exposes it to the network "
        "(a Prometheus on another host)",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


# ----------------------------------------------------------------------------------------------- root


class RunConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    observability: ObservabilityConfig = Field(default_factory=ObservabilityConfig)

    @model_validator(mode="after")
    def _cross(self) -> RunConfig:
        if self.rollout.sampler == "sde" and self.algorithm.name != "flow_grpo":
            raise ValueError(
                f"rollout.sampler = 'sde' only serves algorithm.name = flow_grpo (got "
                f"{self.algorithm.name!r}); fix: --set rollout.sampler=auto"
            )
        if self.algorithm.name == "flow_grpo" and self.rollout.sampler in ("euler", "dpm2"):
            raise ValueError(
                f"flow_grpo needs the SDE sampler's log-probabilities, not rollout.sampler = "
                f"{self.rollout.sampler!r}; fix: --set rollout.sampler=auto"
            )
        name = self.algorithm.name
        windowed = name in WINDOW_ALGORITHMS
        if self.rollout.sampler != "auto" and (self.rollout.sampler == "sde_window") != windowed:
            need = "sde_window" if windowed else "not sde_window"
            raise ValueError(
                f"rollout.sampler = {self.rollout.sampler!r} does not fit algorithm.name = {name!r} (it "
                f"needs {need}; sde_window serves {' and '.join(WINDOW_ALGORITHMS)}); fix: "
                "--set rollout.sampler=auto"
            )
        if windowed:
            self._check_window(name)
        return self

    def _check_window(self, name: str) -> None:
        """The selected windowed objective's SDE window must end before the schedule's last step (the one to
        sigma = 0, which stays deterministic): every start it can draw, plus W, is <= rollout.num_steps - 1."""
        n = self.rollout.num_steps
        if name == "flow_grpo_fast":
            f = self.algorithm.flow_grpo_fast
            r0, r1 = f.sde_window_range
            if r1 > n - 1:
                fix = f"--set rollout.num_steps={r1 + 1}"
                if n - 1 - r0 >= f.sde_window_size:
                    fix += f" or --set algorithm.flow_grpo_fast.sde_window_range=[{r0},{n - 1}]"
                raise ValueError(
                    f"algorithm.flow_grpo_fast.sde_window_range = {[r0, r1]} lets a window cover step "
                    f"{r1 - 1}, but with rollout.num_steps = {n} windows must stay within steps 0..{n - 2} "
                    f"(the final step, to sigma = 0, stays deterministic); fix: {fix}"
                )
            return
        m = self.algorithm.mixgrpo
        w = m.sde_window_size
        if w > n - 1:
            raise ValueError(
                f"algorithm.mixgrpo.sde_window_size = {w} does not fit rollout.num_steps = {n} (windows "
                f"must stay within steps 0..{n - 2}: the final step, to sigma = 0, stays deterministic); fix: --set "
                f"rollout.num_steps={w + 1} or --set algorithm.mixgrpo.sde_window_size={max(1, n - 1)}"
            )
        if m.max_start is not None and m.max_start + w > n - 1:
            raise ValueError(
                f"algorithm.mixgrpo.max_start = {m.max_start} with sde_window_size = {w} covers step "
                f"{m.max_start + w - 1}, but with rollout.num_steps = {n} windows must stay within steps "
                f"0..{n - 2}; fix: --set "
                f"algorithm.mixgrpo.max_start={n - 1 - w} (or null for that default)"
            )

    def sigma_grid(self) -> Literal["uniform", "diffusers"]:
        """The rollout's sigma grid: the one the objective's upstream samples on (docs/algorithms.md).
        Flow-GRPO, Flow-GRPO-Fast and DiffusionNFT sample SD3 through diffusers'
        FlowMatchEulerDiscreteScheduler; MixGRPO samples on the shifted uniform grid
        (``sd3_time_shift(linspace(1, 0, N + 1))``), as V-GRPO and DGPO do here (DGPO's own
        DPMSolverMultistepScheduler grid is a written departure)."""
        if self.rollout.sigma_grid != "auto":
            return self.rollout.sigma_grid
        return "diffusers" if self.algorithm.name in DIFFUSERS_GRID_ALGORITHMS else "uniform"

    def sampler(self) -> str:
        """The rollout sampler the objective needs (DESIGN.md: the sampler follows the objective)."""
        if self.rollout.sampler != "auto":
            return self.rollout.sampler
        if self.algorithm.name in WINDOW_ALGORITHMS:
            return "sde_window"
        return "sde" if self.algorithm.name == "flow_grpo" else "dpm2"


# ----------------------------------------------------------------------------------------------- loading


class ConfigError(Exception):
    """A configuration that cannot be used; ``problems`` holds one line per field."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))


def _fields_at(path: tuple[str | int, ...]) -> list[str]:
    """The valid key names of the section at a dotted path of the tree (empty if not a section)."""
    model: Any = RunConfig
    for part in path:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        model = _section_type(field.annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _section_type(annotation: Any) -> Any:
    """The BaseModel class inside an annotation like ``LoraConfig | None``, else the annotation."""
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return annotation


def _describe(err: Any) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    # pydantic adds the union member's type name to the location of a union field; drop it
    loc = tuple(p for p in loc if not (isinstance(p, str) and p[:1].isupper()))
    dotted = ".".join(str(p) for p in loc) or "<root>"
    if err["type"] == "extra_forbidden":
        valid = _fields_at(loc[:-1])
        key = str(loc[-1])
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
        where = ".".join(str(p) for p in loc[:-1]) or "the top level"
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        return f"{dotted}: unknown key.{hint} Valid keys under {where}: {', '.join(valid)}"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" = {value!r}"
    if err["type"] in ("int_parsing", "float_parsing", "bool_parsing", "int_from_float"):
        kind = err["type"].split("_")[0]
        kind = {"int": "an integer", "float": "a number", "bool": "true or false"}[kind]
        default = _default_at(loc)
        example = f", e.g. --set {dotted}={default}" if default is not None else ""
        msg = f"{msg}; fix: give {kind}{example}"
    return f"{dotted}{shown}: {msg}"


def _default_at(loc: tuple[Any, ...]) -> Any:
    try:
        node: Any = RunConfig()
        for p in loc:
            node = getattr(node, str(p))
        return node if isinstance(node, (int, float, str, bool)) else None
    except Exception:  # a dict key or list index: no default to show
        return None


# what makes a run the run it is: a resume may change capacity (workers, ranks, batch sizes), never these
IDENTITY_KEYS = ("model.path", "model.lora", "algorithm.name", "train.seed")


def identity(cfg: RunConfig) -> dict[str, Any]:
    """The run's identity keys and their values (JSON), as a checkpoint records them."""
    out: dict[str, Any] = {}
    for key in IDENTITY_KEYS:
        node: Any = cfg
        for part in key.split("."):
            node = getattr(node, part)
        out[key] = node.model_dump(mode="json") if isinstance(node, BaseModel) else node
    return out


# keys that were renamed: the old name still loads, with a message naming the new one
RENAMED_KEYS = {
    "algorithm.vgrpo.clip_eps": "algorithm.vgrpo.clip_range",
    "algorithm.dgpo.clip": "algorithm.dgpo.clip_range",
}


def _rename_keys(data: dict[str, Any]) -> None:
    for old, new in RENAMED_KEYS.items():
        *path, key = old.split(".")
        node: Any = data
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or key not in node:
            continue
        new_key = new.rsplit(".", 1)[1]
        if new_key in node:
            raise ConfigError([f"{old} and {new} are one key ({old} is its old name); give only {new}"])
        node[new_key] = node.pop(key)
        log.warning(
            "config: %s is now called %s; the old name still loads, the new one is preferred", old, new
        )


def validate(data: dict[str, Any]) -> RunConfig:
    _rename_keys(data)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError([_describe(err) for err in e.errors()]) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as a YAML scalar, so 3 -> int, true -> bool)."""
    if "=" not in item:
        raise ConfigError([f"--set {item!r}: expected key=value, e.g. --set train.steps=10"])
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError([f"--set {item!r}: the key {key!r} is not a dotted path like train.steps"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        value = raw.strip()  # YAML 1.1 reads on/off/yes/no as booleans; on the command line they are words
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if not isinstance(child, dict):
                child = {} if child is None else child
                if not isinstance(child, dict):
                    raise ConfigError([f"--set {item!r}: {p} is a value, not a section"])
                node[p] = child
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"--config {path}: no such file"])
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except UnicodeDecodeError:
        raise ConfigError([f"--config {path}: not a text file (YAML is UTF-8 text)"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"--config {path}: not valid YAML: {e}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"--config {path}: the top level must be a mapping of sections"])
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The embedded default, updated by a YAML file, then by ``--set`` overrides (in that order)."""
    data = read_yaml(path) if path is not None else {}
    return validate(apply_overrides(data, list(overrides or [])))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
