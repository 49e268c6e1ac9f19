#!/bin/bash
# From-scratch pretraining recipes for the tiny model on a lent GPU machine, at the sample budget that the
# 2-core CPU spends in under an hour (issue 5: `vgrpo pretrain-tiny` must rebuild the model there in < 1 h):
# the GPU only explores faster; the chosen recipe is then run on the CPU. Every variant reuses the shipped
# stage-1 VAE (`vae_from`: stage 1 is the same for all) and runs stage 2 + its `then` stages on the GPU,
# several processes sharing it; an evaluator process scores every checkpoint as it appears (held-out split,
# 4 images per prompt, 10 dpm2 steps, w = 5 -- `vgrpo eval`'s defaults) and prints one line per checkpoint,
# so a call cut off by its deadline keeps what it measured. Run from the repository root there:
#   OUT=/tmp/out DEADLINE=470 bash benchmarks/device/recipe_sweep.sh
# Needs .whl/ with the wheels the machine lacks (see rl_sweep.sh). Variants: $VARIANTS (default
# benchmarks/device/recipe_variants.txt), lines "NAME JSON-PretrainConfig-fields".
VARIANTS=${VARIANTS:-benchmarks/device/recipe_variants.txt}
OUT=${OUT:-/tmp/out}; mkdir -p $OUT; export DEADLINE=${DEADLINE:-470}
. benchmarks/device/setup.sh
export OMP_NUM_THREADS=2
nvidia-smi --query-gpu=name --format=csv,noheader
S=/tmp/rs; rm -rf $S; mkdir -p $S; VAE=$PWD/core/assets/tiny_sd3/vae
while read -r name over; do
  [[ -z $name || $name == \#* ]] && continue
  (cd /tmp && timeout -s KILL $DEADLINE python3 - "$name" "$over" "$VAE" > $S/$name.log 2>&1 <<'PY'
import json, os, sys
from vgrpo.pretrain_tiny import PretrainConfig, pretrain
name, over, vae = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
base = dict(device=os.environ.get("DEV", "cuda"), num_threads=2, checkpoint_every=int(os.environ.get("CKPT", 2100)))
base.update(over)
pretrain(f"/tmp/rs/{name}", seed=0, config=PretrainConfig(**base), vae_from=vae)
PY
  ) &
done < "$VARIANTS"
# the evaluator: every finished checkpoint (ckpt_*, stage_0, the final folder), once
(cd /tmp && timeout -s KILL $((DEADLINE + 40)) python3 - $S <<'PY'
import json, os, sys, time
from pathlib import Path
import torch
from vgrpo.evaluate import evaluate_policy, load_prompt_rows
from vgrpo.core.policy import load_pipeline
root, rows, seen, t0 = Path(sys.argv[1]), load_prompt_rows("builtin:shapes/heldout"), set(), time.time()
while time.time() - t0 < float(os.environ.get("DEADLINE", 470)) + 35:
    found = [d for d in root.glob("*/*") if d.is_dir() and (d / "model_index.json").is_file()]
    found += [d for d in root.glob("*") if (d / "pretrain.json").is_file()]
    for d in sorted(found, key=lambda p: p.stat().st_mtime):
        if d in seen or time.time() - d.stat().st_mtime < 3:
            continue
        seen.add(d)
        pipe = load_pipeline(str(d)).to(os.environ.get("DEV", "cuda"))
        r = evaluate_policy(pipe, rows, images_per_prompt=4, seed=0, num_steps=10, guidance_scale=5.0)
        fam = " ".join(f"{k[:6]} {v:.2f}" for k, v in r["families"].items())
        print(f"EVAL {d.relative_to(root)} overall {r['overall']:.3f} | {fam} | t {time.time() - t0:.0f}s", flush=True)
    time.sleep(5)
PY
) > $OUT/evals.txt 2>&1 &
for i in $(seq 1 60); do
  sleep 20; date +%T
  for f in $S/*.log; do echo "$(basename $f): $(grep -v Warn $f | grep -v shards | tail -1 | cut -c1-120)"; done
  grep EVAL $OUT/evals.txt | tail -n +1 > $OUT/evals_so_far.txt
  jobs -r | grep -q . || break
done
wait; grep EVAL $OUT/evals.txt; for d in $S/*/; do cp $d/pretrain.json $OUT/$(basename $d).json 2>/dev/null; done
tail -5 $OUT/evals.txt
