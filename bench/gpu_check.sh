#!/usr/bin/env bash
# A short GPU check of the graphed worker (2 local GPUs): tiny SDXL and SD3 through `stadi bench speed` with
# CUDA graphs, then the same without (STADI_CUDA_GRAPHS=0); every rank's output under $OUT.
set -u
. bench/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for g in ${GRAPHS:-1 0}; do
  STADI_CUDA_GRAPHS=$g timeout ${TMO:-100} python3 -m stadi.cli bench speed --device cuda --size tiny --models ${MODELS:-sdxl,sd3} \
    --height 256 --steps 10 --levels ${LEVELS:-100} --runs 1 --warmup-runs 1 --min-effective-steps 4 \
    --out-dir $OUT/graphs$g --name check --no-plot > $OUT/check-graphs$g.log 2>&1
  echo "graphs=$g rc=$?"; tail -30 $OUT/check-graphs$g.log
done
