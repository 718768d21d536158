"""The counter-based Gaussian generator behind ``symmetry="noise"``.

Every backend draws the same numbers: element ``idx`` of a tensor with key ``k``
gets ``gauss(k, idx)``, whatever order the elements are visited in. The
generator is splitmix64 run from state ``k`` to positions ``2*idx + 1`` and
``2*idx + 2`` (two 53-bit uniforms), then Box-Muller in float64. The CUDA and
Numba kernels write the same steps; the constants live here.
"""

from __future__ import annotations

import numpy as np

GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
MASK64 = (1 << 64) - 1
TWO_PI = 6.283185307179586
INV_2_53 = 1.0 / 9007199254740992.0


def _mix_int(z: int) -> int:
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def key_from_seed(seed: int) -> int:
    """The 64-bit generator key of an integer seed."""
    return _mix_int((int(seed) + GOLDEN) & MASK64)


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
    return z ^ (z >> np.uint64(31))


def gauss(key: int, idx: np.ndarray) -> np.ndarray:
    """Standard normal draws for element indices ``idx`` under ``key`` (float64)."""
    idx = np.asarray(idx, dtype=np.uint64)
    k = np.uint64(key)
    g = np.uint64(GOLDEN)
    with np.errstate(over="ignore"):
        h1 = _mix(k + (np.uint64(2) * idx + np.uint64(1)) * g)
        h2 = _mix(k + (np.uint64(2) * idx + np.uint64(2)) * g)
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 1.0) * INV_2_53
    u2 = (h2 >> np.uint64(11)).astype(np.float64) * INV_2_53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(TWO_PI * u2)
