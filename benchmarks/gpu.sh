#!/usr/bin/env bash
# The GPU benchmark as one prepared call (see benchmarks/README.md):
#   device tool: run(command="bash benchmarks/gpu.sh", carry=["benchmarks/wheels"], timeout_s=540)
#   locally:     bash benchmarks/gpu.sh --tiny          (CPU smoke test, tiny models, ~2 min)
# Writes gpu_results.json, gpu_summary.md and gpu_log.txt to $OUT (default benchmarks/results/gpu_tiny).
# The device image has no diffusers: it is installed offline from benchmarks/wheels/ (carried), made with
#   .venv/bin/pip download diffusers==0.42.1 flax==0.12.8 --no-deps -d benchmarks/wheels
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/benchmarks/results/gpu_tiny}
mkdir -p "$OUT"
if [ -x "$ROOT/.venv/bin/python" ] && [ -z "${BENCH_PYTHON:-}" ]; then PY=$ROOT/.venv/bin/python; else PY=${BENCH_PYTHON:-python3}; fi

SITE=/tmp/cascade_bench_site
if ! $PY -c "import diffusers" 2>/dev/null; then
  if ls benchmarks/wheels/diffusers-*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" benchmarks/wheels/diffusers-*.whl \
      && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "diffusers is not installed and benchmarks/wheels/ has no wheel: the PyTorch parts will record errors"
  fi
fi
# Our NNX code needs flax >= 0.12 (nnx.List); install the carried flax only where the image's is older.
if ! $PY -c "from flax import nnx; nnx.List" 2>/dev/null && ls benchmarks/wheels/flax-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" benchmarks/wheels/flax-*.whl \
    && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
# JAX and PyTorch share the card: no preallocation; JAX may grow to 85% (training needs ~60 GB).
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.85}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

{ nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,temperature.gpu --format=csv 2>/dev/null || true; } \
  | tee "$OUT/gpu_log.txt"
# gpu_bench.py starts no part after --deadline-s (400 s); the timeout (470 s) is the hard stop, results so far stay.
timeout --signal=TERM --kill-after=10 ${BENCH_TIMEOUT_S:-470} \
  $PY benchmarks/gpu_bench.py --out "$OUT" --deadline-s "${BENCH_DEADLINE_S:-400}" "$@" 2>&1 | tee -a "$OUT/gpu_log.txt"
status=${PIPESTATUS[0]}
echo "gpu_bench exit status $status (124: timed out; results written so far are in $OUT/gpu_results.json)" \
  | tee -a "$OUT/gpu_log.txt"
exit "$status"
