"""``vgrpo plan``: the throughput-optimal split of a cluster between rollout, reward and learner.

    per-phase costs, device-seconds per image
      --measure (the real engines, here) | --costs FILE (a benchmark JSON) | FLOP estimates (printed as such)
                                        │
                                        ▼
    the pipeline of vgrpo/driver.py, for a split (R rollout, W reward, L learner devices):
      rollout  = ceil(P / R) · G · c_rollout         each worker samples whole prompt groups
      reward   = ceil(P·G / W) · c_reward            Serve replicas batch single images
      learner  = ceil(P / L) · G · c_learner + all-reduce(L)   each rank trains whole groups
      max_staleness 0:  step = rollout + reward + learner + weight sync     (the phases serialise)
      max_staleness ≥1: step = max(rollout, reward + learner + weight sync) (the rollout of step k+1
                        runs while step k is scored and learned: the driver launches it before scoring)
                                        │
                                        ▼
    every split with R + W + L ≤ devices → the best images/s = P·G / step, and its bottleneck

The granularity is the driver's: rollout workers and learner ranks receive whole prompt groups, so beyond
P devices a role gets no faster and a plan may leave devices idle (it says so, and what would use them).
Pure functions, no Ray and no torch at import: ``--help`` and the estimate answer in well under a second.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from vgrpo.proto.config import RunConfig, load_config
from vgrpo.proto.messages import WeightUpdate

ROLES = ("rollout", "reward", "learner")
Granularity = Literal["prompt", "image"]

# The SD3.5-Medium V-GRPO recipe (docs/algorithms.md §4.5), used when configs/ holds no such recipe.
SD35M_PATH = "stabilityai/stable-diffusion-3.5-medium"
SD35M_RECIPE = [
    f"model.path={SD35M_PATH}",
    "model.max_sequence_length=128",
    "model.lora.rank=32",
    "model.lora.alpha=64",
    "rollout.group_size=24",
    "rollout.prompts_per_step=48",
    "rollout.num_steps=40",
    "rollout.sampler=dpm2",
    "rollout.guidance_scale=1.0",
    "rollout.height=512",
    "rollout.width=512",
    "reward.weights={geneval: 1.0}",
    "algorithm.name=vgrpo",
    "algorithm.vgrpo.n_mc=4",
    "train.max_staleness=1",
]


class PlanError(ValueError):
    """A plan that cannot be made (too few devices, a model that does not fit, unreadable costs); the
    message names what is missing and the fix."""


# ----------------------------------------------------------------------------------------------- inputs


class InfeasibleError(PlanError):
    """The cluster cannot hold the roles at all (too few devices, too little memory)."""


@dataclass
class Workload:
    """What one training step asks of the roles."""

    prompts: int  # P, prompt groups per step
    group_size: int  # G, images per prompt
    max_staleness: int
    granularity: Granularity = "prompt"

    @property
    def images(self) -> int:
        return self.prompts * self.group_size


@dataclass
class Cluster:
    """Devices the three roles share. ``kind`` GPU: a GPU cluster (a CPU reward then runs on the CPUs);
    CPU: a CPU-only machine, one device = one core (the embedded default)."""

    devices: int
    kind: Literal["GPU", "CPU"] = "GPU"
    cpus: int | None = None  # CPUs for a CPU reward on a GPU cluster (None: 8 per GPU)
    devices_per_node: int = 8
    memory_gb: float = 80.0  # per device
    intra_node_gbps: float = 300.0  # GB/s per device within a node (NVLink)
    inter_node_gbps: float = 25.0  # GB/s per device across nodes (InfiniBand / RoCE)
    # devices' worth of compute really available when they are time-shared (a loaded CPU machine,
    # fractional GPUs); None: every device is dedicated to its actor
    capacity: float | None = None

    def describe(self) -> str:
        if self.kind == "CPU":
            return f"{self.devices} CPU cores"
        return f"{self.devices} GPUs ({self.devices_per_node} per node, {self.memory_gb:g} GB each)"


@dataclass
class Costs:
    """Device-seconds per image of each role on one device, and the per-step fixed costs."""

    rollout: float
    reward: float
    learner: float
    weight_sync: float = 0.0  # seconds per step: publish on the learner + apply on the workers
    grad_bytes: float = 0.0  # bytes all-reduced across learner ranks per step
    reward_device: Literal["device", "cpu"] = "device"  # cpu: a CPU reward beside a GPU cluster
    device: Literal["GPU", "CPU"] = "GPU"
    source: str = "estimate"
    assumptions: list[str] = field(default_factory=list)
    flops: dict[str, float] = field(default_factory=dict)  # per image, where estimated
    memory_gb: dict[str, float] = field(default_factory=dict)  # per device, per role

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str) -> Costs:
        known = {f for f in cls.__dataclass_fields__}
        c = cls(**{k: v for k, v in data.items() if k in known})
        c.source = source
        return c


# ----------------------------------------------------------------------------------------------- config


def recipe_path(root: Path | None = None) -> Path | None:
    """The SD3.5-Medium V-GRPO recipe in configs/ if there is one (a YAML naming the model and vgrpo)."""
    folder = (root or Path.cwd()) / "configs"
    if not folder.is_dir():
        folder = Path(__file__).resolve().parents[1] / "configs"
    if not folder.is_dir():
        return None
    found = []
    for p in sorted(folder.glob("*.y*ml")):
        text = p.read_text(errors="replace").lower()
        if "stable-diffusion-3.5-medium" in text and ("vgrpo" in p.name or "name: vgrpo" in text):
            found.append(p)
    return found[0] if found else None


def default_config(sets: list[str] | None = None) -> tuple[RunConfig, str]:
    """The SD3.5-Medium V-GRPO recipe: configs/ if it holds one, else the built-in numbers above."""
    path = recipe_path()
    if path is not None:
        return load_config(path, sets or []), f"SD3.5-Medium V-GRPO recipe {path}"
    return load_config(
        None, SD35M_RECIPE + (sets or [])
    ), "SD3.5-Medium V-GRPO recipe (built in, docs/algorithms.md §4.5)"


def workload_of(cfg: RunConfig, batch: str | None = None, staleness: int | None = None) -> Workload:
    p, g = cfg.rollout.prompts_per_step, cfg.rollout.group_size
    if batch:
        try:
            a, b = batch.lower().replace("×", "x").split("x")
            p, g = int(a), int(b)
        except ValueError:
            raise PlanError(f"--batch {batch!r}: want PROMPTSxGROUP, e.g. --batch 48x24") from None
        if p < 1 or g < 2:
            raise PlanError(f"--batch {batch!r}: need >= 1 prompt and a group size >= 2")
    return Workload(p, g, cfg.train.max_staleness if staleness is None else staleness)


def parse_resources(text: str) -> Cluster:
    """A cluster from JSON (inline or a file): Ray's ``ray.cluster_resources()`` ({"GPU": 64, "CPU": 512}),
    a list of nodes ({"nodes": [{"GPU": 8, "CPU": 96}, ...]} or a bare list), optionally with
    ``gpu_memory_gb``, ``gpus_per_node``, ``inter_node_gbps``."""
    raw = (
        Path(text).read_text() if not text.lstrip().startswith(("{", "[")) and Path(text).is_file() else text
    )
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise PlanError(
            f'--resources: not JSON ({e.msg}); fix: e.g. --resources \'{{"GPU": 64, "CPU": 512}}\' '
            "or a file holding ray.cluster_resources()"
        ) from None
    nodes = data if isinstance(data, list) else data.get("nodes") if isinstance(data, dict) else None
    top = data if isinstance(data, dict) else {}
    get = lambda d, *ks: next((float(d[k]) for k in ks if k in d), 0.0)  # noqa: E731
    if nodes:
        gpus = sum(get(n, "GPU", "gpus", "num_gpus") for n in nodes)
        cpus = sum(get(n, "CPU", "cpus", "num_cpus") for n in nodes)
        per_node = max(get(n, "GPU", "gpus", "num_gpus") for n in nodes)
    else:
        gpus, cpus = get(top, "GPU", "gpus", "num_gpus"), get(top, "CPU", "cpus", "num_cpus")
        per_node = get(top, "gpus_per_node") or min(gpus, 8.0)
    cluster = Cluster(int(gpus), "GPU", cpus=int(cpus) or None, devices_per_node=max(1, int(per_node)))
    if gpus <= 0:
        if cpus <= 0:
            raise PlanError("--resources names no GPU and no CPU; fix: e.g. '{\"GPU\": 64}'")
        cluster = Cluster(int(cpus), "CPU", cpus=int(cpus), devices_per_node=int(cpus), memory_gb=1e9)
    for key, attr in (("gpu_memory_gb", "memory_gb"), ("inter_node_gbps", "inter_node_gbps")):
        if key in top:
            setattr(cluster, attr, float(top[key]))
    return cluster


# ----------------------------------------------------------------------------------------------- estimates


@dataclass
class Arch:
    """What the FLOP model needs of an SD3 pipeline."""

    name: str
    layers: int
    hidden: int
    dual_layers: int  # MMDiT-X layers with a second image self-attention (SD3.5)
    params: float  # transformer parameters
    patch: int
    latent_channels: int
    vae_scale: int
    vae_decode_tflop_512: float  # VAE decode of one 512x512 image
    text_tflop_per_prompt: float  # all text encoders, once per prompt
    text_encoder_params: float
    native: int  # native resolution (pixels)


SD35M_ARCH = Arch(
    name="SD3.5-Medium (MMDiT-X)",
    layers=24,
    hidden=1536,
    dual_layers=13,
    params=2.5e9,
    patch=2,
    latent_channels=16,
    vae_scale=8,
    # conv layers of the SD3 VAE decoder: ~0.9 TMAC at 512x512
    vae_decode_tflop_512=1.8,
    # T5-XXL encoder (4.7B) over 128 tokens + CLIP-L/G (0.8B) over 77
    text_tflop_per_prompt=2 * (4.7e9 * 128 + 0.82e9 * 77) / 1e12,
    text_encoder_params=5.5e9,
    native=1024,
)


def arch_of(cfg: RunConfig) -> Arch:
    """SD3.5-Medium's numbers for its hub id; for a local pipeline, its own transformer config."""
    path = cfg.model.path.lower()
    if "stable-diffusion-3.5-medium" in path or "sd3.5-m" in path or "sd35m" in path:
        return SD35M_ARCH
    from vgrpo.core.policy import ModelPathError, resolve_model_path

    try:
        folder = Path(resolve_model_path(cfg.model.path))
    except ModelPathError as e:
        raise PlanError(str(e)) from None
    tcfg_path = folder / "transformer" / "config.json"
    if not tcfg_path.is_file():
        raise PlanError(
            f"model.path = {cfg.model.path!r}: no local transformer/config.json to estimate FLOPs from; "
            "fix: --measure on a machine that has the model, or --costs FILE.json"
        )
    t = json.loads(tcfg_path.read_text())
    hidden = int(t["num_attention_heads"]) * int(t["attention_head_dim"])
    params = 0.0
    for st in folder.glob("transformer/*.safetensors"):
        params += _safetensors_numel(st)
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    scale = 2 ** (len(vae_cfg.get("block_out_channels", [1, 1, 1, 1])) - 1)
    native = int(t.get("sample_size", 64)) * scale
    # decoder convs scale with width² · pixels: SD3's (128..512 channels) costs 1.8 TFLOP at 512²
    width = max(vae_cfg.get("block_out_channels", [128]))
    layers = int(vae_cfg.get("layers_per_block", 2)) + 1
    vae_tflop = 1.8 * (width / 512) ** 2 * (layers / 3)
    return Arch(
        name=f"{cfg.model.path} (d={hidden}, {t['num_layers']} layers)",
        layers=int(t["num_layers"]),
        hidden=hidden,
        dual_layers=len(t.get("dual_attention_layers") or []),
        params=params or 24 * hidden**2 * int(t["num_layers"]),
        patch=int(t["patch_size"]),
        latent_channels=int(t["in_channels"]),
        vae_scale=scale,
        vae_decode_tflop_512=vae_tflop,
        text_tflop_per_prompt=2 * 1e6 * 77 / 1e12,
        text_encoder_params=1e6,
        native=native,
    )


