"""Simulated scaling of the actor–learner pipeline from 8 to 256 GPUs, with and without the async overlap.

    python benchmarks/scaling.py [--config X.yaml] [--costs FILE.json] [--gpus 8,16,32,64,128,256]
                                 [--granularity prompt,image] [--out benchmarks/results/scaling.json]

For each cluster size it asks the planner (vgrpo/plan.py) for the best split of the GPUs at
train.max_staleness = 0 (the phases serialise) and = 1 (the rollout of step k+1 overlaps scoring and
learning of step k), at two batch policies:

  fixed  the recipe's batch (P prompts x G) at every size: strong scaling
  weak   P grows with the cluster (P per GPU of the recipe's reference size, 64 GPUs): weak scaling

Efficiency = predicted images/s / the ideal N / (c_rollout + c_reward + c_learner), i.e. the fraction of
GPU-seconds doing useful work. Per-phase costs: --costs FILE (from `vgrpo plan --measure --save-costs` or a
run's metrics.jsonl), else FLOP estimates of the config (default: the SD3.5-Medium V-GRPO recipe), printed
with their assumptions. Prints a table, writes JSON and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pngplot import Panel, Series, save_chart

from vgrpo import plan as PL
from vgrpo.proto.config import load_config

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_GPUS = 64


def simulate(costs_for, cfg_work: PL.Workload, sizes: list[int], policy: str) -> list[dict]:
    rows = []
    for n in sizes:
        p = cfg_work.prompts
        if policy == "weak":
            p = max(1, round(cfg_work.prompts * n / REFERENCE_GPUS))
        row: dict = {"gpus": n, "batch": policy, "prompts": p, "group_size": cfg_work.group_size}
        for staleness in (0, 1):
            work = PL.Workload(p, cfg_work.group_size, staleness, cfg_work.granularity)
            costs = costs_for(work)
            cluster = PL.Cluster(n, "GPU")
            ideal = n / (costs.rollout + costs.reward + costs.learner)
            try:
                plan = PL.make_plan(costs, work, cluster)
            except PL.InfeasibleError as e:
                row[f"s{staleness}"] = {"error": str(e)}
                continue
            b = plan.best
            row[f"s{staleness}"] = {
                "images_per_s": b.images_per_s,
                "efficiency": b.images_per_s / ideal,
                "split": [b.split.rollout, b.split.reward, b.split.learner],
                "idle": plan.idle,
                "step_s": b.step_s,
                "bottleneck": b.bottleneck,
            }
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=None, help="run config (default: the SD3.5-M recipe)")
    ap.add_argument("--costs", type=Path, default=None, help="per-phase costs JSON or a run's metrics.jsonl")
    ap.add_argument("--gpus", default="8,16,32,64,128,256")
    ap.add_argument(
        "--granularity",
        default="prompt,image",
        help="prompt: whole groups per worker/rank, as the driver does; image: single images (the ideal)",
    )
    ap.add_argument("--gpu-type", default="H100")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scaling.json")
    args = ap.parse_args()
    if args.config is not None:
        cfg, title = load_config(args.config, []), str(args.config)
    else:
        cfg, title = PL.default_config()
    short = title.rsplit("/", 1)[-1].split(" (")[0]
    sizes = [int(x) for x in args.gpus.split(",")]
    fixed_costs = PL.load_costs(args.costs) if args.costs else None
    if fixed_costs is not None and fixed_costs.device != "GPU":
        print(f"note: {args.costs} holds per-{fixed_costs.device} costs; the table counts them as GPUs")
        fixed_costs.device = "GPU"

    def costs_for(work: PL.Workload) -> PL.Costs:
        return fixed_costs if fixed_costs is not None else PL.estimate_costs(cfg, work, args.gpu_type)

    base = PL.workload_of(cfg)
    c = costs_for(PL.Workload(base.prompts, base.group_size, 1))
    print(f"scaling of {title}: P={base.prompts} x G={base.group_size}")
    print(
        f"costs ({c.source}), GPU-s/image: rollout {c.rollout:.4g}  reward {c.reward:.4g}  learner {c.learner:.4g}"
    )
    for a in c.assumptions:
        print(f"  - {a}")
    results: dict[str, dict[str, list[dict]]] = {}
    for gran in args.granularity.split(","):
        base.granularity = gran  # type: ignore[assignment]
        results[gran] = {policy: simulate(costs_for, base, sizes, policy) for policy in ("fixed", "weak")}
        for policy, rows in results[gran].items():
            print()
            what = "strong scaling" if policy == "fixed" else "P grows with the GPUs"
            print(f"{policy} batch ({what}), granularity {gran}")
            print(
                f"{'GPUs':>5} {'P':>4} | {'sync img/s':>10} {'eff':>5} {'split r/w/l':>12} | "
                f"{'async img/s':>11} {'eff':>5} {'split r/w/l':>12} {'idle':>4} {'bottleneck':>10} | "
                f"{'async/sync':>10}"
            )
            for r in rows:
                s0, s1 = r.get("s0", {}), r.get("s1", {})
                if "error" in s0 or "error" in s1:
                    print(f"{r['gpus']:>5} {r['prompts']:>4} | infeasible: {(s0 or s1).get('error', '')}")
                    continue
                sp = lambda s: "/".join(map(str, s["split"]))  # noqa: E731
                print(
                    f"{r['gpus']:>5} {r['prompts']:>4} | {s0['images_per_s']:>10.1f} {s0['efficiency']:>5.0%} "
                    f"{sp(s0):>12} | {s1['images_per_s']:>11.1f} {s1['efficiency']:>5.0%} {sp(s1):>12} "
                    f"{s1['idle']:>4} {s1['bottleneck']:>10} | {s1['images_per_s'] / s0['images_per_s']:>9.2f}x"
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": title,
        "costs": c.to_json(),
        "reference_gpus_for_weak_scaling": REFERENCE_GPUS,
        "efficiency": "predicted images/s / (GPUs / (c_rollout + c_reward + c_learner))",
        "results": results,
    }
    args.out.write_text(json.dumps(payload, indent=1))
    png = args.out.with_suffix(".png")
    panels = []
    for metric, label in (("images_per_s", "images/s"), ("efficiency", "efficiency")):
        series = []
        for gran, by_policy in results.items():
            rows = by_policy["fixed"]
            for s, name in (("s1", "async"), ("s0", "sync")):
                ok = [r for r in rows if "error" not in r.get(s, {"error": 1})]
                series.append(
                    Series(
                        f"{name}, {gran} split",
                        [r["gpus"] for r in ok],
                        [r[s][metric] for r in ok],
                        dashed=(s == "s0"),
                    )
                )
        panels.append(
            Panel(
                f"{label} vs GPUs, fixed batch P={base.prompts} x G={base.group_size} ({short})",
                "GPUs",
                label,
                series,
                logx=True,
            )
        )
    save_chart(png, panels)
    print(f"\nwrote {args.out} and {png}")


if __name__ == "__main__":
    main()
