"""In-process GPU figures for SD3.5-Medium (issue 10, item 7), FLUX.1-dev and Wan2.1-T2V-1.3B (``--family``),
with no Ray and no DeepSpeed.

The Ray actors are thin shells around plain-torch engines, so their hot paths are timed here directly:

- rollout: what ``RolloutEngine.sample`` does for one batch (``rollout_workers/engine.py``):
  ``P.initial_noise`` -> ``ode_sample`` (DPM-Solver++(2M)) over ``P.velocity`` of the bf16 transformer
  with a bf16 LoRA -> latents to the host -> ``P.decode_latents`` through an SD3.5-shaped VAE. Prompt
  embeddings are random tensors of the real shapes (CLIP 77 + T5 128 tokens): text encoding is not timed.
- learner: the V-GRPO loss (``learner/objectives/vgrpo.py``) through ``LearnerPolicy``
  (``learner/engine.py``), backward, grad clip and a torch AdamW step, on an fp32 LoRA over bf16 base
  weights under bf16 autocast (DeepSpeed's bf16 mode likewise keeps fp32 masters of what it trains);
  without and with activation checkpointing (``transformer.enable_gradient_checkpointing()``).
- weights: ``LearnerEngine.get_weights``' extraction (trainable parameters -> host fp32 clones) and
  ``RolloutEngine.update_weights``' ``load_weights``, for the LoRA payload and for the full transformer
  (the object-store path of the weight broadcast; NCCL needs two GPUs).

Random weights from SD3.5-Medium's published transformer and VAE configs: nothing is downloaded. FLOPs per
image are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one image (a transformer forward,
a VAE decode, one learner loss + backward); where it sees no attention kernel (CPU) the attention FLOPs
are added analytically (4·T²·D per attention). MFU = achieved FLOP/s / ``--peak-tflops`` (dense bf16;
989 for H100/H200 SXM); the checkpointed learner's MFU counts model FLOPs only, not the recompute.

    python benchmarks/gpu.py                     # one GPU: table, benchmarks/results/gpu.json, docs/benchmarks.md
    python benchmarks/gpu.py --cpu-smoke         # the same code path on CPU, tiny config, < 60 s
    python benchmarks/gpu.py --from-json PATH    # print and render a saved run into docs/benchmarks.md

``--family flux`` / ``--family wan`` run the same rows through the family objects of ``core/families``
(``Family.velocity`` on unpacked latents, ``Family.decode``) on a ``FluxTransformer2DModel`` /
``WanTransformer3DModel`` built from FLUX.1-dev's / Wan2.1-T2V-1.3B's published configs
(``vgrpo/model_configs.py``), random weights, as their recipes run them (configs/flux1dev_vgrpo_geneval.yaml,
configs/wan21_t2v_1_3b_vgrpo.yaml):

- flux: 512² (1024 packed tokens), 512 T5 tokens + a pooled CLIP-L vector; rollout: 16 images, 20
  DPM-Solver++ steps at guidance 3.5 through the guidance embedding (one forward a step), VAE decode;
  learner: one V-GRPO micro step of one group (16 images, N_MC 4, the guided velocity as the recipe's
  learner scores it), LoRA r32 on the family's default targets, activation checkpointing.
- wan: 480x832, ``--frames`` frames (33: 9 latent frames, 14,040 tokens), 512 UMT5 tokens; rollout: 4
  clips, 20 steps at CFG 5 (two forwards a step, ``[uncond; cond]`` batched), the causal video VAE's
  decode; learner: one micro step of one group (8 clips, N_MC 4, the unguided velocity as the recipe
  trains it), LoRA r32, activation checkpointing.

Their learner FLOPs are counted on one sample with checkpointing on (without it one FLUX image or one Wan
clip at N_MC 4 may not fit a GPU) and the recompute (N_MC transformer forwards) taken off; a row that runs
out of memory is retried at half the batch. ``images_per_s`` is samples per second (clips for Wan, which
also reports ``clips_per_s`` and ``frames_per_s``); every row carries its ``family``.

    python benchmarks/gpu.py --family flux --json OUT.json --no-docs --budget-s 240
    python benchmarks/gpu.py --family wan --frames 33 --json OUT.json --no-docs --budget-s 240
    python benchmarks/gpu.py --family wan --cpu-smoke --no-docs --json /tmp/wan.json   # tiny, on CPU
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from vgrpo.core import policy as P
from vgrpo.core.adapters import (
    OLD_ADAPTER,
    TRAIN_ADAPTER,
    adapter_params,
    add_lora,
    load_weights,
    trainable_params,
)
from vgrpo.core.families import FAMILIES, Family, TextCond
from vgrpo.core.families.base import dynamic_shift
from vgrpo.core.flow import ode_sample, sd3_sigmas
from vgrpo.learner.engine import LearnerPolicy
from vgrpo.learner.objectives.base import TrainBatch
from vgrpo.learner.objectives.vgrpo import VGRPO
from vgrpo.proto.config import LoraConfig, VGRPOConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- benchmarks/gpu.py:begin -->", "<!-- benchmarks/gpu.py:end -->"

from vgrpo.model_configs import (  # noqa: E402
    FLUX1_DEV_SCHEDULER,
    FLUX1_DEV_TRANSFORMER,
    FLUX1_VAE,
    SD35_VAE,
    SD35M_TRANSFORMER,
    WAN21_480P_FLOW_SHIFT,
    WAN21_T2V_1_3B_TRANSFORMER,
    WAN21_VAE,
)

# --cpu-smoke: the same module classes, tiny
TINY_TRANSFORMER = dict(
    SD35M_TRANSFORMER,
    sample_size=8,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    caption_projection_dim=16,
    pooled_projection_dim=16,
    pos_embed_max_size=16,
    dual_attention_layers=(0,),
)
TINY_VAE = dict(
    SD35_VAE, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=64
)

GPU_PRESET: dict[str, Any] = dict(
    transformer=SD35M_TRANSFORMER,
    vae=SD35_VAE,
    image=512,
    text_len=77 + 128,  # CLIP-L/G tokens + T5 max_sequence_length 128 (configs/sd35m_*.yaml)
    shift=3.0,  # SD3.5's scheduler shift
    lora=dict(rank=32, alpha=64.0),  # configs/sd35m_vgrpo_*.yaml
    n_mc=4,
    rollout_batches=(8, 16, 32),
    rollout_steps=(10, 40),
    cfg_row=(16, 10, 4.5),  # (batch, steps, guidance): Flow-GRPO / DGPO sample with CFG 4.5
    learner_plain=(1, 2, 4),
    learner_ckpt=(8, 24),  # 24: the recipes' micro step is one whole group of G = 24 images
    off_policy_row=(8, True),  # (micro batch, checkpointing): the old-adapter forwards of max_staleness 1
    repeats=2,
    full_weight_repeats=1,
    warmup=True,  # one untimed run per shape first
)
CPU_PRESET: dict[str, Any] = dict(
    GPU_PRESET,
    transformer=TINY_TRANSFORMER,
    vae=TINY_VAE,
    image=64,
    text_len=8,
    lora=dict(rank=4, alpha=8.0),
    n_mc=2,
    rollout_batches=(2,),
    rollout_steps=(2,),
    cfg_row=(2, 2, 4.5),
    learner_plain=(2,),
    learner_ckpt=(),
    off_policy_row=(2, True),  # checkpointing and the old adapter's forwards in one row
    repeats=1,
    full_weight_repeats=1,
    warmup=False,
)

# what the FLUX.1 and Wan presets share: one row per shape at the recipe's settings (LoRA r32, 20 sampler
# steps, one prompt group per learner micro step with checkpointing, halved on OOM) ...
FAMILY_GPU_RUN: dict[str, Any] = dict(
    lora=dict(rank=32, alpha=64.0),  # target_modules None: the family's own (core/families)
    n_mc=4,
    rollout_steps=(20,),
    cfg_row=None,
    learner_plain=(),
    off_policy_row=None,
    train_grid_steps=20,
    count_with_ckpt=True,
    halve_on_oom=True,
    repeats=1,
    full_weight_repeats=1,
    warmup=True,
)
# ... and the same path tiny (--cpu-smoke)
FAMILY_CPU_SMOKE: dict[str, Any] = dict(
    text_len=8,
    lora=dict(rank=4, alpha=8.0),
    n_mc=2,
    rollout_batches=(2,),
    rollout_steps=(2,),
    learner_ckpt=(2,),
    train_grid_steps=2,
    warmup=False,
)

# --family flux: FLUX.1-dev at 512² as configs/flux1dev_vgrpo_geneval.yaml runs it
FLUX_GPU_PRESET: dict[str, Any] = dict(
    FAMILY_GPU_RUN,
    family="flux",
    transformer=FLUX1_DEV_TRANSFORMER,
    vae=FLUX1_VAE,
    image=512,
    text_len=512,  # T5-XXL tokens (FLUX attends to the padding: the recipe keeps 512); + pooled CLIP-L
    shift=round(dynamic_shift(FLUX1_DEV_SCHEDULER, (512 // 16) ** 2), 4),  # 1024 packed tokens
    rollout_batches=(16,),
    rollout_guidance=3.5,  # the guidance embedding: one forward a step
    learner_guidance=3.5,  # the learner scores the guided velocity its rollout sampled (embedded)
    learner_ckpt=(16,),  # one prompt group of G = 16 images (without checkpointing: ~960 GB)
)
TINY_FLUX_TRANSFORMER = dict(
    FLUX1_DEV_TRANSFORMER,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    axes_dims_rope=(4, 6, 6),  # sums to the head dim, as (16, 56, 56) does to 128
)
TINY_FLUX_VAE = dict(
    TINY_VAE, scaling_factor=FLUX1_VAE["scaling_factor"], shift_factor=FLUX1_VAE["shift_factor"]
)
FLUX_CPU_PRESET: dict[str, Any] = dict(
    FLUX_GPU_PRESET,
    **FAMILY_CPU_SMOKE,
    transformer=TINY_FLUX_TRANSFORMER,
    vae=TINY_FLUX_VAE,
    image=64,
    shift=round(dynamic_shift(FLUX1_DEV_SCHEDULER, (64 // 16) ** 2), 4),
)

# --family wan: Wan2.1-T2V-1.3B at 480x832 as configs/wan21_t2v_1_3b_vgrpo.yaml runs it
WAN_GPU_PRESET: dict[str, Any] = dict(
    FAMILY_GPU_RUN,
    family="wan",
    transformer=WAN21_T2V_1_3B_TRANSFORMER,
    vae=WAN21_VAE,
    height=480,
    width=832,
    frames=33,  # --frames; 4k + 1 (the VAE's temporal factor 4)
    text_len=512,  # UMT5 tokens (no pooled vector)
    shift=WAN21_480P_FLOW_SHIFT,
    rollout_batches=(4,),  # rollout.batch_size: clips per sampler forward
    rollout_guidance=5.0,  # CFG: [uncond; cond] in one forward of 2B
    learner_guidance=1.0,  # the recipe trains the unguided velocity
    learner_ckpt=(8,),  # one prompt group of G = 8 clips
)
TINY_WAN_TRANSFORMER = dict(
    WAN21_T2V_1_3B_TRANSFORMER,
    num_attention_heads=2,
    attention_head_dim=12,  # RoPE splits it 4 (time) + 4 (rows) + 4 (columns)
    text_dim=32,
    freq_dim=32,
    ffn_dim=32,
    num_layers=2,
)
TINY_WAN_VAE = dict(WAN21_VAE, base_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
WAN_CPU_PRESET: dict[str, Any] = dict(
    WAN_GPU_PRESET,
    **FAMILY_CPU_SMOKE,
    transformer=TINY_WAN_TRANSFORMER,
    vae=TINY_WAN_VAE,
    height=32,
    width=48,  # not square: height and width are not swapped anywhere
    frames=5,  # 2 latent frames
)

PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {  # family: (GPU, --cpu-smoke)
    "sd3": (GPU_PRESET, CPU_PRESET),
    "flux": (FLUX_GPU_PRESET, FLUX_CPU_PRESET),
    "wan": (WAN_GPU_PRESET, WAN_CPU_PRESET),
}
MODEL_NAMES = {  # (GPU, --cpu-smoke) for the report
    "sd3": ("SD3.5-Medium-shaped SD3Transformer2DModel, random weights", "tiny SD3 (2 layers)"),
    "flux": (
        "FLUX.1-dev-shaped FluxTransformer2DModel (19 double + 38 single blocks), random weights",
        "tiny FLUX.1 (1 double + 2 single blocks)",
    ),
    "wan": (
        "Wan2.1-T2V-1.3B-shaped WanTransformer3DModel (30 blocks), random weights",
        "tiny Wan2.1 (2 blocks)",
    ),
}
VAE_CLASSES = {"sd3": "AutoencoderKL", "flux": "AutoencoderKL", "wan": "AutoencoderKLWan"}


def family_of_preset(preset: dict) -> Family:
    return FAMILIES[str(preset.get("family", "sd3"))]


def geometry(preset: dict) -> tuple[int, int, int]:
    """(height, width, frames) in pixels / frames of one sample (frames 1 for an image)."""
    h = int(preset.get("height", preset.get("image", 0)))
    w = int(preset.get("width", preset.get("image", 0)))
    return h, w, int(preset.get("frames", 1))


def latent_shape(preset: dict) -> tuple[int, ...]:
    """One sample's *unpacked* latent shape as its family's ``latent_shape`` gives it (VAE factor 8; Wan
    4x in time): SD3 ``(C, h, w)``, FLUX ``(C/4, h, w)`` (packed 2x2 inside ``velocity``), Wan
    ``(C, (F - 1)/4 + 1, h, w)``."""
    cfg, name = preset["transformer"], str(preset.get("family", "sd3"))
    h, w, f = geometry(preset)
    c = int(cfg["in_channels"])
    if name == "flux":
        return (c // 4, h // 8, w // 8)
    if name == "wan":
        return (c, (f - 1) // 4 + 1, h // 8, w // 8)
    return (c, h // 8, w // 8)


def image_tokens(preset: dict) -> int:
    """Transformer tokens of one sample's latents (2x2 spatial patches; every latent frame for Wan)."""
    shape = latent_shape(preset)
    frames = shape[1] if len(shape) == 4 else 1
    return frames * (shape[-2] // 2) * (shape[-1] // 2)


# ------------------------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def build_transformer(config: dict, device: torch.device, seed: int = 0, family: str = "sd3") -> Any:
    """The family's transformer (SD3Transformer2DModel, FluxTransformer2DModel, WanTransformer3DModel) from
    a config with random weights (initialised on ``device``), in bf16."""
    import diffusers

    cls = getattr(diffusers, FAMILIES[family].transformer_class)
    torch.manual_seed(seed)
    with torch.device(device):
        model: Any = cls(**config)
    return model.to(device=device, dtype=torch.bfloat16).eval().requires_grad_(False)  # buffers too


def build_vae(config: dict, device: torch.device, seed: int = 0, family: str = "sd3") -> Any:
    import diffusers

    cls = getattr(diffusers, VAE_CLASSES[family])
    torch.manual_seed(seed)
    with torch.device(device):
        vae: Any = cls(**config)
    return vae.to(device=device, dtype=torch.bfloat16).eval().requires_grad_(False)


def random_cond(b: int, text_len: int, config: dict, device: torch.device, seed: int = 0) -> TextCond:
    """A conditioning of the shapes the family's ``encode`` returns: tokens (B, L, D) (SD3 / FLUX
    ``joint_attention_dim``, Wan ``text_dim``), pooled (B, P) (P = 0 for Wan, which has none)."""
    g = torch.Generator().manual_seed(seed)
    dim = int(config["joint_attention_dim"] if "joint_attention_dim" in config else config["text_dim"])
    embeds = torch.randn(b, text_len, dim, generator=g)
    pooled = torch.randn(b, int(config.get("pooled_projection_dim", 0)), generator=g)
    return TextCond(embeds.to(device, torch.bfloat16), pooled.to(device, torch.bfloat16))


def rollout_batch(
    transformer: Any,
    vae: Any,
    cond: TextCond,
    seeds: list[int],
    sigmas: torch.Tensor,
    image: int | tuple[int, ...],
    guidance: float = 1.0,
    uncond: TextCond | None = None,
    family: Family | None = None,
) -> tuple[torch.Tensor, Any, float, float]:
    """One batch as ``RolloutEngine.sample`` runs it; ``image``: pixels a side (SD3, VAE factor 8) or one
    sample's unpacked latent shape. Returns latents (host, fp32), uint8 images (clips for video), sampling
    seconds, decode seconds."""
    device = transformer.device
    family = family or FAMILIES["sd3"]
    if isinstance(image, int):
        shape: tuple[int, ...] = (int(transformer.config.in_channels), image // 8, image // 8)
    else:
        shape = tuple(image)

    def v_fn(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return P.guided_velocity(transformer, x, s, cond, guidance, uncond, family=family)

    sync(device)
    t0 = time.perf_counter()
    x1 = P.initial_noise(list(seeds), shape).to(device)
    latents = ode_sample(v_fn, x1, sigmas, solver="dpm2").float().cpu()
    t1 = time.perf_counter()
    images = family.decode(vae, latents)
    sync(device)
    t2 = time.perf_counter()
    return latents, images, t1 - t0, t2 - t1


class HostBridgePolicy:
    """A FlowPolicy that runs the network on its device and hands velocities back on the host: used only
    when the objective cannot take a device-resident batch (it then keeps its own math on the host)."""

    def __init__(self, inner: LearnerPolicy, device: torch.device):
        self.inner, self.device = inner, device

    def old_is_current(self) -> bool:
        return self.inner.old_is_current()

    def velocity(self, x_bchw: torch.Tensor, sigma_b: torch.Tensor, cond: Any, which: Any = "current"):
        v = self.inner.velocity(x_bchw.to(self.device), sigma_b.to(self.device), cond, which)
        return v.to(x_bchw.device)


class Learner:
    """The learner's update on one device: fp32 LoRA (``default``, trained) + a frozen ``old`` adapter
    over bf16 base weights, V-GRPO loss under bf16 autocast, AdamW."""

    def __init__(self, preset: dict, device: torch.device, seed: int = 0):
        self.preset, self.device = preset, device
        self.family = family_of_preset(preset)
        self.module = build_transformer(preset["transformer"], device, seed, self.family.name)
        add_lora(self.module, LoraConfig(**preset["lora"]), adapters=(TRAIN_ADAPTER, OLD_ADAPTER), seed=seed)
        self.params = list(adapter_params(self.module, TRAIN_ADAPTER).values())
        for p in self.params:
            p.data = p.data.float()  # fp32 master weights of what is trained
        self.objective = VGRPO(VGRPOConfig(n_mc=int(preset["n_mc"])))
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=1e-4)
        self.host_batch = False  # set when the objective refuses a device-resident batch
        self.note: str | None = None

    def batch(self, b: int, seed: int = 0) -> TrainBatch:
        cfg = self.preset["transformer"]
        g = torch.Generator().manual_seed(seed)
        where = torch.device("cpu") if self.host_batch else self.device
        text = random_cond(b, int(self.preset["text_len"]), cfg, self.device, seed)
        grid = int(self.preset.get("train_grid_steps", 10))
        return TrainBatch(  # the layout LearnerEngine._to_batch builds (one prompt group per micro step)
            latents_bchw=torch.randn(b, *latent_shape(self.preset), generator=g).to(where),
            cond=text,
            group_ids_b=torch.zeros(b, dtype=torch.long).to(where),
            advantages_b=torch.randn(b, generator=g).to(where),
            sigmas=sd3_sigmas(grid, shift=float(self.preset["shift"])),
            shift=float(self.preset["shift"]),
        )

    def _policy(self, off_policy: bool) -> Any:
        guidance = float(self.preset.get("learner_guidance", 1.0))
        policy = LearnerPolicy(self.module, guidance_scale=guidance, family=self.family)
        policy._old_is_current = not off_policy
        return HostBridgePolicy(policy, self.device) if self.host_batch else policy

    def step(self, b: int, off_policy: bool = False, seed: int = 0) -> tuple[float, dict]:
        """One micro step of ``b`` images: loss, backward, clip, AdamW. Falls back to a host-held batch
        (recorded in ``note``) when the objective's own tensors cannot meet a device batch."""
        try:
            return self._step(b, off_policy, seed)
        except RuntimeError as e:
            if self.host_batch or is_oom(e) or "device" not in str(e):
                raise
            self.opt.zero_grad(set_to_none=True)
            self.host_batch = True
            self.note = (
                "the V-GRPO objective failed on a device-resident batch "
                f"({str(e).splitlines()[0][:160]}); timed with the batch on the host and the network on "
                "the device (HostBridgePolicy)"
            )
            print(f"warning: {self.note}", file=sys.stderr)
            return self._step(b, off_policy, seed)

    def _step(self, b: int, off_policy: bool, seed: int) -> tuple[float, dict]:
        batch = self.batch(b, seed)
        gen = torch.Generator().manual_seed(seed)
        autocast = torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        with autocast:
            loss, diag = self.objective.loss(self._policy(off_policy), batch, gen)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite learner loss {loss.item()}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.item()), diag


# ------------------------------------------------------------------------------------------- FLOPs


def attention_flops(config: dict, t_img: int, t_txt: int, family: str = "sd3") -> int:
    """Analytic forward attention FLOPs of one sample: QK^T and PV, 2·Tq·Tk·D each, per attention. SD3:
    joint attention per block + the dual blocks' image self-attention; FLUX: joint attention in every
    double- and single-stream block; Wan: video self-attention + cross-attention to the text per block."""
    d = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    if family == "flux":
        blocks = int(config["num_layers"]) + int(config["num_single_layers"])
        return blocks * 4 * (t_img + t_txt) ** 2 * d
    if family == "wan":
        return int(config["num_layers"]) * 4 * (t_img**2 + t_img * t_txt) * d
    joint = int(config["num_layers"]) * 4 * (t_img + t_txt) ** 2 * d
    dual = len(config["dual_attention_layers"]) * 4 * t_img**2 * d
    return joint + dual


def count_flops(fn: Callable[[], Any]) -> tuple[int, int]:
    """(total FLOPs, FLOPs of attention kernels) of ``fn()`` under FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        fn()
    ops = counter.get_flop_counts().get("Global", {})
    attn = sum(int(v) for k, v in ops.items() if "attention" in str(k))
    return int(counter.get_total_flops()), attn


# ------------------------------------------------------------------------------------------- report


class Report:
    """Rows as they are measured; the JSON is rewritten after each, so a run cut short keeps its rows."""

    def __init__(self, path: Path | None, meta: dict):
        self.path = path
        self.data: dict[str, Any] = {"meta": meta, "flops": {}, "params": {}, "rollout": [], "learner": []}
        self.data["weights"] = []

    def add(self, section: str, row: dict) -> None:
        self.data[section].append(row)
        print(f"  {section}: {json.dumps(row)}", flush=True)
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "–"
    return format(v, spec) if spec else str(v)


def render_markdown(data: dict) -> str:
    """The docs section of a run: where it ran, FLOPs per image (clip), then one table per figure."""
    m, f = data["meta"], data.get("flops", {})
    unit = m.get("sample_unit", "image")
    if unit == "clip":
        size = f"{m.get('frames')}-frame {m.get('height')}x{m.get('width')} clips"
    else:
        size = f"{m.get('image')}² images"
    guidance_col = "guidance (embedded)" if m.get("guidance_mode") == "embedded" else "CFG"
    lines = [
        f"Measured {m.get('date', '?')} on **{m.get('device_name', '?')}** ({m.get('mode')}), torch "
        f"{m.get('torch')}, diffusers {m.get('diffusers')}, peft {m.get('peft')}; "
        f"{m.get('model')}, {size}, {m.get('text_len')} text tokens, LoRA r{m['lora']['rank']}/"
        f"α{m['lora']['alpha']:g}, V-GRPO N_MC {m.get('n_mc')}. MFU against {m.get('peak_tflops'):g} TFLOP/s "
        "dense bf16.",
        "",
        f"FLOPs per {unit} ({f.get('method', '?')}): transformer forward "
        f"{_fmt(f.get('transformer_forward_gflop'), '.4g')} GFLOP, VAE decode {_fmt(f.get('vae_decode_gflop'), '.4g')}"
        f" GFLOP, learner step (loss + backward, N_MC {m.get('n_mc')}) {_fmt(f.get('learner_step_gflop'), '.4g')}"
        " GFLOP.",
        "",
        f"| rollout batch | steps | {guidance_col} | {unit}s/s | s/batch | decode s | peak GiB | MFU |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in data.get("rollout", []):
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['steps']} | {r['guidance']:g} | {r['error']} | | | | |")
            continue
        lines.append(
            f"| {r['batch']} | {r['steps']} | {r['guidance']:g} | {r['images_per_s']:.2f} | {r['seconds']:.2f} | "
            f"{r['decode_seconds']:.2f} | {_fmt(r['peak_gib'])} | {_fmt(r.get('mfu'), '.1%')} |"
        )
    lines += [
        "",
        f"| learner micro batch | activation ckpt | old-adapter forwards | {unit}s/s | s/step | peak GiB | MFU |",
        "| ---: | :---: | :---: | ---: | ---: | ---: | ---: |",
    ]
    for r in data.get("learner", []):
        head = f"| {r['micro_batch']} | {'yes' if r['checkpointing'] else 'no'} | {'yes' if r['off_policy'] else 'no'} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | |")
            continue
        lines.append(
            f"{head} {r['images_per_s']:.2f} | {r['seconds']:.2f} | {_fmt(r['peak_gib'])} | {_fmt(r.get('mfu'), '.1%')} |"
        )
    lines += [
        "",
        "| weights | tensors | MB (fp32) | extract s | apply s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in data.get("weights", []):
        lines.append(
            f"| {r['kind']} | {r['tensors']} | {r['mbytes']:.1f} | {r['extract_seconds']:.3f} | {r['apply_seconds']:.3f} |"
        )
    notes = [n for n in (m.get("notes") or []) if n]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def markers(family: str = "sd3") -> tuple[str, str]:
    """The docs markers of a family's section: SD3.5-M's are the GPU section's; each other family its own."""
    if family == "sd3":
        return BEGIN, END
    return f"<!-- benchmarks/gpu.py:{family}:begin -->", f"<!-- benchmarks/gpu.py:{family}:end -->"


def update_docs(text: str, section: str, family: str = "sd3") -> str:
    """Replace what lies between the markers (kept), or append a GPU section holding them."""
    begin, end = markers(family)
    block = f"{begin}\n{section}{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    heading = "GPU" if family == "sd3" else f"GPU: {family} (benchmarks/gpu.py --family {family})"
    return text.rstrip("\n") + f"\n\n## {heading}\n\n" + block + "\n"


def write_docs(path: Path, data: dict) -> None:
    old = path.read_text() if path.is_file() else "# Benchmarks\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    family = str(data["meta"].get("family", "sd3"))
    path.write_text(update_docs(old, render_markdown(data), family))
    print(f"updated {path}")


# ------------------------------------------------------------------------------------------- run


def preset_for(args: argparse.Namespace) -> dict:
    """The rows and shapes of ``--family`` (GPU or ``--cpu-smoke``), ``--frames`` applied (Wan)."""
    family = str(getattr(args, "family", "sd3") or "sd3")
    gpu, cpu = PRESETS[family]
    preset = dict(cpu if args.cpu_smoke else gpu)
    frames = getattr(args, "frames", None)
    if frames is not None:
        if family != "wan":
            raise SystemExit(f"--frames is for --family wan (a video family), not {family}")
        if frames < 1 or (frames - 1) % 4:
            raise SystemExit(
                f"--frames {frames}: Wan's VAE takes 4k + 1 frames (its temporal factor 4), e.g. 5, 33, 81"
            )
        preset["frames"] = int(frames)
    return preset


def run(args: argparse.Namespace) -> dict:
    import diffusers
    import peft

    smoke = bool(args.cpu_smoke)
    preset = preset_for(args)
    family = family_of_preset(preset)
    fam = family.name
    device = torch.device("cpu") if smoke else torch.device("cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or --cpu-smoke here")
    t_start = time.perf_counter()
    over = lambda: time.perf_counter() - t_start > args.budget_s  # noqa: E731
    cfg, image = preset["transformer"], int(preset.get("image", 0))
    height, width, frames = geometry(preset)
    shape = latent_shape(preset)  # one sample's unpacked latents
    video = len(shape) == 4
    unit = "clip" if video else "image"
    n_mc = int(preset["n_mc"])
    meta = {
        "mode": "cpu-smoke (tiny config)" if smoke else "gpu",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "model": MODEL_NAMES[fam][1 if smoke else 0],
        "transformer_config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "image": image if not video else None,
        "text_len": int(preset["text_len"]),
        "lora": preset["lora"],
        "n_mc": n_mc,
        "sampler": f"dpm2 (DPM-Solver++(2M) ODE), shift {preset['shift']}",
        "precision": "rollout: bf16 weights and LoRA; learner: bf16 base, fp32 LoRA, bf16 autocast",
        "peak_tflops": args.peak_tflops,
        "notes": [],
        # added with --family (the SD3 keys above are unchanged)
        "family": fam,
        "height": height,
        "width": width,
        "frames": frames,
        "latent_shape": list(shape),
        "sample_unit": unit,
    }
    report = Report(args.json, meta)
    peak = args.peak_tflops * 1e12
    t_img, t_txt = image_tokens(preset), int(preset["text_len"])

    # -------- rollout side: transformer (then full-weight extract/apply, then LoRA), VAE
    print(f"building {fam} transformer on {device} ...", flush=True)
    rollout_tf = build_transformer(cfg, device, seed=0, family=fam)
    vae = build_vae(preset["vae"], device, seed=1, family=fam)
    mode = family.guidance_mode(rollout_tf)
    meta["guidance_mode"] = mode
    report.data["params"]["transformer"] = sum(p.numel() for p in rollout_tf.parameters())
    if fam != "sd3":
        report.data["params"]["vae"] = sum(p.numel() for p in vae.parameters())

    full_rows = weight_roundtrip(rollout_tf, rollout_tf, device, int(preset["full_weight_repeats"]), "full")
    report.add("weights", tagged(full_rows, fam))
    add_lora(rollout_tf, LoraConfig(**preset["lora"]), seed=0)
    rollout_tf.requires_grad_(False)

    # FLOPs of one sample: a transformer forward and a VAE decode
    cond1 = random_cond(1, t_txt, cfg, device)
    x1 = torch.randn(1, *shape, device=device)
    w_roll = float(preset.get("rollout_guidance", 1.0))
    with torch.no_grad():
        g_fwd = w_roll if mode == "embedded" else None
        fwd, fwd_attn = count_flops(
            lambda: P.velocity(rollout_tf, x1, torch.full((1,), 0.5), cond1, g_fwd, family=family)
        )
        dec, _ = count_flops(lambda: family.decode(vae, x1.cpu()))
    method = f"FlopCounterMode, one {unit}"
    if fwd_attn == 0:
        fwd += attention_flops(cfg, t_img, t_txt, fam)
        method += "; attention analytic (no attention kernel seen by the counter)"
    report.data["flops"].update(
        method=method,
        transformer_forward_gflop=fwd / 1e9,
        attention_forward_analytic_gflop=attention_flops(cfg, t_img, t_txt, fam) / 1e9,
        vae_decode_gflop=dec / 1e9,
    )
    if fam != "sd3":
        report.data["flops"].update(image_tokens=t_img, text_tokens=t_txt)
    report.save()

    rows: list[tuple[int, int, float]] = [
        (b, s, w_roll) for s in preset["rollout_steps"] for b in preset["rollout_batches"]
    ]
    if preset.get("cfg_row"):
        rows.append(tuple(preset["cfg_row"]))
    uncond = random_cond(1, t_txt, cfg, device, seed=99)
    warmed: set[int] = set()
    print("rollout ...", flush=True)
    i = 0
    while i < len(rows):
        b, steps, w = rows[i]
        i += 1
        passes = 2 if (mode == "cfg" and w != 1.0) else 1  # CFG: [uncond; cond] in one forward of 2B
        row: dict[str, Any] = {"batch": b, "steps": steps, "guidance": w, "family": fam}
        if fam != "sd3":
            row["forwards_per_step"] = passes
            if video:
                row["frames"] = frames
        if over():
            report.add("rollout", {**row, "error": "skipped (time budget)"})
            continue
        cond = random_cond(b, t_txt, cfg, device, seed=b)
        try:
            with torch.no_grad():
                eff = b * passes
                if (
                    preset["warmup"] and eff not in warmed
                ):  # kernels and the allocator see this batch shape once
                    rollout_batch(
                        rollout_tf, vae, cond, list(range(b)), sd3_sigmas(2, 3.0), shape, w, uncond, family
                    )
                    warmed.add(eff)
                reset_peak(device)
                times = []
                for r in range(int(preset["repeats"])):
                    seeds = [r * b + k for k in range(b)]
                    latents, images, t_s, t_d = rollout_batch(
                        rollout_tf,
                        vae,
                        cond,
                        seeds,
                        sd3_sigmas(steps, float(preset["shift"])),
                        shape,
                        w,
                        uncond,
                        family,
                    )
                    times.append((t_s + t_d, t_d))
            assert latents.shape == (b, *shape), (tuple(latents.shape), shape)
            want = (b, frames, height, width, 3) if video else (b, height, width, 3)
            assert images.shape == want, (images.shape, want)
            assert bool(torch.isfinite(latents).all())
            total, dec_s = min(times)
            flops = b * (steps * fwd * passes + dec)
            row.update(
                seconds=round(total, 4),
                decode_seconds=round(dec_s, 4),
                images_per_s=round(b / total, 3),
                peak_gib=peak_gib(device),
                tflops=round(flops / total / 1e12, 2),
                mfu=round(flops / total / peak, 4),
            )
            if video:
                row.update(clips_per_s=row["images_per_s"], frames_per_s=round(b * frames / total, 2))
        except RuntimeError as e:
            if not is_oom(e):
                raise
            row["error"] = "out of memory"
            if preset.get("halve_on_oom") and b > 1:
                rows.append((b // 2, steps, w))
        reset_peak(device)
        report.add("rollout", row)

    # -------- learner: a second instance (same base weights), LoRA payload to the rollout copy
    print("building learner ...", flush=True)
    learner = Learner(preset, device, seed=0)
    report.data["params"]["lora_trainable"] = sum(p.numel() for p in learner.params)
    report.add("weights", tagged(weight_roundtrip(learner.module, rollout_tf, device, 3, "lora"), fam))
    rollout_tf = vae = None  # the learner's peak memory counts its own model only
    reset_peak(device)

    count_ckpt = bool(preset.get("count_with_ckpt", False))
    if count_ckpt:  # one sample at N_MC forwards without checkpointing may not fit: count with it on
        learner.module.enable_gradient_checkpointing()
    lf, lf_attn = count_flops(lambda: learner.step(1))
    if lf_attn == 0:  # forward + 2x in backward (+ the recompute's forward when checkpointed)
        lf += (4 if count_ckpt else 3) * n_mc * attention_flops(cfg, t_img, t_txt, fam)
    if count_ckpt:
        lf -= n_mc * fwd  # model FLOPs: the checkpoint recompute (a forward per MC sample) taken off
        report.data["flops"]["learner_method"] = (
            "counted with activation checkpointing on, one forward per MC sample (the recompute) subtracted"
        )
    report.data["flops"]["learner_step_gflop"] = lf / 1e9
    report.save()

    lrows = [(b, False, False) for b in preset["learner_plain"]]
    lrows += [(b, True, False) for b in preset["learner_ckpt"]]
    if preset.get("off_policy_row"):
        lrows.append((preset["off_policy_row"][0], preset["off_policy_row"][1], True))
    print("learner ...", flush=True)
    i = 0
    while i < len(lrows):
        b, ckpt, off = lrows[i]
        i += 1
        row = {"micro_batch": b, "checkpointing": ckpt, "off_policy": off, "family": fam}
        if fam != "sd3":
            row["guidance"] = float(preset.get("learner_guidance", 1.0))
            if video:
                row["frames"] = frames
        if over():
            report.add("learner", {**row, "error": "skipped (time budget)"})
            continue
        if ckpt:
            learner.module.enable_gradient_checkpointing()
        else:
            learner.module.disable_gradient_checkpointing()
        try:
            if preset["warmup"]:
                learner.step(b, off)
            reset_peak(device)
            step_times: list[float] = []
            loss = 0.0
            for r in range(int(preset["repeats"])):
                sync(device)
                t0 = time.perf_counter()
                loss, _ = learner.step(b, off, seed=r + 1)
                sync(device)
                step_times.append(time.perf_counter() - t0)
            sec = min(step_times)
            # model FLOPs: the old-adapter forwards (no grad) add N_MC forwards per image
            flops = b * (lf + (n_mc * fwd if off else 0))
            row.update(
                seconds=round(sec, 4),
                images_per_s=round(b / sec, 3),
                peak_gib=peak_gib(device),
                loss=loss,
                tflops=round(flops / sec / 1e12, 2),
                mfu=round(flops / sec / peak, 4),
            )
            if video:
                row["clips_per_s"] = row["images_per_s"]
        except RuntimeError as e:
            if not is_oom(e):
                raise
            row["error"] = "out of memory"
            learner.opt.zero_grad(set_to_none=True)
            if preset.get("halve_on_oom") and b > 1:
                lrows.append((b // 2, ckpt, off))
        reset_peak(device)
        report.add("learner", row)
    if learner.note:
        meta["notes"].append(learner.note)
    if fam == "sd3":
        meta["notes"].append(
            "rollout images/s: sampling + VAE decode of one batch (best of repeats), random prompt embeddings "
            "(text encoders not timed); learner images/s: one micro step (V-GRPO loss, backward, clip, "
            "AdamW) of one prompt group; eager PyTorch, no torch.compile or CUDA graphs"
        )
    else:
        how = (
            f"guidance {w_roll:g} through the guidance embedding (one forward a step)"
            if mode == "embedded"
            else f"CFG {w_roll:g} ([uncond; cond] in one forward of 2B a step)"
        )
        meta["notes"].append(
            f"rollout {unit}s/s: sampling ({how}) + VAE decode of one batch, random prompt embeddings "
            f"(text encoders not timed); learner {unit}s/s: one micro step (V-GRPO loss at guidance "
            f"{float(preset.get('learner_guidance', 1.0)):g}, backward, clip, AdamW) of one prompt group with "
            f"activation checkpointing; {int(preset['repeats'])} timed run(s) a row"
            + (" after one untimed warm-up" if preset["warmup"] else "")
            + "; eager PyTorch, no torch.compile or CUDA graphs; a row out of memory is retried at half "
            "its batch"
        )
    meta["seconds"] = round(time.perf_counter() - t_start, 1)
    report.save()
    return report.data


def tagged(row: dict, family: str) -> dict:
    """A weights row with its family."""
    return {**row, "family": family}


@torch.no_grad()
def weight_roundtrip(src: Any, dst: Any, device: torch.device, repeats: int, kind: str) -> dict:
    """``LearnerEngine.get_weights`` (trainable params -> host fp32 clones) then ``load_weights`` into
    ``dst`` (``RolloutEngine.update_weights``); best of ``repeats``."""
    ext, app = [], []
    state: dict[str, torch.Tensor] = {}
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        state = {k: p.detach().to("cpu", torch.float32).clone() for k, p in trainable_params(src).items()}
        t1 = time.perf_counter()
        load_weights(dst, state)
        sync(device)
        t2 = time.perf_counter()
        ext.append(t1 - t0)
        app.append(t2 - t1)
    row = {
        "kind": kind,
        "tensors": len(state),
        "mbytes": round(sum(v.numel() * 4 for v in state.values()) / 1e6, 2),
        "extract_seconds": round(min(ext), 4),
        "apply_seconds": round(min(app), 4),
    }
    del state
    gc.collect()
    return row


def print_table(data: dict) -> None:
    print()
    print(render_markdown(data))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny config on CPU: checks the code path")
    ap.add_argument("--from-json", type=Path, default=None, help="render a saved run; measure nothing")
    ap.add_argument(
        "--json",
        type=Path,
        default=None,
        help="default benchmarks/results/gpu.json (gpu_cpu_smoke.json; gpu_flux.json, gpu_wan.json, ...)",
    )
    ap.add_argument("--docs", type=Path, default=DOCS, help="markdown file whose GPU section is updated")
    ap.add_argument("--no-docs", action="store_true", help="do not touch the docs (default with --cpu-smoke)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--budget-s", type=float, default=360.0, help="rows after this many seconds are skipped")
    ap.add_argument(
        "--family",
        choices=tuple(PRESETS),
        default="sd3",
        help="sd3: SD3.5-Medium (default); flux: FLUX.1-dev at 512²; wan: Wan2.1-T2V-1.3B at 480x832",
    )
    ap.add_argument(
        "--frames", type=int, default=None, help="wan: frames a clip, 4k + 1 (default 33; --cpu-smoke: 5)"
    )
    args = ap.parse_args(argv)
    if args.from_json is not None:
        data = json.loads(args.from_json.read_text())
    else:
        if args.json is None:
            stem = "gpu" if args.family == "sd3" else f"gpu_{args.family}"
            name = f"{stem}_cpu_smoke.json" if args.cpu_smoke else f"{stem}.json"
            args.json = ROOT / "benchmarks" / "results" / name
        if args.cpu_smoke:
            torch.set_num_threads(min(2, torch.get_num_threads()))
        data = run(args)
        print(f"wrote {args.json}")
    print_table(data)
    if args.cpu_smoke and args.from_json is None:
        # exercise the docs rendering without touching the docs: replace, then replace again
        fam = str(data["meta"].get("family", "sd3"))
        begin, end = markers(fam)
        section = render_markdown(data)
        once = update_docs(f"# Benchmarks\n\n## GPU\n\n{begin}\nnothing yet\n{end}\n", section, fam)
        assert update_docs(once, section, fam) == once and once.count(begin) == 1
        fresh = update_docs("# Benchmarks\n", section, fam)  # no markers yet: a section is appended
        assert update_docs(fresh, section, fam) == fresh and fresh.count(begin) == 1
        print(f"cpu smoke passed in {data['meta']['seconds']} s (docs section rendered, not written)")
    elif not args.no_docs:
        write_docs(args.docs, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
