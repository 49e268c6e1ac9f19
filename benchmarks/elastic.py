"""Capacity during a run: a node joining and a node leaving a live Ray cluster (real runs on this
machine), and static vs re-planned capacity simulated with the planner's cost model (vgrpo/plan.py,
vgrpo/elastic.py).

Live (``vgrpo/local_nodes.py: elastic_run``; skip with ``--no-live``): a head and a 1-CPU worker node
started as separate ``ray start`` processes on 127.0.0.1, ``vgrpo train --address`` with the embedded tiny
SD3 and ``train.autoscale`` every 2 steps. ``join``: the run starts with one rollout worker on a full head,
the node joins once step 2 is logged, the next re-plan adds a worker on it. ``leave``: the run starts with
two workers, one on the node; its raylet is killed (by pid) once step 2 is logged; the worker's share is
redone on the other and the run goes on with one. Each gives the event's step and time, images/s before
and after (medians; step 1 and the step of the change left out), the re-plans and their latency.

Simulated:
A 64-GPU V-GRPO job on SD3.5-Medium (configs/sd35m_vgrpo_geneval.yaml) starts with GenEval as its reward
and the planner's best split; halfway its reward becomes ``--factor`` times dearer per image (e.g. a VLM
judge replacing GenEval). The static job keeps its launch split; the elastic one re-plans every
``--every`` steps from the phase seconds it "measures" (the model's stage times of the split it runs,
with a few percent of noise), learner ranks unchanged, and pays ``--move-s`` seconds for each move
(new actors loading the policy / the reward model). Prints a table and writes
benchmarks/results/elastic.json.

    python benchmarks/elastic.py [--no-live] [--live-steps 8] [--gpus 64] [--steps 600] [--factor 8]
        [--every 25] [--min-gain 0.1]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "sd35m_vgrpo_geneval.yaml"
OUT = ROOT / "benchmarks" / "results" / "elastic.json"


def simulate(args: argparse.Namespace) -> dict:
    from vgrpo.elastic import replan
    from vgrpo.plan import Cluster, estimate_costs, make_plan, predict, workload_of
    from vgrpo.proto.config import load_config

    cfg = load_config(RECIPE, [])
    work = workload_of(cfg)
    cluster = Cluster(args.gpus, "GPU")
    before = estimate_costs(cfg, work, "H100")
    after = replace(before, reward=before.reward * args.factor)
    start = make_plan(before, work, cluster).best.split
    rng = random.Random(0)

    def costs_at(step: int):
        return before if step <= args.steps // 2 else after

    def run(elastic: bool) -> dict:
        split, clock, decisions, per_phase = start, 0.0, [], {"first half": [], "second half": []}
        history: list[dict] = []
        for step in range(1, args.steps + 1):
            p = predict(costs_at(step), work, split, cluster)
            clock += p.step_s
            per_phase["first half" if step <= args.steps // 2 else "second half"].append(p.step_s)
            noisy = {k: v * (1 + rng.uniform(-args.noise, args.noise)) for k, v in p.stage_s.items()}
            history.append(
                {
                    "time/sample_compute": noisy["rollout"],
                    "time/reward": noisy["reward"],
                    "time/learner": noisy["learner"],
                    "time/weight_sync": noisy["weight_sync"],
                }
            )
            if elastic and step % args.every == 0:
                d = replan(history[-args.every :], work, split, args.gpus, cluster, step, args.min_gain)
                if d.act:
                    moved = abs(d.proposed.rollout - split.rollout) + abs(d.proposed.reward - split.reward)
                    clock += args.move_s
                    decisions.append({**d.to_json(), "devices_moved": moved})
                    split = d.proposed
        images = work.images
        return {
            "hours": clock / 3600,
            "final_split": asdict(split),
            "images_per_s": {k: images * len(v) / sum(v) for k, v in per_phase.items()},
            "decisions": decisions,
        }

    static, elastic = run(False), run(True)
    return {
        "recipe": str(RECIPE.relative_to(ROOT)),
        "gpus": args.gpus,
        "steps": args.steps,
        "reward_factor_second_half": args.factor,
        "replan_every": args.every,
        "min_gain": args.min_gain,
        "move_s": args.move_s,
        "noise": args.noise,
        "start_split": asdict(start),
        "costs_s_per_image": {
            "first half": {"rollout": before.rollout, "reward": before.reward, "learner": before.learner},
            "second half": {"rollout": after.rollout, "reward": after.reward, "learner": after.learner},
        },
        "best_second_half_split": asdict(make_plan(after, work, cluster).best.split),
        "static": static,
        "elastic": elastic,
        "speedup": static["hours"] / elastic["hours"],
        "splits": "rollout, reward, learner GPUs",
    }


def live(event: str, steps: int, root: Path) -> dict:
    """One join or leave run, summarised (the raw rows and events stay in ``root``)."""
    import shutil
    import statistics

    from vgrpo.local_nodes import elastic_run

    shutil.rmtree(root / event, ignore_errors=True)
    out = elastic_run(root / event, event, steps=steps, at_step=2)
    rows, at = out["rows"], out["happened"].get("after_step")
    changes = [e for e in out["capacity"] if e["event"] == "workers"]
    change = changes[0]["step"] if changes else None

    def med(sel: list[dict], key: str) -> float | None:
        return round(statistics.median(r[key] for r in sel), 3) if sel else None

    before = [r for r in rows if 2 <= r["step"] <= (at or 0)]
    after = [r for r in rows if change is not None and r["step"] > change]
    for r in rows:
        r["rollout_images_per_s"] = r["images_per_s"] * r["time/step"] / r["time/rollout"]
    return {
        "event": event,
        "command": f"python benchmarks/elastic.py (vgrpo.local_nodes.elastic_run(root, {event!r}, steps={steps}, "
        "at_step=2))",
        "rc": out["rc"],
        "steps_logged": [r["step"] for r in rows],
        "after_step": at,
        "time_s": round(out["happened"].get("time_s", 0.0), 1),
        "workers_changed_at_step": change,
        "rollout_workers": [rows[0]["capacity/rollout_workers"], rows[-1]["capacity/rollout_workers"]]
        if rows
        else None,
        "images_per_s_before": med(before, "images_per_s"),
        "images_per_s_after": med(after, "images_per_s"),
        "rollout_images_per_s_before": med(before, "rollout_images_per_s"),
        "rollout_images_per_s_after": med(after, "rollout_images_per_s"),
        "step_s_of_the_change": next((round(r["time/step"], 2) for r in rows if r["step"] == change), None),
        "replans": [
            {k: e.get(k) for k in ("step", "free_slots", "act", "reason", "seconds", "apply_s", "done")}
            for e in out["capacity"]
            if e["event"] == "replan"
        ],
        "events": changes,
        "wall_s": round(out["wall_s"], 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=64)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--factor", type=float, default=8.0, help="reward cost multiplier in the second half")
    ap.add_argument("--every", type=int, default=25, help="re-plan every this many steps")
    ap.add_argument("--min-gain", type=float, default=0.1)
    ap.add_argument("--move-s", type=float, default=90.0, help="seconds a move costs (actors loading)")
    ap.add_argument("--noise", type=float, default=0.05, help="relative noise of the measured phase seconds")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--no-live", action="store_true", help="skip the join and leave runs (minutes each)")
    ap.add_argument("--live-steps", type=int, default=8)
    ap.add_argument("--live-dir", type=Path, default=Path("/tmp/vgrpo-elastic-bench"))
    args = ap.parse_args(argv)
    sim = simulate(args)
    result: dict = {"simulation": sim, "join": None, "leave": None}
    if not args.no_live:
        import datetime
        import os

        result["live_machine"] = f"{os.cpu_count()} cores; measured {datetime.date.today().isoformat()}"
        for event in ("join", "leave"):
            result[event] = r = live(event, args.live_steps, args.live_dir)
            print(
                f"{event}: after step {r['after_step']} ({r['time_s']} s); workers {r['rollout_workers']} "
                f"(changed at step {r['workers_changed_at_step']}); images/s {r['images_per_s_before']} -> "
                f"{r['images_per_s_after']}; rollout images/s {r['rollout_images_per_s_before']} -> "
                f"{r['rollout_images_per_s_after']}; steps {r['steps_logged']}; rc {r['rc']}"
            )
            for d in r["replans"]:
                print(f"  step {d['step']}: {d['reason']} ({d['seconds'] * 1e3:.2f} ms to decide)")
    s, e = sim["static"], sim["elastic"]
    print(f"{sim['gpus']} GPUs, {sim['steps']} steps, reward x{sim['reward_factor_second_half']:g} from step "
          f"{sim['steps'] // 2 + 1}; start split {sim['start_split']}")  # fmt: skip
    print(f"{'':10} {'images/s 1st half':>18} {'images/s 2nd half':>18} {'hours':>7}  final split")
    for name, r in (("static", s), ("elastic", e)):
        ips = r["images_per_s"]
        print(
            f"{name:10} {ips['first half']:18.1f} {ips['second half']:18.1f} {r['hours']:7.2f}  {r['final_split']}"
        )
    print(f"elastic / static: {sim['speedup']:.2f}x faster; decisions:")
    for d in e["decisions"]:
        print(f"  step {d['step']}: {d['reason']} (decided in {d['seconds'] * 1e3:.1f} ms)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
