#!/usr/bin/env bash
# The "where a GPU is available" checks of issues 12 and 14 in one run on a CUDA machine, each
# under its own time limit, everything written to $OUT (default results/gpu):
#   1. the gpu-marked tests (tracer and central-flow loss on CUDA against the CPU);
#   2. the every-step trace's cost, ResNet and transformer (benchmarks/bench_trace_device.py);
#   3. central flows of the seed CNN on 1000 MNIST-1D examples (python -m analyses central_flow_gpu);
#   4. the same trace benchmark with the opt-in CUDA-graph engine (its own process: a failed
#      capture cannot spoil step 2).
# A smoke run on the CPU: DEVICE=cpu QUICK=1 OUT=/tmp/gpu_checks bash benchmarks/gpu_checks.sh
# Where the machine lacks mnist1d, put its wheel in .whl/ (installed into /tmp/site first).
set -u
OUT=${OUT:-results/gpu}; DEVICE=${DEVICE:-cuda}; QUICK=${QUICK:-}
PY=${PY:-python3}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
LOG="$OUT/log.txt"
step() { local limit=$1; shift; echo "=== $(date -u +%T) $* (limit ${limit} s)" >>"$LOG"
         timeout "$limit" "$@" >>"$LOG" 2>&1; echo "=== rc=$?" >>"$LOG"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import sys, torch; print(sys.version.split()[0], torch.__version__)"; } >"$LOG"
if [ -n "$QUICK" ]; then
    step 120 $PY benchmarks/bench_trace_device.py --device "$DEVICE" --budget-s 20 --out "$OUT/bench_trace.json"
    step 150 $PY -m analyses central_flow_gpu --device "$DEVICE" --quick --models seed_cnn --budget-s 60 --out "$OUT/central_flow_gpu"
    exit 0
fi
step 90 $PY -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu.py tests/test_central_flow_loss.py
step 140 $PY benchmarks/bench_trace_device.py --device "$DEVICE" --budget-s 110 --out "$OUT/bench_trace_cuda.json"
step 350 $PY -m analyses central_flow_gpu --device "$DEVICE" --budget-s 320 --out "$OUT/central_flow_gpu"
step 80 $PY benchmarks/bench_trace_device.py --device "$DEVICE" --graph --budget-s 60 --out "$OUT/bench_trace_cuda_graph.json"
