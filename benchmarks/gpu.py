"""In-process GPU figures for SD3.5-Medium (issue 10, item 7), with no Ray and no DeepSpeed.

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
from vgrpo.core.families import TextCond
from vgrpo.core.flow import ode_sample, sd3_sigmas
from vgrpo.learner.engine import LearnerPolicy
from vgrpo.learner.objectives.base import TrainBatch
from vgrpo.learner.objectives.vgrpo import VGRPO
from vgrpo.proto.config import LoraConfig, VGRPOConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- benchmarks/gpu.py:begin -->", "<!-- benchmarks/gpu.py:end -->"

from vgrpo.model_configs import SD35_VAE, SD35M_TRANSFORMER  # noqa: E402

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


def build_transformer(config: dict, device: torch.device, seed: int = 0) -> Any:
    """SD3Transformer2DModel from a config with random weights (initialised on ``device``), in bf16."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model: Any = SD3Transformer2DModel(**config)
    return model.to(device=device, dtype=torch.bfloat16).eval().requires_grad_(False)  # buffers too


def build_vae(config: dict, device: torch.device, seed: int = 0) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    with torch.device(device):
        vae: Any = AutoencoderKL(**config)
    return vae.to(device=device, dtype=torch.bfloat16).eval().requires_grad_(False)


def random_cond(b: int, text_len: int, config: dict, device: torch.device, seed: int = 0) -> TextCond:
    """A conditioning of the shapes ``encode_prompts`` returns: joint tokens (B, L, D), pooled (B, P)."""
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(b, text_len, int(config["joint_attention_dim"]), generator=g)
    pooled = torch.randn(b, int(config["pooled_projection_dim"]), generator=g)
    return TextCond(embeds.to(device, torch.bfloat16), pooled.to(device, torch.bfloat16))


