"""``widen``: split units of a live Keras model in place.

The plans are made here; the event runs through the one surgery pipeline
(``_surgery.apply``) that prune and merge share.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping

import numpy as np

from .._errors import SplitError
from ..compact import CompactPlan
from ..plan import SYMMETRIES, SplitPlan
from ..plan import plan as make_plan
from ._errors import GrowthError
from ._event import GrowthEvent
from ._graph import Graph, check_plan
from ._surgery import Edit, apply, check_args, check_number, collect, sync_jax
from ._units import GroupRef, evaluate, in_place

#: the default size of a ``"nudge"``, relative to each unit's own scale
NUDGE = 1e-3

#: the symmetry of ``widen`` and of the growth callbacks when none is given. ``"fresh"`` is the
#: only one whose new units become different units under Adam, AdamW and RMSprop (issue 12,
#: ``benchmarks/RESULTS.md``, "Separation of split copies"), and it keeps the function exactly.
#: The core :func:`fastsplit.plan` keeps ``"nudge"``: a plan is read there as a split of
#: tensors into copies, and it cannot know the optimizer that will train them.
DEFAULT_SYMMETRY = "fresh"

#: the symmetry a ``"fresh"`` plan made from indices gives way to (see :func:`fresh_blocked_by`)
FRESH_FALLBACK = "direction"


def widen(model, plans, *, symmetry: str = DEFAULT_SYMMETRY, eps: float | None = None, nudge: float = NUDGE,
          optimizer: str = "carry", backend: str = "auto") -> GrowthEvent:
    """Split units of a built Keras model in place; it computes the same function with more units.

    Args:
        model: a built Functional or Sequential ``keras.Model`` (compiled or
            not; ``fit`` may be running: call this from a callback).
        plans: ``{layer name: plan}``, the plan being a :class:`fastsplit.SplitPlan`
            of the layer's width, neuron indices (an index repeated ``r``
            times gets ``r`` extra copies; a boolean mask works too), or
            ``None`` to split every unit. A name may be a producing layer's
            plain name or its path (``"block/dense"`` inside a nested model);
            naming one member of a coupled group (``coupled_groups``) splits
            the whole group.
        symmetry: ``"fresh"`` (default), ``"nudge"``, ``"noise"``, ``"asymmetric"``,
            ``"direction"`` or ``"none"`` for plans made here from indices (a
            SplitPlan keeps its own); see :func:`fastsplit.plan`. ``"fresh"``
            adds new units (random incoming weights at the scale of the source
            unit's, zero outgoing weights: exact); it is the default because
            it is the only one whose new units Adam-type optimizers make into
            different units (the copies of the others stay twins under Adam,
            AdamW, RMSprop; README "Symmetry breaking"). The core
            :func:`fastsplit.plan` defaults to ``"nudge"`` instead: it makes
            plans of tensors for any optimizer, or none. Where the split units
            reach a layer that normalises across them (``LayerNormalization``
            over the units), fresh units would change its mean and variance: a
            plan made here then uses ``"direction"`` for that group, with a
            ``RuntimeWarning``; a ``"fresh"`` SplitPlan given for it is refused.
        eps: ``"direction"``'s step relative to each unit's incoming weights
            (default 0.1), or an absolute ``"nudge"`` bias offset. By default (None) the offset
            of each unit is ``nudge`` times the unit's own scale: the norm of
            its incoming weights (the spread of its pre-activation for inputs
            of unit variance) or, when the offset goes to a normaliser's
            ``beta``, the size of that normaliser's ``gamma``. Refused with a
            symmetry that has no ``eps`` (``"fresh"``, ``"noise"``, ...), which
            would ignore it.
        nudge: the relative size of the default ``"nudge"``; refused with another symmetry.
        optimizer: ``"carry"`` transports the optimizer's slots (DESIGN.md);
            ``"reset"`` gives the widened variables fresh slots. The
            iteration counter is kept either way.
        backend: fastsplit backend for the kernel (``"auto"``, ``"numba"``,
            ``"numpy"``; ``"cupy"`` for weights in CUDA memory).

    Returns:
        The :class:`GrowthEvent`; it is also appended to the model's history
        (:func:`fastsplit.keras.history`), which ``model.save`` keeps.

    Raises:
        GrowthError: (a ``ValueError``; ``fastsplit.SplitError`` for a bad plan) naming the layer
            and the reason; the model, its weights and its optimizer are then
            exactly as before.

    Cost: one read of every touched tensor and one write of its new version
    (weights, statistics and optimizer slots), all in one ``split_many``
    call (two when a kernel is split on both axes); variables are replaced,
    not copied element by element; the next training step retraces.
    """
    t0 = time.perf_counter()
    times = {}
    check_args(model, optimizer, backend)
    if not isinstance(plans, Mapping):
        raise GrowthError(f"plans must map layer names to plans, got {type(plans).__name__}")
    if symmetry not in SYMMETRIES:
        raise GrowthError(f"symmetry must be one of {SYMMETRIES}, got symmetry={symmetry!r}")
    eps = check_number("eps", eps, optional=True)
    if eps is not None and symmetry not in ("nudge", "direction"):
        raise GrowthError(f"eps is the bias offset of symmetry='nudge' or the step of 'direction'; got eps={eps!r} "
                          f"with symmetry={symmetry!r} (the default is {DEFAULT_SYMMETRY!r})")
    nudge = check_number("nudge", nudge)
    if nudge != NUDGE and symmetry != "nudge":
        raise GrowthError(f"nudge is the relative offset of symmetry='nudge'; got nudge={nudge!r} with "
                          f"symmetry={symmetry!r} (the default is {DEFAULT_SYMMETRY!r})")
    sync_jax(model)

    # -- plan ---------------------------------------------------------------------------------------
    graph = Graph(model)
    groups = graph.groups()
    by_root = {g.gid: g for g in groups}

    fell_back = []

    def make(spec, grp, path):
        if isinstance(spec, CompactPlan):
            raise GrowthError(f"the plan for {path!r} is a CompactPlan, which removes units: use "
                              "fastsplit.keras.prune to apply it")
        if spec is None or not isinstance(spec, SplitPlan):
            sym = symmetry
            blocked = fresh_blocked_by(grp) if symmetry == "fresh" else None
            if blocked:
                sym = FRESH_FALLBACK
                fell_back.append(fresh_fallback_message(path, blocked))  # said once every check has passed
            try:
                step = (nudge if eps is None else eps) if sym == "nudge" else eps
                spec = make_plan(grp.width, spec, symmetry=sym, eps=step)
            except SplitError as exc:
                raise SplitError(f"the plan for {path!r}: {exc}") from None
            if eps is None and sym == "nudge":
                spec = spec.scaled(unit_scales(graph, grp.gid, grp.width))
        elif spec.symmetry == "fresh" and fresh_blocked_by(grp):
            raise GrowthError(f"a 'fresh' plan for {path!r} would change what {fresh_blocked_by(grp)} compute: they "
                              "normalise across the split units, and fresh units change their mean and variance; "
                              f"use symmetry={FRESH_FALLBACK!r} (or pass indices, which fall back to it)")
        check_plan(spec, grp.width, path)
        return spec

    chosen, named = collect(graph, groups, plans, make, "different plans; give one plan for the group")
    chosen = {g: p for g, p in chosen.items() if not p.is_identity}
    for g in chosen:
        grp = by_root[g]
        if grp.refused:
            raise GrowthError(f"cannot split {named[g]!r} (group {grp.producers}): " + "; ".join(grp.refused))
    for g, grp in by_root.items():
        if grp.in_place and g in chosen:
            chosen[g] = in_place_plan(chosen[g], grp, named[g])
    for g in list(graph.uniform_layers):
        for path, ref, _units in graph.uniform_layers[g]:
            p = evaluate(ref, chosen, graph.find)
            if p is not None and len(set(p.counts.tolist())) != 1:
                raise GrowthError(
                    f"layer {path!r} normalises across the split units, which keeps the function only when "
                    f"every unit gets the same number of copies; this plan gives between {p.counts.min()} and "
                    f"{p.counts.max()} copies. Split all units of {named.get(graph.find(g), '?')!r} (neurons=None)"
                )

    for g, _path, why in graph.lost_offsets:
        p = chosen.get(graph.find(g))
        if p is not None and np.any(p.offset != 0):
            warnings.warn(f"{why}: symmetry='nudge' cannot separate the copies of {named[graph.find(g)]!r}; use "
                          "symmetry='fresh' (the default) or 'direction'", RuntimeWarning, stacklevel=2)

    for message in dict.fromkeys(fell_back):
        warnings.warn(message, RuntimeWarning, stacklevel=2)

    edit = Edit("split", chosen, symmetry, neurons=lambda p: np.unique(p.src[p.is_copy]).tolist())
    return apply(model, graph, edit, optimizer=optimizer, backend=backend, t0=t0, times=times)


#: symmetries that change an original unit (its incoming weights or bias) or rest on the outgoing ratios
MOVES_ORIGINALS = ("nudge", "direction", "asymmetric")


def in_place_plan(plan, group, name):
    """``plan`` for a group whose units are read at their positions (``CoupledGroup.in_place``), or GrowthError.

    Every unit gets the same number of copies, placed right after it (``_units.in_place``); the consumers
    read the first copy only, so the copies' incoming weights may be anything (copies, noise, fresh draws)
    but the originals must stay as they are: symmetries that move them or rest on the shares are refused.
    """
    laid = in_place(plan)
    if laid is None:
        raise GrowthError(
            f"cannot split {name!r}: layer(s) {group.in_place} read its units at their positions (a rotary "
            f"embedding's frequencies depend on the head size), which only a split that gives every unit the same "
            f"number of copies keeps (the head size times an integer, neurons=None or copies=k); this plan gives "
            f"between {plan.counts.min()} and {plan.counts.max()} copies")
    if plan.symmetry in MOVES_ORIGINALS or np.any(laid.offset[~laid.is_copy] != 0):
        raise GrowthError(
            f"cannot split {name!r} with symmetry={plan.symmetry!r}: layer(s) {group.in_place} read its units at "
            f"their positions (a rotary embedding), so the copies' outgoing weights stay 0 and the originals must not move; use "
            f"'fresh' (the default), 'noise' or 'none'")
    return laid


def fresh_blocked_by(group) -> list:
    """The layers that keep a ``"fresh"`` split of ``group`` from being exact (empty when none).

    A layer that normalises across the split units (``LayerNormalization`` over them) sees
    every unit's value, a fresh one's too: its mean and variance change, and so does the
    function. Copies keep them when every unit gets the same number. ``group`` is a
    :class:`fastsplit.keras.CoupledGroup`; cost: none (the graph walk found them).
    """
    return list(group.uniform)


def fresh_fallback_message(name, blocked) -> str:
    return (f"symmetry='fresh' would change the function of {name!r}: {blocked} normalise across its units; "
            f"its plan uses symmetry={FRESH_FALLBACK!r} instead (second order in eps)")


def unit_scales(graph: Graph, gid: int, width: int) -> np.ndarray:
    """``float[width]``: each unit's own size where its nudge goes, averaged over the group's producers.

    A producer's bias: the norm of the unit's incoming weights. A normaliser's ``beta``: ``|gamma|``
    (1 without a ``gamma``). Only a width-long vector comes back from the device.
    """
    from keras import ops

    sizes = []
    for use in graph.uses:
        if (use.kind != "bias" or not isinstance(use.ref, GroupRef) or use.ref.expand != 1
                or graph.find(use.ref.gid) != gid):
            continue
        if use.attr == "beta":
            var, axis = getattr(use.layer, "gamma", None), use.axis
            if var is None:
                sizes.append(np.ones(width))
                continue
        else:
            incoming = next(u for u in graph.uses if u.layer is use.layer and u.kind == "incoming")
            var, axis = incoming.var, incoming.axis
        axis %= len(var.shape)
        others = [a for a in range(len(var.shape)) if a != axis]
        sq = ops.square(ops.cast(var, "float32"))
        sq = np.asarray(ops.convert_to_numpy(ops.sum(sq, axis=others) if others else sq), dtype=np.float64)
        positions = sq.shape[0] // width  # a Dense read as positions x channels: entry p * width + u
        size = np.sqrt(sq.reshape(positions, width).sum(axis=0))
        sizes.append(size / np.sqrt(positions) if use.attr == "beta" else size)  # |gamma| is per entry
    if not sizes:
        return np.ones(width)
    size = np.mean(sizes, axis=0)
    fallback = size[size > 0].mean() if np.any(size > 0) else 1.0
    return np.where(size > 0, size, fallback)


__all__ = ["DEFAULT_SYMMETRY", "FRESH_FALLBACK", "fresh_blocked_by", "unit_scales", "widen"]
