"""Shared test helpers: which backends can run here, dtypes and per-dtype tolerances."""

import numpy as np

import fastsplit


def _usable():
    status = fastsplit.backends()
    return [name for name in ("numpy", "numba") if status[name][0]]


CPU_BACKENDS = _usable()

DTYPES = ["float16", "bfloat16", "float32", "float64"]

#: (rtol, atol) for comparing a backend with the numpy reference
TOL = {"float16": (1e-3, 1e-3), "bfloat16": (8e-3, 8e-3), "float32": (1e-6, 1e-6), "float64": (1e-12, 1e-12)}


def as_dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)
