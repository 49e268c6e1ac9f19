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
Memory per role is estimated beside the costs (``RoleMemory``: weights, gradients and Adam state as ZeRO
0-3 shard them over the learner ranks, LoRA or full fine-tuning, activations with or without checkpointing,
ZeRO-Offload / ZeRO-Infinity to the host; docs/benchmarks.md "The planner's memory model"): a split in which
a role does not fit a GPU is refused (InfeasibleError, exit 3) naming the role, the bytes and the fixes, and
``memory_check`` applies the same model to a recipe's own placement for `vgrpo train --dry-run`. The model
families' numbers (SD3.5-Medium, FLUX.1-dev, Qwen-Image, Wan2.1-T2V-1.3B) are tables chosen by
``model.family`` or the hub id, so no model file is read for them.
Pure functions, no Ray and no torch at import: ``--help`` and the estimate answer in well under a second.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from vgrpo.proto.config import LoraConfig, RunConfig, load_config
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
    # per role: RoleMemory.to_json() (bytes, fixed + sharded over the ranks); learner_if: the fixes' what-ifs
    memory: dict[str, Any] = field(default_factory=dict)

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
    """What the FLOP and memory models need of a text-to-image (or video) flow-matching pipeline. The
    fields after ``native`` were added for the FLUX, Qwen-Image and Wan families; their defaults are SD3's,
    so an SD3 Arch (the built-in SD3.5-Medium or one read from a local folder) is what it always was."""

    name: str
    layers: int  # joint (double-stream) blocks; Wan: its DiT blocks
    hidden: int
    dual_layers: int  # MMDiT-X layers with a second image self-attention (SD3.5)
    params: float  # transformer parameters
    patch: int  # spatial patch (FLUX / Qwen-Image: the 2x2 packing of the latents)
    latent_channels: int
    vae_scale: int
    vae_decode_tflop_512: float  # VAE decode of one 512x512 image (video: of one 512x512 frame)
    text_tflop_per_prompt: float  # all text encoders, once per prompt (used when long_text_params is 0)
    text_encoder_params: float
    native: int  # native resolution (pixels; the height when native_w is set)
    family: str = "sd3"
    single_layers: int = 0  # FLUX single-stream blocks (parallel attention + MLP on the joint sequence)
    ffn: int = 0  # MLP width (0: 4 x hidden)
    cross_attention: bool = False  # Wan: self-attention over the video tokens, cross-attention to the text
    clip_tokens: int = 77  # text tokens in the sequence besides the long encoder's (SD3: CLIP's 77)
    max_text_tokens: int = 512  # the long text encoder's limit
    long_text_params: float = 0.0  # the long text encoder's params: its FLOPs scale with max_sequence_length
    short_text_params: float = 0.0  # CLIP-L (FLUX), run over 77 tokens
    guidance: Literal["cfg", "embedded", "true_cfg"] = "cfg"  # how rollout.guidance_scale is applied
    frames: int = 1  # default frames per sample (video)
    vae_scale_t: int = 1  # temporal compression of the VAE
    native_w: int = 0  # native width (0: square)
    vae_params: float = 8.4e7
    vae_window_frames: int = 1  # output frames the VAE decodes at once (Wan's causal VAE: 4 per latent frame)
    # LoRA-targetable linears: (module path, d_in, d_out, count); empty: SD3's, derived from layers/hidden
    linears: tuple[tuple[str, int, int, int], ...] = ()
    source: str = "built-in table"  # where the numbers come from

    @property
    def ffn_width(self) -> int:
        return self.ffn or 4 * self.hidden

    @property
    def blocks(self) -> int:
        """Transformer blocks whose activations the learner keeps (double + single stream)."""
        return self.layers + self.single_layers


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

_D = 3072  # FLUX.1 and Qwen-Image: 24 heads x 128


def _mmdit_linears(
    prefix: str,
    d: int,
    n: int,
    mlp: tuple[str, str],
    ctx_mlp: tuple[str, str],
    mod: tuple[str, str],
    mod_mult: int,
) -> list[tuple[str, int, int, int]]:
    """The linears of ``n`` double-stream MMDiT blocks (image + text stream each: q, k, v, out, a 4d MLP
    and an adaLN modulation to mod_mult x d)."""
    attn = [
        f"{prefix}.attn.{m}"
        for m in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    ]
    out = [(a, d, d, n) for a in attn]
    for up, down in (mlp, ctx_mlp):
        out += [(f"{prefix}.{up}", d, 4 * d, n), (f"{prefix}.{down}", 4 * d, d, n)]
    out += [(f"{prefix}.{m}", d, mod_mult * d, n) for m in mod]
    return out


FLUX_DEV_ARCH = Arch(
    name="FLUX.1-dev (12B MMDiT: 19 double + 38 single-stream blocks)",
    family="flux",
    layers=19,
    single_layers=38,
    hidden=_D,
    dual_layers=0,
    # 19 double blocks (2 streams x 12d^2 + 2 x 6d^2 adaLN) + 38 single (12d^2 + 3d^2 adaLN) + embedders
    params=11.9e9,
    patch=2,  # 16-channel latents at 1/8, packed 2x2 into 64-channel tokens
    latent_channels=16,
    vae_scale=8,
    vae_decode_tflop_512=1.8,  # the SD3 VAE's decoder (16 channels, 128..512 wide)
    text_tflop_per_prompt=0.0,
    text_encoder_params=4.76e9 + 1.23e8,  # T5-XXL encoder + CLIP-L text tower
    long_text_params=4.76e9,
    short_text_params=1.23e8,
    clip_tokens=0,  # CLIP-L gives only the pooled vector; the sequence is T5's
    max_text_tokens=512,
    guidance="embedded",  # guidance-distilled: the scale is an input, one forward per step
    native=1024,
    linears=tuple(
        _mmdit_linears(
            "transformer_blocks",
            _D,
            19,
            ("ff.net.0.proj", "ff.net.2"),
            ("ff_context.net.0.proj", "ff_context.net.2"),
            ("norm1.linear", "norm1_context.linear"),
            6,
        )
        + [(f"single_transformer_blocks.attn.{m}", _D, _D, 38) for m in ("to_q", "to_k", "to_v")]
        + [
            ("single_transformer_blocks.proj_mlp", _D, 4 * _D, 38),
            ("single_transformer_blocks.proj_out", 5 * _D, _D, 38),
            ("single_transformer_blocks.norm.linear", _D, 3 * _D, 38),
            ("x_embedder", 64, _D, 1),
            ("context_embedder", 4096, _D, 1),
            ("proj_out", _D, 64, 1),
        ]
    ),
)

