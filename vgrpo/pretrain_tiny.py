"""The reproducible pretraining of the tiny SD3 pipeline of the embedded default (its architecture and
builders: `vgrpo/tiny_models.py`).

Pretraining (``pretrain``) has two stages, each with its own seeded RNG streams:

1. the VAE on rendered GenEval-Shapes scenes (random 32 px crops: it is fully convolutional): L1 + L2
   reconstruction, edge- and object-weighted (flat colour shapes on grey: most pixels are background,
   the detector lives on edges and interiors), tiny KL; then ``shift_factor``/``scaling_factor`` from the
   latent statistics (SD3's normalisation);
2. the transformer (adaLN-Zero init) and both text encoders with the rectified-flow loss (docs/algorithms.md
   §1) ``‖v_θ(x_t, t, c) − (ε − x0)‖²``, ``x_t = (1−t)·x0 + t·ε``, ``t`` logit-normal then SD3-shifted,
   on pairs ``(render(scene_for_prompt(p)), p)`` (the training split plus the six single-object captions,
   see :func:`pretraining_prompts`), 10 % caption dropout (CFG possible), constant learning rate and an
   EMA of the weights (the shipped weights are the EMA; with a constant rate, the checkpoint at step N is
   the model of a run with ``flow_steps = N``). Stage 2 may go on in later stages (``then``), each from
   the previous one's EMA weights with its own data and schedule, exactly as separate ``init_from`` runs.

Named recipes (:data:`RECIPES`, ``vgrpo pretrain-tiny --recipe``): ``cpu-hour`` (the default) rebuilds a
model to the spec from scratch on the 2-core CPU in under an hour; ``shipped`` is the seven stages that made
the shipped weights (one on a GPU, see below).

The training mix is skewed to single-object and colour captions, so that the model learns shapes and
colours before composition. The shipped model adds refinement stages (``init_from``) with more knobs:
``layout="slots"`` (scenes in a few fixed layouts, objects 20-28 px: a layout prior a tiny model draws
cleanly); a GPU stage of 5000 steps at batch 256 (``device="cuda"``) that buys multi-object fidelity (0.75
held-out); then ``crowding`` (in 80 % of the multi-object pairs the objects are pulled together until they
merge -- object fusion, a text-to-image classic), the headroom RL has: the model knows every shape and colour
and composes well when it spreads its objects apart, which it does only some of the time. Two other
defects were tried and measured, and are kept as knobs: ``caption_noise`` (a near miss of the caption drawn
instead, by family) and ``washout`` (low-contrast images); CFG at w = 5 removes most of both (a near miss
looks like a true image of another caption, which guidance steers away from; guidance restores contrast),
while a crowded image still shows every object of its caption and keeps its share under guidance. Its
``pretrain.json`` lists the seven stages' commands, times and held-out scores; docs/training.md what RL
does on it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vgrpo.core.flow import interpolate
from vgrpo.core.policy import AutoencoderKL, StableDiffusion3Pipeline
from vgrpo.reward_servers.shapes.spec import BACKGROUND, Scene
from vgrpo.tiny_models import (
    IMAGE_SIZE,
    SCHEDULER_SHIFT,
    build_pipeline,
    save_pipeline,
)


@dataclass
class PretrainConfig:
    """Everything ``pretrain`` reads; the defaults are the first stage of the shipped model's recipe (its
    ``pretrain.json``), the later stages set fields with ``vgrpo pretrain-tiny --set KEY=VALUE``."""

    seed: int = 0
    # stage 1: VAE
    vae_images: int = 8000
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_crop: int = 32  # train on random crops (multiples of the VAE factor), 4x cheaper than 64 px
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    # stage 2: transformer + text encoders
    flow_pairs: int = 16000
    flow_steps: int = 8000
    flow_batch: int = 48
    flow_lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.995
    caption_dropout: float = 0.1
    # prompt-family mix of the training pairs (the headroom knob, see module docstring)
    family_mix: dict[str, float] = field(
        default_factory=lambda: {
            "single_object": 0.25,
            "colors": 0.35,
            "two_object": 0.10,
            "counting": 0.10,
            "color_attr": 0.10,
            "position": 0.10,
        }
    )
    adaln_zero: bool = True  # DiT's adaLN-Zero init of the transformer (see adaln_zero_init)
    # SD3's time shift s for training times, t = s·u / (1 + (s-1)·u) with u ~ logit-normal(0, 1), saved as
    # the scheduler's shift for sampling (more training at high noise, where a small object's layout is set)
    shift: float = SCHEDULER_SHIFT
    heads: int = 3  # transformer width = 32·heads
    layers: int = 4
    patch: int = 2  # latent patch side: 2 -> 64 image tokens, 4 -> 16 (each a 16x16 px cell)
    # objects beyond those the caption names (scene_for_prompt's distractors); 0: captions describe the
    # whole image, a lower-entropy conditional that a tiny model learns faster
    max_distractors: int = 0
    # P(the image of a pair is drawn for a near miss of its caption), by family (shapes.prompts.
    # near_miss_prompt: one object missing, another count or colour, the opposite relation, swapped
    # colours): the base model then knows every object and attribute but follows compositions only some of
    # the time, a choice that RL can sharpen -- as a web-trained model's caption noise leaves SD3.5 on GenEval
    caption_noise: dict[str, float] = field(default_factory=dict)
    # P(the image of a pair is washed out), by family: its colours faded towards the grey background to
    # ``washout_contrast`` of their contrast, as web data holds low-contrast photos; the detector fails on
    # them. Measured (docs/training.md, "Pretraining recipes and knobs"): CFG at w = 5 restores the contrast, so the mode shows
    # only without guidance; not used by the shipped recipe
    washout: dict[str, float] = field(default_factory=dict)
    washout_contrast: float = 0.25
    # P(the objects of a multi-object scene are crowded together), by family: their centres pulled towards
    # their mean by ``crowding_factor`` so that they overlap and merge, as real models fuse objects; the
    # caption's objects are all still there, so CFG keeps the mode while the detector fails on it
    crowding: dict[str, float] = field(default_factory=dict)
    crowding_factor: float = 0.5
    # the side range (px at 64) of the pretraining scenes' objects (the spec's is 12-28)
    sides: tuple[float, float] = (12.0, 28.0)
    # where the pretraining scenes put their objects: "random" (anywhere the spec allows) or "slots"
    # (render.place_in_slots: centred, side by side / stacked, quadrants -- a low-entropy layout prior that
    # a tiny model learns to draw cleanly, as web images' photographic conventions give real models one;
    # "slots_compact": the same with smaller objects)
    layout: str = "random"
    device: str = "cpu"  # stage 2's device (cuda: the same recipe, its own floating-point path)
    checkpoint_every: int = 0  # save the EMA pipeline every N flow steps under out_dir/ckpt_<N> (0: never)
    # one intra-op thread: measured on the shared 2-core machine, 2 threads ran 4-7x SLOWER than 1 when
    # another process held a core (oversubscription); None leaves torch's default
    num_threads: int | None = 1
    # later stages of stage 2, in order: each a dict of the fields that differ from this (the first)
    # stage's -- not cumulative: a stage restates what it shares with the one before. Stage k starts from
    # stage k-1's EMA weights with a fresh optimiser, warm-up and EMA, exactly as a separate run with
    # ``init_from`` does, and with the random streams of such a run with its seed (default: this stage's
    # seed + k). The VAE fields belong to stage 1 alone
    then: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        from vgrpo.shapes.render import LAYOUTS

        if self.layout not in LAYOUTS:
            raise ValueError(f"layout = {self.layout!r}: want one of {', '.join(LAYOUTS)}")
        for name in ("caption_noise", "washout", "crowding"):
            rates = getattr(self, name)
            bad = {f: p for f, p in rates.items() if f not in self.family_mix or not 0 <= p <= 1}
            if bad:
                raise ValueError(
                    f"{name} {bad}: want {{family: probability in [0, 1]}}, families {list(self.family_mix)}"
                )
        for name in ("washout_contrast", "crowding_factor"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} = {getattr(self, name)}: want a fraction in [0, 1]")
        names = {f.name for f in dataclasses.fields(self)}
        stage_one = {"then"} | {n for n in names if n.startswith("vae_")}
        for k, over in enumerate(self.then, start=1):
            if not isinstance(over, dict):
                raise ValueError(f"then[{k - 1}] = {over!r}: want a dict of PretrainConfig fields")
            wrong = sorted(set(over) - (names - stage_one))
            if wrong:
                raise ValueError(
                    f"then[{k - 1}] sets {wrong}: a later stage may set the stage-2 fields (seed, flow_*, "
                    f"layout, crowding, device, ...), not {', '.join(sorted(stage_one))}"
                )
            try:
                self.stage(k)
            except (TypeError, ValueError) as e:
                raise ValueError(f"then[{k - 1}]: {e}") from None

    def stage(self, k: int) -> PretrainConfig:
        """The config of stage-2 stage ``k`` (0: this one; k >= 1: ``then[k-1]`` applied to this one, the
        seed ``seed + k`` unless it sets one)."""
        if k == 0:
            return self
        over: dict[str, Any] = {"seed": self.seed + k, **self.then[k - 1]}
        if "sides" in over:
            over["sides"] = tuple(over["sides"])
        return dataclasses.replace(self, then=[], **over)

    @property
    def stages(self) -> int:
        return 1 + len(self.then)


CROWDED = {"two_object": 0.8, "counting": 0.8, "color_attr": 0.8, "position": 0.8}
CAPTION_NOISE = {
    "single_object": 0.25,
    "colors": 0.4,
    "two_object": 0.5,
    "counting": 0.5,
    "position": 0.5,
    "color_attr": 0.5,
}
# Named recipes of `vgrpo pretrain-tiny --recipe NAME`: PretrainConfig fields, the later stages in `then`.
RECIPES: dict[str, dict[str, Any]] = {
    # the plain PretrainConfig defaults (the first stage of "shipped"; a refinement stage with --init-from)
    "base": {},
    # from scratch on the 2-core CPU in under an hour (VAE, 8400 slot-layout steps at lr 2e-3, then the
    # crowding defect): the default of `vgrpo pretrain-tiny`, see docs/training.md "Pretraining recipes and knobs"
    "cpu-hour": {
        "num_threads": 2,
        "layout": "slots",
        "flow_pairs": 48000,
        "flow_steps": 8400,
        "flow_lr": 2e-3,
        "warmup_steps": 200,
        "then": [{"num_threads": 2, "layout": "slots", "crowding": CROWDED, "flow_steps": 800}],
    },
    # the seven stages that made the shipped weights (their pretrain.json), in one command; stage 6 on a
    # GPU (5000 steps of batch 256: ~1.8 h on the 2-core CPU), the others about 2 h of CPU
    "shipped": {
        "flow_steps": 8000,
        "then": [
            {"seed": 1, "flow_steps": 3000, "flow_lr": 3e-4},
            {
                "seed": 3,
                "flow_steps": 3000,
                "caption_noise": CAPTION_NOISE,
                "layout": "slots_compact",
                "num_threads": 2,
            },
            {
                "seed": 3,
                "flow_steps": 3000,
                "caption_noise": CAPTION_NOISE,
                "layout": "slots",
                "num_threads": 2,
            },
            {
                "seed": 11,
                "flow_pairs": 96000,
                "flow_steps": 5000,
                "flow_batch": 256,
                "warmup_steps": 200,
                "layout": "slots",
                "device": "cuda",
                "num_threads": 2,
            },
            {"seed": 8, "flow_steps": 800, "crowding": CROWDED, "layout": "slots", "num_threads": 2},
        ],
    },
}


def recipe_config(name: str, sets: Sequence[str] = (), **fields: Any) -> PretrainConfig:
    """The PretrainConfig of recipe ``name`` with ``--set`` strings and ``fields`` applied on top (the
    first stage's fields; a later stage keeps its own values for those it sets)."""
    if name not in RECIPES:
        raise ValueError(f"recipe {name!r} does not exist; fix: one of {', '.join(RECIPES)}")
    return PretrainConfig(**{**copy.deepcopy(RECIPES[name]), **recipe_overrides(sets), **fields})


def recipe_overrides(sets: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (VALUE as JSON, else a plain string) as PretrainConfig fields, checked: an
    unknown key or a value of the wrong kind is a ValueError naming the key and the fix."""
    defaults = asdict(PretrainConfig())
    out: dict[str, Any] = {}
    for item in sets:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"--set {item!r}: want KEY=VALUE with KEY one of {', '.join(defaults)}")
        if not sep:
            raise ValueError(f"--set {item!r}: want KEY=VALUE")
        value: Any
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        want = defaults[key]
        kinds: tuple[type, ...] = (
            (int, float) if isinstance(want, float) else (type(want),) if want is not None else (int,)
        )
        if isinstance(want, tuple):
            kinds = (list, tuple)
        if (isinstance(value, bool) and not isinstance(want, bool)) or not isinstance(value, kinds):
            raise ValueError(f"--set {key}={raw}: want a {type(want).__name__} like {json.dumps(want)}")
        out[key] = tuple(value) if isinstance(want, tuple) and isinstance(value, list) else value
    return out


# ------------------------------------------------------------------------------------------------ data


def render_scenes(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random GenEval-Shapes scenes (1–4 objects), uint8 ``(n, 64, 64, 3)``, for the VAE."""
    from vgrpo.shapes.render import random_scene, render_scene

    out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i in range(n):
        out[i] = render_scene(random_scene(rng, int(rng.integers(1, 5)), IMAGE_SIZE))
    return out


def pretraining_prompts() -> dict[str, list[str]]:
    """The caption pool of pretraining, by family: the training split (docs/geneval-shapes.md), plus the six
    single-object captions. The split holds no single_object prompt (all six are held out, the other
    families teaching every shape); a base model knowing what "a photo of a circle" is stands in for the
    web-scale pretraining that lets SD3.5 name single objects (GenEval single_object 0.98). RL trains on
    the training split only."""
    from vgrpo.reward_servers.shapes.grammar import prompt_text
    from vgrpo.reward_servers.shapes.spec import SHAPES
    from vgrpo.shapes.prompts import load_split

    pool: dict[str, list[str]] = {"single_object": [prompt_text("single_object", [s]) for s in SHAPES]}
    for row in load_split("train"):
        pool.setdefault(row["tag"], []).append(row["prompt"])
    return pool


def wash_out(image_hwc: np.ndarray, contrast: float) -> np.ndarray:
    """``image`` with every pixel's offset from the background grey scaled by ``contrast``."""
    grey = np.asarray(BACKGROUND, np.float32)
    return np.clip(grey + contrast * (image_hwc.astype(np.float32) - grey), 0, 255).round().astype(np.uint8)


def crowd(scene: Scene, factor: float) -> Scene:
    """``scene`` with its objects' centres pulled towards their mean, to ``factor`` of their offsets."""
    mx = float(np.mean([o.cx for o in scene.objects]))
    my = float(np.mean([o.cy for o in scene.objects]))
    moved = [
        dataclasses.replace(o, cx=mx + factor * (o.cx - mx), cy=my + factor * (o.cy - my))
        for o in scene.objects
    ]
    return Scene(objects=moved, size=scene.size)


def make_pairs(
    n: int,
    rng: np.random.Generator,
    family_mix: dict[str, float],
    max_distractors: int = 0,
    caption_noise: dict[str, float] | None = None,
    sides: tuple[float, float] = (12.0, 28.0),
    layout: str = "random",
    washout: dict[str, float] | None = None,
    washout_contrast: float = 0.25,
    crowding: dict[str, float] | None = None,
    crowding_factor: float = 0.5,
) -> tuple[list[str], np.ndarray]:
    """``n`` (prompt, image) pairs: a family drawn by ``family_mix``, a caption of that family from
    :func:`pretraining_prompts`, and a fresh random scene that passes it (``scene_for_prompt``) -- or, with
    probability ``caption_noise[family]``, one that passes a near miss of it (``near_miss_prompt``); with
    probability ``washout[family]`` the image is then washed out (:func:`wash_out`), with probability
    ``crowding[family]`` a scene of several objects is crowded (:func:`crowd`)."""
    from vgrpo.shapes.prompts import near_miss_prompt, scene_for_prompt
    from vgrpo.shapes.render import render_scene

    noise = caption_noise or {}
    wash = washout or {}
    crowd_p = crowding or {}
    by_family = pretraining_prompts()
    families = [f for f in family_mix if by_family.get(f)]
    p = np.array([family_mix[f] for f in families], dtype=np.float64)
    p /= p.sum()
    prompts: list[str] = []
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i in range(n):
        fam = families[int(rng.choice(len(families), p=p))]
        prompt = by_family[fam][int(rng.integers(len(by_family[fam])))]
        prompts.append(prompt)
        drawn = prompt
        if noise.get(fam, 0.0) > 0 and rng.random() < noise[fam]:
            drawn = near_miss_prompt(prompt, rng)[0]
        scene = scene_for_prompt(
            drawn, rng, size=IMAGE_SIZE, max_distractors=max_distractors, sides=sides, layout=layout
        )
        if len(scene.objects) > 1 and crowd_p.get(fam, 0.0) > 0 and rng.random() < crowd_p[fam]:
            scene = crowd(scene, crowding_factor)
        images[i] = render_scene(scene)
        if wash.get(fam, 0.0) > 0 and rng.random() < wash[fam]:
            images[i] = wash_out(images[i], washout_contrast)
    return prompts, images


# ----------------------------------------------------------------------------------------- stage 1: VAE


def _recon_weights(x_bchw: torch.Tensor) -> torch.Tensor:
    """Per-pixel loss weights: 1 on background, 3 inside objects, 6 on edges (any channel changes to a
    4-neighbour): most of a scene is flat grey, while the detector reads edges (shape) and interiors (colour)."""
    grey = torch.tensor(128 / 127.5 - 1.0)
    obj = ((x_bchw - grey).abs().amax(dim=1, keepdim=True) > 0.02).float()
    dx = (x_bchw[..., :, 1:] - x_bchw[..., :, :-1]).abs().amax(dim=1, keepdim=True) > 0.02
    dy = (x_bchw[..., 1:, :] - x_bchw[..., :-1, :]).abs().amax(dim=1, keepdim=True) > 0.02
    edge = torch.zeros_like(obj)
    edge[..., :, 1:] += dx.float()
    edge[..., :, :-1] += dx.float()
    edge[..., 1:, :] += dy.float()
    edge[..., :-1, :] += dy.float()
    return 1.0 + 2.0 * obj + 5.0 * (edge > 0).float()


def train_vae(
    vae: AutoencoderKL, images_nhwc: np.ndarray, cfg: PretrainConfig, log: Callable[[str], None]
) -> None:
    """Stage 1: weighted L1 + L2 reconstruction through a posterior sample, plus ``kl_weight``·KL."""
    from vgrpo.core.policy import images_to_tensor

    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    t0 = time.perf_counter()
    for step in range(1, cfg.vae_steps + 1):
        lr = cfg.vae_lr * min(1.0, step / cfg.warmup_steps) * (0.1 if step > 0.8 * cfg.vae_steps else 1.0)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(images_nhwc), (cfg.vae_batch,), generator=gen).numpy()
        x_bchw = images_to_tensor(images_nhwc[idx])
        if (
            cfg.vae_crop < IMAGE_SIZE
        ):  # the VAE is fully convolutional: crops train it at a fraction of the cost
            ox, oy = (
                int(v) for v in torch.randint(0, IMAGE_SIZE - cfg.vae_crop + 1, (2,), generator=gen) // 4 * 4
            )
            x_bchw = x_bchw[..., oy : oy + cfg.vae_crop, ox : ox + cfg.vae_crop]
        dist = vae.encode(x_bchw).latent_dist
        z_bchw = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        recon_bchw = vae.decode(z_bchw).sample
        w_b1hw = _recon_weights(x_bchw)
        err = recon_bchw - x_bchw
        rec = (w_b1hw * (err.abs() + err.pow(2))).mean()
        kl = dist.kl().mean() / z_bchw[0].numel()
        loss = rec + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == 1:
            log(
                f"vae step {step}/{cfg.vae_steps} rec {rec.item():.4f} kl {kl.item():.2f} "
                f"({time.perf_counter() - t0:.0f}s)"
            )
    vae.eval()


@torch.no_grad()
def set_latent_normalisation(vae: AutoencoderKL, images_nhwc: np.ndarray, batch: int = 256) -> None:
    """SD3 normalisation ``(z − shift)·scale`` to zero mean, unit variance over the data's posterior means."""
    from vgrpo.core.policy import images_to_tensor

    zs = [
        vae.encode(images_to_tensor(images_nhwc[i : i + batch])).latent_dist.mean
        for i in range(0, len(images_nhwc), batch)
    ]
    z = torch.cat(zs)
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))


