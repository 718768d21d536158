"""The other models that hold a layer an edit changes, and whether each one still works after it.

A layer belongs to every model built over it: a model nested in a bigger one
(``keras.Sequential([inputs, G, head])``), a layer shared by two models, a
feature extractor ``keras.Model(m.input, m.layers[3].output)``. Widening one
model changes the layer for all of them. Keras keeps no link from a layer to
the models that hold it, so they are found among the live objects (one pass
over the garbage collector's list, about 50 ms in a process holding two
ResNet50s). Each holder is then

- one that encloses the edited model and uses the touched layers only through
  it: it computes the same function (the edited model's outputs keep their
  shape), and only its traced functions and its optimizer need the news;
- a graph model whose own walk changes exactly the same weights on the same
  axes with the same plans: it keeps working too, and its symbolic tensors
  are updated with the edited model's;
- anything else: the edit is refused, naming the holder.
"""

from __future__ import annotations

import dataclasses
import gc

import numpy as np

from ._errors import GrowthError
from ._graph import Graph
from ._units import evaluate


@dataclasses.dataclass
class Holder:
    """Another model that holds touched layers; ``graph``/``plans`` are set when its own graph must be updated."""

    model: object
    graph: Graph | None = None
    plans: dict | None = None


def find_holders(model, graph: Graph, plans: dict) -> list[Holder]:
    """The other live models holding layers that ``plans`` change, each checked; GrowthError names a broken one."""
    touched = _touched_layers(graph, plans)
    if not touched:
        return []
    try:
        return [_check(h, model, graph, plans, touched) for h in _holding(model, touched)]
    except GrowthError:
        pass  # collected outside the handler: the traceback's frames still hold the model found
    gc.collect()  # a model that is unreachable but not yet collected (Sequential's earlier graphs) holds nothing
    return [_check(h, model, graph, plans, touched) for h in _holding(model, touched)]


def _touched_layers(graph: Graph, plans: dict) -> set:
    import keras

    out = set()
    for g, layers in graph.touched.items():
        if graph.find(g) in plans:
            out |= {id(lay) for lay in layers.values() if isinstance(lay, keras.layers.Layer)}
    return out


def _model_types():
    import keras

    def walk(cls):
        yield cls
        for sub in cls.__subclasses__():
            yield from walk(sub)

    return set(walk(keras.Model))


def _holding(model, touched: set) -> list:
    """Every live keras.Model, other than ``model`` and the models inside it, that holds a touched layer."""
    own = set()
    for m in model._flatten_layers(include_self=True, recursive=True):
        own.add(id(m))
        own |= {id(g) for g in _internal_graphs(m)}
    types = _model_types()
    found = [o for o in gc.get_objects() if type(o) in types and id(o) not in own]
    inner = {id(g) for o in found for g in _internal_graphs(o)}
    out = []
    for m in found:
        if id(m) in inner:
            continue
        try:
            layers = m._flatten_layers(include_self=False, recursive=True)
        except Exception:  # noqa: BLE001 - a half-built or half-collected model holds nothing usable
            continue
        if any(id(lay) in touched for lay in layers):
            out.append(m)
    return out


def _internal_graphs(layer) -> list:
    """A Sequential's graphs: the current ``_functional`` and every earlier one, which Keras's tracker keeps
    alive (one per ``add`` while it was built layer by layer)."""
    seq = __import__("keras").Sequential
    if not isinstance(layer, seq):
        return []
    tracked = getattr(getattr(layer, "_tracker", None), "config", {}).get("layers", (None, []))[1]
    return [layer._functional, *(t for t in tracked if _is_model(t))]


def _is_model(obj) -> bool:
    return isinstance(obj, __import__("keras").Model)


def _outside(holder, model) -> set:
    """ids of the layers ``holder`` holds other than through ``model``."""
    out, stack = set(), list(holder._flatten_layers(include_self=False, recursive=False))
    while stack:
        lay = stack.pop()
        if lay is model or id(lay) in out:
            continue
        out.add(id(lay))
        stack.extend(lay._flatten_layers(include_self=False, recursive=False))
    return out


def _check(holder, model, graph: Graph, plans: dict, touched: set) -> Holder:
    encloses = any(lay is model for lay in holder._flatten_layers(include_self=False, recursive=True))
    if encloses and not (_outside(holder, model) & touched):
        return Holder(holder)
    held = [lay.name for lay in holder._flatten_layers(include_self=False, recursive=True) if id(lay) in touched]
    name = f"model {holder.name!r} ({type(holder).__name__}, holding {held[:4]})"
    try:
        other = Graph(holder)
    except GrowthError as exc:
        raise GrowthError(f"{name} also holds layers this edit changes, and fastsplit cannot check that it keeps "
                          f"working ({exc}); edit that model instead, or delete it first") from None
    mapped = {}
    for g in plans:
        mine = {id(lay) for gg, prods in graph.producers.items() if graph.find(gg) == g for _p, lay in prods}
        roots = {other.find(gg) for gg, prods in other.producers.items() for _p, lay in prods if id(lay) in mine}
        theirs = {id(lay) for gg, prods in other.producers.items() if other.find(gg) in roots for _p, lay in prods}
        if len(roots) != 1 or theirs != mine:
            raise GrowthError(f"{name} also holds layers this edit changes, and couples their units differently: "
                              "the edit would break it. Edit that model instead, or delete it first")
        root = roots.pop()
        if other.refusals.get(root):
            raise GrowthError(f"{name} also holds layers this edit changes, and there they cannot change: "
                              + "; ".join(other.refusals[root]))
        mapped[root] = plans[g]
    if _changes(graph, plans) != _changes(other, mapped):
        raise GrowthError(f"{name} also holds layers this edit changes, and uses them so that the edit would "
                          "change other weights there: it would break. Edit that model instead, or delete it first")
    return Holder(holder, other, mapped)


def _changes(graph: Graph, plans: dict) -> dict:
    """``{(id(variable), axis, side): (width, src, ratio)}`` and the config entries an edit rewrites."""
    out = {}
    for use in graph.uses:
        p = evaluate(use.ref, plans, graph.find)
        if p is not None:
            side = "consuming" if use.kind == "outgoing" else "producing"
            out[(id(use.var), use.axis % len(use.var.shape), side)] = _key(p)
    for obj, attr, ref, index in graph.configs:
        p = evaluate(ref, plans, graph.find)
        if p is not None:
            out[(id(obj), attr, index)] = _key(p)
    return out


def _key(plan) -> tuple:
    """What a plan does to an axis (a SplitPlan's offsets aside: where they go is each graph's own choice)."""
    extra = getattr(plan, "merge", None) if not hasattr(plan, "ratio") else np.asarray(plan.ratio).tobytes()
    return type(plan).__name__, plan.width, np.asarray(plan.src).tobytes(), repr(extra)


__all__ = ["Holder", "find_holders"]