QWEN_IMAGE_ARCH = Arch(
    name="Qwen-Image (20B MMDiT: 60 blocks)",
    family="qwen_image",
    layers=60,
    hidden=_D,
    dual_layers=0,
    params=20.4e9,  # 60 x (2 streams x 12d^2 + 2 x 6d^2 adaLN) = 20.4e9
    patch=2,
    latent_channels=16,
    vae_scale=8,
    # its VAE is Wan 2.1's (96..384 wide, 3-D causal convs), decoding one frame: ~2.4 TFLOP at 512x512
    vae_decode_tflop_512=2.4,
    vae_params=1.27e8,
    text_tflop_per_prompt=0.0,
    text_encoder_params=8.29e9,  # Qwen2.5-VL-7B (language model + vision tower, loaded whole)
    long_text_params=8.29e9 - 6.7e8,  # the vision tower does not run on text prompts
    clip_tokens=0,
    max_text_tokens=1024,
    guidance="true_cfg",  # not distilled: true CFG, a second forward per step when the scale > 1
    native=1024,
    linears=tuple(
        _mmdit_linears(
            "transformer_blocks",
            _D,
            60,
            ("img_mlp.net.0.proj", "img_mlp.net.2"),
            ("txt_mlp.net.0.proj", "txt_mlp.net.2"),
            ("img_mod.1", "txt_mod.1"),
            6,
        )
    ),
)

_WD, _WF = 1536, 8960
WAN21_1_3B_ARCH = Arch(
    name="Wan2.1-T2V-1.3B (30 DiT blocks, d 1536, FFN 8960)",
    family="wan",
    layers=30,
    hidden=_WD,
    dual_layers=0,
    ffn=_WF,
    cross_attention=True,
    params=1.42e9,  # 30 x (self 4d^2 + cross 4d^2 + FFN 2 d 8960) + embedders: "1.3B"
    patch=2,  # patch (1, 2, 2)
    latent_channels=16,
    vae_scale=8,
    vae_scale_t=4,
    frames=81,
    native=480,
    native_w=832,
    # the 3-D causal VAE's decoder (96..384 wide): ~300 TFLOP for 81 frames at 480x832 = ~2.4 per 512^2 frame
    vae_decode_tflop_512=2.4,
    vae_params=1.27e8,
    vae_window_frames=4,
    text_tflop_per_prompt=0.0,
    text_encoder_params=5.68e9,  # UMT5-XXL encoder
    long_text_params=5.68e9,
    clip_tokens=0,
    max_text_tokens=512,
    guidance="cfg",
    linears=tuple(
        [
            (f"blocks.{a}.{m}", _WD, _WD, 30)
            for a in ("attn1", "attn2")
            for m in ("to_q", "to_k", "to_v", "to_out.0")
        ]
        + [("blocks.ffn.net.0.proj", _WD, _WF, 30), ("blocks.ffn.net.2", _WF, _WD, 30)]
    ),
)

# family -> its real-size architectures: (hub id fragments, Arch); the first is the family's default
FAMILY_ARCHS: dict[str, list[tuple[tuple[str, ...], Arch]]] = {
    "sd3": [(("stable-diffusion-3.5-medium", "sd3.5-m", "sd35m"), SD35M_ARCH)],
    "flux": [(("flux.1-dev", "flux.1-schnell", "flux1-dev", "flux1dev"), FLUX_DEV_ARCH)],
    "qwen_image": [(("qwen-image", "qwen_image", "qwenimage"), QWEN_IMAGE_ARCH)],
    "wan": [(("wan2.1-t2v-1.3b", "wan2.1_t2v_1.3b", "wan21-t2v-1.3b", "wan21_t2v_1_3b"), WAN21_1_3B_ARCH)],
}


def _from_table(path: str, family: str | None) -> Arch | None:
    """The built-in Arch whose hub id fragment ``path`` contains (within ``family`` when given)."""
    low = path.lower()
    for fam, entries in FAMILY_ARCHS.items():
        if family not in (None, fam):
            continue
        for fragments, arch in entries:
            if any(f in low for f in fragments):
                return arch
    return None


def arch_of(cfg: RunConfig) -> Arch:
    """The architecture the estimates use.

    ``model.family`` set (not auto): the family's built-in numbers, matched by the hub id where the family
    has several (no model file is read: the recipes name hub ids that need not be on this machine); SD3
    with a path that is not SD3.5-Medium reads its local folder as before.
    ``auto``: a known hub id's numbers (SD3.5-Medium, FLUX.1-dev, Qwen-Image, Wan2.1-T2V-1.3B); a local
    folder's own configs (its model_index.json names the family; the transformer and VAE configs and the
    safetensors headers give the shapes, as before for SD3)."""
    family = cfg.model.family
    path = cfg.model.path
    if family not in ("auto", "sd3"):
        found = _from_table(path, family)
        if found is not None:
            return found
        default = FAMILY_ARCHS[family][0][1]
        return replace(
            default,
            source=f"{default.name}'s numbers (model.family {family}; {path!r} not in the table; with "
            "model.family auto a local folder's own configs are read)",
        )
    found = _from_table(path, "sd3")
    if found is not None:
        return found
    if family == "auto" and not (path.startswith("builtin:") or Path(path).expanduser().is_dir()):
        found = _from_table(path, None)  # a hub id (a local folder is read: its own numbers)
        if found is not None:
            return found
    from vgrpo.core.policy import ModelPathError, resolve_model_path

    try:
        folder = Path(resolve_model_path(path))
    except ModelPathError as e:
        raise PlanError(str(e)) from None
    if family == "auto":
        from vgrpo.core.families import FamilyError, resolve_family

        try:  # model_index.json's pipeline class names the family
            fam = resolve_family(str(folder)).name
        except (FamilyError, OSError, ValueError):
            fam = "sd3"  # no index, or a class no family has: read it as SD3, as before
        if fam != "sd3":
            return _local_family_arch(folder, fam)
    return _local_sd3_arch(cfg, folder)


def _numel(folder: Path, pattern: str) -> float:
    return sum(_safetensors_numel(p) for p in folder.glob(pattern))


def _local_family_arch(folder: Path, fam: str) -> Arch:
    """A FLUX / Qwen-Image / Wan pipeline's numbers from its local folder (model.family auto): the
    transformer's and VAE's configs and the safetensors headers; what they do not say (the VAE's decode
    cost, LoRA-targetable shapes) is the family's table scaled to the folder's width and depth."""
    default = FAMILY_ARCHS[fam][0][1]
    tcfg_path = folder / "transformer" / "config.json"
    if not tcfg_path.is_file():
        return replace(default, source=f"{default.name}'s numbers (no {tcfg_path})")
    t = json.loads(tcfg_path.read_text())
    d = int(t["num_attention_heads"]) * int(t["attention_head_dim"])
    layers = int(t["num_layers"])
    single = int(t.get("num_single_layers", 0)) if fam == "flux" else 0
    ffn = int(t.get("ffn_dim", 0)) if fam == "wan" else 0
    vae_path = folder / "vae" / "config.json"
    vae = json.loads(vae_path.read_text()) if vae_path.is_file() else {}
    if (
        "temperal_downsample" in vae
    ):  # the Wan-style causal VAE (Wan, Qwen-Image), 96..384 wide in the real ones
        down = list(vae["temperal_downsample"])
        scale, scale_t = 2 ** len(down), (2 ** sum(bool(x) for x in down) if fam == "wan" else 1)
        width, ref_width = int(vae.get("base_dim", 96)) * max(vae.get("dim_mult", [1, 2, 4, 4])), 384
    else:  # FLUX's AutoencoderKL, 128..512 wide in the real one
        scale, scale_t = 2 ** (len(vae.get("block_out_channels", [1, 1, 1, 1])) - 1), 1
        width, ref_width = max(vae.get("block_out_channels", [512])), 512
    side_path = folder / "vgrpo.json"  # vgrpo/tiny_families.py's native size
    side = json.loads(side_path.read_text()) if side_path.is_file() else {}
    r = d / default.hidden

    def layer_count(c: int) -> int:
        return single if c == default.single_layers and single else layers if c == default.layers else c

    linears = tuple(
        (path, max(1, round(i * r)), max(1, round(o * r)), layer_count(c))
        for path, i, o, c in default.linears
    )
    params = _numel(folder, "transformer/*.safetensors")
    text = _numel(folder, "text_encoder*/*.safetensors")
    return replace(
        default,
        name=f"{folder} ({fam}, d={d}, {layers}{f' + {single}' if single else ''} blocks)",
        layers=layers,
        single_layers=single,
        hidden=d,
        ffn=ffn,
        params=params or (12 * d * d * (2 * layers + single)),
        patch=2,
        latent_channels=int(t["in_channels"]) // (1 if fam == "wan" else 4),  # FLUX / Qwen: 2x2 packed
        vae_scale=scale,
        vae_scale_t=scale_t,
        vae_decode_tflop_512=default.vae_decode_tflop_512 * (width / ref_width) ** 2,
        vae_params=_numel(folder, "vae/*.safetensors") or default.vae_params,
        text_encoder_params=text or default.text_encoder_params,
        long_text_params=text or default.long_text_params,
        short_text_params=0.0,
        native=int(side.get("height", default.native)),
        native_w=int(side.get("width", default.native_w)),
        frames=int(side.get("frames", default.frames)),
        linears=linears,
        source=f"read from {folder}",
    )


