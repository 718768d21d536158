"""Gather what ``benchmarks/gpu_run.sh`` wrote into OUTDIR into ``OUTDIR/summary.json``; print it short.

    python benchmarks/gpu_collect.py OUTDIR
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_summary  # noqa: E402


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""


def _tests(log: str) -> str:
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|error).*?) in [\d.]+s", log, re.M)
    return found[-1] if found else (log.strip().splitlines() or ["no output"])[-1]


def _ncu(log: str) -> list[dict]:
    """Rows of ``ncu --csv --page raw``: one per profiled kernel, the metrics as numbers where they parse."""
    lines = [ln for ln in log.splitlines() if ln.startswith('"')]
    if not lines:
        return []
    rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
    out = []
    for r in rows[1:] if rows and not str(rows[0].get("ID", "")).isdigit() else rows:  # row 0: units
        keep = {}
        for k, v in r.items():
            if k in ("Kernel Name", "ID") or "__" in k:
                try:
                    keep[k] = float(v.replace(",", "")) if k != "Kernel Name" else v
                except (ValueError, AttributeError):
                    keep[k] = v
        t = keep.get("gpu__time_duration.sum")
        rd, wr = keep.get("dram__bytes_read.sum"), keep.get("dram__bytes_write.sum")
        if isinstance(t, float) and isinstance(rd, float) and isinstance(wr, float) and t > 0:
            keep["dram_GB/s"] = (rd + wr) / t  # bytes per ns = GB/s, if ncu reports ns and bytes
        out.append(keep)
    return out


def main(outdir: Path) -> dict:
    summary = {
        "date": _read(outdir / "date.txt").strip(),
        "gpu": _read(outdir / "gpu.csv").strip().splitlines()[1:],
        "versions": _read(outdir / "versions.txt").split("\n"),
        "stages": _read(outdir / "stages.txt").strip().splitlines(),
    }
    try:
        summary["backends"] = json.loads(_read(outdir / "backends.json"))
    except ValueError:
        summary["backends"] = _read(outdir / "backends.json")[-2000:]
    bench = outdir / "bench_gpu.json"
    if bench.is_file():
        summary["bench"] = gpu_summary.summarise(json.loads(bench.read_text()))
    for backend in ("jax", "torch"):
        path = outdir / f"growth_event_{backend}.json"
        if path.is_file():
            summary[f"growth_{backend}"] = json.loads(path.read_text())
    tune = outdir / "gpu_tune.json"
    if tune.is_file():
        t = json.loads(tune.read_text())
        summary["tune"] = {"best": t["best"], "score": t["score"]}
    summary["ncu"] = _ncu(_read(outdir / "ncu_metrics.log"))
    summary["tests"] = {name: _tests(_read(outdir / f"{name}.log")) for name in ("tests_gpu", "keras_jax", "keras_torch")}
    (outdir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print("\n".join(summary["gpu"] + summary["stages"]))
    for k, v in summary["tests"].items():
        print(f"{k}: {v}")
    if "tune" in summary:
        print("tuning", summary["tune"])
    if "bench" in summary:
        print(gpu_summary.table(summary["bench"]))
    for backend in ("jax", "torch"):
        g = summary.get(f"growth_{backend}")
        if g:
            ms = {k: round(v * 1e3, 1) for k, v in g["times_s"].items()}
            print(f"growth {backend}: {g['params_before'] / 1e6:.0f}M -> {g['params_after'] / 1e6:.0f}M, "
                  f"{g['bytes_new'] / 1e9:.2f} GB new, copy {g['copy_new_bytes_ms']} ms, phases ms {ms}")
    for r in summary["ncu"]:
        print({k: r[k] for k in r if k in ("Kernel Name", "gpu__time_duration.sum", "dram_GB/s",
                                           "dram__throughput.avg.pct_of_peak_sustained_elapsed")})
    return summary


if __name__ == "__main__":
    main(Path(sys.argv[1]))
