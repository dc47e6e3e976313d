# Sourced by the GPU scripts: install the carried wheels (.whl) and this tree under /tmp/site, set the
# environment every rank inherits. STADI_DUMP_AFTER=N makes every Python process print its threads' stacks
# after N seconds (a hang shows where it waits).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 STADI_CACHE=/tmp/stadi-cache STADI_TEARDOWN_S=3
# NVLink multicast stays off (KINDS.md), also in the ranks this harness starts with their own environment
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
# xfuser's and yunchang's wheels put their test/example folders at the top level: 'test' shadows the stdlib's
(cd /tmp/site && rm -rf test tests benchmark benchmarks docker docs entrypoints examples)
export PYTHONPATH=/tmp/site
python3 -m pip install -q --upgrade --no-deps --no-build-isolation --no-index --target /tmp/site . > /tmp/pip-self.log 2>&1 || { echo "pip install . failed:"; tail -3 /tmp/pip-self.log; }
export PATH=/tmp/site/bin:$PATH
if ! python3 -c "import stadi_bench.speed" 2>/dev/null; then  # fall back: the tree itself + entry points
  export PYTHONPATH=/tmp/site:$PWD:$PWD/worker:$PWD/bench
  D=/tmp/site/stadi_local-0.dist-info; mkdir -p $D
  printf 'Metadata-Version: 2.1\nName: stadi-local\nVersion: 0\n' > $D/METADATA
  printf '[stadi.commands]\nworker = stadi_worker.cli.commands:register\nbench = stadi_bench.commands:register\n' > $D/entry_points.txt
fi
if [ -n "${STADI_DUMP_AFTER:-}" ]; then
  mkdir -p /tmp/dump && printf 'import faulthandler, os, sys\nfaulthandler.dump_traceback_later(int(os.environ["STADI_DUMP_AFTER"]), exit=False, file=sys.stderr)\n' > /tmp/dump/sitecustomize.py
  export PYTHONPATH=/tmp/dump:$PYTHONPATH
fi
