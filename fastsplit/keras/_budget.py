"""Budget and caps: which units each growing layer splits at an event.

A select rule (``_select``) picks units by score (``_scores``); ``max_units`` caps each
layer's width and ``max_params`` the model's parameter count, spread over the layers
in proportion to what each wanted (``_select.cap_params``), priced by :func:`unit_costs`.
"""

from __future__ import annotations

import numpy as np

from . import _select
from ._args import check_int
from ._errors import GrowthError


def check_max_units(max_units):
    """``None``, an int >= 1 for every layer, or a dict layer name -> int >= 1; ``GrowthError`` naming the value."""
    if isinstance(max_units, dict):
        for k in max_units:
            if not isinstance(k, str) or not k:
                raise GrowthError(f"max_units as a dict maps layer names to widths; got the key {k!r} in "
                                  f"max_units={max_units!r}")  # fmt: skip
        return {k: check_int(f"max_units[{k!r}]", v, 1) for k, v in max_units.items()}
    if max_units is not None:
        return check_int("max_units", max_units, 1)
    return None


def check_max_params(max_params):
    """``None`` or an int >= 1; ``GrowthError`` naming the value."""
    return None if max_params is None else check_int("max_params", max_params, 1)


def cap_of(max_units, name):
    """The width layer ``name`` may reach under ``max_units`` (None: no cap)."""
    if isinstance(max_units, dict):
        return max_units.get(name)
    return max_units


def ranks_units(rule, max_units, max_params) -> bool:
    """Whether events may rank units by score, so the score must watch every epoch."""
    return _select.needs_scores(rule) or max_units is not None or max_params is not None


def unit_costs(model, names) -> dict:
    """Parameters one more unit adds, per layer name (incoming column, bias, per-unit state, outgoing
    rows; for a coupled group, those of every producer of the group), read off the graph: every weight
    the split of one unit would grow, by the shape the split gives it (a Flatten's positions, a
    depthwise multiplier and a Reshape's regrouping included).

    Cost: one graph walk; no model is built and no weight is read.
    """
    from ..plan import plan as make_plan
    from ._graph import Graph
    from ._surgery import lookup
    from ._units import evaluate, new_length

    graph = Graph(model)
    groups = graph.groups()
    out = {}
    for name in names:
        _path, grp = lookup(graph, groups, name)
        plans = {grp.gid: make_plan(grp.width, [0], symmetry="none")}
        shapes: dict = {}
        for use in graph.uses:
            p = evaluate(use.ref, plans, graph.find)
            if p is None:
                continue
            shape = shapes.setdefault(id(use.var), [list(use.var.shape), list(use.var.shape)])[1]
            axis = use.axis % len(shape)
            shape[axis] = new_length(int(use.var.shape[axis]), p)
        out[name] = max(1, sum(int(np.prod(new)) - int(np.prod(old)) for old, new in shapes.values()))
    return out


def choose_units(model, layers, *, rule, score, max_units, max_params) -> dict:
    """Units to split per growing name (name -> sorted indices) after both caps; names left with none are absent.

    ``layers``: name -> (width, the layer the scores read, or None for a group they cannot rank,
    whose first units are taken). Cost: ``score`` once per layer that is ranked; with
    ``max_params``, :func:`unit_costs`.
    """
    wanted = {}
    for name, (n, layer) in layers.items():
        cap = cap_of(max_units, name)
        if cap is not None and n >= cap:
            continue
        ranked = _select.needs_scores(rule) or (cap is not None and 2 * n > cap) or max_params
        scores = score(layer, model) if ranked and layer is not None else None
        chosen = _select.cap_units(_select.choose(rule, n, scores), n, cap)
        if len(chosen):
            wanted[name] = chosen
    if wanted and max_params is not None:
        budget = max_params - model.count_params()
        wanted = _select.cap_params(wanted, unit_costs(model, list(wanted)), budget)
    return {k: np.sort(v) for k, v in wanted.items() if len(v)}
