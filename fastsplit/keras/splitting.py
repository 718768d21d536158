"""Split along the splitting matrix's eigenvectors (Splitting Steepest Descent, Liu et al. 2019).

``score="splitting"`` ranks the units of a Dense layer by ``-lambda_min`` of their splitting
matrices (``fastsplit/keras/_scores.py``); :func:`split_along` then splits the chosen units
into two copies whose incoming weights (bias included) move to ``theta_u +- eps * |theta_u| * v_u``,
``v_u`` the unit's eigenvector, instead of a bias nudge or a random direction. Both copies keep half
of the outgoing weights, so the function changes at second order in ``eps`` only, and the loss by
about ``eps^2 |theta_u|^2 lambda_min / 2`` per unit: down, where ``lambda_min < 0``.

Only smooth activations have a splitting matrix: ReLU's second derivative is 0 almost everywhere,
and both functions here refuse it (``GrowthError``) rather than rank by a proxy.
"""

from __future__ import annotations

import numpy as np

from ..plan import plan as make_plan
from ._errors import GrowthError
from ._scores import SplittingScore, splitting_matrices, splitting_scores
from ._surgery import check_number
from ._widen import widen

__all__ = ["SplittingScore", "split_along", "splitting_matrices", "splitting_scores", "split_by_curvature"]


def _host(variable) -> np.ndarray:
    from keras import ops

    return np.array(ops.convert_to_numpy(variable))  # a writable copy


def _find_dense(model, name):
    try:
        layer = model.get_layer(name)
    except (ValueError, TypeError):
        raise GrowthError(f"model {model.name!r} has no layer named {name!r}") from None
    kernel = getattr(layer, "kernel", None)
    if kernel is None or len(kernel.shape) != 2:
        raise GrowthError(f"split_along splits Dense layers; {name!r} is a {type(layer).__name__}")
    return layer


def split_along(model, name, units, directions, *, eps: float = 0.1, optimizer: str = "carry"):
    """Split ``units`` of the Dense layer ``name`` into two copies each, moved apart along ``directions``.

    Args:
        model: a built Keras model; call this between ``fit`` calls.
        name: the Dense layer's name.
        units: distinct unit indices to split.
        directions: ``(d + 1, width)`` (one column per unit of the layer, as
            :func:`splitting_scores` returns) or ``(d + 1, len(units))``; rows are the
            kernel's ``d`` inputs, then the bias. Each column is normalised here.
        eps: the step relative to the norm of the unit's incoming weights and bias (>= 0):
            copy ``j`` of unit ``u`` gets ``theta_u + c_j * eps * |theta_u| * v_u``, ``c = +1, -1``.
        optimizer: ``"carry"`` or ``"reset"``, as in :func:`fastsplit.keras.widen`.

    Returns:
        The :class:`GrowthEvent` of the split.

    Raises:
        GrowthError: for a bad argument (checked before anything changes, so the model, its weights and
            its optimizer stay bit-identical), or whatever :func:`widen` refuses.

    Cost: one :func:`widen` with exact copies, then one write of the layer's kernel and bias.
    """
    layer = _find_dense(model, name)
    d, width = (int(s) for s in layer.kernel.shape)
    try:
        idx = np.asarray(units)
    except (TypeError, ValueError):
        idx = None
    if (idx is None or idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer)
            or np.any(idx < 0) or np.any(idx >= width) or len(np.unique(idx)) != idx.size):
        raise GrowthError(f"units must be distinct unit indices in [0, {width}); got units={units!r}")
    idx = idx.astype(np.int64)
    try:
        v = np.asarray(directions, dtype=np.float64)
    except (TypeError, ValueError):
        raise GrowthError(f"directions must be a real array of shape ({d + 1}, {width}) or ({d + 1}, {idx.size})") from None
    if v.shape == (d + 1, width):
        v = v[:, idx]
    elif v.shape != (d + 1, idx.size):
        raise GrowthError(f"directions must have shape ({d + 1}, {width}) or ({d + 1}, {idx.size}) (the kernel's "
                          f"{d} inputs and the bias, per unit); got {v.shape}")
    norms = np.linalg.norm(v, axis=0)
    if not np.all(np.isfinite(v)) or np.any(norms == 0):
        raise GrowthError("directions must be finite and nonzero for every split unit")
    eps = check_number("eps", eps)
    if eps < 0:
        raise GrowthError(f"eps must be at least 0; got eps={eps!r}")
    v = v / norms
    plan = make_plan(width, idx, symmetry="none")

    kernel = _host(layer.kernel).astype(np.float64)
    bias = _host(layer.bias).astype(np.float64) if layer.use_bias else np.zeros(width)
    theta = np.linalg.norm(np.concatenate([kernel, bias[None]], axis=0), axis=0)
    event = widen(model, {name: plan}, optimizer=optimizer)

    layer = model.get_layer(name)
    col = np.full(width, -1)
    col[idx] = np.arange(idx.size)
    c = plan.direction  # +1 for the original, -1 for its copy (equal halves)
    j = np.flatnonzero(col[plan.src] >= 0)
    u = plan.src[j]
    step = v[:, col[u]] * (c[j] * eps * theta[u])[None]  # (d + 1, moved units)
    k = _host(layer.kernel)
    k[:, j] += step[:d].astype(k.dtype)
    layer.kernel.assign(k)
    if layer.use_bias:
        b = _host(layer.bias)
        b[j] += step[d].astype(b.dtype)
        layer.bias.assign(b)
    return event


def split_by_curvature(model, name, probe, *, count, eps: float = 0.1, optimizer: str = "carry"):
    """Split the ``count`` units of Dense layer ``name`` with the most negative ``lambda_min`` on ``probe = (x, y)``,
    each along its eigenvector (:func:`split_along`). Units whose ``lambda_min`` is not negative are split too
    when ``count`` asks for them (their direction then lowers nothing at second order).

    Returns:
        ``(event, lam)``: the :class:`GrowthEvent` and the ``lambda_min`` of every unit before the split.
    """
    layer = _find_dense(model, name)
    width = int(layer.kernel.shape[1])
    if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or not 1 <= count <= width:
        raise GrowthError(f"count must be an integer in [1, {width}]; got count={count!r}")
    if not isinstance(probe, (tuple, list)) or len(probe) != 2:
        raise GrowthError("probe must be (x, y)")
    lam, vec = splitting_scores(model, layer, probe[0], probe[1])
    units = np.sort(np.argsort(lam, kind="stable")[:count])
    return split_along(model, name, units, vec, eps=eps, optimizer=optimizer), lam
