"""Pretraining-recipe sweep: which tiny-model recipe leaves headroom that RL actually takes?

For each variant of `vgrpo.pretrain_tiny.PretrainConfig` (stage 2 only: the shipped model's VAE is reused),
pretrain the transformer and text encoders, then run the learnability probe (benchmarks/learnability.py:
the held-out GenEval-Shapes score before and during a short V-GRPO run with the embedded default's
settings). Variants run as parallel processes (`--device cuda` for a GPU machine). Measured: the tiny model
is launch-bound on a GPU -- six variants at once on one H200 ran ~14 flow steps/s each (~70 ms/step, vs
~0.23 s/step on the 2-core CPU at 2 threads), and rendering 16000 pairs took ~80 s per process: 8000-step
variants do not fit one 10-minute device call; use `--flow-steps` or fewer variants there.

    python benchmarks/pretrain_sweep.py --device cuda --out /tmp/sweep            # every variant
    python benchmarks/pretrain_sweep.py --only base,noise --flow-steps 20 --probe-steps 2   # smoke

Writes OUT/<variant>/model (diffusers folder), OUT/<variant>/probe.json, OUT/<variant>.log and
OUT/sweep.json (start / final held-out score per family, gain, pretraining seconds), and prints a table."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOISE = {"two_object": 0.5, "counting": 0.5, "colors": 0.3, "position": 0.5, "color_attr": 0.5}
SLOTS_NOISE = {**NOISE, "single_object": 0.25, "colors": 0.4}
COMPOSITE_MIX = {
    "single_object": 0.15,
    "colors": 0.25,
    "two_object": 0.15,
    "counting": 0.15,
    "color_attr": 0.15,
    "position": 0.15,
}
VARIANTS: dict[str, dict] = {
    "base": {},  # the first stage of the shipped recipe (random layouts, captions always true)
    "noise": {"caption_noise": NOISE},
    "noise_big": {"caption_noise": NOISE, "sides": [16.0, 28.0]},
    "noise_wide": {"caption_noise": NOISE, "heads": 4, "layers": 6},
    "noise_mix": {"caption_noise": NOISE, "family_mix": COMPOSITE_MIX},
    "slots": {"layout": "slots"},
    "slots_noise": {"layout": "slots", "caption_noise": SLOTS_NOISE},
    "slots_noise_wide": {"layout": "slots", "caption_noise": SLOTS_NOISE, "heads": 4, "layers": 6},
}


def run_variant(name: str, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from vgrpo.pretrain_tiny import PretrainConfig, pretrain

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import learnability

    out = args.out / name
    overrides = dict(VARIANTS[name])
    if args.flow_steps:
        overrides["flow_steps"] = args.flow_steps
    cfg = PretrainConfig(device=args.device, num_threads=args.threads, **overrides)
    t0 = time.perf_counter()
    model = pretrain(out / "model", seed=args.seed, config=cfg, vae_from=ROOT / "core/assets/tiny_sd3/vae")
    pretrain_s = time.perf_counter() - t0
    sets = [f"model.path={model}", "model.dtype=float32", "learner.precision=float32", *args.sets]
    probe = learnability.main(
        [
            "--steps", str(args.probe_steps),
            "--eval-every", str(args.eval_every),
            "--device", args.device,
            "--threads", str(args.threads),
            "--out", str(out / "probe.json"),
            *[x for s in sets for x in ("--set", s)],
        ]
    )  # fmt: skip
    evals = probe["evals"]
    last = str(args.probe_steps)
    return {
        "variant": name,
        "overrides": overrides,
        "pretrain_s": round(pretrain_s, 1),
        "start": evals["0"],
        "final": evals[last],
        "evals": {k: v["overall"] for k, v in evals.items()},
        "gain": probe["gain"],
        "probe_train_s": round(probe["train_seconds"], 1),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/pretrain_sweep"))
    ap.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flow-steps", type=int, default=0, help="override every variant's stage-2 steps")
    ap.add_argument("--probe-steps", type=int, default=160)
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # a child process runs one variant
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.variant:
        result = run_variant(args.variant, args)
        (args.out / args.variant / "result.json").write_text(json.dumps(result, indent=1))
        return
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    passthrough = list(argv if argv is not None else sys.argv[1:])
    procs = {}
    for n in names:
        log = open(args.out / f"{n}.log", "w")  # noqa: SIM115 (the child holds it)
        procs[n] = subprocess.Popen(
            [sys.executable, __file__, *passthrough, "--variant", n],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    results = []
    for n, p in procs.items():
        rc = p.wait()
        f = args.out / n / "result.json"
        results.append(json.loads(f.read_text()) if rc == 0 and f.exists() else {"variant": n, "rc": rc})
    (args.out / "sweep.json").write_text(json.dumps(results, indent=1))
    fams = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
    print(f"{'variant':<12} {'when':<6} " + " ".join(f"{f[:10]:>10}" for f in fams) + "   overall")
    for r in results:
        if "start" not in r:
            print(f"{r['variant']:<12} failed (rc {r.get('rc')}), see {args.out / (r['variant'] + '.log')}")
            continue
        for when in ("start", "final"):
            fam = " ".join(f"{r[when]['families'].get(f, float('nan')):10.3f}" for f in fams)
            print(f"{r['variant']:<12} {when:<6} {fam}   {r[when]['overall']:.3f}")
        print(
            f"{'':<12} gain {r['gain']:+.3f}; pretrain {r['pretrain_s']:.0f} s, probe {r['probe_train_s']:.0f} s"
        )


if __name__ == "__main__":
    main()
