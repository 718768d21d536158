"""Select rules: which units of a layer to split, from their scores, within caps.

Plain numpy; nothing here touches a model. A rule is checked once (``check_select``)
when a callback is made, so a bad value raises before training starts.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ._errors import GrowthError


def check_select(select):
    """Normalise ``select`` to ``("all",)``, ``("fraction", f)``, ``("top", k)`` or ``("threshold", t)``.

    Raises:
        ValueError: naming the value, for anything else.
    """
    if isinstance(select, str):
        if select == "all":
            return ("all",)
        raise GrowthError(
            f'select must be "all", a fraction in (0, 1], an integer k >= 1 or ("threshold", t); got select={select!r}'
        )
    if isinstance(select, (tuple, list)):
        if len(select) == 2 and select[0] == "threshold" and _is_real(select[1]) and math.isfinite(select[1]):
            return ("threshold", float(select[1]))
        raise GrowthError(f'select as a tuple must be ("threshold", t) with a finite number t; got select={select!r}')
    if isinstance(select, bool):
        raise GrowthError(f"select must not be a bool; got select={select!r}")
    if isinstance(select, numbers.Integral):
        if select >= 1:
            return ("top", int(select))
        raise GrowthError(f"select as an integer is a number of units and must be at least 1; got select={select!r}")
    if _is_real(select):
        if 0 < select <= 1:
            return ("fraction", float(select))
        raise GrowthError(f"select as a fraction must be in (0, 1]; got select={select!r}")
    raise GrowthError(
        f'select must be "all", a fraction in (0, 1], an integer k >= 1 or ("threshold", t); got select={select!r}'
    )


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def needs_scores(rule) -> bool:
    """Whether a rule ranks units (``"all"`` does not, unless a cap cuts it)."""
    return rule[0] != "all"


def rank(scores: np.ndarray) -> np.ndarray:
    """Unit indices, highest score first; ties keep the lower index first (stable)."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.argsort(-scores, kind="stable")


def choose(rule, width: int, scores: np.ndarray | None) -> np.ndarray:
    """Units to split in a layer of ``width`` units, best first, before caps.

    Returns an ``int64`` array of distinct unit indices ordered by decreasing
    score (ascending index for ``"all"`` without scores). Cost: one sort, O(n log n).
    """
    kind = rule[0]
    if kind == "all":
        return rank(scores) if scores is not None else np.arange(width, dtype=np.int64)
    scores = _check_scores(scores, width)
    order = rank(scores)
    if kind == "fraction":
        return order[: max(1, math.ceil(rule[1] * width - 1e-9))]
    if kind == "top":
        return order[: min(rule[1], width)]
    # threshold: every unit whose score exceeds t
    return order[scores[order] > rule[1]]


def _check_scores(scores, width: int) -> np.ndarray:
    if scores is None:
        raise GrowthError("this select rule needs scores")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.shape != (width,):
        raise GrowthError(f"a score function must return one score per unit ({width}), got shape {scores.shape}")
    return np.where(np.isfinite(scores), scores, -np.inf)


def cap_units(chosen: np.ndarray, width: int, max_units: int | None) -> np.ndarray:
    """Keep the best ``max_units - width`` of ``chosen`` (each split adds one unit)."""
    if max_units is None:
        return chosen
    return chosen[: max(0, max_units - width)]


def cap_params(wanted: dict, cost: dict, budget: float) -> dict:
    """Cut each layer's choice to fit ``budget`` extra parameters.

    Args:
        wanted: layer name -> chosen units, best first.
        cost: layer name -> parameters added per split unit (> 0).
        budget: parameters that may still be added (``max_params - params``).

    Returns:
        layer name -> a prefix of its chosen units. Every layer keeps the same
        fraction of its choice (the largest that fits); what that leaves of the
        budget then goes, one unit at a time, to the layers in turn.
        Cost: O(layers · log(units)).
    """
    total = sum(len(v) * cost[k] for k, v in wanted.items())
    if total <= budget:
        return dict(wanted)
    names = list(wanted)

    def counts(frac):
        return {k: int(math.floor(frac * len(wanted[k]) + 1e-9)) for k in names}

    def used(c):
        return sum(c[k] * cost[k] for k in names)

    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if used(counts(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    c = counts(lo)
    left = budget - used(c)
    progress = True
    while progress:
        progress = False
        for k in names:
            if c[k] < len(wanted[k]) and cost[k] <= left:
                c[k] += 1
                left -= cost[k]
                progress = True
    return {k: wanted[k][: c[k]] for k in names}
