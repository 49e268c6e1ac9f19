"""Validate `vgrpo plan` on this machine: does the predicted ranking of a few splits match the measured one?

    python benchmarks/plan_validate.py [--costs FILE.json] [--steps 4] [--repeats 1] [--out FILE]

1. Per-phase costs of the embedded default (tiny SD3 + GenEval-Shapes + V-GRPO), measured in-process with
   the real engines at one torch thread (`vgrpo plan --embedded --measure`), or read from --costs.
2. The planner's model (vgrpo/plan.py `predict`) gives images/s for each split below, one core per actor,
   at the capacity this machine really has now (probed: the same work in 1 and in N processes at once;
   other jobs on a shared machine leave less than its N cores, and then parallel splits gain less).
3. Each split runs for real: `vgrpo.driver.train` on a local Ray cluster, resources.torch_threads=1, the
   median images/s over its steps (the first, which pays start-up, dropped).

Splits (rollout workers / learner ranks / max_staleness) are chosen to differ in what the model claims:
the overlap (staleness 1 vs 0 at 1/1) and more workers or ranks in the synchronous loop, where only one
phase runs at a time, so 2 actors of a role use both cores. Prints a table with Kendall's tau between the
predicted and measured orders (for both predictions: at the probed capacity and with dedicated cores),
and how many of the pairs the model separates by > 10% the measurement orders alike; writes JSON.

On the project's shared 2-core machine under load (load average 8-12 from other jobs) the measured
images/s of one split moved ~3x within minutes, more than the model's differences between splits
(<= 1.8x), and the ranking did not hold. On the same machine quiet (2026-11-26, --repeats 3, ~4 min,
benchmarks/results/plan_validate.json) it holds: predicted 14.6 / 23.6 / 21.1 / 17.6 images/s for
1/1/0, 1/1/1, 2/1/0, 1/2/0, measured 14.4 / 23.3 / 18.8 / 16.6 (measured/predicted 0.89-0.99), Kendall
tau +1.00, all 6 pairs the model separates by > 10% measured in the same order. Use --repeats 3
(alternating order) where the load drifts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SPLITS = [(1, 1, 0), (1, 1, 1), (2, 1, 0), (1, 2, 0)]  # (rollout workers, learner ranks, max_staleness)


def kendall_tau(a: list[float], b: list[float]) -> float:
    pairs = list(itertools.combinations(range(len(a)), 2))
    s = sum((a[i] - a[j]) * (b[i] - b[j]) > 0 for i, j in pairs) - sum(
        (a[i] - a[j]) * (b[i] - b[j]) < 0 for i, j in pairs
    )
    return s / len(pairs) if pairs else 1.0


def _burn(n: int, q: Any) -> None:
    import torch

    torch.set_num_threads(1)
    a = torch.randn(192, 192)
    t0 = time.perf_counter()
    for _ in range(n):
        a = torch.tanh(a @ a / 192)
    q.put(time.perf_counter() - t0)


def probe_capacity(cores: int, n: int = 1500) -> float:
    """Cores' worth of compute this process group really gets now: the same single-threaded work in 1 and
    in ``cores`` processes at once; capacity = cores x t(1) / mean t(cores), at most ``cores``."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")

    def timed(k: int) -> list[float]:
        q = ctx.Queue()
        procs = [ctx.Process(target=_burn, args=(n, q)) for _ in range(k)]
        for pr in procs:
            pr.start()
        out = [q.get(timeout=300) for _ in procs]
        for pr in procs:
            pr.join()
        return out

    t1 = statistics.mean(timed(1))
    tk = statistics.mean(timed(cores))
    return max(0.25, min(float(cores), cores * t1 / tk))


def decisive_agreement(p: list[float], m: list[float], margin: float = 0.10) -> tuple[int, int]:
    """Pairs the model separates by more than ``margin``, and how many of them the measurement orders alike."""
    n = agree = 0
    for i, j in itertools.combinations(range(len(p)), 2):
        if abs(p[i] - p[j]) > margin * max(p[i], p[j]):
            n += 1
            agree += (p[i] - p[j]) * (m[i] - m[j]) > 0
    return agree, n


