"""The algorithm race: V-GRPO vs DGPO vs Flow-GRPO (SDE) vs DiffusionNFT on the embedded default.

    python benchmarks/race.py [--seeds 2] [--time-limit 480] [--max-steps 200] [--eval-every 4]
                              [--objectives vgrpo,dgpo,flow_grpo,nft] [--ablation] [--smoke]
                              [--set key=value ...] [--runs-dir DIR] [--out FILE]

Every run is a real `vgrpo train` (tiny SD3 + GenEval-Shapes, a local Ray cluster) at equal resources:
the same batch (rollout.prompts_per_step x group_size), sampler steps, learner ranks and rollout workers;
each objective keeps its paper's own hyper-parameters (the `algorithm.<name>` defaults of the config,
ALGORITHMS.md §4-6: V-GRPO N_MC 4 + soft clip 3; DGPO beta_dpo 100, KL 0.02, 4 high-noise grid times;
Flow-GRPO SDE a=0.7, clip 1e-4, KL 0.04; NFT beta 1, KL 1e-4), scaled down only through the shared
rollout (10 sampler steps, CFG w = 5, P x G of the embedded default; V-GRPO with its reference KL 0.5). A run stops at --max-steps or at
--time-limit seconds (SIGINT: the driver checkpoints and exits 130), whichever comes first.

From each run's metrics.jsonl (`eval/overall`, `eval/<family>` every `train.eval_every` steps;
`reward_mean`, `time/step` every step) it reports:

- the target: --target-frac (0.9) x the best final held-out score of any objective (mean over seeds);
- steps and seconds to the target per objective (seconds = training wall-clock, the sum of `time/step`,
  which leaves out the evaluations themselves; `wall_s` beside it counts everything from launch);
- the final held-out score, overall and per family;
- reward-hacking signs: the training reward rising (last third vs first third of the steps) while the
  held-out score does not (first vs last evaluation).

Prints tables, writes JSON (--out) and a PNG of held-out score vs training seconds beside it. Resumable:
a run whose result.json exists in --runs-dir is not run again (delete it to rerun). --smoke: 2 steps per
objective, 1 seed, a small evaluation, into benchmarks/results/race_smoke.json (checks the machinery).
--ablation adds V-GRPO variants (N_MC, clip + KL, soft clip, reference KL, reward mode, learning rate)
as extra entries; --only LABEL[,LABEL] runs just those entries.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pngplot import Panel, Series, save_chart

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OBJECTIVES = ["vgrpo", "dgpo", "flow_grpo", "nft"]
# V-GRPO variants for the ablation table (label -> --set overrides on top of algorithm.name=vgrpo)
ABLATION: dict[str, list[str]] = {
    "vgrpo[n_mc=2]": ["algorithm.vgrpo.n_mc=2"],
    "vgrpo[n_mc=8]": ["algorithm.vgrpo.n_mc=8"],
    "vgrpo[kl=0.3,inner=2]": ["algorithm.vgrpo.kl_beta=0.3", "algorithm.vgrpo.inner_steps=2"],
    "vgrpo[no_soft_clip]": ["algorithm.vgrpo.advantage.soft_clip=null", "algorithm.vgrpo.advantage.clip=5.0"],
    "vgrpo[ref_kl=0]": ["algorithm.vgrpo.ref_kl_beta=0"],
    "vgrpo[reward=mixed]": ["reward.servers.shapes.options.mode=mixed"],
    "vgrpo[lr=3e-3]": ["learner.lr=0.003"],
    "vgrpo[lr=3e-4]": ["learner.lr=0.0003"],
}


# ----------------------------------------------------------------------------------------------- one run


def run_one(
    label: str,
    sets: list[str],
    seed: int,
    args: argparse.Namespace,
    runs_dir: Path,
) -> dict[str, Any]:
    """One `vgrpo train` in its own session; returns (and stores) its curves. Skipped if stored."""
    folder = runs_dir / f"{label}_s{seed}"
    done = folder / "result.json"
    if done.is_file():
        print(f"[race] {label} seed {seed}: done before, skipping ({done})", flush=True)
        return json.loads(done.read_text())
    run_dir = folder / "run"
    if run_dir.exists():  # an interrupted attempt: start it over (a partial curve is not comparable)
        shutil.rmtree(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "vgrpo.cli",
        "train",
        "--run-dir",
        str(run_dir),
        "--set",
        f"train.seed={seed}",
        "--set",
        f"train.steps={args.max_steps}",
        "--set",
        f"train.eval_every={args.eval_every}",
        "--set",
        f"train.checkpoint_every={args.max_steps}",
        "--set",
        f"train.samples_every={args.max_steps}",
        "--set",
        "observability.progress=plain",
        "--set",
        "observability.report=false",
        "--set",
        "observability.tensorboard=false",
        "--set",
        f"data.eval_images_per_prompt={args.eval_images}",
    ]
    if args.eval_prompts:
        cmd += ["--set", f"data.eval_max_prompts={args.eval_prompts}"]
    for s in [*args.sets, *sets]:
        cmd += ["--set", s]
    log_path = folder / "train.log"
    print(f"[race] {label} seed {seed}: {' '.join(cmd[3:])}", flush=True)
    t0 = time.time()
    arrivals: dict[int, float] = {}
    metrics = run_dir / "metrics.jsonl"
    stopped_early = False
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                _note_arrivals(metrics, arrivals, t0)
                if time.time() - t0 > args.time_limit and not stopped_early:
                    stopped_early = True
                    print(
                        f"[race] {label} seed {seed}: time limit {args.time_limit:.0f} s, stopping",
                        flush=True,
                    )
                    proc.send_signal(signal.SIGINT)  # the driver checkpoints and exits 130
                    try:
                        proc.wait(timeout=120)
                    except subprocess.TimeoutExpired:
                        _end_group(proc)
        except KeyboardInterrupt:
            _end_group(proc)
            raise
    _note_arrivals(metrics, arrivals, t0)
    rc = proc.returncode
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.is_file() else []
    if not rows:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(
            f"[race] {label} seed {seed}: no metrics (exit {rc}); log {log_path}:\n" + "\n".join(tail)
        )
    result = curves(label, seed, sets, rows, arrivals, rc, time.time() - t0, stopped_early)
    if rc not in (0, 130):  # failed mid-run: reported, but not stored as done (a rerun tries again)
        print(
            f"[race] {label} seed {seed}: exit {rc} after step {rows[-1]['step']}; see {log_path}", flush=True
        )
        (folder / "failed.json").write_text(json.dumps(result, indent=1))
        return result
    done.write_text(json.dumps(result, indent=1))
    for bulky in ("checkpoints", "samples"):  # metrics.jsonl and config.yaml stay beside result.json
        shutil.rmtree(run_dir / bulky, ignore_errors=True)
    return result


def _note_arrivals(metrics: Path, arrivals: dict[int, float], t0: float) -> None:
    if not metrics.is_file():
        return
    now = time.time() - t0
    for line in metrics.read_text().splitlines():
        try:
            step = int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue  # a line being written
        arrivals.setdefault(step, now)


def _end_group(proc: subprocess.Popen) -> None:
    """End the run we started: its own process group (start_new_session), by id."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def curves(
    label: str,
    seed: int,
    sets: list[str],
    rows: list[dict[str, Any]],
    arrivals: dict[int, float],
    rc: int | None,
    wall: float,
    stopped: bool,
) -> dict[str, Any]:
    train_s = 0.0
    steps, reward, t_train, t_wall = [], [], [], []
    evals = []
    for r in rows:
        train_s += float(r.get("time/step", 0.0))
        steps.append(int(r["step"]))
        reward.append(float(r["reward_mean"]))
        t_train.append(train_s)
        t_wall.append(arrivals.get(int(r["step"])))
        if "eval/overall" in r:
            fam = {k[5:]: float(v) for k, v in r.items() if k.startswith("eval/") and k != "eval/overall"}
            evals.append(
                {
                    "step": int(r["step"]),
                    "train_s": train_s,
                    "wall_s": arrivals.get(int(r["step"])),
                    "overall": float(r["eval/overall"]),
                    "families": fam,
                }
            )
    return {
        "label": label,
        "seed": seed,
        "sets": sets,
        "exit_code": rc,
        "stopped_by_time_limit": stopped,
        "wall_s": wall,
        "steps": steps,
        "reward_mean": reward,
        "train_s": t_train,
        "wall_s_at_step": t_wall,
        "evals": evals,
        "seconds_per_step": statistics.median(float(r.get("time/step", 0.0)) for r in rows),
    }


