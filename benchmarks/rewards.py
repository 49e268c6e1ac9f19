"""Reward throughput on this machine: images/s per reward vs batch size (in process), and vs Serve replicas
(1 and 2, through `deploy_rewards` + `RewardClient`, as the training driver scores). GenEval and PickScore
run on tiny models built from config (their real checkpoints are not downloaded: the numbers measure the
pipeline's overhead, not ViT-L/Swin-S compute), OCR on the real bundled PaddleOCR models, shapes as is.
Prints a table and writes JSON.

    python benchmarks/rewards.py [--batch-sizes 1,4,16] [--images 32] [--replicas 1,2] [--no-serve]
                                 [--out benchmarks/results/rewards.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _shapes_images(n: int) -> tuple[list[np.ndarray], list[str], list[dict] | None]:
    from vgrpo.reward_servers.shapes.spec import FAMILIES
    from vgrpo.shapes.prompts import make_prompt, scene_for_prompt
    from vgrpo.shapes.render import render_scene

    rng = np.random.default_rng(0)
    prompts = [make_prompt(str(FAMILIES[i % len(FAMILIES)]), rng) for i in range(n)]
    images = [render_scene(scene_for_prompt(p, rng)) for p in prompts]
    return images, prompts, None


def _photo_images(n: int, size: int = 256) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    from PIL import Image

    return [
        np.asarray(Image.fromarray(np.roll(base, i, axis=0)).resize((size, size), Image.Resampling.BILINEAR))
        for i in range(n)
    ]


def _text_images(n: int) -> tuple[list[np.ndarray], list[str], None]:
    from PIL import Image, ImageDraw, ImageFont

    words = ["OPEN", "Hello World", "SALE 50%", "vgrpo", "Coffee", "EXIT", "Welcome Home", "GenEval"]
    font = ImageFont.load_default(size=40)
    images, prompts = [], []
    for i in range(n):
        w = words[i % len(words)]
        im = Image.new("RGB", (384, 128), (245, 245, 240))
        ImageDraw.Draw(im).text((20, 40), w, fill=(15, 15, 25), font=font)
        images.append(np.asarray(im))
        prompts.append(f'a sign that says "{w}"')
    return images, prompts, None


def workloads(tmp: Path, n: int, threads: int = 1) -> dict[str, tuple[dict[str, Any], Any]]:
    """reward name -> (options, batch maker) for the four rewards measured."""
    from vgrpo.tiny_rewards import build_tiny_clip, build_tiny_mask2former

    clip = build_tiny_clip(tmp / "clip")
    det = build_tiny_mask2former(tmp / "mask2former", image_size=256)
    meta = {"tag": "color_attr", "include": [{"class": "person", "count": 1, "color": "red"}, {"class": "dog", "count": 1, "color": "blue"}]}  # fmt: skip

    def geneval_batch(k: int) -> tuple[list[np.ndarray], list[str], list[dict]]:
        return _photo_images(k), ["a photo of a red person and a blue dog"] * k, [meta] * k

    def pick_batch(k: int) -> tuple[list[np.ndarray], list[str], None]:
        return _photo_images(k), ["a photo of a red person and a blue dog"] * k, None

    return {
        "shapes": ({}, _shapes_images),
        "geneval (tiny)": (
            {"detector_path": str(det), "clip_path": str(clip), "image_size": 256, "device": "cpu"},
            geneval_batch,
        ),
        "pickscore (tiny)": (
            {"processor_path": str(clip), "model_path": str(clip), "device": "cpu"},
            pick_batch,
        ),
        "ocr": ({"num_threads": threads}, _text_images),
    }


def registry_name(label: str) -> str:
    return label.split(" ")[0]


def bench_in_process(label: str, options: dict, make: Any, batch_sizes: list[int], n: int) -> list[dict]:
    from vgrpo.reward_servers.registry import get_reward

    t0 = time.perf_counter()
    reward = get_reward(registry_name(label), options)
    load_s = time.perf_counter() - t0
    images, prompts, meta = make(max(n, max(batch_sizes)))
    reward.score(images[:1], prompts[:1], meta[:1] if meta else None)  # warm-up
    rows = []
    for bs in batch_sizes:
        total = max(n, bs)
        t0 = time.perf_counter()
        done = 0
        while done < total:
            k = min(bs, total - done)
            idx = [(done + j) % len(images) for j in range(k)]
            items = reward.score(
                [images[i] for i in idx], [prompts[i] for i in idx], [meta[i] for i in idx] if meta else None
            )
            assert len(items) == k
            done += k
        dt = time.perf_counter() - t0
        rows.append({"reward": label, "mode": "in-process", "batch_size": bs, "replicas": None,
                     "images": total, "seconds": dt, "images_per_s": total / dt, "load_s": load_s})  # fmt: skip
        print(f"  {label:18s} in-process  batch {bs:3d}: {total / dt:8.1f} images/s", flush=True)
    return rows


def bench_serve(label: str, options: dict, make: Any, replicas: list[int], n: int, batch: int) -> list[dict]:
    """One Serve deployment per replica count, `n` images sent at once through RewardClient."""
    from vgrpo.proto.config import RewardConfig, RewardServerConfig
    from vgrpo.reward_servers.serve import RewardClient, deploy_rewards, shutdown_rewards

    name = registry_name(label)
    images, prompts, meta = make(n)
    rows = []
    for r in replicas:
        cfg = RewardConfig(
            weights={name: 1.0},
            servers={
                name: RewardServerConfig(num_replicas=r, max_batch_size=batch, cpus=0.5, options=options)
            },
        )
        try:
            handles = deploy_rewards(cfg, quiet=True)
            client = RewardClient(handles, cfg)
            client.score(images[:2], prompts[:2], meta[:2] if meta else None)  # warm-up: every replica loaded
            t0 = time.perf_counter()
            scores = client.score(images, prompts, meta)
            dt = time.perf_counter() - t0
            mean_batch = float(np.mean(scores.batch_sizes[name]))
            rows.append({"reward": label, "mode": "serve", "batch_size": batch, "replicas": r, "images": n,
                         "seconds": dt, "images_per_s": n / dt, "mean_batch": mean_batch})  # fmt: skip
            print(
                f"  {label:18s} serve x{r}  batch<={batch:3d}: {n / dt:8.1f} images/s (mean batch {mean_batch:.1f})",
                flush=True,
            )
        except Exception as e:  # a benchmark reports, it does not stop at the first failure
            rows.append(
                {"reward": label, "mode": "serve", "replicas": r, "error": f"{type(e).__name__}: {e}"[:300]}
            )
            print(f"  {label:18s} serve x{r}: failed: {e}", flush=True)
        finally:
            shutdown_rewards()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,4,16")
    ap.add_argument("--images", type=int, default=32, help="images scored per measurement")
    ap.add_argument("--replicas", default="1,2")
    ap.add_argument("--serve-batch", type=int, default=8, help="max_batch_size of the Serve deployments")
    ap.add_argument("--no-serve", action="store_true", help="skip the Serve (replicas) measurements")
    ap.add_argument("--rewards", default="shapes,geneval,pickscore,ocr")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch/onnxruntime threads in process (Ray gives a replica OMP_NUM_THREADS = its CPUs, 1 here)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rewards.json")
    args = ap.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    replicas = [int(r) for r in args.replicas.split(",")]
    wanted = set(args.rewards.split(","))
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="vgrpo-bench-rewards-") as tmp:
        loads = {
            k: v
            for k, v in workloads(Path(tmp), args.images, args.threads).items()
            if registry_name(k) in wanted
        }
        print("in process:")
        for label, (options, make) in loads.items():
            rows += bench_in_process(label, options, make, batch_sizes, args.images)
        if not args.no_serve:
            import ray

            print("Ray Serve (RewardClient, one request per image):")
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            try:
                for label, (options, make) in loads.items():
                    rows += bench_serve(label, options, make, replicas, args.images, args.serve_batch)
            finally:
                ray.shutdown()

    print(f"\n{'reward':18s} {'mode':10s} {'batch':>5s} {'replicas':>8s} {'images/s':>9s}")
    for r in rows:
        ips = f"{r['images_per_s']:9.1f}" if "images_per_s" in r else "   failed"
        print(
            f"{r['reward']:18s} {r['mode']:10s} {r.get('batch_size', '-')!s:>5s} {r.get('replicas') or '-'!s:>8s} {ips}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "note": "geneval/pickscore on tiny models (pipeline overhead, not real-model compute); ocr real; "
        "2 CPU cores shared with other jobs: expect noise",
        "threads": args.threads,
        "results": rows,
    }
    args.out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
