"""Sweep the CUDA kernel's tuning constants on this GPU; write the table and the best setting.

    python benchmarks/gpu_tune.py --out DIR

For each (threads per block, 16-byte vectors per thread, minimum blocks per SM, most blocks per
launch) the split kernel alone (layout prepared beforehand) is timed with CUDA events, median of 10
after 3 warm-ups, on the cases of ``test_bench_gpu.py`` (float32 and bfloat16), next to a
device-to-device copy of the same output bytes. Every timed launch is checked against the numpy
reference on two rows of the first and last tensor. ``DIR/gpu_tune.json`` holds every figure and
``best``: the setting with the highest mean share of the copy's bandwidth over the cases.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cupy  # noqa: E402
import test_bench_gpu as bench  # noqa: E402
from _tuning import apply  # noqa: E402

from fastsplit import _reference  # noqa: E402
from fastsplit.backends import cupy_cuda  # noqa: E402

SETTINGS = [  # threads, items, min blocks per SM, most blocks (0: one block per tile)
    (256, 4, 1, 0), (256, 4, 2, 0), (256, 4, 3, 0), (256, 4, 4, 0), (256, 2, 4, 0), (256, 8, 1, 0),
    (256, 8, 2, 0), (128, 4, 8, 0), (128, 8, 4, 0), (512, 2, 2, 0), (512, 4, 1, 0),
    (256, 4, 4, 132 * 8), (256, 4, 2, 132 * 4),
]
CASES = [("dense-4096x4096-to-6144-incoming", "float32"), ("dense-4096x4096-to-6144-outgoing", "float32"),
         ("flatten-7x7x512x1024-to-768-outgoing", "float32"), ("big-256MiB", "float32"), ("big-256MiB", "bfloat16"),
         ("batched-108-tensors-42M-params", "float32"), ("batched-18-tensors-1GB", "float32"),
         ("batched-18-tensors-1GB", "bfloat16")]


def events_ms(fn, reps=10, warm=3) -> float:
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return float(np.median(times))


def copy_ms(nbytes: int) -> float:
    src = cupy.empty(nbytes, cupy.uint8)
    dst = cupy.empty(nbytes, cupy.uint8)
    return events_ms(lambda: dst.data.copy_from_device_async(src.data, nbytes))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    rows = []
    for case, dtype in CASES:
        tasks = bench.CASES[case](dtype)
        out_bytes = sum(t.out.nbytes for t in tasks)
        moved = out_bytes + sum(t.x.nbytes for t in tasks)
        copy = copy_ms(out_bytes)
        copy_gbs = 2 * out_bytes / copy / 1e6
        for setting in SETTINGS:
            apply(setting)
            launches = cupy_cuda.prepare(tasks)
            for t in tasks:
                t.out.fill(0)

            def kernel():
                for launch in launches:  # noqa: B023
                    launch()

            ms = events_ms(kernel)
            for t in (tasks[0], tasks[-1]):
                want = _reference.gather(cupy.asnumpy(t.x[:2]), t.src, t.scale, t.add)
                np.testing.assert_array_equal(cupy.asnumpy(t.out[:2]), want)
            gbs = moved / ms / 1e6
            rows.append({"case": case, "dtype": dtype, "setting": setting, "ms": ms, "GB/s": gbs,
                         "copy_GB/s": copy_gbs, "vs_copy": gbs / copy_gbs})
            print(f"{case:40s} {dtype:8s} {setting!s:22s} {ms:8.3f} ms {gbs:7.0f} GB/s  copy {copy_gbs:6.0f}  "
                  f"{gbs / copy_gbs:5.0%}", flush=True)
        del tasks
        cupy.get_default_memory_pool().free_all_blocks()
    score = {s: float(np.mean([r["vs_copy"] for r in rows if r["setting"] == s])) for s in SETTINGS}
    best = max(score, key=score.get)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_tune.json").write_text(json.dumps({"rows": rows, "score": {str(k): v for k, v in score.items()},
                                                        "best": best}, indent=1))
    for s in SETTINGS:
        print(f"{s!s:22s} mean share of copy bandwidth {score[s]:.1%}")
    print("best", ",".join(str(v) for v in best))
    apply(SETTINGS[0])


if __name__ == "__main__":
    main()