def _safetensors_numel(path: Path) -> float:
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return float(sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__"))


def transformer_tflop(arch: Arch, image_tokens: int, text_tokens: int) -> float:
    """One forward of the MMDiT on one image: the image stream's linear layers on image tokens, the context
    stream's on text tokens (12·d² each: qkv, out, 4d MLP), joint attention over both, and SD3.5's extra
    image self-attention in its dual layers. adaLN acts once per sample and is negligible."""
    d, L, n = arch.hidden, arch.layers, image_tokens + text_tokens
    linear = 2 * L * 12 * d * d * n + 2 * arch.dual_layers * 4 * d * d * image_tokens
    attention = 4 * L * n * n * d + 4 * arch.dual_layers * image_tokens**2 * d
    return (linear + attention) / 1e12


def learner_passes(cfg: RunConfig, staleness: int) -> tuple[float, float, str]:
    """(training forwards+backwards, no-grad forwards) per image per update for the configured objective
    (learner/objectives/*.py), and a one-line reason."""
    a, n_steps = cfg.algorithm, cfg.rollout.num_steps
    if a.name == "vgrpo":
        v = a.vgrpo
        old = v.n_mc * (v.inner_steps - 1) + (v.n_mc if staleness >= 1 else 0)
        why = (
            f"{v.n_mc} (t, eps) pairs x {v.inner_steps} step(s); old-policy forwards {'on' if old else 'off'}"
        )
        return v.n_mc * v.inner_steps, old, why
    if a.name == "dgpo":
        m = min(a.dgpo.num_timesteps, a.dgpo.trunc_steps + 1, n_steps)
        return m, 2 * m, f"{m} grid times; reference + EMA-old forwards"
    if a.name == "flow_grpo":
        f = a.flow_grpo
        n = max(1, int(n_steps * f.timestep_fraction)) * f.inner_steps
        cfg_x = 2 if cfg.rollout.guidance_scale != 1.0 else 1
        ref = n if f.kl_beta > 0 else 0
        return (
            n * cfg_x,
            ref * cfg_x,
            f"{n} SDE steps{' with CFG (x2)' if cfg_x == 2 else ''}; reference forwards",
        )
    if a.name in ("flow_grpo_fast", "mixgrpo"):
        wf = a.flow_grpo_fast if a.name == "flow_grpo_fast" else a.mixgrpo
        n = wf.sde_window_size * wf.inner_steps
        cfg_x = 2 if cfg.rollout.guidance_scale != 1.0 else 1
        ref = n if wf.kl_beta > 0 else 0
        return (
            n * cfg_x,
            ref * cfg_x,
            f"{n} SDE-window steps{' with CFG (x2)' if cfg_x == 2 else ''}"
            + ("; reference forwards" if ref else ""),
        )
    if a.name == "nft":
        nf = a.nft
        n = max(1, int(n_steps * nf.timestep_fraction))
        return n, n + (n if nf.kl_beta > 0 else 0), f"{n} grid times; old + reference forwards"
    raise PlanError(f"algorithm.name = {a.name!r}: no cost model")


GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0, "CPU": 0.1}
MFU = {"rollout": 0.40, "learner": 0.35, "reward": 0.15}
REWARD_TFLOP = {  # per image, the reward model's forward (docs/algorithms.md §7)
    "geneval": (0.85, "Mask2Former Swin-S at 512² (~0.35) + CLIP ViT-L/14 on ~3 crops (~0.5)"),
    "pickscore": (0.35, "CLIP ViT-H/14 image + text towers at 224²"),
    "ocr": (0.05, "PaddleOCR detection + recognition"),
    "shapes": (0.0, "programmatic detector (CPU, ~3 ms/image)"),
}
UNKNOWN_REWARD = "unknown reward: 0.5 TFLOP/image assumed"
CPU_REWARD_S = {"shapes": 0.003, "ocr": 0.25}  # CPU-seconds per image (benchmarks/results/rewards.json)


