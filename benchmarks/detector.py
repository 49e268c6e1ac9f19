"""Detector accuracy on GenEval-Shapes (docs/geneval-shapes.md "Detector"): for each family and corruption,
the fraction of true scenes whose prompt passes, and of single-clause violations (a prompt one word
away: a missing object, a wrong colour, count or relation) correctly failed. Seeded; prints a table and
writes JSON.

    python benchmarks/detector.py [--n 100] [--seed 0] [--out benchmarks/results/detector.json]
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from vgrpo.reward_servers.shapes.detector import detect
from vgrpo.reward_servers.shapes.rules import evaluate
from vgrpo.reward_servers.shapes.spec import FAMILIES
from vgrpo.shapes.prompts import make_prompt, scene_for_prompt, violate_prompt
from vgrpo.shapes.render import render_scene

ROOT = Path(__file__).resolve().parents[1]


def blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=1)))


def noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(img + rng.normal(0.0, 8.0, img.shape), 0, 255).round().astype(np.uint8)


def jpeg(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=70, subsampling=2)  # 2 = 4:2:0
    return np.asarray(Image.open(buf).convert("RGB"))


CONDITIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "clean": lambda img, rng: img,
    "blur_r1": blur,
    "noise_8": noise,
    "jpeg_q70": jpeg,
}


def run(n: int, seed: int) -> dict:
    results: dict = {}
    seconds, images = 0.0, 0
    for cond, corrupt in CONDITIONS.items():
        results[cond] = {}
        for f, family in enumerate(FAMILIES):
            rng = np.random.default_rng([seed, f])  # the same scenes under every condition
            passed = failed = 0
            for _ in range(n):
                prompt = make_prompt(family, rng)
                scene = scene_for_prompt(prompt, rng)
                false_prompt, _ = violate_prompt(prompt, scene, rng)
                img = corrupt(render_scene(scene), rng)
                t = time.perf_counter()
                dets = detect(img)
                passed += evaluate(prompt, dets).score == 1.0
                seconds += time.perf_counter() - t
                images += 1
                failed += evaluate(false_prompt, dets).score == 0.0
            results[cond][family] = {"true_pass": passed / n, "violation_fail": failed / n}
    return {"n_per_family": n, "seed": seed, "ms_per_image": 1000 * seconds / images, "results": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="scenes per family per condition")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "detector.json")
    args = ap.parse_args()
    report = run(args.n, args.seed)
    res = report["results"]
    print("cells: fraction of true scenes that pass / of single-clause violations that fail")
    print(f"{'family':<14}" + "".join(f"{c:>14}" for c in res))
    for family in FAMILIES:
        cells = (f"{res[c][family]['true_pass']:.2f} / {res[c][family]['violation_fail']:.2f}" for c in res)
        print(f"{family:<14}" + "".join(f"{cell:>14}" for cell in cells))
    print(
        f"detect + evaluate: {report['ms_per_image']:.2f} ms per 64 px image; {args.n} scenes per cell, seed {args.seed}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
