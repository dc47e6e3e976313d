#!/usr/bin/env bash
# Issue 16's one-H200 measurement: per family, `python -m stadi_bench.steps` twice with one inductor cache (the
# compile cold, then from the cache), every output under $OUT. Env: FAMILIES ("sd3 sdxl"), TMO (seconds per
# process), PHASES ("cold warm"), COLD_ARGS / WARM_ARGS (more flags for each process, e.g. "--rows 128,64 --batches 2").
set -u
. bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
export TORCHINDUCTOR_CACHE_DIR=/tmp/stadi-compile/inductor TRITON_CACHE_DIR=/tmp/stadi-compile/triton
for f in ${FAMILIES:-sd3 sdxl}; do
  for phase in ${PHASES:-cold warm}; do
    args=$(eval echo \${${phase^^}_ARGS:-})
    timeout ${TMO:-280} python3 -m stadi_bench.steps --family $f --out $OUT/steps-$f-$phase.json $args \
      > $OUT/steps-$f-$phase.log 2>&1
    echo "$f $phase rc=$?"; grep -v Warning $OUT/steps-$f-$phase.log | tail -14
  done
done
