"""Per-phase seconds of the actor–learner loop and the speed-up of bounded staleness.

    python benchmarks/pipeline.py [--steps 6] [--set key=value ...] [--out FILE]

Runs the embedded default (tiny SD3 + GenEval-Shapes + V-GRPO) on a local Ray cluster twice at equal
resources, with train.max_staleness = 0 and = 1, and reports the median over steps (the first step, which
includes start-up effects, is dropped) of each phase and of images/s. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
PHASES = ["time/rollout", "time/reward", "time/learner", "time/weight_sync", "time/step", "images_per_s"]


def run(staleness: int, steps: int, sets: list[str]) -> dict[str, float]:
    from vgrpo.driver import train
    from vgrpo.proto.config import load_config

    cfg = load_config(
        None,
        [
            f"train.steps={steps}",
            f"train.max_staleness={staleness}",
            f"train.checkpoint_every={steps}",
            "observability.progress=off",
            "observability.tensorboard=false",
            *sets,
        ],
    )
    with tempfile.TemporaryDirectory() as d:
        train(cfg, Path(d) / "run")
        rows = [json.loads(x) for x in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = rows[1:] or rows
    return {k: statistics.median(r[k] for r in rows) for k in PHASES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, default=PROJECT / "benchmarks" / "results" / "pipeline.json")
    args = ap.parse_args()
    import ray

    results = {}
    for staleness in (0, 1):
        ray.init(include_dashboard=False, log_to_driver=False)
        try:
            results[f"max_staleness={staleness}"] = run(staleness, args.steps, args.sets)
        finally:
            ray.shutdown()
    sync, overlap = results["max_staleness=0"], results["max_staleness=1"]
    speedup = overlap["images_per_s"] / sync["images_per_s"]
    print(f"{'phase (median s/step)':<22}" + "".join(f"{k:>18}" for k in results))
    for k in PHASES:
        print(f"{k:<22}" + "".join(f"{results[name][k]:>18.3f}" for name in results))
    print(f"speed-up of max_staleness=1 over 0 (images/s): {speedup:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"steps": args.steps, "sets": args.sets, "results": results, "speedup_staleness1": speedup},
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
