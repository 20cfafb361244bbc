#!/usr/bin/env bash
# Everything a GPU lease should run, in one command that ends within 9 minutes on an H100.
#
#   device run:  bash benchmarks/gpu_session.sh                       (timeout_s 590)
#   some steps:  STEPS=attention,sparse bash benchmarks/gpu_session.sh
#   the plan:    DRY=1 bash benchmarks/gpu_session.sh                  (prints the steps, runs nothing)
#   afterwards:  cp <files_at>/results/*.json benchmarks/results/
#
# Steps, by default all of them in this order (what matters most first):
#   tests      the GPU tests (compiled kernels against the reference, CUDA graphs, memory): no GPU
#              has run them, and every number after them means little if they fail
#   attention  attention TOPS, attnopt against torch SDPA (flash, cuDNN) and FlexAttention,
#              4K-32K tokens, head dims 128 and 64
#   budget     launches and GPU time per op (benchmarks/launch_budget.py --gpu-times: launch_budget.json)
#   sparse     block-sparse attention at 0.5 sparsity (and 0, 0.9) against attnopt's own dense kernel;
#              the predictors' cost, svg2's warm predictor and whole op (k-means, permutation, kernel)
#   linear     attnopt's GEMMs (w8a8, fp8, w4a16, w4a8) against cuBLAS bf16, the training linear's
#              fwd+bwd against bf16's, then a Llama block as time allows; on sm100 / sm120 also the
#              NVFP4 linear ("attnopt nvfp4" rows of linear_<arch>.json: never timed on a GPU yet)
#   training   attention forward+backward against SDPA / FlexAttention, then a training step of a
#              small Qwen3 under attnopt against bf16 eager and Inductor (training_gpu.py)
#   decode     decode attention on the quantized KV cache (int8 / int4 / int4+int8) against SDPA on
#              the bf16 cache at batch 1/8/32, 4K-32K tokens, then whole-model decode tokens/s with
#              AttnoptCache against transformers' bf16 StaticCache (decode.py)
# Each step has its own limit in seconds (TESTS_S, ATTN_S, BUDGET_S, SPARSE_S, LINEAR_S, TRAIN_S, DECODE_S), cut to
# what is left of TOTAL_S (the whole session, default 525); the benchmarks get it as --time-limit
# and stop starting new configurations in time. A failing or missing step does not stop the next.
# Everything goes to $OUT (the device tool's return folder; benchmarks/results/gpu elsewhere):
# session.log, results/*.json (each with the device, torch and triton versions it ran with; PNG
# plots), results/<step>.log (each step's output) and results/gpu_session.json (versions, and
# each step's limit, exit status and seconds).
set -u
cd "$(dirname "$0")/.."

ALL_STEPS="tests attention budget sparse linear training decode"
declare -A LIMIT=([tests]=${TESTS_S:-185} [attention]=${ATTN_S:-120} [budget]=${BUDGET_S:-35}
                  [sparse]=${SPARSE_S:-40} [linear]=${LINEAR_S:-40} [training]=${TRAIN_S:-45}
                  [decode]=${DECODE_S:-45})
TOTAL_S=${TOTAL_S:-525}
RESERVE_S=15  # what the end (summary, JSON) needs, and timeout's --kill-after

