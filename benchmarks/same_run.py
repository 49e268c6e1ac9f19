"""Do two runs compute the same thing? A refactor's proof (docs/architecture.md): the same fixed-seed run
before and after must give the same rewards and losses.

    python benchmarks/same_run.py RUN_DIR_A RUN_DIR_B [--tol 1e-6] [--allow-new-keys] [--out FILE]

Compares the two runs' metrics.jsonl step by step on every computed number (rewards, advantages'
statistics, loss, grad norm, learner diagnostics, held-out scores) and ignores what measures the machine
rather than the computation (``time/*``, ``images_per_s``, ``*_bytes``, rates). Prints one row per key
with the largest absolute difference, writes JSON (--out), and exits 1 when any difference exceeds --tol
or a key is in one run only (``--allow-new-keys``: metrics that only B logs — a change that adds
metrics — are listed but allowed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

TIMING = ("time/", "images_per_s", "rate/", "weight_sync_bytes")


def rows(run: Path) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {int(r["step"]): r for r in (json.loads(x) for x in lines if x.strip())}


def computed(key: str, value: object) -> bool:
    return isinstance(value, (int, float)) and not any(key.startswith(t) or key == t for t in TIMING)


def compare(a: dict[int, dict], b: dict[int, dict]) -> dict:
    steps = sorted(set(a) | set(b))
    missing = [s for s in steps if s not in a or s not in b]
    diffs: dict[str, float] = {}
    only_a: set[str] = set()
    only_b: set[str] = set()
    for s in steps:
        if s in missing:
            continue
        keys = {k for k, v in a[s].items() if computed(k, v)} | {k for k, v in b[s].items() if computed(k, v)}
        for k in keys:
            if k not in b[s]:
                only_a.add(k)
                continue
            if k not in a[s]:
                only_b.add(k)
                continue
            x, y = float(a[s][k]), float(b[s][k])
            d = 0.0 if (x == y or (math.isnan(x) and math.isnan(y))) else abs(x - y)
            diffs[k] = max(diffs.get(k, 0.0), d)
    return {"steps": steps, "missing_steps": missing, "only_in_a": sorted(only_a), "only_in_b": sorted(only_b),
            "max_abs_diff": diffs}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument(
        "--allow-new-keys", action="store_true", help="keys only B logs do not count as a difference"
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    result = compare(rows(args.a), rows(args.b))
    result.update(a=str(args.a), b=str(args.b), tol=args.tol)
    width = max((len(k) for k in result["max_abs_diff"]), default=10)
    print(f"{'key':<{width}}  max |a - b| over {len(result['steps'])} steps")
    for k, d in sorted(result["max_abs_diff"].items()):
        print(f"{k:<{width}}  {d:.3g}{'  > tol' if d > args.tol else ''}")
    for side in ("a", "b"):
        for k in result[f"only_in_{side}"]:
            print(f"{k:<{width}}  only in {side.upper()}")
    if result["missing_steps"]:
        print(f"steps in one run only: {result['missing_steps']}")
    worst = max(result["max_abs_diff"].values(), default=0.0)
    new_ok = args.allow_new_keys or not result["only_in_b"]
    result["same"] = worst <= args.tol and not result["missing_steps"] and not result["only_in_a"] and new_ok
    shared = f"{len(result['max_abs_diff'])} shared keys"
    extra = f"; {len(result['only_in_b'])} keys only in B, allowed" if result["only_in_b"] and new_ok else ""
    print(f"same to {args.tol:g}: {result['same']} ({shared}, largest difference {worst:.3g}{extra})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0 if result["same"] else 1


if __name__ == "__main__":
    sys.exit(main())
