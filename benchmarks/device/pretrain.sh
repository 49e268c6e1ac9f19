#!/bin/bash
# Pretraining variants on a lent GPU machine, two processes sharing the GPU (session 5: batch 256 at ~80 ms a
# step each on an H200, 5000 steps in ~400 s: the shipped model's stage 6). Checkpoints (transformer + text
# encoders, every 2500 steps) packed into $OUT as they appear. Run from the repository root there:
#   OUT=/tmp/out DEADLINE=470 bash benchmarks/device/pretrain.sh
# Needs .whl/ with the wheels the machine lacks (see rl_sweep.sh); INIT = the pipeline folder to refine (stage 6
# started from stage 5, see core/assets/tiny_sd3/pretrain.json). Edit the `run` lines at the end.
OUT=${OUT:-/tmp/out}; mkdir -p $OUT; DEADLINE=${DEADLINE:-480}
. benchmarks/device/setup.sh
nvidia-smi --query-gpu=name --format=csv,noheader
S=/tmp/pt; mkdir -p $S; INIT=${INIT:-$PWD/core/assets/tiny_sd3}  # the pipeline to refine
run() {  # NAME JSON-overrides
  (cd /tmp && timeout -s KILL $DEADLINE python3 - "$1" "$2" "$INIT" > $S/$1.log 2>&1 <<'PY'

import json, sys
from vgrpo.pretrain_tiny import PretrainConfig, pretrain
name, over = sys.argv[1], json.loads(sys.argv[2])
base = dict(flow_pairs=96000, flow_batch=256, flow_steps=30000, flow_lr=1e-3, warmup_steps=200, layout="slots",
            device="cuda", checkpoint_every=2500, num_threads=2)
base.update(over)
pretrain(f"/tmp/pt/{name}", seed=11, config=PretrainConfig(**base), init_from=sys.argv[3])
PY
  ) &
}
NOISE='{"single_object": 0.25, "colors": 0.4, "two_object": 0.5, "counting": 0.5, "color_attr": 0.5, "position": 0.5}'
run noise "{\"caption_noise\": $NOISE}"
run clean '{}'
for i in $(seq 1 40); do
  sleep 15
  for d in $S/*/ckpt_*; do
    [ -d "$d" ] || continue; v=$(basename $(dirname $d)); c=$(basename $d)
    [ -f $OUT/${v}_$c.tar.gz ] || [ ! -f $d/model_index.json ] || (sleep 3; cd $d && tar czf $OUT/${v}_$c.tar.gz --exclude=vae --exclude=tokenizer --exclude=tokenizer_2 .)
  done
  date +%T; for f in $S/*.log; do echo "$(basename $f): $(grep -v Warn $f | tail -1 | cut -c1-150)"; done
  jobs -r | grep -q . || break
done
cp $S/*.log $OUT/; ls -la $OUT
