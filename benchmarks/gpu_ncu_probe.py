"""The kernels ``ncu`` profiles in ``benchmarks/gpu_run.sh``: the 256 MiB and the 1 GB batched split, once each.

    ncu --target-processes all -k regex:fastsplit python3 benchmarks/gpu_ncu_probe.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cupy  # noqa: E402
import test_bench_gpu as bench  # noqa: E402

from fastsplit.backends import cupy_cuda  # noqa: E402

for case, dtype in [("big-256MiB", "float32"), ("big-256MiB", "bfloat16"), ("batched-18-tensors-1GB", "float32")]:
    tasks = bench.CASES[case](dtype)
    for launch in cupy_cuda.prepare(tasks):
        launch()
    cupy.cuda.get_current_stream().synchronize()
    read = sum(t.x.nbytes for t in tasks)
    written = sum(t.out.nbytes for t in tasks)
    print(f"{case} {dtype}: {read / 1e6:.0f} MB read, {written / 1e6:.0f} MB written", flush=True)
    del tasks
    cupy.get_default_memory_pool().free_all_blocks()
