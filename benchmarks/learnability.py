"""Learnability probe: does the shipped tiny SD3 model's held-out GenEval-Shapes score rise under RL?

One process, no Ray: `vgrpo/local_loop.py`'s step (the rollout engine, the configured rewards and a
one-rank DeepSpeed learner on gloo run the same code as `vgrpo train`'s actors: sample G images per
prompt -> score -> group advantages -> update -> apply the weights). The held-out split is evaluated before the first step and
every `--eval-every` steps with the configured evaluation sampler. Settings are the embedded default's
(`vgrpo config`), changed with `--set key=value` as in `vgrpo train`.

    python benchmarks/learnability.py                      # 60 steps of the default V-GRPO, ~5 min
    python benchmarks/learnability.py --steps 20 --set algorithm.name=nft

Prints a table of held-out scores per family by step and writes JSON
(benchmarks/results/learnability.json by default)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

FAMILIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (rollout engine and learner alike)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "learnability.json")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vgrpo-torch-extensions"))
    from vgrpo.data import PromptSource
    from vgrpo.driver import derive_seeds
    from vgrpo.evaluate import load_prompt_rows, score_heldout, shapes_reward
    from vgrpo.local_loop import LocalLoop
    from vgrpo.proto.config import load_config

    cfg = load_config(None, args.sets)
    r, d, seed = cfg.rollout, cfg.data, cfg.train.seed
    loop = LocalLoop(cfg, device=args.device, seed=seed, total_steps=args.steps)
    rollout = loop.rollout
    source = PromptSource.from_spec(d.train_prompts, seed=seed, shuffle=d.shuffle, balance_by=d.balance_by)
    rows = load_prompt_rows(d.eval_prompts, d.eval_max_prompts)

    def evaluate() -> dict:
        sampled = rollout.sample_heldout(
            [row["prompt"] for row in rows],
            images_per_prompt=d.eval_images_per_prompt,
            seed=seed,
            num_steps=d.eval_num_steps,
            guidance_scale=d.eval_guidance_scale,
            sampler="dpm2",
            shift=r.shift,
            batch_size=r.batch_size,
        )
        res = score_heldout(rows, sampled, shapes_reward(), "shapes")
        return {"overall": res["overall"], "families": res["families"]}

    history: list[dict] = []
    t_start = time.perf_counter()

    def record(last: int) -> dict:  # written after every evaluation: a cut-off run keeps what it measured
        result = {
            "settings": {
                "steps": args.steps,
                "sets": args.sets,
                "threads": args.threads,
                "device": args.device,
                "algorithm": cfg.algorithm.name,
            },
            "evals": {str(k): v for k, v in evals.items()},
            "gain": evals[last]["overall"] - evals[0]["overall"],
            "train_seconds": train_s,
            "wall_seconds": time.perf_counter() - t_start,
            "history": history,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        return result

    evals = {0: evaluate()}
    print(f"step 0: held-out {evals[0]['overall']:.3f}", flush=True)
    train_s = 0.0
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        items = source.next(r.prompts_per_step)
        seeds = derive_seeds(seed, step, len(items) * r.group_size)
        done = loop.step([p.prompt for p in items], step, seeds, [p.metadata for p in items])
        total, stats, metrics = done.scores.total, done.adv_stats, done.learner
        train_s += time.perf_counter() - t0
        history.append(
            {"step": step, "reward": float(total.mean()), "zero_std_frac": stats["zero_std_frac"], **metrics}
        )
        if step % args.eval_every == 0 or step == args.steps:
            evals[step] = evaluate()
            record(step)
            window = [h["reward"] for h in history[-args.eval_every :]]
            print(
                f"step {step}: held-out {evals[step]['overall']:.3f}  train reward (last {len(window)}) "
                f"{np.mean(window):.3f}  {train_s / step:.2f} s/step",
                flush=True,
            )

    print()
    print(f"{'step':>5} " + " ".join(f"{f[:12]:>12}" for f in FAMILIES) + f" {'overall':>8}")
    for step, e in evals.items():
        fam = " ".join(f"{e['families'].get(f, float('nan')):12.3f}" for f in FAMILIES)
        print(f"{step:5d} {fam} {e['overall']:8.3f}")
    result = record(args.steps)
    print(
        f"\nheld-out gain {result['gain']:+.3f} in {args.steps} steps ({train_s:.0f} s training); wrote {args.out}"
    )
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