STEPS=${STEPS:-$ALL_STEPS}
STEPS=${STEPS//,/ }
for s in $STEPS; do
    if [[ -z "${LIMIT[$s]+set}" ]]; then
        echo "gpu_session.sh: unknown step '$s' in STEPS (known: ${ALL_STEPS// /, })" >&2
        exit 2
    fi
done
for s in $ALL_STEPS TOTAL; do
    v=${LIMIT[$s]:-$TOTAL_S}
    if [[ ! "$v" =~ ^[1-9][0-9]*$ ]]; then
        echo "gpu_session.sh: the seconds for $s must be a positive integer, got '$v'" >&2
        exit 2
    fi
done

OUT=${OUT:-benchmarks/results/gpu}
RUN=$OUT/results
GPU_TESTS=$(grep -l "mark.gpu" tests/test_*.py | tr '\n' ' ')

command_for() {  # command_for STEP LIMIT: the step's command line
    local limit=$(($2 > 40 ? $2 - 20 : $2 / 2))  # the benchmark's clock starts after its imports, ends before its plot
    case $1 in
        tests) echo python3 -m pytest -m gpu -q -n 4 -p no:cacheprovider -rfEs $GPU_TESTS ;;
        attention) echo python3 benchmarks/attention.py --quick --rep-ms 50 --time-limit "$limit" --out-dir "$RUN" ;;
        budget) echo python3 benchmarks/launch_budget.py --gpu-times --out "$RUN/launch_budget.json" ;;
        sparse) echo python3 benchmarks/sparse.py --quick --time-limit "$limit" --out-dir "$RUN" ;;
        linear) echo python3 benchmarks/linear.py --quick --time-limit "$limit" --out-dir "$RUN" ;;
        training) echo python3 benchmarks/training_gpu.py --quick --time-limit "$limit" --out-dir "$RUN" ;;
        decode) echo python3 benchmarks/decode.py --quick --time-limit "$limit" --out-dir "$RUN" ;;
    esac
}

if [[ -n "${DRY:-}" && "${DRY:-0}" != 0 ]]; then
    echo "plan (TOTAL_S=$TOTAL_S; results to $RUN):"
    for s in $STEPS; do
        echo "  $s (limit ${LIMIT[$s]}s): $(command_for "$s" "${LIMIT[$s]}")"
    done
    exit 0
fi

DEADLINE=$((SECONDS + TOTAL_S))
mkdir -p "$RUN"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
LOG=$OUT/session.log
: >"$LOG"
STATUS=()  # one JSON object per step that ran

step() {  # step NAME: run with its limit (cut to the time left), log its status
    local name=$1 limit=${LIMIT[$1]}
    local left=$((DEADLINE - SECONDS - RESERVE_S))
    if ((left < 20)); then
        echo "=== $name: skipped, ${left}s left of TOTAL_S=$TOTAL_S" | tee -a "$LOG"
        STATUS+=("{\"step\": \"$name\", \"limit_s\": $limit, \"exit\": null, \"seconds\": 0, \"skipped\": true}")
        return
    fi
    ((limit > left)) && limit=$left
    local cmd
    read -r -a cmd <<<"$(command_for "$name" "$limit")"
    echo "=== $name (limit ${limit}s): ${cmd[*]}" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "${cmd[@]}" 2>&1 | tee "$RUN/$name.log" | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
    STATUS+=("{\"step\": \"$name\", \"limit_s\": $limit, \"exit\": $rc, \"seconds\": $((SECONDS - t0))}")
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
} 2>&1 | tee -a "$LOG"
ENV_JSON=$(python3 -c "import json, torch, triton; print(json.dumps({'device': torch.cuda.get_device_name()
if torch.cuda.is_available() else None, 'capability': list(torch.cuda.get_device_capability())
if torch.cuda.is_available() else None, 'torch': torch.__version__, 'triton': triton.__version__,
'cuda': torch.version.cuda}))" 2>>"$LOG") || ENV_JSON=null
echo "env: $ENV_JSON" | tee -a "$LOG"
# the backend's entry point (backend="attnopt" without an import) needs the package installed
# (NO_INSTALL=1: it already is)
[[ -n "${NO_INSTALL:-}" ]] || python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$LOG" 2>&1 \
    || echo "pip install -e . failed: tests that compile by name will say so" | tee -a "$LOG"

for s in $STEPS; do
    step "$s"
done

joined=$(IFS=,; echo "${STATUS[*]}")
printf '{"env": %s, "total_s": %d, "steps": [%s]}\n' "$ENV_JSON" "$SECONDS" "$joined" >"$RUN/gpu_session.json"
echo "=== summary (${SECONDS}s)" | tee -a "$LOG"
grep -E "^=== .*: (exit|skipped)|passed|failed|error" "$LOG" | tail -20
