"""Unit statistics on data: which units are dead, which are constant.

A *probe* runs the model's flattened graph (``_graph.Graph``, nested models
included) layer by layer in inference mode on batches of the data and keeps
running reductions of the tensors asked for; nothing is stored per sample.

A unit is measured where its value is final before anything mixes it with
other units: the producing layer's output followed through the per-unit
layers that only it feeds (activations, BatchNormalization, Dropout and other
inference no-ops, PReLU). So the units of ``Conv2D → BatchNormalization →
ReLU`` are measured after the ReLU. ``UnitStats.where`` names the layer.
"""

from __future__ import annotations

import dataclasses
import operator

import numpy as np

from ._errors import GrowthError
from ._graph import Graph

#: layers that map each unit's value on its own, so a unit's state is final only after them


@dataclasses.dataclass
class UnitStats:
    """Statistics of the units of one producing layer on some data.

    Attributes:
        layer: the producing layer's path (``"block/dense"`` inside a nested model).
        where: path of the layer whose output was measured (the producer, or
            the last per-unit layer after it: activation, BatchNormalization, ...).
        samples: number of inputs seen.
        active: ``float64[units]`` fraction of inputs on which the unit is
            nonzero (for a feature map: nonzero at some position).
        mean: ``float64[units]`` mean value over inputs (and positions).
        max: ``float64[units]`` largest value.
        min: ``float64[units]`` smallest value.
    """

    layer: str
    where: str
    samples: int
    active: np.ndarray
    mean: np.ndarray
    max: np.ndarray
    min: np.ndarray

    @property
    def constant(self) -> np.ndarray:
        """``bool[units]``: the unit has one value on every input and position (``max == min``)."""
        return self.max == self.min

    @property
    def dead(self) -> np.ndarray:
        """``bool[units]``: never active (zero on every input)."""
        return self.active == 0

    @property
    def width(self) -> int:
        return int(self.active.shape[0])


# -- data ---------------------------------------------------------------------------------------------------


def model_inputs(model, data, what: str = "data") -> list[np.ndarray]:
    """``data`` as one numpy array per model input, checked against the input shapes.

    ``data`` is ``x`` (an array, or a list/tuple/dict of arrays for a model with
    several inputs) or ``(x, y)`` / ``(x, y, sample_weight)``.

    Raises:
        ValueError: naming ``what`` and the shape that does not fit.
    """
    inputs = list(model.inputs) if getattr(model, "inputs", None) else []
    if not inputs:
        raise GrowthError(f"model {model.name!r} has no inputs yet: build it before measuring units")
    n_in = len(inputs)
    x = data
    if isinstance(x, dict):
        try:
            x = [x[t.name] for t in inputs]
        except KeyError as exc:
            raise GrowthError(f"{what} is a dict without the model input {exc.args[0]!r}") from None
    elif isinstance(x, (tuple, list)):
        if n_in == 1:
            if len(x) not in (1, 2, 3):
                raise GrowthError(f"{what} must be x or (x, y); got a sequence of length {len(x)}")
            x = [x[0]]
        elif len(x) == n_in and not isinstance(x[0], (tuple, list, dict)):
            x = list(x)
        elif len(x) in (2, 3) and isinstance(x[0], (tuple, list)) and len(x[0]) == n_in:
            x = list(x[0])
        else:
            raise GrowthError(f"{what} must hold one array per model input ({n_in}); got {len(x)}")
    else:
        x = [x]
    if len(x) != n_in:
        raise GrowthError(f"{what} must hold one array per model input ({n_in}); got {len(x)}")
    out = []
    n = None
    for arr, t in zip(x, inputs, strict=False):
        try:
            a = np.asarray(arr)
        except Exception as exc:  # an object numpy cannot read
            raise GrowthError(f"{what} for input {t.name!r} is not an array: {type(arr).__name__}") from exc
        expect = tuple(t.shape)
        if a.ndim != len(expect) or any(e is not None and int(e) != s for e, s in zip(expect[1:], a.shape[1:], strict=False)):
            raise GrowthError(
                f"{what} for input {t.name!r} has shape {a.shape}, but the model expects {expect} (None: any size)"
            )
        if not np.issubdtype(a.dtype, np.number) and a.dtype != bool:
            raise GrowthError(f"{what} for input {t.name!r} has dtype {a.dtype}; expected numbers")
        if np.issubdtype(a.dtype, np.inexact) and not np.all(np.isfinite(a)):
            raise GrowthError(f"{what} for input {t.name!r} holds {int(np.size(a) - np.isfinite(a).sum())} NaN or "
                              "infinite values: unit statistics on it would be meaningless")
        if n is not None and a.shape[0] != n:
            raise GrowthError(f"{what}: the inputs have different numbers of samples ({n} and {a.shape[0]})")
        n = a.shape[0]
        out.append(a)
    if not n:
        raise GrowthError(f"{what} holds no samples")
    return out