GPU_FIGURES = Path("benchmarks") / "results" / "gpu.json"


def measured_mfu(path: Path | None = None) -> tuple[dict[str, float], str] | None:
    """Rollout and learner utilisation measured by benchmarks/gpu.py on a real GPU (SD3.5-Medium shapes,
    bf16, eager PyTorch): the best row of each phase of its JSON (``path``, else benchmarks/results/gpu.json
    of the working directory or of the source checkout), or None where there is none."""
    if path is None:
        here = [Path.cwd() / GPU_FIGURES, Path(__file__).resolve().parents[1] / GPU_FIGURES]
        path = next((p for p in here if p.is_file()), here[0])
    try:
        data = json.loads(path.read_text())
        roll = max(float(r["mfu"]) for r in data["rollout"])
        learn = max(float(r["mfu"]) for r in data["learner"])
        where = f"{data['meta']['device_name']} {data['meta']['date'][:10]}"
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (0 < roll <= 1 and 0 < learn <= 1):
        return None
    return {"rollout": roll, "learner": learn}, f"measured on {where} ({path.name})"


def estimate_costs(cfg: RunConfig, work: Workload, gpu: str = "H100") -> Costs:
    """Per-phase costs from FLOP counts and utilisation (measured by benchmarks/gpu.py where its JSON is
    saved, else assumed); every assumption is listed."""
    mfu, mfu_source = dict(MFU), "assumed"
    measured = measured_mfu() if gpu.upper() != "CPU" else None
    if measured is not None:
        mfu.update(measured[0])
        mfu_source = measured[1]
    arch = arch_of(cfg)
    r = cfg.rollout
    h, w = r.height or arch.native, r.width or arch.native
    image_tokens = (h // arch.vae_scale // arch.patch) * (w // arch.vae_scale // arch.patch)
    text_tokens = 77 + cfg.model.max_sequence_length
    f = transformer_tflop(arch, image_tokens, text_tokens)
    cfg_x = 2 if r.guidance_scale != 1.0 else 1
    decode = arch.vae_decode_tflop_512 * (h * w) / 512**2
    text = arch.text_tflop_per_prompt / work.group_size
    roll = r.num_steps * cfg_x * f + decode + text
    train, nograd, why = learner_passes(cfg, work.max_staleness)
    learn = (3 * train + nograd) * f
    peak = GPU_PEAK_TFLOPS.get(gpu.upper())
    if peak is None:
        raise PlanError(f"--gpu-type {gpu!r}: unknown; fix: one of {', '.join(GPU_PEAK_TFLOPS)}")
    rewards = [n for n, wgt in cfg.reward.weights.items() if wgt != 0]
    rew_tflop = sum(REWARD_TFLOP.get(n, (0.5, ""))[0] for n in rewards)
    cpu_reward = rew_tflop == 0.0
    # trainable weights published each step: LoRA on the attention projections, else everything
    d, L = arch.hidden, arch.layers
    if cfg.model.lora is not None:
        n_proj = len(cfg.model.lora.target_modules)
        trainable = cfg.model.lora.rank * 2 * d * (n_proj * L + 4 * arch.dual_layers)
    else:
        trainable = arch.params
    sync_s = 4 * trainable / 5e9 + 0.05  # fp32 weights through Ray's object store at ~5 GB/s, + latency
    bf16 = 2
    mem_roll = (arch.params + arch.text_encoder_params) * bf16 / 1e9 + 4
    optim = (trainable * 16) / 1e9  # fp32 master + Adam moments + grads
    mem_fixed = arch.params * bf16 / 1e9 + 20  # bf16 weights + activations at the micro-batch
    assumptions = [
        f"{arch.name}: transformer forward {f:.2f} TFLOP/image at {h}x{w} "
        f"({image_tokens} image + {text_tokens} text tokens)",
        f"rollout: {r.num_steps} sampler steps{' x2 (CFG)' if cfg_x == 2 else ''} + VAE decode {decode:.2f} "
        f"+ text encoders {text:.3f} (per prompt, shared by G={work.group_size})",
        f"learner ({cfg.algorithm.name}): {train:g} training passes (backward = 2x forward) + {nograd:g} "
        f"no-grad forwards per image: {why}",
        "reward: " + ", ".join(f"{n} {REWARD_TFLOP.get(n, (0.5, UNKNOWN_REWARD))[1]}" for n in rewards),
        f"{gpu} bf16 dense peak {peak:g} TFLOP/s; utilisation rollout {mfu['rollout']:.0%}, "
        f"learner {mfu['learner']:.0%} ({mfu_source}), reward {mfu['reward']:.0%} (assumed)",
        f"weight sync: {trainable / 1e6:.1f} M trainable params in fp32 at ~5 GB/s + 50 ms",
    ]
    reward_s = rew_tflop / (peak * mfu["reward"])
    if cpu_reward:
        reward_s = sum(CPU_REWARD_S.get(n, 0.05) for n in rewards)
        assumptions.append(f"reward runs on CPUs: {reward_s * 1e3:.0f} CPU-ms/image")
    return Costs(
        rollout=roll / (peak * mfu["rollout"]),
        reward=reward_s,
        learner=learn / (peak * mfu["learner"]),
        weight_sync=sync_s,
        grad_bytes=4 * trainable,
        reward_device="cpu" if cpu_reward else "device",
        device="CPU" if gpu.upper() == "CPU" else "GPU",
        source=f"FLOP estimate ({gpu})",
        assumptions=assumptions,
        flops={"rollout": roll, "reward": rew_tflop, "learner": learn},
        memory_gb={"rollout": mem_roll, "reward": 4.0, "learner_fixed": mem_fixed, "learner_sharded": optim},
    )


# ----------------------------------------------------------------------------------------------- costs from files


def load_costs(path: Path) -> Costs:
    """Costs from ``vgrpo plan --measure --save-costs`` JSON (or any JSON with rollout/reward/learner
    seconds per image), or from a run's metrics.jsonl (its config.yaml beside it gives the devices)."""
    if not path.is_file():
        raise PlanError(
            f"--costs {path}: no such file; fix: write one with `vgrpo plan --measure --save-costs`"
        )
    if path.suffix == ".jsonl" or path.name == "metrics.jsonl":
        return _costs_from_run(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PlanError(f"--costs {path}: not JSON ({e.msg})") from None
    data = data.get("costs", data)
    missing = [k for k in ROLES if k not in data]
    if missing:
        raise PlanError(
            f"--costs {path}: missing {', '.join(missing)} (device-seconds per image); fix: a JSON like "
            '{"rollout": 0.23, "reward": 0.01, "learner": 0.1, "weight_sync": 0.1, "device": "GPU"}'
        )
    return Costs.from_json(data, f"benchmark JSON {path}")


def _costs_from_run(path: Path) -> Costs:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    rows = rows[1:] or rows  # the first step pays start-up
    if not rows:
        raise PlanError(f"--costs {path}: no metric rows")
    cfg = load_config(path.parent / "config.yaml", []) if (path.parent / "config.yaml").is_file() else None
    n_roll = cfg.rollout.num_workers if cfg else 1
    n_learn = cfg.learner.num_ranks if cfg else 1
    med = lambda k: sorted(r.get(k, 0.0) for r in rows)[len(rows) // 2]  # noqa: E731
    images = med("images_per_s") * med("time/step")
    gpu = bool(cfg and cfg.rollout.gpus_per_worker > 0)
    n_rew = 1
    if cfg is not None:
        reps = [cfg.reward.server(n).num_replicas for n in cfg.reward.weights]
        n_rew = max(1, sum(r for r in reps if isinstance(r, int)))
    return Costs(
        rollout=med("time/sample_compute") * n_roll / images,
        reward=med("time/reward") * n_rew / images,
        learner=med("time/learner") * n_learn / images,
        weight_sync=med("time/weight_sync"),
        device="GPU" if gpu else "CPU",
        source=f"run metrics {path} (median of {len(rows)} steps)",
        assumptions=[f"{n_roll} rollout worker(s), {n_learn} learner rank(s), {n_rew} reward replica(s)"],
    )


# ----------------------------------------------------------------------------------------------- measurement


def measure_costs(cfg: RunConfig, work: Workload, prompts: int = 2, log: Any = print) -> Costs:
    """Time the real code on this machine, in-process (no Ray: vgrpo/local_loop.py): RolloutEngine.sample,
    the configured rewards, LearnerEngine.train_step (one DeepSpeed rank on gloo/NCCL) and a weight
    publish + apply.
    One device = one GPU, or on a CPU-only machine one core (torch is limited to one thread)."""

    import numpy as np
    import torch

    from vgrpo.core.policy import ModelPathError, resolve_model_path
    from vgrpo.local_loop import LocalLoop

    hint = "; or measure the embedded default: vgrpo plan --embedded --measure"
    try:
        local = resolve_model_path(cfg.model.path)
    except ModelPathError as e:
        raise PlanError(f"--measure needs the model here: {e}{hint}") from None
    if not Path(local).is_dir():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(local, "model_index.json"), str):
            raise PlanError(
                f"--measure needs the model here: {cfg.model.path!r} is not in the Hugging Face cache of "
                f"this machine; fix: run it where the weights are cached, or --costs FILE{hint}"
            )
    gpu = torch.cuda.is_available()
    if not gpu:
        torch.set_num_threads(1)
    device = "cuda" if gpu else "cpu"
    g = cfg.rollout.group_size
    texts = [
        "a photo of a red circle",
        "a photo of two squares",
        "a photo of a blue ring",
        "a photo of a cross",
    ]
    batch_prompts = [texts[i % len(texts)] for i in range(prompts)]
    n = prompts * g
    stale = work.max_staleness >= 1
    t0 = time.perf_counter()
    # the loop's step in-process (vgrpo/local_loop.py): the same engines and messages as the actors'
    loop = LocalLoop(cfg, device=device, total_steps=10, max_staleness=1 if stale else 0)
    obj = loop.objective
    loop.sample(batch_prompts[:1], 1, list(range(g)))  # warm-up
    out = loop.sample(batch_prompts, 1, list(range(100, 100 + n)))
    rollout_s = out.seconds / n
    log(
        f"  measured rollout: {n} images in {out.seconds:.2f} s (load + warm-up {time.perf_counter() - t0:.1f} s)"
    )

    images = list(out.images)
    prompt_b = [p for p in batch_prompts for _ in range(g)]
    reward_s = 0.0
    reward_cpu = True
    for name, weight in cfg.reward.weights.items():
        if weight == 0:
            continue
        model = loop.rewards[name]
        model.score(images[:2], prompt_b[:2])
        t1 = time.perf_counter()
        model.score(images, prompt_b)
        reward_s += (time.perf_counter() - t1) / n
        reward_cpu = reward_cpu and cfg.reward.server(name).gpus == 0
    log(f"  measured reward: {reward_s * 1e3:.2f} ms/image ({', '.join(cfg.reward.weights)})")

    advantages = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    loop.learn(out, advantages, 1, policy_version=0)  # warm-up (on-policy); publishes version 1
    t1 = time.perf_counter()
    state = loop.learner.publish()
    loop.rollout.update_weights(WeightUpdate(1, state))
    sync_s = time.perf_counter() - t1
    t1 = time.perf_counter()
    # stale: the batch of version 0 trained at version 1 runs the old-policy forwards of a lagging batch
    loop.learn(out, advantages, 2, policy_version=0 if stale else 1)
    learner_s = (time.perf_counter() - t1) / n
    log(f"  measured learner ({obj.name}): {learner_s * n:.2f} s for {n} images; weight sync {sync_s:.3f} s")
    loop.close()
    trainable = sum(int(v.numel()) for v in state.values())
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name(0) if gpu else f"CPU, {threads} torch thread(s) = 1 device"
    return Costs(
        rollout=rollout_s,
        reward=reward_s,
        learner=learner_s,
        weight_sync=sync_s,
        grad_bytes=4.0 * trainable,
        reward_device="cpu" if (reward_cpu and gpu) else "device",
        device="GPU" if gpu else "CPU",
        source=f"measured on this machine ({where}; {prompts} prompts x G={g}, {cfg.rollout.num_steps} steps)",
        assumptions=[f"{cfg.model.path}, {cfg.algorithm.name}, sampler {cfg.sampler()}"],
    )


# ----------------------------------------------------------------------------------------------- the model


@dataclass
class Split:
    rollout: int
    reward: int
    learner: int

    @property
    def total(self) -> int:
        return self.rollout + self.reward + self.learner


@dataclass
class Prediction:
    split: Split
    stage_s: dict[str, float]  # rollout, reward, learner, weight_sync (seconds per step)
    step_s: float
    images_per_s: float
    bottleneck: str


def _units(work: Workload, n: int) -> int:
    """Images one of n rollout workers / learner ranks handles per step (whole groups by default)."""
    if work.granularity == "image":
        return math.ceil(work.images / n)
    return math.ceil(work.prompts / n) * work.group_size


def allreduce_s(costs: Costs, cluster: Cluster, ranks: int) -> float:
    if ranks <= 1 or costs.grad_bytes <= 0:
        return 0.0
    bw = cluster.intra_node_gbps if ranks <= cluster.devices_per_node else cluster.inter_node_gbps
    return 2 * (ranks - 1) / ranks * costs.grad_bytes / (bw * 1e9)


def predict(costs: Costs, work: Workload, split: Split, cluster: Cluster) -> Prediction:
    """Seconds per step of one split under the driver's pipeline (module docstring)."""
    if split.rollout < 1 or split.learner < 1:
        raise PlanError("a split needs at least 1 rollout and 1 learner device")
    t_roll = _units(work, split.rollout) * costs.rollout
    if costs.reward_device == "cpu" and cluster.kind == "GPU":
        cpus = cluster.cpus if cluster.cpus is not None else 8 * cluster.devices
        reward_units = max(1, cpus - split.rollout - split.learner)  # one CPU per GPU actor
    elif split.reward < 1 and cluster.kind == "CPU":
        reward_units = 1  # shares the cores of the other roles (the phases' times add up below)
    else:
        if split.reward < 1:
            raise PlanError("this reward runs on the devices: a split needs at least 1 reward device")
        reward_units = split.reward
    t_rew = math.ceil(work.images / reward_units) * costs.reward
    t_learn = _units(work, split.learner) * costs.learner + allreduce_s(costs, cluster, split.learner)
    t_sync = costs.weight_sync
    cap = cluster.capacity
    if cap:  # time-shared devices: n busy actors run at most cap / n of full speed
        work_s = split.rollout * t_roll + split.learner * t_learn + t_rew * min(reward_units, cap)
        t_roll *= max(1.0, split.rollout / cap)
        t_learn *= max(1.0, split.learner / cap)
    stages = {"rollout": t_roll, "reward": t_rew, "learner": t_learn, "weight_sync": t_sync}
    if work.max_staleness == 0:
        step = t_roll + t_rew + t_learn + t_sync
        bottleneck = max(stages, key=lambda k: stages[k])
    else:
        step = max(t_roll, t_rew + t_learn + t_sync)
        if cap:  # overlapping actors share the capacity: a step needs at least its work / capacity
            step = max(step, work_s / cap + t_sync)
        if t_roll >= t_rew + t_learn + t_sync:
            bottleneck = "rollout"
        else:
            bottleneck = max(("reward", "learner", "weight_sync"), key=lambda k: stages[k])
    return Prediction(split, stages, step, work.images / step if step > 0 else math.inf, bottleneck)


def _candidates(n_max: int, units: int) -> list[int]:
    """The smallest device count for each distinct per-device share ceil(units / n), n <= n_max."""
    out, seen = [], set()
    for n in range(1, n_max + 1):
        share = math.ceil(units / n)
        if share not in seen:
            seen.add(share)
            out.append(n)
    return out


@dataclass
class Plan:
    best: Prediction
    ranked: list[Prediction]  # the best few, best first
    cluster: Cluster
    work: Workload
    costs: Costs

    @property
    def idle(self) -> int:
        return self.cluster.devices - self.best.split.total


def min_devices(costs: Costs, cluster: Cluster) -> dict[str, int]:
    """The least devices per role: 1 each (a CPU reward on a GPU cluster needs none), more learner ranks
    when the full optimiser state must be sharded (ZeRO) to fit a device's memory."""
    # a CPU reward beside a GPU cluster takes no GPU; on a CPU-only machine it may share the cores
    shared = costs.reward_device == "cpu" or cluster.kind == "CPU"
    need = {"rollout": 1, "reward": 0 if shared else 1}
    need["learner"] = 1
    mem = costs.memory_gb
    if mem and cluster.kind == "GPU":
        for role in ("rollout", "reward"):
            if mem.get(role, 0) > cluster.memory_gb:
                raise InfeasibleError(
                    f"the {role} needs ~{mem[role]:.0f} GB per GPU and the cluster's GPUs have "
                    f"{cluster.memory_gb:g} GB; fix: GPUs with more memory (--resources gpu_memory_gb)"
                )
        fixed, sharded = mem.get("learner_fixed", 0.0), mem.get("learner_sharded", 0.0)
        if fixed >= cluster.memory_gb:
            raise InfeasibleError(
                f"a learner rank needs ~{fixed:.0f} GB before its optimiser state and the cluster's GPUs "
                f"have {cluster.memory_gb:g} GB; fix: LoRA (model.lora), activation checkpointing, or "
                "GPUs with more memory"
            )
        # ZeRO-2/3 shard the optimiser state over the ranks: enough ranks that each share fits
        need["learner"] = max(1, math.ceil(sharded / (cluster.memory_gb - fixed)))
    return need


def make_plan(costs: Costs, work: Workload, cluster: Cluster, keep: int = 5, tolerance: float = 0.01) -> Plan:
    """The throughput-optimal split: the fewest devices within ``tolerance`` of the most images/s (a
    role given devices that buy less than 1% is a waste the user would not want)."""
    need = min_devices(costs, cluster)
    if cluster.devices < sum(need.values()):
        roles = ", ".join(f"{v} {k}" for k, v in need.items() if v)
        reward_note = "" if need["reward"] else " (the reward runs on CPUs)"
        raise InfeasibleError(
            f"{cluster.describe()} cannot hold the three roles: at least {sum(need.values())} devices are "
            f"needed ({roles}){reward_note}; fix: --{cluster.kind.lower()}s {sum(need.values())} or more"
        )
    n = cluster.devices
    learn_units = work.images if work.granularity == "image" else work.prompts
    best: list[Prediction] = []

    for r in _candidates(n - need["learner"] - need["reward"], learn_units):
        for lr in _candidates(n - r - need["reward"], learn_units):
            if lr < need["learner"]:
                continue
            w_max = n - r - lr
            if need["reward"] == 0 and (cluster.kind == "GPU" or w_max == 0):
                options = [0]
            else:
                # step time is non-increasing in W: binary-search the fewest reward devices that reach
                # the best time this (R, L) can have
                full = predict(costs, work, Split(r, w_max, lr), cluster).step_s
                lo, hi = need["reward"], w_max
                while lo < hi:
                    mid = (lo + hi) // 2
                    if predict(costs, work, Split(r, mid, lr), cluster).step_s <= full * (1 + tolerance / 2):
                        hi = mid
                    else:
                        lo = mid + 1
                options = [lo]
            for w in options:
                p = predict(costs, work, Split(r, w, lr), cluster)
                best.append(p)
    top = max(p.images_per_s for p in best)
    near = sorted(
        (p for p in best if p.images_per_s >= top * (1 - tolerance)),
        key=lambda p: (p.split.total, -p.images_per_s),
    )
    rest = sorted((p for p in best if p.images_per_s < top * (1 - tolerance)), key=lambda p: -p.images_per_s)
    ranked = (near + rest)[:keep]
    return Plan(ranked[0], ranked, cluster, work, costs)


# ----------------------------------------------------------------------------------------------- printing


def _fmt_s(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def render(plan: Plan, title: str, sync_plan: Plan | None = None) -> list[str]:
    """The plan first (one line per role, as `vgrpo plan` prints it), then the model's inputs."""
    b, c, w, k = plan.best, plan.costs, plan.work, plan.cluster
    unit = "GPUs" if k.kind == "GPU" else "CPU cores"
    one = "GPU" if k.kind == "GPU" else "core"
    lines = [f"vgrpo plan: {title}", f"cluster: {k.describe()}", ""]
    lines.append(f"plan ({unit}):")
    per = {
        "rollout": f"{_units(w, b.split.rollout) // w.group_size} prompt group(s) x G={w.group_size} each"
        if w.granularity == "prompt"
        else f"{_units(w, b.split.rollout)} images each",
        "reward": f"{math.ceil(w.images / max(1, b.split.reward))} images each",
        "learner": f"{_units(w, b.split.learner) // w.group_size} group(s) each, one DeepSpeed ZeRO group"
        if w.granularity == "prompt"
        else f"{_units(w, b.split.learner)} images each",
    }
    if b.split.reward == 0 and k.kind == "CPU":
        per["reward"] = "shares the other roles' cores"
    elif c.reward_device == "cpu" and k.kind == "GPU":
        cpus = k.cpus if k.cpus is not None else 8 * k.devices
        per["reward"] = f"the reward runs on CPUs (~{max(1, cpus - b.split.rollout - b.split.learner)} free)"
    for role in ROLES:
        n = getattr(b.split, role)
        lines.append(f"  {role:<8} {n:>5} {unit:<9} {_fmt_s(b.stage_s[role]):>10}/step   {per[role]}")
    lines.append(f"  {'idle':<8} {plan.idle:>5} {unit}")
    lines.append("")
    mode = (
        "max_staleness 0: the phases serialise"
        if w.max_staleness == 0
        else f"max_staleness {w.max_staleness}: rollout of step k+1 overlaps reward + learner of step k"
    )
    lines.append(
        f"predicted: {b.images_per_s:.1f} images/s ({_fmt_s(b.step_s)}/step for {w.prompts} prompts x "
        f"G={w.group_size} = {w.images} images; {mode})"
    )
    lines.append(
        f"bottleneck: {b.bottleneck} ({_fmt_s(b.stage_s[b.bottleneck])} of the {_fmt_s(b.step_s)} step)"
    )
    if plan.idle > 0:
        lines.append(
            f"note: {plan.idle} {unit} idle: every role already has its fastest share of whole prompt groups; "
            f"more prompts per step (--batch) or a bigger group would use them"
        )
    if sync_plan is not None:
        s = sync_plan.best
        lines.append(
            f"for comparison, max_staleness 0 (no overlap): {s.images_per_s:.1f} images/s with "
            f"{s.split.rollout}/{s.split.reward}/{s.split.learner} (rollout/reward/learner {unit})"
        )
    if len(plan.ranked) > 1:
        lines.append("")
        lines.append(f"next best splits (rollout / reward / learner {unit} -> images/s, bottleneck):")
        for p in plan.ranked[1:]:
            lines.append(
                f"  {p.split.rollout:>4} / {p.split.reward:>3} / {p.split.learner:>4}  -> "
                f"{p.images_per_s:8.1f}  {p.bottleneck}"
            )
    lines.append("")
    est = c.source.startswith("FLOP estimate")
    lines.append(f"per-phase costs ({'ESTIMATES' if est else c.source}), {one}-seconds per image:")
    for role in ROLES:
        tf = c.flops.get(role, 0.0)
        extra = (
            (f"   ({tf:.2f} TFLOP/image)" if tf >= 0.1 else f"   ({tf * 1e3:.3g} GFLOP/image)") if tf else ""
        )
        where = " on a CPU" if role == "reward" and c.reward_device == "cpu" else ""
        lines.append(f"  {role:<8} {getattr(c, role):.4g}{where}{extra}")
    lines.append(f"  weight sync {c.weight_sync:.3g} s/step")
    if c.assumptions:
        lines.append("assumptions:" if est else "notes:")
        lines.extend(f"  - {a}" for a in c.assumptions)
    if est:
        lines.append(
            "  (estimates: calibrate with `vgrpo plan --measure` on one of the cluster's GPUs, or --costs FILE)"
        )
    return lines


def plan_to_json(plan: Plan) -> dict[str, Any]:
    return {
        "cluster": asdict(plan.cluster),
        "workload": asdict(plan.work),
        "costs": plan.costs.to_json(),
        "best": asdict(plan.best),
        "ranked": [asdict(p) for p in plan.ranked],
        "idle": plan.idle,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "host_cpus": os.cpu_count(),
    }
