#!/usr/bin/env bash
# One run on a GPU machine with no network: install what it lacks from carried wheels, time the
# kernel and the growth events on a quiet GPU, profile the kernel with ncu, then run the GPU tests;
# logs and one summary.json (benchmarks/gpu_collect.py) go to OUTDIR.
#
#   benchmarks/gpu_run.sh OUTDIR              # every stage, about 5 minutes on an H100
#   STAGES="tests keras" benchmarks/gpu_run.sh OUTDIR   # only some: tune bench growth ncu tests keras
#
# "tune" sweeps the kernel's tuning constants (benchmarks/gpu_tune.py); the stages after it run with
# the best setting it found (FASTSPLIT_CUDA_TUNING), unless that variable is set already.
#
# Wheels (keras, namex, optree: what the machine's image lacks) are taken from .whl/ when present;
# CuPy, Numba, JAX, PyTorch, pytest-benchmark and hypothesis are expected on the machine. Each stage
# has a time limit, so a hung stage costs its limit, not the lease.
set -uo pipefail
OUTDIR=${1:?usage: benchmarks/gpu_run.sh OUTDIR}
STAGES=${STAGES:-tune bench growth ncu tests keras}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fastsplit-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/fastsplit-site
fi
# JAX takes 75 % of the GPU at start-up unless told not to; CuPy and PyTorch share the card here
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export FASTSPLIT_GPU_OUT="$OUTDIR"
PY=python3
stage() {  # stage NAME LIMIT_S COMMAND...: run it with a time limit, log it, record rc and seconds
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUTDIR/stages.txt"
    tail -n 3 "$OUTDIR/$name.log"
}
want() { [[ " $STAGES " == *" $1 "* ]]; }

date -u +%FT%TZ > "$OUTDIR/date.txt"
nvidia-smi > "$OUTDIR/nvidia-smi.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv > "$OUTDIR/gpu.csv" 2>&1
$PY -c "import fastsplit, json; print(json.dumps(fastsplit.backends(), indent=1))" > "$OUTDIR/backends.json" 2>&1
$PY -m pip list 2>/dev/null | grep -iE "^(cupy|numba|numpy|jax|jaxlib|torch|keras|pytest-benchmark) " > "$OUTDIR/versions.txt"
cat "$OUTDIR/gpu.csv" "$OUTDIR/backends.json"

# -- timings first, on a quiet GPU ----------------------------------------------------------------
if want tune; then
    stage tune 150 $PY benchmarks/gpu_tune.py --out "$OUTDIR"
    best=$(sed -n 's/^best //p' "$OUTDIR/tune.log")
    if [ -z "${FASTSPLIT_CUDA_TUNING:-}" ] && [ -n "$best" ]; then export FASTSPLIT_CUDA_TUNING=$best; fi
    echo "tuning: ${FASTSPLIT_CUDA_TUNING:-defaults}" | tee -a "$OUTDIR/stages.txt"
fi
if want bench; then
    stage bench 240 $PY -m pytest benchmarks/test_bench_gpu.py --benchmark-only -q -p no:cacheprovider \
        --benchmark-json "$OUTDIR/bench_gpu.json"
fi
if want growth; then
    for backend in jax torch; do
        KERAS_BACKEND=$backend stage "growth_$backend" 150 $PY benchmarks/gpu_growth_event.py --out "$OUTDIR"
    done
fi
if want ncu; then
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
    if [ -n "$NCU" ]; then
        stage ncu_metrics 150 "$NCU" --target-processes all --clock-control none -k regex:fastsplit --csv --page raw \
            --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__grid_size,lts__t_sector_hit_rate.pct \
            $PY benchmarks/gpu_ncu_probe.py
        stage ncu_sections 120 "$NCU" --target-processes all --clock-control none -k regex:fastsplit -c 1 \
            --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
            --section WarpStateStats $PY benchmarks/gpu_ncu_probe.py
    else
        echo "ncu not found" | tee "$OUTDIR/ncu_metrics.log"
    fi
fi

# -- correctness: the core's GPU tests and Keras on JAX and PyTorch, side by side ----------------------
pids=()
if want tests; then
    stage tests_gpu 300 $PY -m pytest tests/test_cupy_backend.py -q -p no:cacheprovider -k TestGPU -rs &
    pids+=($!)
fi
if want keras; then
    for backend in jax torch; do
        KERAS_BACKEND=$backend stage "keras_$backend" 300 $PY -m pytest tests/keras/test_gpu.py \
            tests/keras/test_zero_copy.py tests/keras/test_optim.py -q -p no:cacheprovider -rs &
        pids+=($!)
    done
fi
for pid in "${pids[@]}"; do wait "$pid"; done
$PY benchmarks/gpu_collect.py "$OUTDIR" | tee "$OUTDIR/summary.txt"