def _local_sd3_arch(cfg: RunConfig, folder: Path) -> Arch:
    """An SD3 pipeline's numbers from its local folder: transformer config, safetensors headers, VAE config."""
    tcfg_path = folder / "transformer" / "config.json"
    if not tcfg_path.is_file():
        raise PlanError(
            f"model.path = {cfg.model.path!r}: no local transformer/config.json to estimate FLOPs from; "
            "fix: set model.family (sd3, flux, qwen_image, wan) to use the built-in numbers of a known "
            "model, --measure on a machine that has the model, or --costs FILE.json"
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
        vae_params=sum(_safetensors_numel(p) for p in folder.glob("vae/*.safetensors")) or 8.4e7,
        source=f"read from {folder}",
    )


def _safetensors_numel(path: Path) -> float:
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return float(sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__"))


@dataclass
class Shape:
    """One sample's shape as the transformer sees it."""

    height: int
    width: int
    frames: int  # output frames (1 for an image)
    latent_frames: int
    image_tokens: int  # per sample (video: all latent frames)
    text_tokens: int


def shape_of(cfg: RunConfig, arch: Arch) -> Shape:
    r = cfg.rollout
    h = r.height or arch.native
    w = r.width or (arch.native_w or arch.native)
    frames = (cfg.model.frames or arch.frames) if arch.vae_scale_t > 1 else 1
    latent_frames = (frames - 1) // arch.vae_scale_t + 1 if arch.vae_scale_t > 1 else 1
    per_frame = (h // arch.vae_scale // arch.patch) * (w // arch.vae_scale // arch.patch)
    text = arch.clip_tokens + min(cfg.model.max_sequence_length, arch.max_text_tokens)
    return Shape(h, w, frames, latent_frames, latent_frames * per_frame, text)


def block_tokens(arch: Arch, shape: Shape) -> int:
    """Tokens each block's hidden states hold per sample: image + text (joint attention) or, with
    cross-attention, the video's alone (the text is only the keys and values)."""
    return shape.image_tokens + (0 if arch.cross_attention else shape.text_tokens)


def cfg_forwards(cfg: RunConfig, arch: Arch) -> int:
    """Transformer forwards per sampler step: 2 with classifier-free guidance (SD3, Wan when the scale is
    not 1; Qwen-Image's true CFG when it is above 1), 1 for FLUX.1-dev (guidance embedding)."""
    g = cfg.rollout.guidance_scale
    if arch.guidance == "embedded":
        return 1
    if arch.guidance == "true_cfg":
        return 2 if g > 1.0 else 1
    return 2 if g != 1.0 else 1


def text_tflop(cfg: RunConfig, arch: Arch) -> float:
    """All text encoders over one prompt."""
    if not arch.long_text_params:
        return arch.text_tflop_per_prompt
    n = min(cfg.model.max_sequence_length, arch.max_text_tokens)
    return 2 * (arch.long_text_params * n + arch.short_text_params * 77) / 1e12


def transformer_tflop(arch: Arch, image_tokens: int, text_tokens: int) -> float:
    """One forward of the transformer on one sample.

    MMDiT (SD3, FLUX, Qwen-Image): the image stream's linear layers on image tokens, the context stream's on
    text tokens (4·d² attention + 2·d·ffn MLP = 12·d² each for a 4d MLP), joint attention over both, and
    SD3.5's extra image self-attention in its dual layers; FLUX's single-stream blocks (qkv 3d², MLP in 4d²,
    out 5d²: also 12·d²) act on the joint sequence. adaLN acts once per sample and is negligible.
    Wan (cross-attention): self-attention (4d²) + cross-attention q/out (2d²) + FFN (2·d·ffn) per video
    token, cross-attention k/v (2d²) per text token, attention n_v² + n_v·n_t."""
    d, n_img, n_txt = arch.hidden, image_tokens, text_tokens
    per_token = 4 * d * d + 2 * d * arch.ffn_width
    if arch.cross_attention:
        linear = 2 * arch.layers * ((per_token + 2 * d * d) * n_img + 2 * d * d * n_txt)
        attention = 4 * arch.layers * (n_img * n_img + n_img * n_txt) * d
        return (linear + attention) / 1e12
    L, n = arch.blocks, n_img + n_txt
    linear = 2 * L * per_token * n + 2 * arch.dual_layers * 4 * d * d * n_img
    attention = 4 * L * n * n * d + 4 * arch.dual_layers * n_img**2 * d
    return (linear + attention) / 1e12


def learner_passes(cfg: RunConfig, staleness: int, arch: Arch | None = None) -> tuple[float, float, str]:
    """(training forwards+backwards, no-grad forwards) per image per update for the configured objective
    (learner/objectives/*.py), and a one-line reason. CFG doubles the forwards that carry it (with
    ``arch``: as the family applies guidance, none for FLUX's guidance embedding)."""
    a, n_steps = cfg.algorithm, cfg.rollout.num_steps
    cfg_x = cfg_forwards(cfg, arch) if arch is not None else (2 if cfg.rollout.guidance_scale != 1.0 else 1)
    if a.name == "vgrpo":
        v = a.vgrpo
        old = v.n_mc * (v.inner_steps - 1) + (v.n_mc if staleness >= 1 else 0)
        g = cfg_x if v.guided_training else 1
        why = (
            f"{v.n_mc} (t, eps) pairs x {v.inner_steps} step(s); old-policy forwards {'on' if old else 'off'}"
            + ("; guided training with CFG (x2)" if g == 2 else "")
        )
        return v.n_mc * v.inner_steps * g, old * g, why
    if a.name == "dgpo":
        m = min(a.dgpo.num_timesteps, a.dgpo.trunc_steps + 1, n_steps)
        return m, 2 * m, f"{m} grid times; reference + EMA-old forwards"
    if a.name == "flow_grpo":
        f = a.flow_grpo
        n = max(1, int(n_steps * f.timestep_fraction)) * f.inner_steps
        ref = n if f.kl_beta > 0 else 0
        return (
            n * cfg_x,
            ref * cfg_x,
            f"{n} SDE steps{' with CFG (x2)' if cfg_x == 2 else ''}; reference forwards",
        )
    if a.name in ("flow_grpo_fast", "mixgrpo"):
        wf = a.flow_grpo_fast if a.name == "flow_grpo_fast" else a.mixgrpo
        n = wf.sde_window_size * wf.inner_steps
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
    shape = shape_of(cfg, arch)
    h, w = shape.height, shape.width
    image_tokens, text_tokens = shape.image_tokens, shape.text_tokens
    f = transformer_tflop(arch, image_tokens, text_tokens)
    cfg_x = cfg_forwards(cfg, arch)
    decode = arch.vae_decode_tflop_512 * (h * w) / 512**2 * shape.frames
    text = text_tflop(cfg, arch) / work.group_size
    roll = r.num_steps * cfg_x * f + decode + text
    train, nograd, why = learner_passes(cfg, work.max_staleness, arch)
    learn = (3 * train + nograd) * f
    peak = GPU_PEAK_TFLOPS.get(gpu.upper())
    if peak is None:
        raise PlanError(f"--gpu-type {gpu!r}: unknown; fix: one of {', '.join(GPU_PEAK_TFLOPS)}")
    rewards = [n for n, wgt in cfg.reward.weights.items() if wgt != 0]
    # an image reward scores each frame of a clip (core/families/wan.py)
    rew_tflop = sum(REWARD_TFLOP.get(n, (0.5, ""))[0] for n in rewards) * shape.frames
    cpu_reward = rew_tflop == 0.0
    # trainable weights published each step: LoRA on its target modules, else everything
    if cfg.model.lora is not None:
        trainable = lora_params(cfg, arch)[0]
    else:
        trainable = arch.params
    sync_s = 4 * trainable / 5e9 + 0.05  # fp32 weights through Ray's object store at ~5 GB/s, + latency
    mem = memory_of(cfg, arch)
    memory: dict[str, Any] = {k: v.to_json() for k, v in mem.items()}
    memory["learner_if"] = {k: v.to_json() for k, v in learner_whatifs(cfg, arch).items()}
    memory["micro_images"] = micro_images(cfg)
    memory["zero_stage"] = cfg.learner.zero_stage
    sample = "video" if shape.frames > 1 else "image"
    frames = f", {shape.frames} frames ({shape.latent_frames} latent)" if shape.frames > 1 else ""
    assumptions = [
        f"{arch.name}: transformer forward {f:.2f} TFLOP/{sample} at {h}x{w}{frames} "
        f"({image_tokens} {sample} + {text_tokens} text tokens)",
        f"rollout: {r.num_steps} sampler steps{' x2 (CFG)' if cfg_x == 2 else ''} + VAE decode {decode:.2f} "
        f"+ text encoders {text:.3f} (per prompt, shared by G={work.group_size})",
        f"learner ({cfg.algorithm.name}): {train:g} training passes (backward = 2x forward) + {nograd:g} "
        f"no-grad forwards per {sample}: {why}",
        "reward: " + ", ".join(f"{n} {REWARD_TFLOP.get(n, (0.5, UNKNOWN_REWARD))[1]}" for n in rewards),
        f"{gpu} bf16 dense peak {peak:g} TFLOP/s; utilisation rollout {mfu['rollout']:.0%}, "
        f"learner {mfu['learner']:.0%} ({mfu_source}), reward {mfu['reward']:.0%} (assumed)",
        f"weight sync: {trainable / 1e6:.1f} M trainable params in fp32 at ~5 GB/s + 50 ms",
    ]
    if arch.family != "sd3" or arch.guidance != "cfg":
        assumptions.append(
            f"{arch.name}: numbers from {arch.source}; the utilisation is SD3.5-Medium's, taken as is"
        )
    if arch.guidance == "embedded":
        assumptions.append(
            f"guidance: rollout.guidance_scale {r.guidance_scale:g} is FLUX's guidance embedding, one forward a step"
        )
    if shape.frames > 1:
        assumptions.append(f"reward: the image reward(s) score each of the {shape.frames} frames of a clip")
    if cfg.learner.zero_stage == 3:
        assumptions.append(
            "learner: ZeRO-3 gathers the sharded weights for every forward and backward; that traffic is "
            "not in the time model (only the gradient all-reduce is)"
        )
    reward_s = rew_tflop / (peak * mfu["reward"])
    if cpu_reward:
        reward_s = sum(CPU_REWARD_S.get(n, 0.05) for n in rewards) * shape.frames
        assumptions.append(f"reward runs on CPUs: {reward_s * 1e3:.0f} CPU-ms/image")
    learner_m = mem["learner"]
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
        memory_gb={
            "rollout": mem["rollout"].total() / GB,
            "reward": mem["reward"].total() / GB,
            "learner_fixed": learner_m.fixed / GB,
            "learner_sharded": learner_m.sharded / GB,
        },
        memory=memory,
    )


# ----------------------------------------------------------------------------------------------- memory

GB = 1e9  # the tables print GB = 1e9 bytes; a GPU's "80 GB" is taken as 80e9 bytes (an 80 GB H100 holds
# ~85.9e9, ~79 GiB usable after the CUDA context: the difference is the planner's margin)
# Activation model, per token per hidden unit per transformer block (bytes, bf16, eager PyTorch, SDPA
# attention: no n² term). 56 B is calibrated on the SD3.5-Medium H200 rows of benchmarks/results/gpu.json
# (micro batch 1/2/4 without checkpointing: +9.6 GiB per image of 4 V-GRPO forwards x 1229 tokens x 1536 x
# 24 blocks = 57 B); Korthikanti et al. 2022 count 34 B for a fused Megatron layer (15 attention + norms,
# 19 for a 4d MLP), the floor. The MLP share scales with the FFN width, and a cross-attention adds 6 B.
ACT_BYTES = 56.0
# with activation checkpointing (diffusers' per-block checkpoint): each block's bf16 input (2 B) stays, plus
# ~8 B a token-hidden outside the blocks (embeddings, final layer, the loss's tensors); during the backward
# one block of one forward of the micro batch is recomputed with its full 56 B (calibrated on the same
# file's checkpointed rows: micro batch 8 -> 8.85 GiB, 24 -> 16.5 GiB measured, 8.9 / 17.3 GiB modelled)
ACT_CKPT_BYTES, ACT_CKPT_EXTRA = 2.0, 8.0
INFER_BYTES = 32.0  # sampling (no graph): the live tensors of one block, per token per hidden unit
VAE_BYTES_PER_PIXEL = 2048.0  # decoding: ~0.5 GiB per 512x512 image (gpu.json's rollout rows' slope)
OVERHEAD = 1.0 * GB  # CUDA context, NCCL buffers, allocator slack per GPU process
ZERO3_LIVE_PARAMS = 1e9  # DeepSpeed's stage3_max_live_parameters: parameters gathered at once under ZeRO-3
REWARD_GB = 4.0  # a reward replica on a GPU (the largest, GenEval's Mask2Former + CLIP ViT-L, ~3 GB)
ADAM_BYTES = 12  # fp32 master weights + Adam's two moments per trainable parameter (ZeRO's K = 12)
OFFLOAD_GRAD_BYTES = 4  # ZeRO-Offload keeps fp32 gradients beside the host optimiser
ACCELERATOR_MEMORY_GB = {"H200": 141.0, "H100": 80.0, "A100": 80.0, "B200": 180.0, "L40S": 48.0, "A10G": 24.0}
PARTS = ("weights", "gradients", "optimizer", "activations", "overhead")


def lora_params(cfg: RunConfig, arch: Arch) -> tuple[float, list[str]]:
    """LoRA parameters: rank x (d_in + d_out) for every linear a target module names (matched as peft
    does: the module's path equals the target or ends with "." + target), and notes on targets that match
    nothing in the table. SD3 (no table): the attention projections of every block, d x d each."""
    lora = cfg.model.lora
    if lora is None:
        return 0.0, []
    from vgrpo.core.families import FAMILIES

    # model.lora.target_modules None: the family's own targets (core/families/*.py lora_targets)
    targets = list(lora.target_modules or FAMILIES.get(arch.family, FAMILIES["sd3"]).lora_targets)
    if not arch.linears:  # SD3: 8 projections per joint block + 4 in each dual (attn2) block
        d, L = arch.hidden, arch.layers
        n_proj = len(targets)
        return float(lora.rank * 2 * d * (n_proj * L + 4 * arch.dual_layers)), []
    total, unmatched = 0.0, []
    for t in targets:
        hits = [(i, o, c) for path, i, o, c in arch.linears if path == t or path.endswith("." + t)]
        if not hits:
            unmatched.append(t)
        total += sum(lora.rank * (i + o) * c for i, o, c in hits)
    notes = []
    if unmatched:
        notes.append(f"LoRA targets {', '.join(unmatched)} match no linear of {arch.name} (not counted)")
    return total, notes


@dataclass
class RoleMemory:
    """One role's memory on one of its GPUs. Each part is [fixed bytes, bytes sharded over the role's
    ranks]: on one of n ranks a part takes fixed + sharded / n (ZeRO shards; 0 for the other roles).
    ``host``: what offload moves to the host, per rank, in the same form."""

    role: str
    parts: dict[str, list[float]] = field(default_factory=lambda: {p: [0.0, 0.0] for p in PARTS})
    host: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, part: str, fixed: float = 0.0, sharded: float = 0.0) -> None:
        self.parts[part][0] += fixed
        self.parts[part][1] += sharded

    def add_host(self, part: str, sharded: float) -> None:
        self.host.setdefault(part, [0.0, 0.0])[1] += sharded

    def at(self, ranks: int = 1) -> dict[str, float]:
        """Bytes of each part on one GPU of ``ranks``."""
        return {k: f + s / max(1, ranks) for k, (f, s) in self.parts.items()}

    def total(self, ranks: int = 1) -> float:
        return sum(self.at(ranks).values())

    def host_total(self, ranks: int = 1) -> float:
        return sum(f + s / max(1, ranks) for f, s in self.host.values())

    @property
    def fixed(self) -> float:
        return sum(f for f, _ in self.parts.values())

    @property
    def sharded(self) -> float:
        return sum(s for _, s in self.parts.values())

    def min_ranks(self, capacity: float) -> int | None:
        """The fewest ranks on which one rank fits ``capacity`` bytes (None: no count does)."""
        if self.fixed >= capacity:
            return None
        if self.sharded <= 0:
            return 1
        return max(1, math.ceil(self.sharded / (capacity - self.fixed) - 1e-9))

    def to_json(self) -> dict[str, Any]:
        return {"role": self.role, "parts": self.parts, "host": self.host, "notes": self.notes}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoleMemory:
        m = cls(str(data.get("role", "")))
        for k, v in (data.get("parts") or {}).items():
            m.parts[k] = [float(v[0]), float(v[1])]
        m.host = {k: [float(v[0]), float(v[1])] for k, v in (data.get("host") or {}).items()}
        m.notes = list(data.get("notes") or [])
        return m