# -------------------------------------------------------------------------------- stage 2: flow matching


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
            pe.lerp_(pm, 1.0 - decay)


def train_flow(
    pipe: StableDiffusion3Pipeline,
    prompts: list[str],
    latents_nchw: torch.Tensor,
    cfg: PretrainConfig,
    log: Callable[[str], None],
    on_checkpoint: Callable[[int, StableDiffusion3Pipeline], None] | None = None,
) -> StableDiffusion3Pipeline:
    """Stage 2: rectified-flow regression (docs/algorithms.md §1) of the transformer and both text encoders;
    returns a pipeline holding the EMA weights (the VAE stays frozen)."""
    from vgrpo.core.policy import encode_prompts, velocity

    trained = torch.nn.ModuleList([pipe.transformer, pipe.text_encoder, pipe.text_encoder_2])
    ema_pipe = copy.deepcopy(pipe)
    ema = torch.nn.ModuleList([ema_pipe.transformer, ema_pipe.text_encoder, ema_pipe.text_encoder_2])
    ema.requires_grad_(False)
    trained.requires_grad_(True)  # a later stage trains the previous stage's (frozen) EMA copy
    trained.train()
    opt = torch.optim.AdamW(trained.parameters(), lr=cfg.flow_lr, weight_decay=0.01, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    t0 = time.perf_counter()
    running = 0.0
    dev = latents_nchw.device  # random numbers drawn on the CPU: one stream on every device
    for step in range(1, cfg.flow_steps + 1):
        for g in opt.param_groups:
            g["lr"] = cfg.flow_lr * min(1.0, step / cfg.warmup_steps)
        idx = torch.randint(len(prompts), (cfg.flow_batch,), generator=gen)
        drop = torch.rand(cfg.flow_batch, generator=gen) < cfg.caption_dropout
        batch_prompts = ["" if d else prompts[int(i)] for i, d in zip(idx, drop, strict=True)]
        x0_bchw = latents_nchw[idx.to(dev)]
        eps_bchw = torch.randn(x0_bchw.shape, generator=gen).to(dev)
        u_b = torch.sigmoid(torch.randn(cfg.flow_batch, generator=gen)).to(dev)  # SD3's logit-normal(0, 1)
        t_b = cfg.shift * u_b / (1 + (cfg.shift - 1) * u_b)  # SD3's shift (docs/algorithms.md §1)
        t_b4 = t_b.view(-1, 1, 1, 1)
        xt_bchw = interpolate(x0_bchw, eps_bchw, t_b4)
        v_bchw = velocity(pipe.transformer, xt_bchw, t_b, encode_prompts(pipe, batch_prompts))
        loss = F.mse_loss(v_bchw.float(), eps_bchw - x0_bchw)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        opt.step()
        _ema_update(ema, trained, min(cfg.ema_decay, (1 + step) / (10 + step)))
        running = loss.item() if step == 1 else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == 1:
            log(f"flow step {step}/{cfg.flow_steps} loss {running:.4f} ({time.perf_counter() - t0:.0f}s)")
        if on_checkpoint is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            on_checkpoint(step, ema_pipe)
    ema.eval()
    return ema_pipe


# ------------------------------------------------------------------------------------------ the recipe


def pretrain_vae(seed: int, cfg: PretrainConfig, log: Callable[[str], None] = print) -> AutoencoderKL:
    """Stage 1 alone: the seeded VAE of ``build_pipeline(seed)`` trained on its own scene stream, with
    its latent normalisation set."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    vae = build_pipeline(seed).vae
    rng = np.random.default_rng([seed, 1])
    log(f"rendering {cfg.vae_images} scenes for the VAE")
    images = render_scenes(cfg.vae_images, rng)
    train_vae(vae, images, cfg, log)
    set_latent_normalisation(vae, images)
    vae.requires_grad_(False)
    return vae


def pretrain(
    out_dir: str | Path,
    seed: int = 0,
    config: PretrainConfig | None = None,
    log: Callable[[str], None] = print,
    vae_from: str | Path | None = None,
    init_from: str | Path | None = None,
) -> Path:
    """Build a tiny model from ``seed`` by ``config`` (a :data:`RECIPES` entry through
    :func:`recipe_config`, or any PretrainConfig): VAE, then transformer + text encoders, stage by stage
    (``config.then``); saves the diffusers folder to ``out_dir`` (plus ``pretrain.json`` with the config
    and timings; with ``checkpoint_every`` also every stage but the last under ``stage_<k>``). ``vae_from``
    reuses a stage-1 VAE saved by an earlier run with the same seed (each stage has its own RNG streams,
    so the result is the same as running both). ``init_from`` starts stage 2 from a saved pipeline's
    transformer and text encoders (and takes its VAE): a refinement stage, e.g. a lower learning rate
    after a constant-rate run (the shipped model's recipe, see its ``pretrain.json``)."""
    from diffusers import AutoencoderKL as VAE

    cfg = copy.deepcopy(config) if config is not None else PretrainConfig()
    cfg.seed = seed
    stages = [cfg.stage(k) for k in range(cfg.stages)]
    for k, stage in enumerate(stages):  # before hours of the stages that could run: a GPU stage needs a GPU
        if stage.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                f"stage 2.{k} has device={stage.device!r} but torch sees no CUDA device here; fix: run the recipe "
                "on a GPU machine, or the stages before it one by one (--recipe base, the commands in the "
                "shipped pretrain.json) and that stage where a GPU is"
            )
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    pipe = build_pipeline(
        seed, adaln_zero=cfg.adaln_zero, shift=cfg.shift, heads=cfg.heads, layers=cfg.layers, patch=cfg.patch
    )
    if init_from is not None:
        from vgrpo.core.policy import load_pipeline

        pipe = load_pipeline(init_from)
        pipe.vae.requires_grad_(False)
        log(f"stage 2 starts from {init_from} (its VAE reused)")
    elif vae_from is not None:
        pipe.vae = VAE.from_pretrained(str(vae_from))
        pipe.vae.requires_grad_(False)
        log(f"stage 1 reused from {vae_from}")
    else:
        pipe.vae = pretrain_vae(seed, cfg, log)
    t_vae = time.perf_counter() - t_start
    log(
        f"vae done in {t_vae:.0f}s: shift {pipe.vae.config.shift_factor:.4f} scale {pipe.vae.config.scaling_factor:.4f}"
    )

    stage_s: list[float] = []
    for k, stage in enumerate(stages):
        t_stage = time.perf_counter()
        if k > 0:  # from the previous stage's EMA weights, as `init_from` does
            log(f"stage 2.{k}: {json.dumps(cfg.then[k - 1])}")
        pipe = _train_stage(pipe, stage, k, out, log)  # the stage's EMA weights
        stage_s.append(round(time.perf_counter() - t_stage, 1))
        if k + 1 < len(stages) and cfg.checkpoint_every:
            save_pipeline(pipe, out / f"stage_{k}")
            log(f"stage 2.{k} saved to {out / f'stage_{k}'}")
    pipe.to("cpu")
    save_pipeline(pipe, out)
    total = time.perf_counter() - t_start
    record = {
        "config": asdict(cfg),
        "vae_s": round(t_vae, 1),
        "stage_s": stage_s,
        "total_s": round(total, 1),
    }
    if init_from is not None:
        record["init_from"] = str(init_from)
    (out / "pretrain.json").write_text(json.dumps(record, indent=2))
    log(f"saved {out} in {total:.0f}s")
    return out


def _train_stage(
    pipe: StableDiffusion3Pipeline, cfg: PretrainConfig, k: int, out: Path, log: Callable[[str], None]
) -> StableDiffusion3Pipeline:
    """Stage 2.k of ``pretrain`` (``cfg`` its own config): draws its pairs, encodes them with the frozen
    VAE and trains; returns the EMA pipeline. Its random streams depend on ``cfg.seed`` alone."""
    from vgrpo.core.policy import encode_images

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    pipe.to(cfg.device)
    log(f"rendering {cfg.flow_pairs} (prompt, image) pairs")
    prompts, images = make_pairs(
        cfg.flow_pairs,
        np.random.default_rng([cfg.seed, 2]),
        cfg.family_mix,
        max_distractors=cfg.max_distractors,
        caption_noise=cfg.caption_noise,
        sides=tuple(cfg.sides),  # type: ignore[arg-type]
        layout=cfg.layout,
        washout=cfg.washout,
        washout_contrast=cfg.washout_contrast,
        crowding=cfg.crowding,
        crowding_factor=cfg.crowding_factor,
    )
    with torch.no_grad():
        latents = torch.cat(
            [encode_images(pipe.vae, images[i : i + 256]) for i in range(0, len(images), 256)]
        )
    prefix = "" if k == 0 else f"s{k}_"

    def checkpoint(step: int, ema_pipe: StableDiffusion3Pipeline) -> None:
        save_pipeline(ema_pipe, out / f"ckpt_{prefix}{step}")
        log(f"checkpoint {out / f'ckpt_{prefix}{step}'}")

    return train_flow(pipe, prompts, latents, cfg, log, on_checkpoint=checkpoint)


@torch.no_grad()
def vae_verdict_preservation(
    vae: AutoencoderKL, rows: list[dict], scenes_per_prompt: int = 2, seed: int = 0
) -> dict[str, float]:
    """How faithful the VAE is to what the detector reads: for random scenes that pass each prompt,
    the fraction whose verdict (pass/fail under GenEval's rules) survives encode -> decode, and the
    fraction whose detections (shape, colour multiset) survive exactly."""
    from vgrpo.core.policy import decode_latents, encode_images
    from vgrpo.reward_servers.shapes.detector import detect
    from vgrpo.reward_servers.shapes.rules import evaluate
    from vgrpo.shapes.prompts import scene_for_prompt
    from vgrpo.shapes.render import render_scene

    rng = np.random.default_rng(seed)
    prompts = [r["prompt"] for r in rows for _ in range(scenes_per_prompt)]
    images = np.stack([render_scene(scene_for_prompt(p, rng, size=IMAGE_SIZE)) for p in prompts])
    recon = np.concatenate(
        [decode_latents(vae, encode_images(vae, images[i : i + 64])) for i in range(0, len(images), 64)]
    )
    same_verdict = same_objects = 0
    for prompt, clean, rec in zip(prompts, images, recon, strict=True):
        d_clean, d_rec = detect(clean), detect(rec)
        same_verdict += evaluate(prompt, d_clean).score == evaluate(prompt, d_rec).score
        same_objects += sorted((d.shape, d.color) for d in d_clean) == sorted(
            (d.shape, d.color) for d in d_rec
        )
    n = len(prompts)
    return {"verdict_preserved": same_verdict / n, "objects_preserved": same_objects / n, "scenes": n}