# ----------------------------------------------------------------------------------------------- analysis


def mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def gain(final: float | None, start: float | None) -> float | None:
    return final - start if final is not None and start is not None else None


def hacking_signs(run: dict[str, Any]) -> dict[str, Any]:
    """Training reward rising while the held-out score does not (ALGORITHMS.md §9.5)."""
    rew = run["reward_mean"]
    k = max(1, len(rew) // 3)
    d_train = (mean(rew[-k:]) or 0.0) - (mean(rew[:k]) or 0.0)
    ev = run["evals"]
    d_held = ev[-1]["overall"] - ev[0]["overall"] if len(ev) >= 2 else None
    if len(ev) < 3 or len(rew) < 6:  # too short a run to tell a trend from noise
        return {"d_train_reward": d_train, "d_heldout": d_held, "flag": None}
    flagged = d_held is not None and d_train > 0.05 and d_held < 0.25 * d_train
    return {"d_train_reward": d_train, "d_heldout": d_held, "flag": bool(flagged)}


def start_score(seed: int, args: argparse.Namespace, runs_dir: Path) -> float:
    """Held-out score of the starting policy with the race's evaluation settings and the seed's images
    (the runs evaluate every train.eval_every steps, never step 0): `vgrpo eval` once per seed, stored."""
    out = runs_dir / f"start_s{seed}.json"
    if not out.is_file():
        model = next(
            (v.split("=", 1)[1] for v in args.sets if v.startswith("model.path=")), "builtin:tiny-sd3"
        )
        cmd = [sys.executable, "-m", "vgrpo.cli", "eval", "--model", model, "--seed", str(seed)]
        cmd += ["--images-per-prompt", str(args.eval_images), "--out", str(out)]
        if args.eval_prompts:
            cmd += ["--max-prompts", str(args.eval_prompts)]
        runs_dir.mkdir(parents=True, exist_ok=True)
        print(f"[race] starting policy, seed {seed}: {' '.join(cmd[3:])}", flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return float(json.loads(out.read_text())["overall"])


def analyse(runs: list[dict[str, Any]], target_frac: float, start: float | None = None) -> dict[str, Any]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["label"], []).append(r)
    finals = {lab: mean([rs["evals"][-1]["overall"] for rs in rr if rs["evals"]]) for lab, rr in by.items()}
    scored = [v for v in finals.values() if v is not None]
    best = max(scored) if scored else None
    target = target_frac * best if best is not None else None
    # a target no higher than where every run started is reached by standing still: say so
    degenerate = target is not None and start is not None and target <= start
    table: dict[str, Any] = {}
    for lab, rr in by.items():
        per_seed = []
        for r in rr:
            hit = next((e for e in r["evals"] if target is not None and e["overall"] >= target), None)
            per_seed.append(
                {
                    "seed": r["seed"],
                    "steps_to_target": hit["step"] if hit else None,
                    "seconds_to_target": hit["train_s"] if hit else None,
                    "wall_s_to_target": hit["wall_s"] if hit else None,
                    "final": r["evals"][-1]["overall"] if r["evals"] else None,
                    "final_families": r["evals"][-1]["families"] if r["evals"] else {},
                    "steps_run": r["steps"][-1] if r["steps"] else 0,
                    "seconds_per_step": r["seconds_per_step"],
                    "hacking": hacking_signs(r),
                }
            )
        reached = [s for s in per_seed if s["steps_to_target"] is not None]
        fams = sorted({f for s in per_seed for f in s["final_families"]})
        table[lab] = {
            "seeds": len(per_seed),
            "reached": len(reached),
            "final_mean": finals[lab],
            "final_sd": statistics.stdev([s["final"] for s in per_seed]) if len(per_seed) > 1 else None,
            # mean over the seeds that reached it; `reached` says how many did
            "steps_to_target": mean([s["steps_to_target"] for s in reached]),
            "seconds_to_target": mean([s["seconds_to_target"] for s in reached]),
            "seconds_per_step": mean([s["seconds_per_step"] for s in per_seed]),
            "families": {f: mean([s["final_families"].get(f) for s in per_seed]) for f in fams},
            # runs flagged, of the runs long enough to judge (None: none was)
            "hacking_flags": sum(bool(s["hacking"]["flag"]) for s in per_seed)
            if any(s["hacking"]["flag"] is not None for s in per_seed)
            else None,
            "d_train_reward": mean([s["hacking"]["d_train_reward"] for s in per_seed]),
            "d_heldout": mean([s["hacking"]["d_heldout"] for s in per_seed]),
            "gain_over_start": gain(finals[lab], start),
            "runs": per_seed,
        }
    ref = table.get("vgrpo", {})
    for row in table.values():  # > 1: V-GRPO reaches the target that many times faster
        for key in ("seconds_to_target", "steps_to_target"):
            a, b = ref.get(key), row.get(key)
            row[f"vgrpo_speedup_{key.split('_')[0]}"] = (b / a) if a and b else None
    return {
        "target_frac": target_frac,
        "best_final": best,
        "target": target,
        "start": start,
        "target_not_above_start": degenerate,
        "objectives": table,
    }


def fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def print_tables(summary: dict[str, Any]) -> None:
    print()
    print(
        f"target: {fmt(summary['target'])} held-out overall = {summary['target_frac']:.0%} of the best final "
        f"score {fmt(summary['best_final'])}; the starting policy scores {fmt(summary.get('start'))}"
    )
    if summary.get("target_not_above_start"):
        print(
            "NOTE: the target is not above the starting policy's score: no objective gained, so 'reached' and "
            "the times to target say nothing about speed (compare the gains and the curves)"
        )
    head = (
        f"{'objective':<24} {'seeds':>5} {'final':>13} {'reached':>7} {'steps→T':>8} {'s→T':>8} "
        f"{'s/step':>7} {'×vgrpo(s)':>9} {'Δtrain':>7} {'Δheld':>7} {'gain':>7} {'hack?':>5}"
    )
    print(head)
    print("-" * len(head))
    for lab, r in summary["objectives"].items():
        final = fmt(r["final_mean"]) + (f"±{r['final_sd']:.3f}" if r["final_sd"] is not None else "")
        print(
            f"{lab:<24} {r['seeds']:>5} {final:>13} {r['reached']:>3}/{r['seeds']:<3} "
            f"{fmt(r['steps_to_target'], '.1f'):>8} {fmt(r['seconds_to_target'], '.0f'):>8} "
            f"{fmt(r['seconds_per_step'], '.2f'):>7} {fmt(r['vgrpo_speedup_seconds'], '.2f'):>9} "
            f"{fmt(r['d_train_reward'], '+.3f'):>7} {fmt(r['d_heldout'], '+.3f'):>7} "
            f"{fmt(r.get('gain_over_start'), '+.3f'):>7} "
            f"{('-' if r['hacking_flags'] is None else 'yes' if r['hacking_flags'] else 'no'):>5}"
        )
    fams = sorted({f for r in summary["objectives"].values() for f in r["families"]})
    if fams:
        print()
        print(f"{'final by family':<24} " + " ".join(f"{f[:12]:>12}" for f in fams))
        for lab, r in summary["objectives"].items():
            print(f"{lab:<24} " + " ".join(f"{fmt(r['families'].get(f)):>12}" for f in fams))
    print(
        "\n×vgrpo(s): seconds to target of the row / V-GRPO's (> 1: V-GRPO is faster). Δtrain: training reward, "
        "last third - first third of the steps; Δheld: held-out score, last - first evaluation; gain: final - the "
        "starting policy's score; hack?: Δtrain "
        "> 0.05 while Δheld < Δtrain / 4 (-: fewer than 3 evaluations or 6 steps to judge)."
    )


def plot(runs: list[dict[str, Any]], summary: dict[str, Any], png: Path) -> None:
    labels = list(dict.fromkeys(r["label"] for r in runs))
    start = summary.get("start")  # every curve starts at the starting policy's score, at 0 s
    x0, y0 = ([0.0], [start]) if start is not None else ([], [])
    held, train = [], []
    for lab in labels:
        for r in (r for r in runs if r["label"] == lab):
            held.append(
                Series(
                    f"{lab} s{r['seed']}",
                    x0 + [e["train_s"] for e in r["evals"]],
                    y0 + [e["overall"] for e in r["evals"]],
                )
            )
            train.append(Series(f"{lab} s{r['seed']}", r["train_s"], r["reward_mean"], dashed=True))
    save_chart(
        png,
        [
            Panel(
                "held-out score (GenEval-Shapes overall) vs training seconds",
                "seconds",
                "held-out",
                held,
                hline=summary["target"],
            ),
            Panel("training reward vs training seconds", "seconds", "reward_mean", train),
        ],
    )


# ----------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objectives", default=",".join(OBJECTIVES))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--time-limit", type=float, default=480.0, help="seconds per run (SIGINT, then stop)")
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--eval-prompts", type=int, default=0, help="held-out prompts (0: all)")
    ap.add_argument("--eval-images", type=int, default=2, help="images per held-out prompt")
    ap.add_argument("--target-frac", type=float, default=0.9)
    ap.add_argument("--ablation", action="store_true", help="also run the V-GRPO variants")
    ap.add_argument("--only", default="", help="comma-separated entry labels: run (or report) just these")
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for every run (equal resources: keep it the same for all)",
    )
    ap.add_argument("--smoke", action="store_true", help="2 steps per objective, 1 seed, tiny eval")
    ap.add_argument("--runs-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--report-only", action="store_true", help="analyse stored runs, run nothing")
    args = ap.parse_args()
    name = "race_smoke" if args.smoke else "race"
    if args.smoke:
        args.seeds, args.max_steps, args.eval_every = 1, 2, 1
        args.eval_prompts, args.eval_images = args.eval_prompts or 12, 1
        args.time_limit = min(args.time_limit, 600.0)
    # the race's runs are kept beside its JSON (result.json per run: a later session resumes from them);
    # the smoke's go to runs/ (git-ignored)
    runs_dir = args.runs_dir or (ROOT / "runs" / "race_smoke" if args.smoke else RESULTS / "race_runs")
    out = args.out or RESULTS / f"{name}.json"
    entries = [(o, [f"algorithm.name={o}"]) for o in args.objectives.split(",") if o]
    if args.ablation:
        entries += [(lab, ["algorithm.name=vgrpo", *s]) for lab, s in ABLATION.items()]
    if args.only:
        wanted = set(re.findall(r"[^,\[]+(?:\[[^\]]*\])?", args.only))  # labels may hold commas in [...]
        unknown = wanted - {lab for lab, _ in entries}
        if unknown:
            raise SystemExit(f"--only: no entry {sorted(unknown)}; entries: {[lab for lab, _ in entries]}")
        entries = [(lab, s) for lab, s in entries if lab in wanted]
    runs = []
    args.starts = {}  # seed -> the starting policy's held-out score
    for seed in range(args.seeds):  # seeds outermost: a stopped race has every objective at seed 0 first
        args.starts[seed] = start_score(seed, args, runs_dir)
        for label, sets in entries:
            if args.report_only:
                f = runs_dir / f"{label}_s{seed}" / "result.json"
                if f.is_file():
                    runs.append(json.loads(f.read_text()))
                continue
            runs.append(run_one(label, sets, seed, args, runs_dir))
            write(out, args, runs, entries)  # after every run: a stopped race keeps what it has
    if not runs:
        raise SystemExit(f"no runs in {runs_dir}")
    summary = write(out, args, runs, entries)
    print_tables(summary)
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


def write(out: Path, args: argparse.Namespace, runs: list[dict[str, Any]], entries: list) -> dict[str, Any]:
    starts = [v for k, v in getattr(args, "starts", {}).items() if any(r["seed"] == k for r in runs)]
    summary = analyse(runs, args.target_frac, mean(starts) if starts else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "settings": {
            "seeds": args.seeds,
            "max_steps": args.max_steps,
            "time_limit_s": args.time_limit,
            "eval_every": args.eval_every,
            "eval_prompts": args.eval_prompts or "all held-out",
            "eval_images_per_prompt": args.eval_images,
            "common_sets": args.sets,
            "entries": {lab: s for lab, s in entries},
            "machine_cpus": os.cpu_count(),
            "seconds": "training wall-clock: the sum of time/step (evaluations excluded)",
        },
        "summary": summary,
        "runs": runs,
    }
    out.write_text(json.dumps(payload, indent=1))
    plot(runs, summary, out.with_suffix(".png"))
    return summary


if __name__ == "__main__":
    main()
