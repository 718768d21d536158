#!/usr/bin/env bash
# One run on a GPU machine with no network: install what it lacks from carried
# wheels, run the GPU tests and benchmarks, write logs and JSON into OUTDIR.
#
#   benchmarks/gpu_run.sh OUTDIR
#
# Wheels (keras and its small pure-Python dependencies, hypothesis if missing)
# are taken from .whl/ when present; CuPy, Numba, JAX and PyTorch are expected
# on the machine already. Not yet run on hardware: no GPU was lent to the
# session that wrote it.
set -uo pipefail
OUTDIR=${1:?usage: benchmarks/gpu_run.sh OUTDIR}
mkdir -p "$OUTDIR"
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fastsplit-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/fastsplit-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi > "$OUTDIR/nvidia-smi.txt" 2>&1
python3 -c "import fastsplit, json; print(json.dumps(fastsplit.backends(), indent=1))" | tee "$OUTDIR/backends.json"
python3 -m pytest tests/test_cupy_backend.py tests/test_split.py -q -p no:cacheprovider 2>&1 | tee "$OUTDIR/tests_gpu.log"
python3 -m pytest benchmarks/test_bench_gpu.py --benchmark-only -p no:cacheprovider \
    --benchmark-json "$OUTDIR/bench_gpu.json" 2>&1 | tee "$OUTDIR/bench_gpu.log"
for backend in jax torch; do
    KERAS_BACKEND=$backend python3 -m pytest tests/keras -q -p no:cacheprovider 2>&1 | tee "$OUTDIR/keras_$backend.log"
done
