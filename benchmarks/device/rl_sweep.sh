#!/bin/bash
# Parallel RL probes (benchmarks/learnability.py) on a lent GPU machine, several processes sharing one GPU
# (the tiny model is launch-bound: 8 probes of 120 steps ran at ~0.6 s a step each on an H200, session 5).
# Run from the repository root there:   OUT=/tmp/out bash benchmarks/device/rl_sweep.sh
# Needs: .whl/ with the wheels the machine lacks (diffusers, transformers, peft, tokenizers, deepspeed,
# pydantic + pydantic_core + annotated_types + typing_inspection, hjson, regex, typing_extensions,
# importlib_metadata: `pip download --no-deps ...` here), and the model to probe in .whl/m (copied to /tmp/m).
# Variants: $VARIANTS (default benchmarks/device/rl_variants.txt), lines
# "NAME DEVICE THREADS STEPS EVAL_EVERY --set k=v ...". JSON per variant under $OUT/runs.
VARIANTS=${VARIANTS:-benchmarks/device/rl_variants.txt}
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
DEADLINE=${DEADLINE:-500}
. benchmarks/device/setup.sh
export TORCH_EXTENSIONS_DIR=/tmp/ext OMP_NUM_THREADS=2
nproc; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
S=$OUT/runs; mkdir -p $S; rm -rf /tmp/m; cp -r .whl/m /tmp/m
while read -r name dev thr steps every rest; do
  [[ -z $name || $name == \#* ]] && continue
  OMP_NUM_THREADS=$thr timeout -s INT $DEADLINE python3 benchmarks/learnability.py --device $dev --threads $thr \
    --steps $steps --eval-every $every $rest --out $S/$name.json > $S/$name.log 2>&1 &
done < "$VARIANTS"
sleep 5
for i in $(seq 1 60); do
  sleep 20; date +%T
  for f in $S/*.log; do echo "$(basename $f): $(tail -c 200 $f | tr '\r' '\n' | grep -v '^$' | tail -1)"; done
  jobs -r | grep -q . || break
done
wait; ls -la $S
