"""Benchmark helpers: record each median with its byte count, print GB/s and ratios at the end.

Every benchmark that calls the ``record`` fixture stores ``(case, impl) ->
(median seconds, bytes)``; the terminal summary then prints one table of
median times, GB/s and the ratios the targets are stated in, all from the same
run (``make bench`` / ``pytest benchmarks --benchmark-only``).
"""

from __future__ import annotations

import pytest

_RESULTS: dict[tuple[str, str], tuple[float, int]] = {}

#: (label, numerator, denominator) of the ratios printed, on GB/s: (case, impl) or ("*", impl) for every case
RATIOS = [
    ("numba / memcpy", "numba", "memcpy"),
    ("kernel / memcpy", "kernel", "memcpy"),
    ("numba / np.take", "numba", "take"),
    ("numba / reference", "numba", "reference"),
]
IMPLS = ["numba", "kernel", "reference", "take", "memcpy"]


@pytest.fixture
def record(benchmark):
    """``record(case, impl, nbytes)`` after a benchmark ran: GB/s into ``extra_info`` and the summary."""

    def store(case: str, impl: str, nbytes: int) -> None:
        benchmark.extra_info["bytes"] = int(nbytes)
        if benchmark.stats is None:  # --benchmark-disable: the function ran once, untimed
            return
        median = benchmark.stats.stats.median
        benchmark.extra_info["GB/s"] = round(nbytes / median / 1e9, 2)
        _RESULTS[(case, impl)] = (median, int(nbytes))

    return store


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("fastsplit CPU benchmarks: medians, GB/s (bytes read + written) and ratios")
    cases = sorted({c for c, _ in _RESULTS}, key=list(dict.fromkeys(c for c, _ in _RESULTS)).index)
    impls = IMPLS
    tr.write_line(f"{'case':18s} " + " ".join(f"{i:>20s}" for i in impls))
    for case in cases:
        cells = []
        for impl in impls:
            if (case, impl) in _RESULTS:
                t, b = _RESULTS[(case, impl)]
                cells.append(f"{t * 1e3:8.2f} ms {b / t / 1e9:5.1f} GB/s")
            else:
                cells.append(" " * 20)
        tr.write_line(f"{case:18s} " + " ".join(f"{c:>20s}" for c in cells))

    def gbps(case, impl):
        t, b = _RESULTS[(case, impl)]
        return b / t / 1e9

    tr.write_line("")
    for case in cases:
        parts = [
            f"{label} {gbps(case, a) / gbps(case, b):.2f}"
            for label, a, b in RATIOS
            if (case, a) in _RESULTS and (case, b) in _RESULTS
        ]
        if parts:
            tr.write_line(f"{case:18s} " + ", ".join(parts))
    for impl in ("numba", "kernel"):
        for single in ("model_rows", "model_columns"):
            if ("model", impl) in _RESULTS and (single, impl) in _RESULTS:
                ratio = gbps("model", impl) / gbps(single, impl)
                tr.write_line(f"{'model':18s} {impl}: batched / {single} (one tensor of the same size) {ratio:.2f}")
