#!/usr/bin/env bash
# The 2xH200 run of `stadi bench speed` (issue 5): install the carried wheels, a tiny GPU smoke run, then
# SDXL and SD3 (one invocation each, so a slow second model cannot lose the first's figures), with PEER=1 the
# peer xDiT on the SD3 pipeline (its own invocation: --peer xdit --peer-only), all merged.
# Env: MODELS ("sdxl sd3"; empty: none), LEVELS / LEVELS_<model> / LEVELS_peer, TMO / TMO_<model> / TMO_peer
# (seconds per invocation), STEPS, RUNS, SMOKE (1), TAG (name suffix), NAME (merged result), PEER (0),
# PEER_CONFIGS (all, or e.g. cfg,cfg-compile,pipefusion), PEER_TMO (seconds per peer configuration and level),
# EXTRA (more `stadi bench speed` options for our models, e.g. "--compile" or "--strategies stadi,auto").
set -u
. bench/gpu_env.sh
S="python3 -m stadi.cli"
OUT=${OUT:-/tmp/out}; W=/tmp/sp; mkdir -p $OUT $W; LOG=$OUT/run.log
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m stadi.cli bench speed --help >/dev/null || exit 1
if [ -n "${PREBUILD:-sd3}" ]; then  # build the SD3 random pipeline in the background while SDXL runs
(OMP_NUM_THREADS=6 python3 -c "
import torch; torch.set_num_threads(6)
from pathlib import Path; from stadi.api import ModelSource; from stadi_worker.job.loading import resolve_source
resolve_source(ModelSource(family='${PREBUILD:-sd3}', source='random://full', dtype='float16'), Path('/tmp/stadi-cache/models'))
" > $W/build.log 2>&1 &)
fi
if [ "${SMOKE:-1}" = 1 ]; then
  timeout 90 $S bench speed --device cuda --size tiny --models sdxl --height 256 --steps 10 --levels 100,50 \
    --runs 1 --warmup-runs 1 --min-effective-steps 4 --out-dir $W --name smoke-gpu --no-plot > $W/smoke.log 2>&1
  echo "smoke rc=$?"; tail -25 $W/smoke.log; cat $W/smoke.log >> $LOG
fi
A="--device cuda --steps ${STEPS:-50} --runs ${RUNS:-3} --warmup-runs 1 --out-dir $OUT --no-plot ${EXTRA:-}"
for m in ${MODELS-sdxl sd3}; do  # LEVELS_sdxl / TMO_sdxl etc. override per model
  lv=$(eval echo \${LEVELS_$m:-${LEVELS:-100,50,25}}); tmo=$(eval echo \${TMO_$m:-${TMO:-250}})
  # each level gets the whole budget but the orchestrator outlives it: a level cut short keeps what it measured
  timeout $tmo $S bench speed $A --levels $lv --models $m --name speed-$m${TAG:-} --level-timeout $((tmo - 15)) \
    > $W/speed-$m.log 2>&1
  echo "$m rc=$?"; tail -14 $W/speed-$m.log; cat $W/speed-$m.log >> $LOG
done
if [ "${PEER:-0}" = 1 ]; then  # xDiT: same GPUs, SD3 pipeline directory, job, levels and MPS setting of rank 1
  lv=${LEVELS_peer:-${LEVELS_sd3:-${LEVELS:-100,50,25}}}; tmo=${TMO_peer:-${TMO:-500}}
  python3 -c "import xfuser" > $W/xfuser-import.log 2>&1 || { echo "xfuser does not import:"; tail -5 $W/xfuser-import.log; }
  timeout $tmo $S bench speed $A --levels $lv --models sd3 --peer xdit --peer-only --peer-configs ${PEER_CONFIGS:-all} \
    --peer-timeout ${PEER_TMO:-240} --name speed-peer-sd3${TAG:-} > $W/speed-peer.log 2>&1
  echo "peer rc=$?"; tail -14 $W/speed-peer.log; cat $W/speed-peer.log >> $LOG
fi
cat $W/build.log >> $LOG 2>/dev/null
ls $OUT/speed-*.json >/dev/null 2>&1 && python3 -m stadi_bench.speed --merge $OUT/speed-*.json $OUT/${NAME:-bench-2xh200}.json
ls -la $OUT