def _weight_bytes(cfg: RunConfig) -> int:
    return 4 if cfg.learner.precision == "float32" else 2


def uses_ref(cfg: RunConfig) -> bool:
    """Whether the objective keeps a frozen reference policy (learner/objectives: DGPO always; V-GRPO with
    ref_kl_beta > 0; Flow-GRPO, its windowed variants and DiffusionNFT with kl_beta > 0)."""
    a = cfg.algorithm
    if a.name == "dgpo":
        return True
    if a.name == "vgrpo":
        return a.vgrpo.ref_kl_beta > 0
    return float(getattr(a.params(), "kl_beta", 0.0)) > 0


def grad_forwards(cfg: RunConfig, arch: Arch) -> tuple[int, int, str]:
    """(forwards whose graphs one micro step holds until its backward, x2 when those forwards carry CFG's
    unconditional half, as one doubled batch) per image: every objective sums its per-time losses before
    one backward (learner/objectives/*.py)."""
    a, n_steps = cfg.algorithm, cfg.rollout.num_steps
    cfg_x = cfg_forwards(cfg, arch)
    if a.name == "vgrpo":
        g = cfg_x if a.vgrpo.guided_training else 1
        return (
            a.vgrpo.n_mc,
            g,
            f"V-GRPO: {a.vgrpo.n_mc} (t, eps) pairs" + (" with CFG (x2)" if g == 2 else ""),
        )
    if a.name == "dgpo":
        m = min(a.dgpo.num_timesteps, a.dgpo.trunc_steps + 1, n_steps)
        return m, 1, f"DGPO: {m} grid times"
    if a.name == "flow_grpo":
        n = max(1, int(n_steps * a.flow_grpo.timestep_fraction))
        return n, cfg_x, f"Flow-GRPO: {n} SDE steps" + (" with CFG (x2)" if cfg_x == 2 else "")
    if a.name in ("flow_grpo_fast", "mixgrpo"):
        w = (a.flow_grpo_fast if a.name == "flow_grpo_fast" else a.mixgrpo).sde_window_size
        return w, cfg_x, f"{a.name}: {w} window steps" + (" with CFG (x2)" if cfg_x == 2 else "")
    n = max(1, int(n_steps * a.nft.timestep_fraction))
    return n, 1, f"DiffusionNFT: {n} grid times"


