"""What each reward costs per image at its real size: the scoring path (preprocessing, tokenising, the
model forward) of every built-in reward with the real architecture — CLIP ViT-L/14, the ViT-H-14 of
HPSv2.1 and PickScore, ImageReward's BLIP ViT-L/16 + BERT-base — built from config with random weights
(nothing is downloaded; the weights do not change the compute). Loading is left out: the reward objects
are assembled around the built models. OCR runs its real bundled PaddleOCR models, shapes and JPEG as
they are.

Per reward: images/s on this machine's CPU threads (batch 8, 256² images; the models resize to 224²),
the forward's multiply-add count (GFLOP/image, counted from the architecture: 2 · parameters · tokens
per tower) and the images/s a GPU would give at an assumed 30 % of an H100's dense bf16 peak
(989 TFLOP/s) — an estimate from the count, not a measurement. Prints a table and writes JSON.

    python benchmarks/reward_costs.py [--images 16] [--batch 8] [--rewards a,b]
                                      [--out benchmarks/results/reward_costs.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
H100_BF16_TFLOPS = 989.0
ASSUMED_MFU = 0.30

VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14, image_size=224)  # fmt: skip
VIT_H14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14, image_size=224, hidden_act="gelu")  # fmt: skip
TEXT_L14 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
TEXT_H14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, hidden_act="gelu")  # fmt: skip


def _params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def _clip(vision: dict, text: dict, projection: int) -> tuple[Any, float, float]:
    """A CLIPModel at the given size (random weights) and the GFLOP per image of its image tower and of
    its text tower (77 tokens)."""
    import torch
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    from vgrpo.tiny_rewards import TOKENIZER

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(0)
    ids = dict(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    text = dict(text, vocab_size=len(tok), max_position_embeddings=77, **ids)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)).eval()
    tokens_v = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    embed = model.text_model.embeddings.token_embedding.weight.numel()
    return (
        model,
        2 * _params(model.vision_model) * tokens_v / 1e9,
        2 * (_params(model.text_model) - embed) * 77 / 1e9,
    )


def _processor(size: int = 224) -> Any:
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPProcessor

    from vgrpo.tiny_rewards import TOKENIZER

    image = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return CLIPProcessor(image_processor=image, tokenizer=AutoTokenizer.from_pretrained(TOKENIZER))


def build(name: str) -> tuple[Any, float | None, str]:
    """(reward object, GFLOP per image or None, the architecture measured)."""
    import torch

    from vgrpo.reward_servers import clip_rewards, hpsv2, imagereward, pickscore
    from vgrpo.reward_servers.registry import get_reward

    if name in ("shapes", "jpeg_compressibility", "ocr"):
        return (
            get_reward(name, {"num_threads": os.cpu_count() or 1} if name == "ocr" else {}),
            None,
            "as shipped",
        )
    if name in ("clipscore", "aesthetic"):
        model, image_gflop, text_gflop = _clip(VIT_L14, TEXT_L14, 768)
        gflop = image_gflop + (text_gflop if name == "clipscore" else 0.0)  # aesthetic: the image only
        r: Any = object.__new__(
            clip_rewards.ClipScoreReward if name == "clipscore" else clip_rewards.AestheticReward
        )
        r.model, r.processor, r.device, r.batch_size = model, _processor(), "cpu", 32
        if name == "clipscore":
            r.w = 2.5
        else:
            r.mlp, r.scale = clip_rewards.aesthetic_mlp().eval(), 1.0
        return r, gflop, "CLIP ViT-L/14" + (" (image tower) + MLP" if name == "aesthetic" else "")
    if name in ("hpsv2", "pickscore"):
        model, image_gflop, text_gflop = _clip(VIT_H14, TEXT_H14, 1024)
        gflop = image_gflop + text_gflop
        if name == "hpsv2":
            r = object.__new__(hpsv2.HPSv2Reward)
            r.model, r.device, r.size, r.batch_size = model, "cpu", 224, 32
            r.tokenizer = _processor().tokenizer
        else:
            r = object.__new__(pickscore.PickScoreReward)
            r.model, r.processor, r.device, r.scale, r.batch_size = model, _processor(), "cpu", 26.0, 32
        return r, gflop, "open_clip ViT-H-14 (as transformers' CLIPModel)"
    if name == "imagereward":
        from transformers import BlipTextConfig, BlipVisionConfig
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        torch.manual_seed(0)
        r = object.__new__(imagereward.ImageRewardReward)
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
        r.vision = BlipVisionModel(BlipVisionConfig(**vision, image_size=224, patch_size=16, layer_norm_eps=1e-6)).eval()  # fmt: skip
        text = BlipTextConfig(vocab_size=30524, encoder_hidden_size=1024, bos_token_id=None, sep_token_id=None, pad_token_id=0)  # fmt: skip
        r.text = BlipTextModel(text, add_pooling_layer=False).eval()
        r.mlp = clip_rewards.aesthetic_mlp().eval()
        r.device, r.size, r.batch_size = "cpu", 224, 32
        r.tokenizer = _bert_tokenizer()
        embed = r.text.embeddings.word_embeddings.weight.numel()
        gflop = 2 * (_params(r.vision) * 197 + (_params(r.text) - embed) * imagereward.MAX_TEXT_TOKENS) / 1e9
        return r, gflop, "BLIP ViT-L/16 + BERT-base with cross-attention + MLP"
    raise ValueError(f"unknown reward {name!r}")


def _bert_tokenizer() -> Any:
    """A word-piece tokenizer of BERT's special tokens and a few words (the real vocabulary is not
    shipped); prompts tokenise to the same padded length (35) the real one gives."""
    import tempfile

    from transformers import BertTokenizer

    folder = Path(tempfile.mkdtemp(prefix="vgrpo-bert-"))
    words = [
        "a",
        "photo",
        "of",
        "red",
        "blue",
        "green",
        "circle",
        "square",
        "two",
        "three",
        "on",
        "the",
        "left",
        "right",
        "above",
        "below",
    ]
    (folder / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n"
    )
    return BertTokenizer(str(folder / "vocab.txt"))


def _batch(name: str, n: int) -> tuple[list[np.ndarray], list[str]]:
    rng = np.random.default_rng(0)
    if name == "shapes":
        from vgrpo.reward_servers.shapes.spec import FAMILIES
        from vgrpo.shapes.prompts import make_prompt, scene_for_prompt
        from vgrpo.shapes.render import render_scene

        prompts = [make_prompt(str(FAMILIES[i % len(FAMILIES)]), rng) for i in range(n)]
        return [render_scene(scene_for_prompt(p, rng)) for p in prompts], prompts
    if name == "ocr":
        from PIL import Image, ImageDraw, ImageFont

        font, images, prompts = ImageFont.load_default(size=40), [], []
        for i in range(n):
            im = Image.new("RGB", (384, 128), (245, 245, 240))
            ImageDraw.Draw(im).text((20, 40), f"SALE {i}%", fill=(15, 15, 25), font=font)
            images.append(np.asarray(im))
            prompts.append(f'a sign that says "SALE {i}%"')
        return images, prompts
    smooth = [
        np.kron(rng.integers(0, 256, (16, 16, 3)), np.ones((16, 16, 1))).astype(np.uint8) for _ in range(n)
    ]
    return smooth, ["a photo of two red circles on the left of a blue square"] * n


def measure(name: str, n: int, batch: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    reward, gflop, arch = build(name)
    build_s = time.perf_counter() - t0
    images, prompts = _batch(name, n)
    reward.score(images[:1], prompts[:1])  # warm-up
    t0 = time.perf_counter()
    for lo in range(0, n, batch):
        items = reward.score(images[lo : lo + batch], prompts[lo : lo + batch])
        assert all(i.error is None for i in items), items
    dt = time.perf_counter() - t0
    row: dict[str, Any] = {"reward": name, "architecture": arch, "images": n, "batch": batch, "seconds": dt,
                           "cpu_images_per_s": n / dt, "build_s": build_s}  # fmt: skip
    if gflop is not None:
        row["gflop_per_image"] = gflop
        row["gpu_images_per_s_estimate"] = H100_BF16_TFLOPS * 1e3 * ASSUMED_MFU / gflop
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument(
        "--rewards", default="shapes,jpeg_compressibility,ocr,clipscore,aesthetic,pickscore,hpsv2,imagereward"
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reward_costs.json"))
    args = ap.parse_args()
    rows = []
    for name in args.rewards.split(","):
        row = measure(name, args.images, args.batch)
        rows.append(row)
        gpu = row.get("gpu_images_per_s_estimate")
        print(
            f"{name:22s} {row['cpu_images_per_s']:9.2f} img/s on CPU   "
            + (
                f"{row['gflop_per_image']:7.1f} GFLOP/img  ~{gpu:8.0f} img/s on an H100 (est.)" if gpu else ""
            ),
            flush=True,
        )
    out = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "assumed": {"gpu": "H100 SXM dense bf16", "peak_tflops": H100_BF16_TFLOPS, "mfu": ASSUMED_MFU},
           "rows": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