def rollout_batch(
    transformer: Any,
    vae: Any,
    cond: tuple[torch.Tensor, torch.Tensor],
    seeds: list[int],
    sigmas: torch.Tensor,
    image: int,
    guidance: float = 1.0,
    uncond: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, Any, float, float]:
    """One batch as ``RolloutEngine.sample`` runs it (``image`` pixels a side, VAE factor 8); returns
    latents (host, fp32), uint8 images, sampling seconds, decode seconds."""
    device = transformer.device
    shape_chw = (int(transformer.config.in_channels), image // 8, image // 8)
    v_fn = lambda x, s: P.guided_velocity(transformer, x, s, cond, guidance, uncond)  # noqa: E731

    sync(device)
    t0 = time.perf_counter()
    x1 = P.initial_noise(list(seeds), shape_chw).to(device)
    latents = ode_sample(v_fn, x1, sigmas, solver="dpm2").float().cpu()
    t1 = time.perf_counter()
    images = P.decode_latents(vae, latents)
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
        self.module = build_transformer(preset["transformer"], device, seed)
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
        side = int(self.preset["image"]) // 8
        g = torch.Generator().manual_seed(seed)
        where = torch.device("cpu") if self.host_batch else self.device
        text = random_cond(b, int(self.preset["text_len"]), cfg, self.device, seed)
        return TrainBatch(  # the layout LearnerEngine._to_batch builds (one prompt group per micro step)
            latents_bchw=torch.randn(b, int(cfg["in_channels"]), side, side, generator=g).to(where),
            cond=text,
            group_ids_b=torch.zeros(b, dtype=torch.long).to(where),
            advantages_b=torch.randn(b, generator=g).to(where),
            sigmas=sd3_sigmas(10, shift=float(self.preset["shift"])),
            shift=float(self.preset["shift"]),
        )

    def _policy(self, off_policy: bool) -> Any:
        policy = LearnerPolicy(self.module)
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


def attention_flops(config: dict, t_img: int, t_txt: int) -> int:
    """Analytic forward attention FLOPs of one image: QK^T and PV, 2·T²·D each, per attention."""
    d = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
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
    """The docs section of a run: where it ran, FLOPs per image, then one table per figure."""
    m, f = data["meta"], data.get("flops", {})
    lines = [
        f"Measured {m.get('date', '?')} on **{m.get('device_name', '?')}** ({m.get('mode')}), torch "
        f"{m.get('torch')}, diffusers {m.get('diffusers')}, peft {m.get('peft')}; "
        f"{m.get('model')}, {m.get('image')}² images, {m.get('text_len')} text tokens, LoRA r{m['lora']['rank']}/"
        f"α{m['lora']['alpha']:g}, V-GRPO N_MC {m.get('n_mc')}. MFU against {m.get('peak_tflops'):g} TFLOP/s "
        "dense bf16.",
        "",
        f"FLOPs per image ({f.get('method', '?')}): transformer forward "
        f"{_fmt(f.get('transformer_forward_gflop'), '.4g')} GFLOP, VAE decode {_fmt(f.get('vae_decode_gflop'), '.4g')}"
        f" GFLOP, learner step (loss + backward, N_MC {m.get('n_mc')}) {_fmt(f.get('learner_step_gflop'), '.4g')}"
        " GFLOP.",
        "",
        "| rollout batch | steps | CFG | images/s | s/batch | decode s | peak GiB | MFU |",
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
        "| learner micro batch | activation ckpt | old-adapter forwards | images/s | s/step | peak GiB | MFU |",
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


def update_docs(text: str, section: str) -> str:
    """Replace what lies between the markers (kept), or append a GPU section holding them."""
    block = f"{BEGIN}\n{section}{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1]
    return text.rstrip("\n") + "\n\n## GPU\n\n" + block + "\n"


def write_docs(path: Path, data: dict) -> None:
    old = path.read_text() if path.is_file() else "# Benchmarks\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(update_docs(old, render_markdown(data)))
    print(f"updated {path}")


# ------------------------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> dict:
    import diffusers
    import peft

    smoke = bool(args.cpu_smoke)
    preset = CPU_PRESET if smoke else GPU_PRESET
    device = torch.device("cpu") if smoke else torch.device("cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or --cpu-smoke here")
    t_start = time.perf_counter()
    over = lambda: time.perf_counter() - t_start > args.budget_s  # noqa: E731
    cfg, image = preset["transformer"], int(preset["image"])
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
        "model": "tiny SD3 (2 layers)"
        if smoke
        else "SD3.5-Medium-shaped SD3Transformer2DModel, random weights",
        "transformer_config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "image": image,
        "text_len": int(preset["text_len"]),
        "lora": preset["lora"],
        "n_mc": int(preset["n_mc"]),
        "sampler": "dpm2 (DPM-Solver++(2M) ODE), shift 3.0",
        "precision": "rollout: bf16 weights and LoRA; learner: bf16 base, fp32 LoRA, bf16 autocast",
        "peak_tflops": args.peak_tflops,
        "notes": [],
    }
    report = Report(args.json, meta)
    peak = args.peak_tflops * 1e12
    t_img, t_txt = (image // 16) ** 2, int(preset["text_len"])

    # -------- rollout side: transformer (then full-weight extract/apply, then LoRA), VAE
    print(f"building transformer on {device} ...", flush=True)
    rollout_tf = build_transformer(cfg, device, seed=0)
    vae = build_vae(preset["vae"], device, seed=1)
    report.data["params"]["transformer"] = sum(p.numel() for p in rollout_tf.parameters())

    full_rows = weight_roundtrip(rollout_tf, rollout_tf, device, int(preset["full_weight_repeats"]), "full")
    report.add("weights", full_rows)
    add_lora(rollout_tf, LoraConfig(**preset["lora"]), seed=0)
    rollout_tf.requires_grad_(False)

    # FLOPs of one image: a transformer forward and a VAE decode
    cond1 = random_cond(1, t_txt, cfg, device)
    x1 = torch.randn(1, int(cfg["in_channels"]), image // 8, image // 8, device=device)
    with torch.no_grad():
        fwd, fwd_attn = count_flops(lambda: P.velocity(rollout_tf, x1, torch.full((1,), 0.5), cond1))
        dec, _ = count_flops(lambda: P.decode_latents(vae, x1.cpu()))
    method = "FlopCounterMode, one image"
    if fwd_attn == 0:
        fwd += attention_flops(cfg, t_img, t_txt)
        method += "; attention analytic (no attention kernel seen by the counter)"
    report.data["flops"].update(
        method=method,
        transformer_forward_gflop=fwd / 1e9,
        attention_forward_analytic_gflop=attention_flops(cfg, t_img, t_txt) / 1e9,
        vae_decode_gflop=dec / 1e9,
    )
    report.save()

    rows = [(b, s, 1.0) for s in preset["rollout_steps"] for b in preset["rollout_batches"]]
    rows.append(tuple(preset["cfg_row"]))
    uncond = random_cond(1, t_txt, cfg, device, seed=99)
    warmed: set[int] = set()
    print("rollout ...", flush=True)
    for b, steps, w in rows:
        row: dict[str, Any] = {"batch": b, "steps": steps, "guidance": w}
        if over():
            report.add("rollout", {**row, "error": "skipped (time budget)"})
            continue
        cond = random_cond(b, t_txt, cfg, device, seed=b)
        try:
            with torch.no_grad():
                eff = b * (2 if w != 1.0 else 1)
                if (
                    preset["warmup"] and eff not in warmed
                ):  # kernels and the allocator see this batch shape once
                    rollout_batch(rollout_tf, vae, cond, list(range(b)), sd3_sigmas(2, 3.0), image, w, uncond)
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
                        image,
                        w,
                        uncond,
                    )
                    times.append((t_s + t_d, t_d))
            assert latents.shape == (b, int(cfg["in_channels"]), image // 8, image // 8)
            assert images.shape == (b, image, image, 3) and bool(torch.isfinite(latents).all())
            total, dec_s = min(times)
            flops = b * (steps * fwd * (2 if w != 1.0 else 1) + dec)
            row.update(
                seconds=round(total, 4),
                decode_seconds=round(dec_s, 4),
                images_per_s=round(b / total, 3),
                peak_gib=peak_gib(device),
                tflops=round(flops / total / 1e12, 2),
                mfu=round(flops / total / peak, 4),
            )
        except RuntimeError as e:
            if not is_oom(e):
                raise
            row["error"] = "out of memory"
        reset_peak(device)
        report.add("rollout", row)

    # -------- learner: a second instance (same base weights), LoRA payload to the rollout copy
    print("building learner ...", flush=True)
    learner = Learner(preset, device, seed=0)
    report.data["params"]["lora_trainable"] = sum(p.numel() for p in learner.params)
    report.add("weights", weight_roundtrip(learner.module, rollout_tf, device, 3, "lora"))
    rollout_tf = vae = None  # the learner's peak memory counts its own model only
    reset_peak(device)

    lf, lf_attn = count_flops(lambda: learner.step(1))
    if lf_attn == 0:
        lf += 3 * int(preset["n_mc"]) * attention_flops(cfg, t_img, t_txt)  # forward + 2x in backward
    report.data["flops"]["learner_step_gflop"] = lf / 1e9
    report.save()

    lrows = [(b, False, False) for b in preset["learner_plain"]]
    lrows += [(b, True, False) for b in preset["learner_ckpt"]]
    lrows.append((preset["off_policy_row"][0], preset["off_policy_row"][1], True))
    print("learner ...", flush=True)
    for b, ckpt, off in lrows:
        row = {"micro_batch": b, "checkpointing": ckpt, "off_policy": off}
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
            flops = b * (lf + (int(preset["n_mc"]) * fwd if off else 0))
            row.update(
                seconds=round(sec, 4),
                images_per_s=round(b / sec, 3),
                peak_gib=peak_gib(device),
                loss=loss,
                tflops=round(flops / sec / 1e12, 2),
                mfu=round(flops / sec / peak, 4),
            )
        except RuntimeError as e:
            if not is_oom(e):
                raise
            row["error"] = "out of memory"
            learner.opt.zero_grad(set_to_none=True)
        reset_peak(device)
        report.add("learner", row)
    if learner.note:
        meta["notes"].append(learner.note)
    meta["notes"].append(
        "rollout images/s: sampling + VAE decode of one batch (best of repeats), random prompt embeddings "
        "(text encoders not timed); learner images/s: one micro step (V-GRPO loss, backward, clip, "
        "AdamW) of one prompt group; eager PyTorch, no torch.compile or CUDA graphs"
    )
    meta["seconds"] = round(time.perf_counter() - t_start, 1)
    report.save()
    return report.data


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
        "--json", type=Path, default=None, help="default benchmarks/results/gpu.json (gpu_cpu_smoke.json)"
    )
    ap.add_argument("--docs", type=Path, default=DOCS, help="markdown file whose GPU section is updated")
    ap.add_argument("--no-docs", action="store_true", help="do not touch the docs (default with --cpu-smoke)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--budget-s", type=float, default=360.0, help="rows after this many seconds are skipped")
    args = ap.parse_args(argv)
    if args.from_json is not None:
        data = json.loads(args.from_json.read_text())
    else:
        if args.json is None:
            name = "gpu_cpu_smoke.json" if args.cpu_smoke else "gpu.json"
            args.json = ROOT / "benchmarks" / "results" / name
        if args.cpu_smoke:
            torch.set_num_threads(min(2, torch.get_num_threads()))
        data = run(args)
        print(f"wrote {args.json}")
    print_table(data)
    if args.cpu_smoke and args.from_json is None:
        # exercise the docs rendering without touching the docs: replace, then replace again
        once = update_docs(f"# Benchmarks\n\n## GPU\n\n{BEGIN}\nnothing yet\n{END}\n", render_markdown(data))
        assert update_docs(once, render_markdown(data)) == once and once.count(BEGIN) == 1
        print(f"cpu smoke passed in {data['meta']['seconds']} s (docs section rendered, not written)")
    elif not args.no_docs:
        write_docs(args.docs, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
