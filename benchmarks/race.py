"""The algorithm race on the embedded default: V-GRPO, DGPO, Flow-GRPO, Flow-GRPO-Fast, MixGRPO, DiffusionNFT.

    python benchmarks/race.py [--objectives vgrpo,dgpo,flow_grpo,flow_grpo_fast,mixgrpo,nft] [--seeds 3]
                              [--max-steps 160] [--time-limit 720] [--eval-every 20] [--eval-images 2]
                              [--eval-prompts FILE] [--eval-max-prompts N] [--set key=value ...]
                              [--target-frac 0.9] [--bootstrap 2000] [--budget-hours 5]
                              [--only LABEL[,LABEL]] [--ablation] [--report-only] [--smoke]
                              [--runs-dir DIR] [--out FILE]

Every run is a real `vgrpo train` (tiny SD3 + GenEval-Shapes, a local Ray cluster) at equal resources:
the same batch (rollout.prompts_per_step x group_size), sampler steps, learner ranks and rollout workers,
and the same wall-clock budget. Each objective runs with `--set algorithm.name=<objective>` and nothing
else of its own: its paper's hyper-parameters are the `algorithm.<name>` defaults of the config (V-GRPO
N_MC 4 + soft clip 3 + reference KL 0.5; DGPO beta_dpo 100, KL 0.02, 4 high-noise grid times; Flow-GRPO
SDE a=0.7, clip 1e-4, KL 0.04; NFT beta 1, KL 1e-4; Flow-GRPO-Fast and MixGRPO as their sections say),
scaled down only through the shared rollout (10 sampler steps, CFG w = 5, P x G of the embedded default).

Per-run budget (the defaults): 160 steps or 12 minutes (720 s) of wall-clock from launch, whichever comes
first (at the limit: SIGINT, the driver checkpoints and exits 130); a held-out evaluation every 20 steps
with 2 images per held-out prompt (the 2026-11-26 race's settings, with the limit raised from 7 to 12
minutes so that the slowest objective at its paper's settings, Flow-GRPO at ~4.3 s a step on this 2-core
machine, gets ~150 of the 160 steps). Time estimate for the full race (6 objectives x 3 seeds = 18 runs):
at most 18 x (720 s + ~45 s launch/stop overhead) + 3 starting-policy evaluations = ~3.9 h; at the
2026-11-26 race's rates (V-GRPO and DGPO ~2.2 s a step end at 160 steps in ~7.5 min, the others at the 12-minute
limit) ~3.3 h. The script prints its estimate for the runs still to do and refuses to start when it
exceeds --budget-hours (default 5; 0 turns the guard off).

From each run's metrics.jsonl (`eval/overall`, `eval/<family>` every `train.eval_every` steps;
`reward_mean`, `time/step`, `images_per_s` every step) it reports:

- the target: --target-frac (0.9) x the best final held-out score of any objective (mean over seeds), as
  in the 2026-11-26 race (docs/benchmarks.md); a target no higher than the starting policy's score is
  called out (then no time to target means anything);
- time to target per run, in training seconds (the sum of `time/step`: training wall-clock with the
  evaluations left out; `wall_s` beside each evaluation counts everything from launch) and in images
  sampled (steps x prompts_per_step x group_size, counted from the metrics): the first evaluation at or
  above the target. A run that never reaches it is censored at its budget: its time to target is
  "> budget" (its training seconds / images at its last step), and the budget is used as a lower bound
  for it in every mean and ratio;
- per objective, the mean time to target over seeds with a bootstrap 90 % interval (--bootstrap 2000
  resamples of the seeds with replacement, a fixed RNG seed per objective, so the numbers repeat);
  with a censored seed the mean and the interval's lower end are lower bounds and the upper end is open;
- one line per paper claim (CLAIMS): ratio = the claimed-slower method's time to target / the
  claimed-faster method's, in seconds (the verdict) and in images, each objective's seeds resampled
  independently. "reproduced": the interval's lower bound >= the claimed ratio; "not reproduced": its
  upper bound < the claim; otherwise "not measurable here". Censoring: the slower method censored makes
  the ratio a lower bound (upper end open); the faster one censored makes it an upper bound (lower end
  0). The largest ratio a race can show is about the slower method's budget / the faster method's first
  evaluation (the "ceiling" printed with the claim: with evaluations every 20 steps, ~15x at this
  budget, so the 20x and 25x claims can be refuted here but not confirmed; --eval-every 5 raises it);
- the final held-out score, overall and per family, and reward-hacking signs: the training reward rising
  (last third vs first third of the steps) while the held-out score does not (first vs last evaluation).

Prints tables, writes JSON (--out: `settings`, `summary` with the target, intervals and claims, and `runs`,
one entry per objective and seed with `label`, `seed`, `evals: [{step, wall_s, train_s, images, overall,
families}]`) and two PNGs beside it: held-out score (mean over seeds) vs training seconds and vs images.

Resumable: a run whose result.json exists in --runs-dir is not run again (delete it to rerun); a stored
run made with other race settings (steps, limit, evaluation, --set) stops the race instead of being mixed
in: use another --runs-dir. --only LABEL[,LABEL] runs just those entries (the report still takes every
entry's stored runs); --report-only analyses stored runs and runs nothing. A harder prompt split or a
longer budget needs no code change: --eval-prompts FILE (held-out prompts of every run and of the
starting policy), --set data.train_prompts=FILE, --max-steps / --time-limit, each with its own --runs-dir.
--ablation adds V-GRPO variants (N_MC, clip + KL, soft clip, reference KL, reward mode, learning rate) as
extra entries. --smoke: 1 seed, vgrpo and nft (or --objectives), 3 steps, an evaluation every step on 12
prompts x 1 image, into runs/race_smoke/ (checks the machinery end to end).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pngplot import Panel, Series, save_chart

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OBJECTIVES = ["vgrpo", "dgpo", "flow_grpo", "flow_grpo_fast", "mixgrpo", "nft"]
SMOKE_OBJECTIVES = ["vgrpo", "nft"]  # a paper claim (V-GRPO vs NFT) end to end
# (claimed-faster objective, claimed-slower objective, claimed ratio of times to target, the claim)
CLAIMS: list[tuple[str, str, float, str]] = [
    ("vgrpo", "mixgrpo", 2.0, "V-GRPO >= 2x faster than MixGRPO"),
    ("vgrpo", "nft", 3.0, "V-GRPO >= 3x faster than DiffusionNFT"),
    ("dgpo", "flow_grpo", 20.0, "DGPO >= 20x faster than Flow-GRPO"),
    ("nft", "flow_grpo", 25.0, "DiffusionNFT >= 25x faster than Flow-GRPO"),
]
CI = 0.90  # bootstrap interval
BOOT_SEED = 0
RUN_OVERHEAD_S = 45.0  # per run beyond --time-limit: launch (Ray) and the SIGINT checkpoint + exit
START_EVAL_S = 40.0  # one starting-policy evaluation
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


def race_sets(args: argparse.Namespace) -> list[str]:
    """The --set overrides every run of the race gets (its budget, evaluation and the common --set)."""
    sets = [
        f"train.steps={args.max_steps}",
        f"train.eval_every={args.eval_every}",
        f"train.checkpoint_every={args.max_steps}",
        f"train.samples_every={args.max_steps}",
        "observability.progress=plain",
        "observability.report=false",
        "observability.tensorboard=false",
        f"data.eval_images_per_prompt={args.eval_images}",
    ]
    if args.eval_prompts:
        sets.append(f"data.eval_prompts={args.eval_prompts}")
    if args.eval_max_prompts:
        sets.append(f"data.eval_max_prompts={args.eval_max_prompts}")
    return sets + list(args.sets)


def race_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a stored run must share with this race to be reused (stored in its result.json)."""
    return {"time_limit_s": float(args.time_limit), "sets": race_sets(args)}


