"""Sampling throughput of the tiny SD3 pipeline (``vgrpo.core.policy.sample``: deterministic ODE + VAE decode).

Prints a table of images/s for batch sizes x step counts and writes JSON (default
``benchmarks/results/sampling.json`` under the project root, whatever the working directory).

    python benchmarks/sampling.py [--model builtin:tiny-sd3] [--batch-sizes 1,8,32] [--steps 10,20,40]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from vgrpo.core.policy import Sampler, load_pipeline, sample

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "a photo of a red circle",
    "a photo of a square and a triangle",
    "a photo of three rings",
    "a photo of a blue cross left of a diamond",
]


def bench(pipe: Any, batch: int, steps: int, sampler: Sampler, guidance: float, repeats: int) -> dict:
    prompts = [PROMPTS[k % len(PROMPTS)] for k in range(batch)]
    sample(
        pipe, prompts, list(range(batch)), num_steps=steps, sampler=sampler, guidance_scale=guidance
    )  # warm-up
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        sample(
            pipe,
            prompts,
            [r * batch + k for k in range(batch)],
            num_steps=steps,
            sampler=sampler,
            guidance_scale=guidance,
        )
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"batch": batch, "steps": steps, "seconds": round(best, 4), "images_per_s": round(batch / best, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:tiny-sd3")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--steps", default="10,20,40")
    ap.add_argument("--sampler", default="dpm2", choices=["dpm2", "euler"])
    ap.add_argument("--guidance-scale", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per cell; the best is kept")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sampling.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    rows = [
        bench(pipe, b, s, args.sampler, args.guidance_scale, args.repeats)  # type: ignore[arg-type]
        for s in map(int, args.steps.split(","))
        for b in map(int, args.batch_sizes.split(","))
    ]
    print(f"{'batch':>6} {'steps':>6} {'seconds':>9} {'images/s':>9}")
    for r in rows:
        print(f"{r['batch']:>6} {r['steps']:>6} {r['seconds']:>9.3f} {r['images_per_s']:>9.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": args.model,
        "sampler": args.sampler,
        "guidance_scale": args.guidance_scale,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
    }
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
