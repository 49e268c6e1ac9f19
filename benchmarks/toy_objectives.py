"""Steps and wall-clock seconds for each objective to reach a target reward on the toy world.

    python benchmarks/toy_objectives.py [--seeds 3] [--target 0.8] [--max-steps 300] [--out FILE]

Each objective runs with its paper-default configuration (docs/algorithms.md), the toy overrides listed in
``vgrpo.toy.train.TOY_OVERRIDES`` and the per-objective toy learning rate ``TOY_LR``; the held-out score
is the mean reward of deterministic ODE samples (512, fixed noise), evaluated every 5 steps. Prints a
table and writes JSON keyed by ``algorithm.name``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from vgrpo.toy.train import TOY_LR, TOY_OVERRIDES, toy_algorithm, train_toy

PROJECT = Path(__file__).resolve().parents[1]
NAMES = ("vgrpo", "dgpo", "flow_grpo", "nft", "flow_grpo_fast", "mixgrpo")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--target", type=float, default=0.8, help="toy eval reward to reach (pretrained: ~0.40)")
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--out", type=Path, default=PROJECT / "benchmarks" / "results" / "toy_objectives.json")
    args = ap.parse_args()
    torch.set_num_threads(1)  # comparable per-objective timings on a shared 2-core machine

    results: dict[str, dict] = {}
    for name in NAMES:
        runs = []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            run = train_toy(
                toy_algorithm(name),
                steps=args.max_steps,
                seed=seed,
                eval_every=args.eval_every,
                target=args.target,
            )
            wall = time.perf_counter() - t0
            hit = next((i for i, r in enumerate(run.rewards) if r >= args.target), None)
            steps_to = None if hit is None else hit * args.eval_every
            seconds_to = None if hit is None else round(run.seconds[hit], 2)
            runs.append(
                {
                    "seed": seed,
                    "steps_to_target": steps_to,
                    "seconds_to_target": seconds_to,
                    "start_reward": round(run.rewards[0], 4),
                    "final_reward": round(run.rewards[-1], 4),
                    "wall_seconds": round(wall, 2),
                }
            )
        reached = [r for r in runs if r["steps_to_target"] is not None]
        results[name] = {
            "runs": runs,
            "reached": f"{len(reached)}/{len(runs)}",
            "median_steps_to_target": statistics.median(r["steps_to_target"] for r in reached)
            if reached
            else None,
            "median_seconds_to_target": statistics.median(r["seconds_to_target"] for r in reached)
            if reached
            else None,
            "lr": TOY_LR[name],
            "toy_overrides": TOY_OVERRIDES.get(name, {}),
        }

    header = f"{'objective':<10} {'reached':>8} {'median steps':>13} {'median s':>9} {'final reward (per seed)':>28}"
    print(f"toy world: target eval reward {args.target}, {args.seeds} seeds, at most {args.max_steps} steps")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        finals = " ".join(f"{x['final_reward']:.3f}" for x in r["runs"])
        steps = "-" if r["median_steps_to_target"] is None else f"{r['median_steps_to_target']:.0f}"
        secs = "-" if r["median_seconds_to_target"] is None else f"{r['median_seconds_to_target']:.1f}"
        print(f"{name:<10} {r['reached']:>8} {steps:>13} {secs:>9} {finals:>28}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "target": args.target,
        "seeds": args.seeds,
        "max_steps": args.max_steps,
        "eval_every": args.eval_every,
        "objectives": results,
    }
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