def run_one(
    label: str,
    sets: list[str],
    seed: int,
    args: argparse.Namespace,
    runs_dir: Path,
    images_per_step: int | None = None,
) -> dict[str, Any] | None:
    """One `vgrpo train` in its own session; returns (and stores) its curves, None if it produced no
    metrics. Skipped if stored."""
    folder = runs_dir / f"{label}_s{seed}"
    stored = load_stored(folder, label, seed, args)
    if stored is not None:
        print(f"[race] {label} seed {seed}: done before, skipping ({folder / 'result.json'})", flush=True)
        return stored
    run_dir = folder / "run"
    if run_dir.exists():  # an interrupted attempt: start it over (a partial curve is not comparable)
        shutil.rmtree(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "vgrpo.cli", "train", "--run-dir", str(run_dir)]
    for s in [f"train.seed={seed}", *race_sets(args), *sets]:
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
    if not rows:  # e.g. an objective this checkout does not know: the race goes on without it
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        print(f"[race] {label} seed {seed}: no metrics (exit {rc}); log {log_path}:\n" + "\n".join(tail))
        return None
    ips = images_per_step or run_images_per_step(run_dir, [*args.sets, *sets])
    result = curves(label, seed, sets, rows, arrivals, rc, time.time() - t0, stopped_early, ips)
    result["race"] = race_settings(args)
    if rc not in (0, 130):  # failed mid-run: reported, but not stored as done (a rerun tries again)
        print(
            f"[race] {label} seed {seed}: exit {rc} after step {rows[-1]['step']}; see {log_path}", flush=True
        )
        (folder / "failed.json").write_text(json.dumps(result, indent=1))
        return result
    (folder / "result.json").write_text(json.dumps(result, indent=1))
    for bulky in ("checkpoints", "samples"):  # metrics.jsonl and config.yaml stay beside result.json
        shutil.rmtree(run_dir / bulky, ignore_errors=True)
    return result