# -- the probe ----------------------------------------------------------------------------------------------


def _needed_ops(graph: Graph, keys) -> list:
    """The ops that the tensors ``keys`` depend on, in topological order."""
    order = graph.topological()
    produced_by = {}
    for op in order:
        for k in op.outputs:
            produced_by[graph.canon(k)] = op
    need, stack = set(), [graph.canon(k) for k in keys]
    while stack:
        op = produced_by.get(stack.pop())
        if op is None or id(op) in need:
            continue
        need.add(id(op))
        stack += [graph.canon(k) for k in op.inputs]
    return [op for op in order if id(op) in need]


def probe(graph: Graph, xs: list, keys, batch_size: int = 256):
    """Yield ``{key: numpy array}`` of the tensors ``keys`` for each batch of ``xs``, in inference mode.

    Cost: one forward pass over the layers the tensors depend on, batch by batch.
    """
    from keras import ops

    batch_size = operator.index(batch_size)
    if batch_size < 1:
        raise GrowthError(f"batch_size must be at least 1, got {batch_size}")
    keys = [graph.canon(k) for k in keys]
    ops_needed = _needed_ops(graph, keys)
    n = xs[0].shape[0]
    for start in range(0, n, batch_size):
        values = {}
        for k, x in zip(graph.model_inputs, xs, strict=False):
            values[graph.canon(k)] = ops.convert_to_tensor(x[start:start + batch_size])
        for op in ops_needed:
            tensors = {k: values[graph.canon(k)] for k in op.inputs}
            args, kwargs = op.node.arguments.fill_in(tensors)
            layer = op.layer
            if getattr(layer, "_call_has_training_arg", False):
                kwargs["training"] = False
            outputs = layer(*args, **kwargs)
            flat = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            for k, y in zip(op.outputs, flat, strict=False):
                values[graph.canon(k)] = y
        out = {k: np.asarray(ops.convert_to_numpy(values[k])) for k in keys}
        for k, a in out.items():
            if not np.all(np.isfinite(a)):
                where = next((op.path for op in ops_needed if k in {graph.canon(o) for o in op.outputs}), "an input")
                raise GrowthError(f"the output of {where!r} is not finite (NaN or inf) on the data at samples "
                                  f"{start}..{start + len(a) - 1}: unit statistics on it would be meaningless")
        yield out


class Reduction:
    """Running min / max / sum / count / active-count of a tensor along one axis (the rest reduced).

    ``axis`` is the axis kept (batch axis 0 never kept).
    """

    def __init__(self, axis: int):
        self.axis = axis
        self.n = 0
        self.count = 0
        self.sum = self.min = self.max = self.active = None

    def add(self, a: np.ndarray) -> None:
        a = np.moveaxis(np.asarray(a, dtype=np.float64), self.axis, -1)
        b = a.shape[0]
        per = a.reshape(b, -1, a.shape[-1])
        mn, mx, s = per.min(axis=(0, 1)), per.max(axis=(0, 1)), per.sum(axis=(0, 1))
        act = (per != 0).any(axis=1).sum(axis=0)
        if self.sum is None:
            self.sum, self.min, self.max, self.active = s, mn, mx, act.astype(np.int64)
        else:
            self.sum += s
            np.minimum(self.min, mn, out=self.min)
            np.maximum(self.max, mx, out=self.max)
            self.active += act
        self.n += b
        self.count += per.shape[0] * per.shape[1]

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)


def measure_point(graph: Graph, op) -> tuple:
    """(tensor key, path of the measured layer, Units) where the units of producer ``op`` are final."""
    out_keys = {graph.canon(k) for k in graph.model_outputs}
    key = graph.canon(op.outputs[0])
    where = op.path
    units = graph.labels[key].units
    consumers_of = graph.consumers_of
    while key not in out_keys:
        nxt = consumers_of.get(key, [])
        if len(nxt) != 1 or len(nxt[0].inputs) != 1 or len(nxt[0].outputs) != 1:
            break
        lay = nxt[0].layer
        if not graph.unitwise(lay):
            break
        nkey = graph.canon(nxt[0].outputs[0])
        lab = graph.labels.get(nkey)
        if lab is None or lab.units != units:
            break
        key, where = nkey, nxt[0].path
    return key, where, units


def _producer_ops(graph: Graph) -> dict:
    """path -> Op of every producing layer (its first call)."""
    out = {}
    for g in graph.producers:
        for path, layer in graph.producers[g]:
            for op in graph.ops:
                if op.layer is layer:
                    out.setdefault(path, op)
                    break
    return out