def micro_images(cfg: RunConfig) -> int:
    """Images in one learner micro step: whole prompt groups, at least one (learner/engine.py:
    micro_groups = max(1, micro_batch_size // group_size)), so G bounds it from below."""
    g = cfg.rollout.group_size
    return max(1, cfg.learner.micro_batch_size // g) * g


def _act_scale(arch: Arch) -> float:
    """ACT_BYTES' attention/MLP split (15 + 19 of Korthikanti's 34) rescaled to this block's MLP width and
    cross-attention."""
    return (15 + 19 * arch.ffn_width / (4 * arch.hidden) + (6 if arch.cross_attention else 0)) / 34


def learner_activations(cfg: RunConfig, arch: Arch, checkpointing: bool | None = None) -> tuple[float, str]:
    """Bytes of one micro step's activations and how they were counted."""
    ckpt = cfg.learner.activation_checkpointing if checkpointing is None else checkpointing
    shape = shape_of(cfg, arch)
    b = micro_images(cfg)
    f, g, why = grad_forwards(cfg, arch)
    n = block_tokens(arch, shape)
    d, blocks = arch.hidden, arch.blocks
    per_layer = ACT_BYTES * _act_scale(arch)
    if ckpt:
        kept = b * f * g * n * d * (ACT_CKPT_BYTES * blocks + ACT_CKPT_EXTRA)
        acts = kept + b * g * n * d * per_layer
        how = (
            f"activation checkpointing: {ACT_CKPT_BYTES:g} B x {blocks} blocks + {ACT_CKPT_EXTRA:g} B kept "
            f"per token per hidden unit, + one block's {per_layer:.0f} B while it is recomputed"
        )
    else:
        acts = b * f * g * n * d * blocks * per_layer
        how = f"no checkpointing: {per_layer:.0f} B per token per hidden unit x {blocks} blocks"
    desc = f"activations: micro step {b} samples x {f * g} forwards ({why}) x {n} tokens x d {d}; {how}"
    return acts, desc


def learner_memory(cfg: RunConfig, arch: Arch, checkpointing: bool | None = None) -> RoleMemory:
    """One learner rank's memory as a function of the rank count (RoleMemory.at), ZeRO's accounting:
    per trainable parameter 2 B bf16 weight + 2 B gradient + 12 B Adam (fp32 master + 2 moments); ZeRO-1
    shards the 12 B, ZeRO-2 also the gradient, ZeRO-3 also the weights (with LoRA, the frozen base too)
    and gathers up to stage3_max_live_parameters at a time. offload_optimizer moves the 12 B (and fp32
    gradients) to the host, offload_params the ZeRO-3 weight shards. Full fine-tuning also holds the old
    policy (and, when the objective uses one, the reference) as whole frozen copies outside DeepSpeed."""
    lc = cfg.learner
    s, wb = lc.zero_stage, _weight_bytes(cfg)
    m = RoleMemory("learner")
    if cfg.model.lora is not None:
        trainable, notes = lora_params(cfg, arch)
        m.notes += notes
        module = arch.params + 2 * trainable  # frozen base + trained adapter + the frozen old adapter
    else:
        trainable = arch.params
        module = arch.params
        copies = 1 + int(uses_ref(cfg))
        m.add("weights", fixed=copies * wb * arch.params)
        m.notes.append(
            f"full fine-tuning: the old policy{' and the reference' if copies == 2 else ''} kept as "
            f"{copies} whole frozen {'bf16' if wb == 2 else 'fp32'} cop{'ies' if copies == 2 else 'y'} "
            f"({copies * wb * arch.params / GB:.1f} GB, not sharded)"
        )
    if s == 3:
        live = wb * min(module, ZERO3_LIVE_PARAMS)
        m.add("weights", fixed=live)
        if lc.offload_params:
            m.add_host("weights", wb * module)
        else:
            m.add("weights", sharded=wb * module)
    else:
        m.add("weights", fixed=wb * module)
    grads = wb * trainable
    m.add("gradients", **({"sharded": grads} if s >= 2 else {"fixed": grads}))
    adam = ADAM_BYTES * trainable
    if lc.offload_optimizer:
        m.add_host("optimizer", adam + OFFLOAD_GRAD_BYTES * trainable)
    else:
        m.add("optimizer", **({"sharded": adam} if s >= 1 else {"fixed": adam}))
    acts, desc = learner_activations(cfg, arch, checkpointing)
    m.add("activations", fixed=acts)
    m.add("overhead", fixed=OVERHEAD)
    what = f"LoRA r{cfg.model.lora.rank}" if cfg.model.lora is not None else "full fine-tuning"
    m.notes.insert(0, f"{what}: {_count(trainable)} trainable of {_count(arch.params)} parameters")
    m.notes.append(desc)
    return m


def rollout_memory(cfg: RunConfig, arch: Arch) -> RoleMemory:
    """A rollout worker: the pipeline's bf16 weights (transformer + text encoders + VAE; LoRA adapters
    are negligible) and the larger of a sampler step over rollout.batch_size samples (x2 with CFG) and
    the VAE decode of that batch."""
    m = RoleMemory("rollout")
    m.add("weights", fixed=2 * (arch.params + arch.text_encoder_params + arch.vae_params))
    shape = shape_of(cfg, arch)
    b = cfg.rollout.batch_size
    step = (
        b * cfg_forwards(cfg, arch) * block_tokens(arch, shape) * arch.hidden * INFER_BYTES * _act_scale(arch)
    )
    window = min(shape.frames, arch.vae_window_frames)
    decode = b * shape.height * shape.width * window * VAE_BYTES_PER_PIXEL
    m.add("activations", fixed=max(step, decode))
    m.add("overhead", fixed=OVERHEAD)
    m.notes.append(
        f"weights: transformer {_count(arch.params)} + text encoders {_count(arch.text_encoder_params)} "
        f"+ VAE {_count(arch.vae_params)} params in bf16; activations: max(sampler step "
        f"{step / GB:.1f} GB, VAE decode {decode / GB:.1f} GB) at batch {b}"
    )
    return m


def reward_memory(cfg: RunConfig) -> RoleMemory:
    m = RoleMemory("reward")
    m.add("weights", fixed=REWARD_GB * GB)
    m.notes.append(f"a reward replica: ~{REWARD_GB:g} GB (the reward models are at most ~1 B parameters)")
    return m


def memory_of(cfg: RunConfig, arch: Arch) -> dict[str, RoleMemory]:
    return {
        "rollout": rollout_memory(cfg, arch),
        "reward": reward_memory(cfg),
        "learner": learner_memory(cfg, arch),
    }


def _count(x: float) -> str:
    return f"{x / 1e9:.2f} B" if x >= 1e8 else f"{x / 1e6:.2f} M"


def _gb(x: float) -> str:
    return f"{x / GB:.1f}"


def memory_table(
    mem: dict[str, RoleMemory], counts: dict[str, int], capacity: dict[str, float], title: str
) -> list[str]:
    """The per-role table: bytes on one GPU of each role, against what one GPU of it holds."""
    lines = [
        title,
        f"  {'role':<10}{'GPUs':>5}{'weights':>9}{'grads':>8}{'optim':>8}{'activ.':>8}{'other':>7}{'total':>8}   of GPU      host/rank",
    ]
    for role, m in mem.items():
        n = counts.get(role, 1)
        at = m.at(n)
        cap = capacity.get(role, 0.0)
        tot = m.total(n)
        of = f"{tot / cap:>4.0%} of {cap / GB:g}" if cap else "(CPU)"
        host = m.host_total(n)
        lines.append(
            f"  {role:<10}{n:>5}{_gb(at['weights']):>9}{_gb(at['gradients']):>8}{_gb(at['optimizer']):>8}"
            f"{_gb(at['activations']):>8}{_gb(at['overhead']):>7}{_gb(tot):>8}   {of:<11} "
            f"{_gb(host) if host else '-'}"
        )
    return lines


def learner_whatifs(cfg: RunConfig, arch: Arch) -> dict[str, RoleMemory]:
    """The learner's memory under each fix that applies to this config (the refusal quotes them)."""
    lc = cfg.learner
    out: dict[str, RoleMemory] = {}

    def alt(label: str, model: Any = None, **learner: Any) -> None:
        update: dict[str, Any] = {"learner": lc.model_copy(update=learner)}
        if model is not None:
            update["model"] = model
        out[label] = learner_memory(cfg.model_copy(update=update), arch)

    if lc.zero_stage < 3:
        alt("learner.zero_stage=3", zero_stage=3)
    if not lc.offload_optimizer:
        stage = max(1, lc.zero_stage)
        alt(
            "learner.offload_optimizer=true" + (f" (zero_stage {stage})" if stage != lc.zero_stage else ""),
            offload_optimizer=True,
            zero_stage=stage,
        )
    if not (lc.zero_stage == 3 and lc.offload_optimizer and lc.offload_params):
        alt(
            "learner.zero_stage=3 + offload_optimizer + offload_params",
            zero_stage=3,
            offload_optimizer=True,
            offload_params=True,
        )
    if not lc.activation_checkpointing:
        alt("learner.activation_checkpointing=true", activation_checkpointing=True)
    if cfg.model.lora is None:
        alt(
            "LoRA (model.lora, r16 on the attention projections)",
            model=cfg.model.model_copy(update={"lora": LoraConfig()}),
        )
    return out


def fixes_for(
    base: RoleMemory, whatifs: dict[str, RoleMemory], ranks: int, capacity: float, group: int
) -> list[str]:
    """The fixes for a learner that does not fit: more ranks where ZeRO's shards would then fit, each
    what-if with the bytes a rank would then need, and a smaller group (the micro step's floor)."""
    out = []
    more = base.min_ranks(capacity)
    if more is not None and more > ranks:
        out.append(f"more learner ranks (>= {more})")
    # the fixes that fit first, least memory first
    for label, m in sorted(
        whatifs.items(), key=lambda kv: (kv[1].total(ranks) > capacity, kv[1].total(ranks))
    ):
        need = m.total(ranks)
        out.append(f"{label} (-> {need / GB:.1f} GB{'' if need <= capacity else ', still too much'})")
    out.append(
        f"less activation memory a micro step: a smaller rollout.group_size (a micro step is whole groups: "
        f"{group} samples now), fewer tokens a sample (rollout.height / width, model.frames) or fewer "
        "forwards a sample (e.g. algorithm.vgrpo.n_mc)"
    )
    return out


def refusal(role: str, need: float, capacity: float, what: str, fixes: list[str]) -> str:
    return (
        f"the {role} needs {need / GB:.1f} GB per GPU ({need:,.0f} bytes{what}) and a GPU has "
        f"{capacity / GB:g} GB ({capacity:,.0f} bytes); fix: " + "; or ".join(fixes)
    )


@dataclass
class MemoryCheck:
    """`vgrpo train --dry-run`'s memory check: the table, and why it does not fit ("" when it does)."""

    lines: list[str]
    problem: str = ""

    @property
    def fits(self) -> bool:
        return not self.problem


def gpu_memory_of(nodes: list[dict[str, float]] | None) -> tuple[float, str]:
    """GB per GPU of a --resources description: its gpu_memory_gb, else an accelerator_type:X resource
    Ray reports, else 80 (assumed)."""
    for node in nodes or []:
        if node.get("gpu_memory_gb"):
            return float(node["gpu_memory_gb"]), "gpu_memory_gb"
    for node in nodes or []:
        for key in node:
            if key.startswith("accelerator_type:"):
                kind = key.split(":", 1)[1].upper()
                for name, gb in ACCELERATOR_MEMORY_GB.items():
                    if name in kind:
                        return gb, key
    return 80.0, "assumed, --resources gpu_memory_gb sets it"


def _replicas(cfg: RunConfig, name: str) -> int:
    s = cfg.reward.server(name)
    return max(1, s.min_replicas) if s.num_replicas == "auto" else int(s.num_replicas)


def memory_check(cfg: RunConfig, nodes: list[dict[str, float]] | None = None) -> MemoryCheck:
    """The configured roles' memory on their GPUs (learner.num_ranks ranks, rollout.batch_size, ...):
    the table and, when a role does not fit, the refusal naming the role, the bytes and the fixes. Roles
    on CPUs are not checked. Reads no model file when model.family is set; a model whose numbers are
    unknown gives a note, not a refusal."""
    lc, r = cfg.learner, cfg.rollout
    gpu_roles = {"rollout": r.gpus_per_worker, "learner": lc.gpus_per_rank}
    on_gpu = [n for n in cfg.reward.weights if cfg.reward.server(n).gpus > 0]
    gpu_roles["reward"] = min((cfg.reward.server(n).gpus for n in on_gpu), default=0.0)
    if not any(g > 0 for g in gpu_roles.values()):
        return MemoryCheck(["memory: every role runs on CPUs (not checked)"])
    try:
        arch = arch_of(cfg)
    except PlanError as e:
        return MemoryCheck([f"memory: not estimated ({e})"])
    gb, where = gpu_memory_of(nodes)
    mem = memory_of(cfg, arch)
    replicas = sum(math.ceil(cfg.reward.server(n).gpus * _replicas(cfg, n)) for n in on_gpu)
    counts = {"rollout": r.num_workers, "reward": replicas, "learner": lc.num_ranks}
    # a fraction of a GPU holds that fraction of its memory; a whole GPU or more, one GPU's (no model parallelism)
    capacity = {k: min(1.0, g) * gb * GB for k, g in gpu_roles.items() if g > 0}
    title = f"memory per GPU ({arch.name}, {arch.source}; GB = 1e9 bytes; {gb:g} GB GPUs: {where}):"
    roles = [k for k in ("rollout", "reward", "learner") if k in capacity]
    lines = memory_table({k: mem[k] for k in roles}, counts, capacity, title)
    cpu = [k for k in ("rollout", "reward", "learner") if k not in capacity]
    if cpu:
        lines.append(f"  on CPUs (not checked): {', '.join(cpu)}")
    lines += [
        f"  {role}: {n}" for role in ("rollout", "learner") if role in capacity for n in mem[role].notes
    ]
    problems = []
    for role in ("rollout", "reward", "learner"):
        if role not in capacity:
            continue
        need = mem[role].total(counts[role])
        if need <= capacity[role]:
            continue
        if role == "learner":
            fixes = fixes_for(
                mem[role], learner_whatifs(cfg, arch), lc.num_ranks, capacity[role], micro_images(cfg)
            )
            what = f" at ZeRO-{lc.zero_stage} over {lc.num_ranks} rank(s)"
        elif role == "rollout":
            fixes = ["a smaller rollout.batch_size", "GPUs with more memory (gpu_memory_gb)"]
            what = ""
        else:
            fixes = ["reward.servers.<name>.gpus of a whole GPU"]
            what = ""
        problems.append(refusal(role, need, capacity[role], what, fixes))
    return MemoryCheck(lines, " | ".join(problems))


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


def images_each(work: Workload, n: int) -> int:
    """Images one of n rollout workers / learner ranks handles per step (whole groups by default)."""
    if work.granularity == "image":
        return math.ceil(work.images / n)
    return math.ceil(work.prompts / n) * work.group_size


def allreduce_s(costs: Costs, cluster: Cluster, ranks: int) -> float:
    if ranks <= 1 or costs.grad_bytes <= 0:
        return 0.0
    bw = cluster.intra_node_gbps if ranks <= cluster.devices_per_node else cluster.inter_node_gbps
    return 2 * (ranks - 1) / ranks * costs.grad_bytes / (bw * 1e9)


def reward_units(reward_device: str, split: Split, cluster: Cluster) -> int:
    """How many units score a step's images in parallel: the reward's devices; on a GPU cluster a CPU
    reward's free CPUs (one per GPU actor taken); on a CPU machine a reward without devices of its own
    shares the cores with the other roles (one unit, the phases' times add up)."""
    if reward_device == "cpu" and cluster.kind == "GPU":
        cpus = cluster.cpus if cluster.cpus is not None else 8 * cluster.devices
        return max(1, cpus - split.rollout - split.learner)  # one CPU per GPU actor
    if split.reward < 1 and cluster.kind == "CPU":
        return 1
    if split.reward < 1:
        raise PlanError("this reward runs on the devices: a split needs at least 1 reward device")
    return split.reward


def predict(costs: Costs, work: Workload, split: Split, cluster: Cluster) -> Prediction:
    """Seconds per step of one split under the driver's pipeline (module docstring)."""
    if split.rollout < 1 or split.learner < 1:
        raise PlanError("a split needs at least 1 rollout and 1 learner device")
    t_roll = images_each(work, split.rollout) * costs.rollout
    units = reward_units(costs.reward_device, split, cluster)
    t_rew = math.ceil(work.images / units) * costs.reward
    t_learn = images_each(work, split.learner) * costs.learner + allreduce_s(costs, cluster, split.learner)
    t_sync = costs.weight_sync
    cap = cluster.capacity
    if cap:  # time-shared devices: n busy actors run at most cap / n of full speed
        work_s = split.rollout * t_roll + split.learner * t_learn + t_rew * min(units, cap)
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
    learner_memory: str = "learner"  # which of costs.memory's learner models the plan fits
    memory_notes: list[str] = field(default_factory=list)

    @property
    def idle(self) -> int:
        return self.cluster.devices - self.best.split.total


def _memory_fit(costs: Costs, cluster: Cluster, need: dict[str, int]) -> tuple[int, str, list[str]]:
    """(least learner ranks, the learner model used, notes) from costs.memory, or InfeasibleError naming
    the role, the bytes and the fixes. A learner that fits only with activation checkpointing is planned
    with it, and the note says to set it."""
    mem = costs.memory
    cap = cluster.memory_gb * GB
    for role in ("rollout", "reward"):
        if role == "reward" and need["reward"] == 0:
            continue
        m = RoleMemory.from_json(mem[role])
        if m.total() > cap:
            fix = "a smaller rollout.batch_size" if role == "rollout" else "a smaller reward model"
            raise InfeasibleError(
                refusal(role, m.total(), cap, "", [fix, "GPUs with more memory (--resources gpu_memory_gb)"])
            )
    ranks_max = max(1, cluster.devices - need["rollout"] - need["reward"])
    base = RoleMemory.from_json(mem["learner"])
    n = base.min_ranks(cap)
    if n is not None and n <= ranks_max:
        return n, "learner", []
    whatifs = {k: RoleMemory.from_json(v) for k, v in mem.get("learner_if", {}).items()}
    ckpt = whatifs.get("learner.activation_checkpointing=true")
    n2 = ckpt.min_ranks(cap) if ckpt is not None else None
    if ckpt is not None and n2 is not None and n2 <= ranks_max:
        mem["learner_planned"] = ckpt.to_json()
        note = (
            f"the learner as configured needs {base.total(ranks_max) / GB:.1f} GB a rank even over "
            f"{ranks_max} ranks (a micro step holds {mem.get('micro_images', '?')} images' activations); "
            "PLANNED WITH activation checkpointing: set learner.activation_checkpointing=true (the measured "
            "learner utilisation already includes its recompute)"
        )
        return n2, "learner_planned", [note]
    fixes = fixes_for(base, whatifs, ranks_max, cap, int(mem.get("micro_images", 0)))
    raise InfeasibleError(
        refusal(
            "learner",
            base.total(ranks_max),
            cap,
            f" at ZeRO-{mem.get('zero_stage', '?')} over {ranks_max} rank(s), all the GPUs left",
            fixes,
        )
    )


def min_devices(costs: Costs, cluster: Cluster) -> dict[str, int]:
    """The least devices per role: 1 each (a CPU reward on a GPU cluster needs none), more learner ranks
    when ZeRO must shard the learner's state over more ranks to fit a device's memory."""
    # a CPU reward beside a GPU cluster takes no GPU; on a CPU-only machine it may share the cores
    shared = costs.reward_device == "cpu" or cluster.kind == "CPU"
    need = {"rollout": 1, "reward": 0 if shared else 1}
    need["learner"] = 1
    if costs.memory and cluster.kind == "GPU":
        need["learner"] = _memory_fit(costs, cluster, need)[0]
        return need
    mem = costs.memory_gb  # costs from a JSON without the per-role model: the totals alone
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
    plan = Plan(ranked[0], ranked, cluster, work, costs)
    if costs.memory and cluster.kind == "GPU":
        _, plan.learner_memory, plan.memory_notes = _memory_fit(costs, cluster, need)
    return plan


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
        "rollout": f"{images_each(w, b.split.rollout) // w.group_size} prompt group(s) x G={w.group_size} each"
        if w.granularity == "prompt"
        else f"{images_each(w, b.split.rollout)} images each",
        "reward": f"{math.ceil(w.images / max(1, b.split.reward))} images each",
        "learner": f"{images_each(w, b.split.learner) // w.group_size} group(s) each, one DeepSpeed ZeRO group"
        if w.granularity == "prompt"
        else f"{images_each(w, b.split.learner)} images each",
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
    lines += memory_lines(plan)
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


def memory_lines(plan: Plan) -> list[str]:
    """The plan's memory table (GPU clusters, estimated costs): each role on one of its GPUs."""
    c, k, b = plan.costs, plan.cluster, plan.best
    if not c.memory or k.kind != "GPU":
        return []
    roles = ["rollout", "learner"] if c.reward_device == "cpu" else ["rollout", "reward", "learner"]
    mem = {r: RoleMemory.from_json(c.memory[plan.learner_memory if r == "learner" else r]) for r in roles}
    counts = {"rollout": b.split.rollout, "reward": b.split.reward, "learner": b.split.learner}
    capacity = {r: k.memory_gb * GB for r in roles}
    lines = [""]
    lines += memory_table(
        mem, counts, capacity, f"memory per GPU (estimated; GB = 1e9 bytes, GPU {k.memory_gb:g} GB):"
    )
    lines += [f"  {r}: {n}" for r in ("rollout", "learner") for n in mem[r].notes]
    lines += [f"note: {n}" for n in plan.memory_notes]
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