def measured(workers: int, ranks: int, staleness: int, steps: int, sets: list[str]) -> dict[str, float]:
    import ray

    from vgrpo.driver import train
    from vgrpo.proto.config import load_config

    cfg = load_config(
        None,
        [
            f"train.steps={steps}",
            f"train.max_staleness={staleness}",
            f"train.checkpoint_every={steps}",
            f"train.samples_every={steps}",
            f"rollout.num_workers={workers}",
            f"learner.num_ranks={ranks}",
            "resources.torch_threads=1",
            "observability.progress=off",
            "observability.tensorboard=false",
            "observability.report=false",
            *sets,
        ],
    )
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as d:
            train(cfg, Path(d) / "run")
            rows = [json.loads(x) for x in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
    finally:
        ray.shutdown()
    rows = rows[1:] or rows
    keys = ["images_per_s", "time/rollout", "time/reward", "time/learner", "time/weight_sync", "time/step"]
    return {k: statistics.median(r[k] for r in rows) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--costs", type=Path, default=None, help="costs JSON (vgrpo plan --save-costs)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1, help="runs per split, in alternating order (median)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "plan_validate.json")
    args = ap.parse_args()
    from vgrpo import plan as PL
    from vgrpo.proto.config import load_config

    cfg = load_config(None, args.sets)
    work = PL.workload_of(cfg)
    t0 = time.perf_counter()
    cores = os.cpu_count() or 1
    costs = PL.load_costs(args.costs) if args.costs else PL.measure_costs(cfg, work)
    dedicated = PL.Cluster(
        cores, "CPU", cpus=cores, devices_per_node=cores, memory_gb=1e9, intra_node_gbps=2.0
    )
    # repeats alternate the order (ABCD, DCBA, ...) so that a drift of the machine's load hits every split
    order_runs = [SPLITS if k % 2 == 0 else SPLITS[::-1] for k in range(args.repeats)]
    caps: dict[tuple, list[float]] = {sp: [] for sp in SPLITS}
    meas: dict[tuple, list[dict[str, float]]] = {sp: [] for sp in SPLITS}
    for k, splits in enumerate(order_runs):
        for sp in splits:
            workers, ranks, staleness = sp
            # the load of a shared machine changes by the minute: probe it right before each run
            caps[sp].append(probe_capacity(cores))
            print(
                f"[validate] repeat {k + 1}/{args.repeats}: R={workers} L={ranks} staleness={staleness}, "
                f"capacity {caps[sp][-1]:.2f} cores",
                flush=True,
            )
            meas[sp].append(measured(workers, ranks, staleness, args.steps, args.sets))
    rows: list[dict[str, Any]] = []
    for sp in SPLITS:
        workers, ranks, staleness = sp
        w = PL.Workload(work.prompts, work.group_size, staleness)
        split = PL.Split(workers, 0, ranks)
        capacity = statistics.mean(caps[sp])
        shared = PL.Cluster(**{**dedicated.__dict__, "capacity": capacity})
        pred = PL.predict(costs, w, split, shared)
        ideal = PL.predict(costs, w, split, dedicated)
        m_all = meas[sp]
        rows.append(
            {
                "rollout_workers": workers,
                "learner_ranks": ranks,
                "max_staleness": staleness,
                "capacity_cores": capacity,
                "predicted_images_per_s": pred.images_per_s,
                "predicted_dedicated_images_per_s": ideal.images_per_s,
                "predicted_stage_s": pred.stage_s,
                "measured": {key: statistics.median(x[key] for x in m_all) for key in m_all[0]},
                "measured_repeats": m_all,
            }
        )
    p = [r["predicted_images_per_s"] for r in rows]
    d = [r["predicted_dedicated_images_per_s"] for r in rows]
    m = [r["measured"]["images_per_s"] for r in rows]
    order = lambda xs: sorted(range(len(xs)), key=lambda i: -xs[i])  # noqa: E731
    rp, rd, rm = order(p), order(d), order(m)
    print(
        f"\ncosts ({costs.source}): rollout {costs.rollout:.4g}, reward {costs.reward:.4g}, "
        f"learner {costs.learner:.4g} core-s/image"
    )
    print(
        f"{'split R/L/staleness':>20} {'capacity':>8} | {'predicted':>9} {'rank':>4} | {'dedicated':>9} {'rank':>4} "
        f"| {'measured':>8} {'rank':>4} | {'meas/pred':>9}   (images/s)"
    )
    for i, r in enumerate(rows):
        name = f"{r['rollout_workers']}/{r['learner_ranks']}/{r['max_staleness']}"
        print(
            f"{name:>20} {r['capacity_cores']:>8.2f} | {p[i]:>9.2f} {rp.index(i) + 1:>4} | {d[i]:>9.2f} "
            f"{rd.index(i) + 1:>4} | {m[i]:>8.2f} {rm.index(i) + 1:>4} | {m[i] / p[i]:>9.2f}"
        )
    verdict = {}
    for name, pr in (("at the probed capacity", p), ("with dedicated cores", d)):
        agree, decisive = decisive_agreement(pr, m)
        verdict[name] = {
            "kendall_tau": kendall_tau(pr, m),
            "same_order": order(pr) == rm,
            "decisive_pairs": decisive,
            "decisive_pairs_agreeing": agree,
        }
        print(
            f"prediction {name}: Kendall tau vs measured {kendall_tau(pr, m):+.2f}, same order "
            f"{order(pr) == rm}; of the {decisive} pairs it separates by > 10%, {agree} measured alike"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "costs": costs.to_json(),
                "steps": args.steps,
                "repeats": args.repeats,
                "sets": args.sets,
                "rows": rows,
                "verdict": verdict,
                "seconds": time.perf_counter() - t0,
            },
            indent=1,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
