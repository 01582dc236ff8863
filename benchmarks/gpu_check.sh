#!/usr/bin/env bash
# The GPU check of the Triton kernel as one script, for a CUDA machine that
# has torch and triton installed but maybe no network (so nothing is installed here):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]     # default OUT_DIR: benchmarks/results
#
# 1. the Triton and CUDA tests, natively at full sizes, against the machine's torch;
# 2. the offline compile report for the machine's own arch (no timing);
# 3. benchmarks/cuda_flash_bench.py: triton vs torch SDPA's backends, bf16, B*H = 32,
#    writing <gpu-name>-triton.json.
# Each step has its own time limit (seconds, overridable) and the script goes on after a
# failing step, so one run brings back everything that worked; it exits non-zero if any
# step failed. PYTHON picks the interpreter (default python3); SEQ_LENS and HEAD_DIMS
# shorten the benchmark sweep (autotuning compiles every config once per head dim,
# length bucket and causal flag).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
TEST_LIMIT=${TEST_LIMIT:-300}
BENCH_LIMIT=${BENCH_LIMIT:-420}
SEQ_LENS=${SEQ_LENS:-"1024 4096 16384"}
HEAD_DIMS=${HEAD_DIMS:-"64 128"}
PY=${PYTHON:-python3}
status=0
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to $PY; this check needs a GPU" >&2
    exit 2
fi

nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv 2>&1 | tee "$OUT/gpu.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    2>&1 | tee -a "$OUT/gpu.txt"

echo "== 1. Triton and CUDA tests (limit ${TEST_LIMIT}s)"
timeout "$TEST_LIMIT" "$PY" -m pytest -m "triton or cuda" -q -p no:cacheprovider -x \
    spec_tests property_tests 2>&1 | tee "$OUT/gpu-tests.log" | tail -n 25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 2. offline compile report for this GPU's arch"
arch=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(10 * a + b)")
"$PY" -m transformer bench compile --arch "$arch" --dtypes bf16 --head-dims $HEAD_DIMS \
    --out "$OUT" --force > "$OUT/gpu-compile.log" 2>&1 || status=1
tail -n 3 "$OUT/gpu-compile.log"

echo "== 3. flash attention benchmark (limit ${BENCH_LIMIT}s)"
gpu=$("$PY" -c "import re, torch; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name()).strip('-').lower())")
# shellcheck disable=SC2086  # the lists are meant to split into arguments
timeout "$BENCH_LIMIT" "$PY" benchmarks/cuda_flash_bench.py --seq-lens $SEQ_LENS \
    --head-dims $HEAD_DIMS --out "$OUT/$gpu-triton.json" 2>&1 | tee "$OUT/gpu-bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

exit "$status"