def load_stored(folder: Path, label: str, seed: int, args: argparse.Namespace) -> dict[str, Any] | None:
    """A finished run's result.json, with images filled in for runs stored before they were counted; a
    run made with other race settings stops the race (mixing budgets would bias every ratio)."""
    done = folder / "result.json"
    if not done.is_file():
        return None
    result: dict[str, Any] = json.loads(done.read_text())
    stored, now = result.get("race"), race_settings(args)
    if stored is None:
        print(f"[race] {label} seed {seed}: stored before runs recorded their settings; not checked")
    elif stored != now:
        diff = sorted(set(map(str, stored["sets"])) ^ set(now["sets"]))
        if stored["time_limit_s"] != now["time_limit_s"]:
            diff.append(f"time limit {stored['time_limit_s']:.0f} s vs {now['time_limit_s']:.0f} s")
        msg = f"{done} was run with other race settings ({'; '.join(diff)})"
        if not args.report_only:
            raise SystemExit(f"[race] {msg}: use another --runs-dir, or delete it to rerun")
        print(f"[race] WARNING: {msg}")
    if "images" not in result:
        with_images(result, run_images_per_step(folder / "run", [*args.sets, *result.get("sets", [])]))
    return result


def run_images_per_step(run_dir: Path | None, sets: list[str]) -> int:
    """prompts_per_step x group_size: the run's config.yaml, else the --set overrides over the defaults."""
    cfg = run_dir / "config.yaml" if run_dir is not None else None
    if cfg is not None and cfg.is_file():
        import yaml

        r = (yaml.safe_load(cfg.read_text()) or {}).get("rollout", {})
        if "prompts_per_step" in r and "group_size" in r:
            return int(r["prompts_per_step"]) * int(r["group_size"])
    from vgrpo.proto.config import RolloutConfig

    d = RolloutConfig()
    p, g = d.prompts_per_step, d.group_size
    for s in sets:
        key, _, value = s.partition("=")
        if key == "rollout.prompts_per_step":
            p = int(value)
        elif key == "rollout.group_size":
            g = int(value)
    return p * g


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
    images_per_step: int | None = None,
) -> dict[str, Any]:
    """A run's curves from its metrics rows. Images per step: `images_per_s` x `time/step` of the row
    (the driver's count), else images_per_step (default: prompts_per_step x group_size of the config)."""
    if images_per_step is None:
        images_per_step = run_images_per_step(None, sets)
    train_s, images = 0.0, 0
    steps, reward, t_train, t_wall, n_images = [], [], [], [], []
    evals = []
    for r in rows:
        dt = float(r.get("time/step", 0.0))
        train_s += dt
        images += round(float(r["images_per_s"]) * dt) if "images_per_s" in r and dt > 0 else images_per_step
        steps.append(int(r["step"]))
        reward.append(float(r["reward_mean"]))
        t_train.append(train_s)
        t_wall.append(arrivals.get(int(r["step"])))
        n_images.append(images)
        if "eval/overall" in r:
            fam = {k[5:]: float(v) for k, v in r.items() if k.startswith("eval/") and k != "eval/overall"}
            evals.append(
                {
                    "step": int(r["step"]),
                    "train_s": train_s,
                    "wall_s": arrivals.get(int(r["step"])),
                    "images": images,
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
        "images_per_step": images_per_step,
        "steps": steps,
        "reward_mean": reward,
        "train_s": t_train,
        "images": n_images,
        "wall_s_at_step": t_wall,
        "evals": evals,
        "seconds_per_step": statistics.median(float(r.get("time/step", 0.0)) for r in rows),
    }


def with_images(run: dict[str, Any], images_per_step: int) -> dict[str, Any]:
    """Images for a run stored before they were counted: step x images_per_step (every step samples
    the same P x G batch)."""
    run["images_per_step"] = images_per_step
    run["images"] = [s * images_per_step for s in run["steps"]]
    for e in run["evals"]:
        e["images"] = e["step"] * images_per_step
    return run


# ----------------------------------------------------------------------------------------------- analysis


def mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def gain(final: float | None, start: float | None) -> float | None:
    return final - start if final is not None and start is not None else None


def quantile(xs: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def hacking_signs(run: dict[str, Any]) -> dict[str, Any]:
    """Training reward rising while the held-out score does not."""
    rew = run["reward_mean"]
    k = max(1, len(rew) // 3)
    d_train = (mean(rew[-k:]) or 0.0) - (mean(rew[:k]) or 0.0)
    ev = run["evals"]
    d_held = ev[-1]["overall"] - ev[0]["overall"] if len(ev) >= 2 else None
    if len(ev) < 3 or len(rew) < 6:  # too short a run to tell a trend from noise
        return {"d_train_reward": d_train, "d_heldout": d_held, "flag": None}
    flagged = d_held is not None and d_train > 0.05 and d_held < 0.25 * d_train
    return {"d_train_reward": d_train, "d_heldout": d_held, "flag": bool(flagged)}


def time_to_target(run: dict[str, Any], target: float | None) -> dict[str, Any]:
    """The first evaluation at or above the target; a run that never gets there is censored at its
    budget (training seconds and images at its last step): its time to target is greater than that."""
    hit = next((e for e in run["evals"] if target is not None and e["overall"] >= target), None)
    budget_s = run["train_s"][-1] if run["train_s"] else 0.0
    budget_images = run["images"][-1] if run.get("images") else 0
    first = run["evals"][0] if run["evals"] else None
    return {
        "censored": hit is None,
        "steps": hit["step"] if hit else None,
        "seconds": hit["train_s"] if hit else budget_s,  # censored: the lower bound
        "images": hit["images"] if hit else budget_images,
        "wall_s": hit["wall_s"] if hit else None,
        "budget_s": budget_s,
        "budget_images": budget_images,
        "first_eval_s": first["train_s"] if first else None,
        "first_eval_images": first["images"] if first else None,
    }


def resample_indices(label: str, k: int, n_boot: int, boot_seed: int = BOOT_SEED) -> list[list[int]]:
    """n_boot resamples (with replacement) of k seeds; the RNG is seeded by (boot_seed, label), so an
    objective's resamples do not depend on which others are in the race."""
    rng = random.Random(zlib.crc32(f"{boot_seed}:{label}".encode()))
    return [[rng.randrange(k) for _ in range(k)] for _ in range(n_boot)]


def boot_means(values: list[float], idx: list[list[int]]) -> list[float]:
    return [sum(values[i] for i in draw) / len(draw) for draw in idx]


def interval(point: float, samples: list[float], ci: float = CI) -> tuple[float, float, float]:
    a = (1 - ci) / 2
    return point, quantile(samples, a), quantile(samples, 1 - a)


def objective_time(ttt: list[dict[str, Any]], idx: list[list[int]], axis: str, ci: float) -> dict[str, Any]:
    """Mean time to target over seeds (censored seeds at their budget) and its bootstrap interval."""
    values = [float(t[axis]) for t in ttt]
    samples = boot_means(values, idx)
    point, lo, hi = interval(sum(values) / len(values), samples, ci)
    censored = sum(t["censored"] for t in ttt)
    return {
        "point": point,
        "lo": lo,
        "hi": hi if not censored else None,  # a censored seed: the true mean is larger, the top open
        "hi_computed": hi,
        "censored": censored,
        "seeds": len(ttt),
        "lower_bound": bool(censored),
        "samples": samples,  # dropped before writing
    }


def ratio_interval(fast: dict[str, Any], slow: dict[str, Any], ci: float = CI) -> dict[str, Any]:
    """slow / fast times to target with the interval of the ratio of their bootstrap means. The slower
    method censored: the ratio is a lower bound (upper end open, None); the faster one censored: an
    upper bound (lower end open, None)."""
    samples = [s / f for s, f in zip(slow["samples"], fast["samples"], strict=True) if f > 0]
    if not samples or fast["point"] <= 0:
        return {"point": None, "lo": None, "hi": None, "bound": "none"}
    point, lo, hi = interval(slow["point"] / fast["point"], samples, ci)
    slow_c, fast_c = slow["censored"] > 0, fast["censored"] > 0
    bound = "both censored" if slow_c and fast_c else "lower" if slow_c else "upper" if fast_c else "exact"
    return {
        "point": point,
        "lo": None if fast_c else lo,
        "hi": None if slow_c else hi,
        "lo_computed": lo,
        "hi_computed": hi,
        "bound": bound,  # lower: the true ratio is at least the point; upper: at most
    }


def verdict(r: dict[str, Any], claim: float) -> str:
    if r.get("lo") is not None and r["lo"] >= claim:
        return "reproduced"
    if r.get("hi") is not None and r["hi"] < claim:
        return "not reproduced"
    return "not measurable here"


def claims(table: dict[str, Any], degenerate: bool, ci: float = CI) -> list[dict[str, Any]]:
    out = []
    for fast, slow, claim, text in CLAIMS:
        row: dict[str, Any] = {"claim": text, "faster": fast, "slower": slow, "claimed_ratio": claim}
        missing = [o for o in (fast, slow) if o not in table]
        if missing:
            row.update(verdict="not measurable here", note=f"{' and '.join(missing)} not in this race")
            out.append(row)
            continue
        tf, ts = table[fast]["time_to_target"], table[slow]["time_to_target"]
        for axis in ("seconds", "images"):
            row[axis] = ratio_interval(tf[axis], ts[axis], ci)
            first = tf[axis].get("first_eval")
            row[axis]["ceiling"] = ts[axis]["budget"] / first if first else None
        row["verdict"] = verdict(row["seconds"], claim)
        if degenerate:
            row.update(
                verdict="not measurable here", note="the target is not above the starting policy's score"
            )
        elif row["verdict"] == "not measurable here" and (c := row["seconds"]["ceiling"]) and c < claim:
            row["note"] = (
                f"this race can show at most ~{c:.1f}x ({slow}'s budget / {fast}'s first evaluation): "
                "a longer budget or more frequent evaluations are needed to confirm it"
            )
        out.append(row)
    return out


def start_eval_args(args: argparse.Namespace) -> list[str]:
    """`vgrpo eval` options matching the runs' held-out evaluation (their --set included)."""
    sets = dict(s.split("=", 1) for s in args.sets if "=" in s)
    opts = [
        ("--model", sets.get("model.path")),
        ("--prompts", args.eval_prompts or sets.get("data.eval_prompts")),
        ("--max-prompts", str(args.eval_max_prompts or "") or sets.get("data.eval_max_prompts")),
        ("--num-steps", sets.get("data.eval_num_steps")),
        ("--guidance-scale", sets.get("data.eval_guidance_scale")),
    ]
    return [x for flag, v in opts if v for x in (flag, v)]


def start_score(seed: int, args: argparse.Namespace, runs_dir: Path) -> float:
    """Held-out score of the starting policy with the race's evaluation settings and the seed's images
    (the runs evaluate every train.eval_every steps, never step 0): `vgrpo eval` once per seed, stored."""
    extra = start_eval_args(args)
    out = start_file(seed, args, runs_dir)
    if not out.is_file():
        if "--model" not in extra:
            extra = ["--model", "builtin:tiny-sd3", *extra]
        cmd = [sys.executable, "-m", "vgrpo.cli", "eval", *extra, "--seed", str(seed)]
        cmd += ["--images-per-prompt", str(args.eval_images), "--out", str(out)]
        runs_dir.mkdir(parents=True, exist_ok=True)
        print(f"[race] starting policy, seed {seed}: {' '.join(cmd[3:])}", flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return float(json.loads(out.read_text())["overall"])


def analyse(
    runs: list[dict[str, Any]],
    target_frac: float,
    start: float | None = None,
    n_boot: int = 2000,
    ci: float = CI,
) -> dict[str, Any]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if r.get("exit_code") in (0, 130, None) and r["evals"]:  # a failed run is in `runs`, not here
            by.setdefault(r["label"], []).append(r)
    finals = {lab: mean([rs["evals"][-1]["overall"] for rs in rr]) for lab, rr in by.items()}
    scored = [v for v in finals.values() if v is not None]
    best = max(scored) if scored else None
    target = target_frac * best if best is not None else None
    # a target no higher than where every run started is reached by standing still: say so
    degenerate = target is not None and start is not None and target <= start
    table: dict[str, Any] = {}
    for lab, rr in by.items():
        rr.sort(key=lambda r: r["seed"])  # the bootstrap's resamples index seeds in this order
        per_seed = []
        for r in rr:
            t = time_to_target(r, target)
            per_seed.append(
                {
                    "seed": r["seed"],
                    "censored": t["censored"],
                    "steps_to_target": t["steps"],
                    "seconds_to_target": None if t["censored"] else t["seconds"],
                    "images_to_target": None if t["censored"] else t["images"],
                    "wall_s_to_target": t["wall_s"],
                    "budget_s": t["budget_s"],
                    "budget_images": t["budget_images"],
                    "ttt": t,
                    "final": r["evals"][-1]["overall"],
                    "final_families": r["evals"][-1]["families"],
                    "steps_run": r["steps"][-1] if r["steps"] else 0,
                    "seconds_per_step": r["seconds_per_step"],
                    "hacking": hacking_signs(r),
                }
            )
        reached = [s for s in per_seed if not s["censored"]]
        fams = sorted({f for s in per_seed for f in s["final_families"]})
        ttt = [s.pop("ttt") for s in per_seed]
        idx = resample_indices(lab, len(ttt), n_boot)
        times = {axis: objective_time(ttt, idx, axis, ci) for axis in ("seconds", "images")}
        for axis in ("seconds", "images"):  # for the claims' ceilings
            times[axis]["budget"] = mean([t[f"budget_{'s' if axis == 'seconds' else 'images'}"] for t in ttt])
            times[axis]["first_eval"] = mean(
                [t[f"first_eval_{'s' if axis == 'seconds' else 'images'}"] for t in ttt]
            )
        table[lab] = {
            "seeds": len(per_seed),
            "reached": len(reached),
            "final_mean": finals[lab],
            "final_sd": statistics.stdev([s["final"] for s in per_seed]) if len(per_seed) > 1 else None,
            # mean over the seeds that reached it; `reached` says how many did
            "steps_to_target": mean([s["steps_to_target"] for s in reached]),
            "seconds_to_target": mean([s["seconds_to_target"] for s in reached]),
            "images_to_target": mean([s["images_to_target"] for s in reached]),
            # over all seeds, a censored seed at its budget, with the bootstrap interval
            "time_to_target": times,
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
    claim_rows = claims(table, degenerate, ci)
    for row in table.values():  # the bootstrap samples served the claims; the JSON keeps the interval
        for axis in ("seconds", "images"):
            row["time_to_target"][axis].pop("samples")
    return {
        "target_frac": target_frac,
        "best_final": best,
        "target": target,
        "start": start,
        "target_not_above_start": degenerate,
        "bootstrap": {"resamples": n_boot, "interval": ci, "rng_seed": BOOT_SEED, "over": "seeds"},
        "censoring": "a run that does not reach the target counts at its budget (training seconds / images "
        "at its last step) as a lower bound of its time to target",
        "objectives": table,
        "claims": claim_rows,
    }


# ----------------------------------------------------------------------------------------------- output


def fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def fmt_time(t: dict[str, Any], spec: str) -> str:
    """'46 [40, 52]'; with censored seeds '>688 [560, open)' (the budget as a lower bound)."""
    point = (">" if t["lower_bound"] else "") + format(t["point"], spec)
    hi = "open)" if t["hi"] is None else format(t["hi"], spec) + "]"
    return f"{point} [{format(t['lo'], spec)}, {hi}"


def fmt_ratio(r: dict[str, Any]) -> str:
    if r.get("point") is None:
        return "-"
    mark = {"lower": ">=", "upper": "<=", "both censored": "?"}.get(r["bound"], "")
    lo = "0" if r["lo"] is None else f"{r['lo']:.2f}"
    hi = "open" if r["hi"] is None else f"{r['hi']:.2f}"
    return f"{mark}{r['point']:.2f}x [{lo}, {hi}]"


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
        f"{'objective':<22} {'seeds':>5} {'final':>13} {'reached':>7} {'steps→T':>7} "
        f"{'seconds→T [90% CI]':>22} {'images→T [90% CI]':>24} {'s/step':>6} {'Δtrain':>7} {'Δheld':>7} "
        f"{'gain':>7} {'hack?':>5}"
    )
    print(head)
    print("-" * len(head))
    for lab, r in summary["objectives"].items():
        final = fmt(r["final_mean"]) + (f"±{r['final_sd']:.3f}" if r["final_sd"] is not None else "")
        tt = r["time_to_target"]
        print(
            f"{lab:<22} {r['seeds']:>5} {final:>13} {r['reached']:>3}/{r['seeds']:<3} "
            f"{fmt(r['steps_to_target'], '.0f'):>7} {fmt_time(tt['seconds'], '.0f'):>22} "
            f"{fmt_time(tt['images'], '.0f'):>24} {fmt(r['seconds_per_step'], '.2f'):>6} "
            f"{fmt(r['d_train_reward'], '+.3f'):>7} {fmt(r['d_heldout'], '+.3f'):>7} "
            f"{fmt(r.get('gain_over_start'), '+.3f'):>7} "
            f"{('-' if r['hacking_flags'] is None else 'yes' if r['hacking_flags'] else 'no'):>5}"
        )
    fams = sorted({f for r in summary["objectives"].values() for f in r["families"]})
    if fams:
        print()
        print(f"{'final by family':<22} " + " ".join(f"{f[:12]:>12}" for f in fams))
        for lab, r in summary["objectives"].items():
            print(f"{lab:<22} " + " ".join(f"{fmt(r['families'].get(f)):>12}" for f in fams))
    b = summary["bootstrap"]
    print(
        f"\n→T: time to target, mean over seeds [bootstrap {b['interval']:.0%} interval, {b['resamples']} "
        "resamples of the seeds]; seconds = training seconds (sum of time/step, evaluations excluded); images "
        "= images sampled. '>': a seed did not reach the target and counts at its budget (its seconds / images "
        "at its last step) as a lower bound, so the mean is a lower bound and the interval's top is open. "
        "steps→T: mean over the seeds that reached it. Δtrain: training reward, last third - first third of the "
        "steps; Δheld: held-out score, last - first evaluation; gain: final - the starting policy's score; "
        "hack?: Δtrain > 0.05 while Δheld < Δtrain / 4 (-: fewer than 3 evaluations or 6 steps to judge)."
    )
    print("\npaper claims (ratio = the claimed-slower method's time to target / the claimed-faster one's):")
    for c in summary["claims"]:
        line = f"  {c['claim']:<42} {c['verdict']:<20}"
        if "seconds" in c:
            line += f" seconds {fmt_ratio(c['seconds']):<24} images {fmt_ratio(c['images'])}"
        print(line + (f"  ({c['note']})" if c.get("note") else ""))
    print(
        "  verdict on seconds: reproduced = interval's lower bound >= the claim, not reproduced = its upper "
        "bound < the claim. '>=': the slower method did not reach the target in some seed and counts at its "
        "budget, so the ratio is a lower bound (upper end open); '<=': the faster one did not, an upper bound."
    )


def mean_curve(rr: list[dict[str, Any]], x_key: str, y_key: str | None) -> tuple[list[float], list[float]]:
    """Mean over seeds at the steps every seed has (evaluations when y_key is None, else every step)."""
    if y_key is None:
        points = [{e["step"]: (e[x_key], e["overall"]) for e in r["evals"]} for r in rr]
    else:
        points = [{s: (x, y) for s, x, y in zip(r["steps"], r[x_key], r[y_key], strict=True)} for r in rr]
    common = sorted(set.intersection(*(set(p) for p in points))) if points else []
    xs = [sum(p[s][0] for p in points) / len(points) for s in common]
    ys = [sum(p[s][1] for p in points) / len(points) for s in common]
    return xs, ys


def plot(runs: list[dict[str, Any]], summary: dict[str, Any], png: Path, x_key: str = "train_s") -> None:
    """Held-out score and training reward (means over seeds) against training seconds or images."""
    what = {"train_s": "training seconds", "images": "images sampled"}[x_key]
    start = summary.get("start")  # every curve starts at the starting policy's score, at 0
    x0, y0 = ([0.0], [start]) if start is not None else ([], [])
    held, train = [], []
    for lab in summary["objectives"]:
        rr = [r for r in runs if r["label"] == lab and r["evals"] and r.get("exit_code") in (0, 130, None)]
        name = f"{lab} ({len(rr)} seed{'s' if len(rr) > 1 else ''})"
        xs, ys = mean_curve(rr, x_key, None)
        held.append(Series(name, x0 + xs, y0 + ys))
        xs, ys = mean_curve(rr, x_key, "reward_mean")
        train.append(Series(name, xs, ys, dashed=True))
    save_chart(
        png,
        [
            Panel(
                f"held-out score (GenEval-Shapes overall, mean over seeds) vs {what}; dotted: the target",
                what,
                "held-out",
                held,
                hline=summary["target"],
            ),
            Panel(f"training reward (mean over seeds) vs {what}", what, "reward_mean", train),
        ],
    )


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objectives", default=None, help=f"comma-separated (default {','.join(OBJECTIVES)})")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=160)
    ap.add_argument("--time-limit", type=float, default=720.0, help="seconds per run (SIGINT, then stop)")
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--eval-images", type=int, default=2, help="images per held-out prompt")
    ap.add_argument(
        "--eval-prompts", default="", metavar="FILE", help="held-out prompt file (default: the config's)"
    )
    ap.add_argument("--eval-max-prompts", type=int, default=0, help="held-out prompts (0: all)")
    ap.add_argument("--target-frac", type=float, default=0.9)
    ap.add_argument("--bootstrap", type=int, default=2000, help="resamples of the seeds")
    ap.add_argument(
        "--budget-hours", type=float, default=5.0, help="refuse to start above this estimate (0: no guard)"
    )
    ap.add_argument("--ablation", action="store_true", help="also run the V-GRPO variants")
    ap.add_argument("--only", default="", help="comma-separated entry labels: run just these")
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for every run (equal resources: the same for all), e.g. a harder prompt split",
    )
    ap.add_argument("--smoke", action="store_true", help="1 seed, vgrpo + nft, 3 steps, tiny eval")
    ap.add_argument("--runs-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--report-only", action="store_true", help="analyse stored runs, run nothing")
    args = ap.parse_args(argv)
    if args.smoke:
        args.seeds, args.max_steps, args.eval_every = 1, 3, 1
        args.eval_max_prompts, args.eval_images = args.eval_max_prompts or 12, 1
        args.time_limit = min(args.time_limit, 600.0)
        args.objectives = args.objectives or ",".join(SMOKE_OBJECTIVES)
    args.objectives = args.objectives or ",".join(OBJECTIVES)
    return args


def check_entries(entries: list[tuple[str, list[str]]], args: argparse.Namespace) -> dict[str, int]:
    """Validate every entry's configuration before hours of runs (an objective this checkout lacks fails
    here, in a second); returns each entry's images per step."""
    from vgrpo.proto.config import ConfigError, load_config

    ips, bad = {}, []
    for label, sets in entries:
        try:
            r = load_config(None, ["train.seed=0", *race_sets(args), *sets]).rollout
            ips[label] = r.prompts_per_step * r.group_size
        except ConfigError as e:
            bad.append(f"{label}: " + "; ".join(e.problems))
    if bad:
        raise SystemExit("[race] invalid configurations:\n  " + "\n  ".join(bad))
    return ips


def estimate_s(todo: int, starts: int, args: argparse.Namespace) -> float:
    """Upper bound of the wall-clock still to spend: every run to its time limit plus launch/stop."""
    return todo * (args.time_limit + RUN_OVERHEAD_S) + starts * START_EVAL_S


def main() -> None:
    args = parse_args()
    name = "race_smoke" if args.smoke else "race"
    # the race's runs are kept beside its JSON (result.json per run: a later invocation resumes from them);
    # the smoke's go to runs/ (git-ignored)
    runs_dir = args.runs_dir or (ROOT / "runs" / "race_smoke" if args.smoke else RESULTS / "race_v2_runs")
    out = args.out or RESULTS / f"{name}.json"
    entries = [(o, [f"algorithm.name={o}"]) for o in args.objectives.split(",") if o]
    if args.ablation:
        entries += [(lab, ["algorithm.name=vgrpo", *s]) for lab, s in ABLATION.items()]
    to_run = {lab for lab, _ in entries}
    if args.only:
        wanted = set(re.findall(r"[^,\[]+(?:\[[^\]]*\])?", args.only))  # labels may hold commas in [...]
        unknown = wanted - to_run
        if unknown:
            raise SystemExit(f"--only: no entry {sorted(unknown)}; entries: {[lab for lab, _ in entries]}")
        to_run = wanted
    ips: dict[str, int] = {}
    if not args.report_only:
        ips = check_entries([(lab, s) for lab, s in entries if lab in to_run], args)
        todo = sum(
            not (runs_dir / f"{lab}_s{seed}" / "result.json").is_file()
            for lab in to_run
            for seed in range(args.seeds)
        )
        starts = sum(not start_file(seed, args, runs_dir).is_file() for seed in range(args.seeds))
        est = estimate_s(todo, starts, args)
        print(
            f"[race] {todo} runs to do ({len(to_run)} entries x {args.seeds} seeds, the rest stored), budget "
            f"{args.max_steps} steps or {args.time_limit:.0f} s each: at most {est / 3600:.1f} h",
            flush=True,
        )
        if args.budget_hours and est > args.budget_hours * 3600:
            raise SystemExit(
                f"[race] the estimate {est / 3600:.1f} h exceeds --budget-hours {args.budget_hours}: lower "
                "--time-limit or --seeds, run some entries with --only, or pass --budget-hours 0"
            )
    runs: list[dict[str, Any]] = []
    args.starts = {}  # seed -> the starting policy's held-out score
    for seed in range(args.seeds):  # seeds outermost: a stopped race has every objective at seed 0 first
        args.starts[seed] = (
            start_score(seed, args, runs_dir) if not args.report_only else _stored_start(seed, args, runs_dir)
        )
        for label, sets in entries:
            if args.report_only or label not in to_run:
                stored = load_stored(runs_dir / f"{label}_s{seed}", label, seed, args)
                if stored is not None:
                    runs.append(stored)
                continue
            result = run_one(label, sets, seed, args, runs_dir, ips.get(label))
            if result is not None:
                runs.append(result)
                write(out, args, runs, entries)  # after every run: a stopped race keeps what it has
    if not runs:
        raise SystemExit(f"no runs in {runs_dir}")
    summary = write(out, args, runs, entries)
    print_tables(summary)
    print(f"\nwrote {out}, {out.with_suffix('.png')} and {images_png(out)}")


def start_file(seed: int, args: argparse.Namespace, runs_dir: Path) -> Path:
    """start_s<seed>.json for the default evaluation (2 images per prompt, the config's prompts), else
    named by a hash of the evaluation settings (a harder split gets its own starting score)."""
    extra = start_eval_args(args)
    if not extra and args.eval_images == 2:
        return runs_dir / f"start_s{seed}.json"
    return runs_dir / f"start_s{seed}_{zlib.crc32(repr((extra, args.eval_images)).encode()):08x}.json"


def _stored_start(seed: int, args: argparse.Namespace, runs_dir: Path) -> float | None:
    f = start_file(seed, args, runs_dir)
    return float(json.loads(f.read_text())["overall"]) if f.is_file() else None


def images_png(out: Path) -> Path:
    return out.with_name(out.stem + "_images.png")


def payload(args: argparse.Namespace, runs: list[dict[str, Any]], entries: list) -> dict[str, Any]:
    starts = [
        v
        for k, v in getattr(args, "starts", {}).items()
        if v is not None and any(r["seed"] == k for r in runs)
    ]
    summary = analyse(runs, args.target_frac, mean(starts) if starts else None, args.bootstrap)
    return {
        "settings": {
            "seeds": args.seeds,
            "max_steps": args.max_steps,
            "time_limit_s": args.time_limit,
            "eval_every": args.eval_every,
            "eval_prompts": args.eval_prompts or "the config's held-out prompts",
            "eval_max_prompts": args.eval_max_prompts or "all",
            "eval_images_per_prompt": args.eval_images,
            "common_sets": args.sets,
            "entries": {lab: s for lab, s in entries},
            "machine_cpus": os.cpu_count(),
            "seconds": "training wall-clock: the sum of time/step (evaluations excluded)",
            "images": "images sampled for training: steps x prompts_per_step x group_size",
        },
        "summary": summary,
        "runs": runs,
    }


def write(out: Path, args: argparse.Namespace, runs: list[dict[str, Any]], entries: list) -> dict[str, Any]:
    data = payload(args, runs, entries)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    plot(runs, data["summary"], out.with_suffix(".png"), "train_s")
    plot(runs, data["summary"], images_png(out), "images")
    return data["summary"]


if __name__ == "__main__":
    main()
