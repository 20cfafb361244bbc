#!/usr/bin/env bash
# Everything a GPU lease should run, in one call that fits a 10-minute command:
#   GPU tests (compiled kernels vs the reference, CUDA graphs, memory), then quick attention,
#   sparse and linear benchmarks. Each step has its own time limit and a failure does not stop
#   the next; everything goes to $OUT (the device tool's return folder; benchmarks/results/gpu
#   elsewhere): session.log and results.tar (the benchmark JSON/PNG files).
#
#   device run:  bash benchmarks/gpu_session.sh            (timeout_s 590)
#   afterwards:  tar -xf <files_at>/results.tar -C benchmarks/results
#
# Budgets (seconds) can be changed with TESTS_S / ATTN_S / SPARSE_S / LINEAR_S.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
LOG=$OUT/session.log
RUN=$(mktemp -d)  # benchmark outputs, tarred into $OUT at the end

step() {  # step NAME SECONDS CMD...: run with a limit, log its status
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$LOG"
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
} 2>&1 | tee -a "$LOG"
# the backend's entry point (backend="attnopt" without an import) needs the package installed
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$LOG" 2>&1 \
    || echo "pip install -e . failed: tests that compile by name will say so" | tee -a "$LOG"

step tests "${TESTS_S:-240}" python3 -m pytest -m gpu -q -n 4 -p no:cacheprovider -rfEs \
    tests/test_gpu_kernels.py tests/test_gpu.py tests/test_backend.py tests/test_reliability.py
step attention "${ATTN_S:-150}" python3 benchmarks/attention.py --quick --rep-ms 50 --out-dir "$RUN"
step sparse "${SPARSE_S:-90}" python3 benchmarks/sparse.py --quick --out-dir "$RUN"
step linear "${LINEAR_S:-70}" python3 benchmarks/linear.py --quick --out-dir "$RUN"

tar -cf "$OUT/results.tar" -C "$RUN" . 2>>"$LOG"
echo "=== summary" | tee -a "$LOG"
grep -E "^=== .*: exit|passed|failed|error" "$LOG" | tail -20
