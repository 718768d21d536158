"""`import fastsplit` is cheap: numpy and nothing heavier (STYLE.md #1)."""

import subprocess
import sys

HEAVY = ["numba", "cupy", "tensorflow", "jax", "torch", "keras", "ml_dtypes", "llvmlite"]


def test_import_pulls_in_no_framework():
    code = (
        "import sys, fastsplit, fastsplit.plan, fastsplit.interop;"
        "p = fastsplit.plan(4); import numpy as np;"
        "fastsplit.split(np.ones((2, 4)), p, backend='numpy');"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_public_surface():
    import fastsplit

    assert sorted(fastsplit.__all__) == sorted(
        ["CompactPlan", "Job", "SplitError", "SplitPlan", "__version__", "backends", "compact_plan", "plan", "split",
         "split_many"]
    )
    for name in fastsplit.__all__:
        assert hasattr(fastsplit, name)
