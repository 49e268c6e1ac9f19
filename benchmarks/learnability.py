"""Learnability probe: does the shipped tiny SD3 model's held-out GenEval-Shapes score rise under RL?

One process, no Ray: the rollout engine, the shapes reward and a one-rank DeepSpeed learner (gloo) run
the same code as `vgrpo train`'s actors, step by step (sample G images per prompt -> score -> group
advantages -> update -> apply the weights). The held-out split is evaluated before the first step and
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
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

FAMILIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    from vgrpo.learner.engine import LearnerEngine
    from vgrpo.proto.config import load_config
    from vgrpo.proto.messages import TrainShard, WeightUpdate
    from vgrpo.reward_servers.registry import get_reward
    from vgrpo.rollout_workers.engine import RolloutEngine

    cfg = load_config(None, args.sets)
    r, d, seed = cfg.rollout, cfg.data, cfg.train.seed
    noise = float(getattr(cfg.algorithm.params(), "noise_level", 0.7))
    rollout = RolloutEngine(
        cfg.model,
        r,
        cfg.sampler(),
        noise_level=noise,
        sigma_grid=cfg.sigma_grid(),
        seed=seed,
        device=args.device,
    )
    learner = LearnerEngine(
        cfg.model, cfg.learner, cfg.algorithm, r, 0, 1, args.steps, seed=seed, device=args.device
    )
    learner.init_distributed("127.0.0.1", free_port())
    rewards = {name: get_reward(name, cfg.reward.server(name).options) for name in cfg.reward.weights}
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
        prompts = [p.prompt for p in items for _ in range(r.group_size)]
        window = learner.objective.rollout_window(step, r.num_steps, seed)  # MixGRPO, Flow-GRPO-Fast
        batch = rollout.sample(
            [p.prompt for p in items], r.group_size, derive_seeds(seed, step, len(prompts)), window
        )
        images = list(batch.images)
        metadata = [p.metadata for p in items for _ in range(r.group_size)]
        total = np.zeros(len(prompts))
        for name, w in cfg.reward.weights.items():
            scored = rewards[name].score(images, prompts, metadata)
            values = [s.value if s.error is None else None for s in scored]
            bad = next((i for i, v in enumerate(values) if v is None or not np.isfinite(v)), None)
            if bad is not None:  # as the driver's RewardClient: a failed image stops the run, named
                why = scored[bad].error or f"value {values[bad]}"
                raise SystemExit(f"reward {name!r} failed on image {bad} (prompt {prompts[bad]!r}): {why}")
            total += w * np.array(values, dtype=np.float64)
        group_b = np.repeat(np.arange(len(items)), r.group_size)
        adv, stats = learner.objective.advantages(torch.as_tensor(total), torch.as_tensor(group_b))
        (shard,) = TrainShard.split(batch, adv.numpy(), 1, rollout.version)
        metrics = learner.train_step(shard, step)
        rollout.update_weights(WeightUpdate(step, learner.publish()))
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
