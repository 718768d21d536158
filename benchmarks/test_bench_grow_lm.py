"""pytest-benchmark entry of the language-model growth comparison (``benchmarks/grow_lm.py``, issue 14).

``pytest benchmarks --benchmark-only -k grow_lm`` runs the from-scratch byte-level GPT and the FFN-growth
policy once each, one seed, at a size that finishes in a few minutes on 2 cores (``FASTSPLIT_LM_STEPS``
scales it), and stores in the benchmark's ``extra_info`` what ``grow_lm.py`` writes to summary.json: each
run's final validation bits per byte, wall time and FLOPs, the wall time and FLOPs to the from-scratch
run's final loss, and ``grown_vs_scratch_wall``. The timed quantity is the whole comparison; the ratios
are the result. ``python benchmarks/grow_lm.py --quick`` is the 3-seed version that RESULTS.md quotes.
"""

from __future__ import annotations

import os

import pytest

STEPS = int(os.environ.get("FASTSPLIT_LM_STEPS", "160"))


@pytest.mark.benchmark(group="grow_lm")
def test_bench_grow_lm_ffn_against_scratch(benchmark, tmp_path):
    import fastsplit.lm_demo as lm

    size = lm.Size(d=32, heads=2, ff=128, layers=2, ctx=32, batch=8, steps=STEPS, eval_every=max(STEPS // 4, 1),
                   warmup=STEPS // 16)
    summary = benchmark.pedantic(
        lm.compare, args=(size, [0], ["grow-ffn-rewarm"], tmp_path),
        kwargs={"quick": True, "data_bytes": 1 << 20, "n_val": 64}, rounds=1, iterations=1,
    )
    runs = {r["name"]: r for r in summary["runs"]}
    benchmark.extra_info.update({
        "grown_vs_scratch_wall": summary["grown_vs_scratch_wall"],
        **{f"{name}/{k}": r[k] for name, r in runs.items()
           for k in ("final_val_loss", "wall_s", "flops", "wall_s_to_target", "flops_to_target")},
    })
    assert runs["grow-ffn-rewarm"]["flops"] < runs["scratch"]["flops"]  # a quarter of the FFN before the events