def resolve_layers(graph: Graph, layers) -> list[str]:
    """Producing-layer paths from names (plain names or paths); all producers for None."""
    ops_by_path = _producer_ops(graph)
    if layers is None:
        return list(ops_by_path)
    if isinstance(layers, str):
        layers = [layers]
    out = []
    for name in layers:
        if name in ops_by_path:
            out.append(name)
            continue
        matches = [p for p in ops_by_path if p.rsplit("/", 1)[-1] == name]
        if len(matches) == 1:
            out.append(matches[0])
        elif matches:
            raise GrowthError(f"layer name {name!r} is ambiguous in this model; use one of the paths {matches}")
        else:
            raise GrowthError(
                f"the model has no producing layer (Dense, Conv) named {name!r}; the layers with units are "
                f"{sorted(ops_by_path)}"
            )
    return list(dict.fromkeys(out))


def unit_stats(model, data, layers=None, *, batch_size: int = 256) -> dict:
    """Per-unit statistics of the producing layers of ``model`` on ``data``.

    Args:
        model: a built Functional or Sequential ``keras.Model``.
        data: ``x`` or ``(x, y)`` (numpy or anything ``numpy.asarray`` reads;
            a list of arrays for a model with several inputs).
        layers: producing layer names or paths (Dense, Conv1D/2D/3D); ``None``
            for every one.
        batch_size: samples per forward pass.

    Returns:
        ``{layer path: UnitStats}``, in graph order.

    Raises:
        ValueError: an unknown layer, or data whose shape does not fit the model
            (the message names it).

    Cost: one inference pass over ``data`` through the layers that the
    measured tensors depend on (layer by layer, not compiled), with
    O(units) running reductions per measured tensor on the host.
    """
    from ._surgery import sync_jax

    sync_jax(model)
    graph = Graph(model)
    paths = resolve_layers(graph, layers)
    xs = model_inputs(model, data)
    ops_by_path = _producer_ops(graph)
    points = {p: measure_point(graph, ops_by_path[p]) for p in paths}
    red = {}
    for key, _, units in points.values():
        red.setdefault(key, Reduction(units.axis))
    for batch in probe(graph, xs, list(red), batch_size):
        for key, arr in batch.items():
            red[key].add(arr)
    out = {}
    for p in paths:
        key, where, units = points[p]
        r = red[key]
        mean, mx, mn, active = r.mean, r.max, r.min, r.active.astype(np.float64)
        out[p] = UnitStats(p, where, r.n, active / r.n, mean, mx, mn)
    return out


def dead_units(model, data, *, threshold: float = 0.0, layers=None, batch_size: int = 256) -> dict:
    """The units that are dead on ``data``: active on at most ``threshold`` of the inputs, or constant.

    A unit of a coupled group (a residual stream: every producer feeding one
    ``Add``) counts as dead only when it is dead at every producer of the group;
    the group is then listed once, under its first producer. Groups that
    cannot be pruned (their units reach the model output, or they pass an
    unsupported layer) are left out, and so are groups normalised across
    their units (LayerNormalization), where removing a unit changes the others.

    Args:
        model: a built Functional or Sequential ``keras.Model``.
        data: as for :func:`unit_stats`.
        threshold: the largest fraction of inputs on which a dead unit may be
            nonzero; 0.0 (the default) means never. Only units that are
            zero or constant on every input are removed exactly by ``prune``.
        layers: limit the search to these producing layers (their groups).
        batch_size: samples per forward pass.

    Returns:
        ``{layer path: int64 array of unit indices}`` for every prunable group
        (an empty array when none is dead). Pass it to
        :func:`fastsplit.keras.prune`, with the same ``data`` to fold
        constant outputs into the next layer's bias.

    Cost: as :func:`unit_stats`.
    """
    threshold = float(threshold)
    if not (0.0 <= threshold < 1.0):
        raise GrowthError(f"threshold must be a fraction in [0, 1), got threshold={threshold!r}")
    graph = Graph(model)
    groups = [g for g in graph.groups() if g.removable]
    if layers is not None:
        chosen = set(resolve_layers(graph, layers))
        groups = [g for g in groups if chosen & set(g.producers)]
    paths = [p for g in groups for p in g.producers]
    if not paths:
        return {}
    stats = unit_stats(model, data, paths, batch_size=batch_size)
    out = {}
    for g in groups:
        dead = np.ones(g.width, dtype=bool)
        for p in g.producers:
            s = stats[p]
            dead &= (s.active <= threshold) | s.constant
        out[g.producers[0]] = np.flatnonzero(dead).astype(np.int64)
    return out


__all__ = ["UnitStats", "dead_units", "unit_stats"]
