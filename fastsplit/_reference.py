"""The numpy oracle: plain, obviously right, slow is fine.

Each task is a gather along the middle axis of a 3-D view ``(outer, n, inner)``:

    out[o, j, i] = x[o, src[j], i] * scale[j] + add[j] + noise[j] * gauss(key, (o*m + j)*inner + i)

computed in float64 for float64 tensors and in float32 for the others (float32,
float16, bfloat16), then rounded to the tensor's dtype. A task with
``noise_by_source`` draws at the flat index of the element read instead,
``gauss(key, (o*n + src[j])*inner + i)``: every copy of a unit gets the same draws.

A two-axis task (``task.rows``) is two such gathers, literally: the first step on
a 3-D view of the input, rounded to the dtype, then the second on a 3-D view of
that intermediate, so each step's noise index is the flat index in its own result
(in its own input, for a step drawn by source).
"""

from __future__ import annotations

import numpy as np

from . import _noise


def compute_dtype(dtype) -> np.dtype:
    """float64 for float64 tensors, float32 for every other supported dtype."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def gather(x, src, scale, add=None, noise=None, key=0, by_source=False):
    """One task, returned as a new ``(outer, m, inner)`` array of ``x.dtype``."""
    ct = compute_dtype(x.dtype)
    outer, n, inner = x.shape
    m = src.shape[0]
    y = x[:, src, :].astype(ct) * scale.astype(ct)[None, :, None]
    if add is not None:
        y = y + add.astype(ct)[None, :, None]
    if noise is not None:
        o, j, i = np.meshgrid(np.arange(outer), np.arange(m), np.arange(inner), indexing="ij")
        flat = (o * n + np.asarray(src)[j] if by_source else o * m + j) * inner + i
        draw = noise[None, :, None] * _noise.gauss(key, flat)
        y = y + draw.astype(ct)
    return y.astype(x.dtype)


def run(tasks) -> None:
    """Write every task's result into its ``out``."""
    for t in tasks:
        if t.rows is None:
            t.out[...] = gather(t.x, t.src, t.scale, t.add, t.noise, t.key, t.noise_by_source)
        else:
            t.out[...] = _two_axes(t)


def _two_axes(t):
    """A two-axis task as two one-axis gathers through an intermediate array."""
    outer, na, mid, nb, inner = t.x.shape
    r = t.rows
    ma, mb = r.src.shape[0], t.src.shape[0]

    def along_rows(y, nb_now):  # (outer, na, mid, nb_now, inner) -> (outer, ma, mid, nb_now, inner)
        y3 = gather(y.reshape(outer, na, mid * nb_now * inner), r.src, r.scale, r.add, r.noise, r.key,
                    r.noise_by_source)
        return y3.reshape(outer, ma, mid, nb_now, inner)

    def along_columns(y, na_now):  # (outer, na_now, mid, nb, inner) -> (outer, na_now, mid, mb, inner)
        y3 = gather(y.reshape(outer * na_now * mid, nb, inner), t.src, t.scale, t.add, t.noise, t.key,
                    t.noise_by_source)
        return y3.reshape(outer, na_now, mid, mb, inner)

    if r.first:
        return along_columns(along_rows(t.x, nb), ma)
    return along_rows(along_columns(t.x, na), mb)
