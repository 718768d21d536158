"""Summarise ``bench_gpu.json`` (pytest-benchmark JSON of ``test_bench_gpu.py``) as one table.

    python benchmarks/gpu_summary.py OUTDIR/bench_gpu.json [--json OUT.json]

Per case and dtype: each implementation's bandwidth (GB/s, bytes read plus written, median of the
CUDA-event times), the split's share of the device-to-device copy's bandwidth (kernel alone and
the whole call), and how many times faster the kernel is than the fastest framework gather.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FRAMEWORKS = ("take", "index_select", "jnp_take")


def summarise(bench: dict) -> list[dict]:
    rows: dict = {}
    for b in bench["benchmarks"]:
        info = b["extra_info"]
        row = rows.setdefault((info["case"], info["dtype"]), {"case": info["case"], "dtype": info["dtype"]})
        row[info["impl"]] = {"GB/s": info["GB/s"], "ms": info["gpu_ms_median"], "bytes": info["bytes_read_plus_written"]}
        row["device"] = info.get("device")
    out = []
    for row in rows.values():
        copy = row.get("copy", {}).get("GB/s")
        for impl in ("kernel", "fastsplit"):
            if copy and impl in row:
                row[f"{impl}_vs_copy"] = row[impl]["GB/s"] / copy
        frames = [row[f]["ms"] for f in FRAMEWORKS if f in row]
        if frames and "kernel" in row:
            row["kernel_speedup_vs_best_framework"] = min(frames) / row["kernel"]["ms"]
        out.append(row)
    return out


def table(rows: list[dict]) -> str:
    head = ["case", "dtype", "MB", "kernel", "fastsplit", "copy", "take", "index_select", "jnp_take",
            "kernel/copy", "call/copy", "x best gather"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mb = r.get("kernel", {}).get("bytes", 0) / 1e6
        cells = [r["case"], r["dtype"], f"{mb:.0f}"]
        cells += [f"{r[i]['GB/s']:.0f}" if i in r else "-" for i in ("kernel", "fastsplit", "copy", *FRAMEWORKS)]
        cells += [f"{r[k]:.0%}" if k in r else "-" for k in ("kernel_vs_copy", "fastsplit_vs_copy")]
        s = r.get("kernel_speedup_vs_best_framework")
        cells.append(f"{s:.2f}" if s else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = summarise(json.loads(args.bench.read_text()))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
