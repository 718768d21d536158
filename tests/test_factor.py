"""``Job.factor``: a constant on the first step's gather, the same on every backend as in the reference."""

import numpy as np
import pytest

import fastsplit
from fastsplit import SplitError, plan

try:
    import numba  # noqa: F401

    BACKENDS = ["numpy", "numba"]
except ImportError:
    BACKENDS = ["numpy"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_factor_scales_the_first_step(backend, dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 97, 5)).astype(dtype)
    p = plan(97, [1, 5, 96], symmetry="asymmetric")
    q = plan(5, [0, 4], symmetry="nudge", eps=0.5)
    f = 1.4142135
    for role in ("outgoing", "copy", "moment2"):
        plain = fastsplit.split(x, p, 1, role=role, backend="numpy").astype(np.float64)
        got = fastsplit.split(x, p, 1, role=role, backend=backend, factor=f)
        np.testing.assert_allclose(got, plain * f, rtol=2e-6 if dtype == "float32" else 1e-13)
    # two axes: the factor goes with the first step, before the second step's offsets
    ref = fastsplit.split(fastsplit.split(x, p, 1, role="outgoing", backend="numpy", factor=f), q, 2, role="bias",
                          backend="numpy")
    got = fastsplit.split(x, p, 1, role="outgoing", backend=backend, factor=f, also=(q, 2, "bias"))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    ref = fastsplit.split(fastsplit.split(x, q, 2, role="bias", backend="numpy", factor=f), p, 1, role="outgoing",
                          backend="numpy")
    got = fastsplit.split(x, q, 2, role="bias", backend=backend, factor=f, also=(p, 1, "outgoing"))
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_factor_refused_when_not_finite():
    x = np.ones((2, 3), dtype=np.float32)
    with pytest.raises(SplitError, match="factor must be a finite real number"):
        fastsplit.split(x, plan(3, [0], symmetry="none"), 1, factor=float("nan"))
    with pytest.raises(SplitError, match="factor must be a finite real number"):
        fastsplit.split(x, plan(3, [0], symmetry="none"), 1, factor=True)
