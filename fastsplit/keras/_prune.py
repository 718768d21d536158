"""``prune`` and ``merge_twins``: remove or merge units of a live Keras model in place.

The inverse of ``widen``, run through the same machinery: the graph walk
(``_graph.Graph``) finds every variable that holds the units of a coupled
group, a :class:`fastsplit.CompactPlan` per group says which units stay, one
``fastsplit.compact.compact_many`` call (two when a kernel is compacted on both
of its axes) makes the new arrays through DLPack, and the variables are
swapped in with every write recorded, so that a failure anywhere leaves the
model, its optimizer and its history exactly as they were.

Exactness:

- ``prune``: the consumer of a removed unit reads a value from it. Given
  ``data``, that value is measured at the consumer's input (so a
  BatchNormalization or an activation between producer and consumer, or a
  residual stream, is accounted for) and its mean times the unit's outgoing
  row is added to the consumer's bias. The model's outputs on ``data`` are
  then unchanged (in inference mode) when each removed unit's value is
  constant on ``data`` (a ReLU unit that never fires: 0), and a
  ``RuntimeWarning`` says so when it is not. Without ``data`` nothing is
  folded, which is exact for units whose value at every consumer is zero.
- ``merge_twins``: units whose incoming weights, bias and every per-unit
  parameter between producer and consumer (BatchNormalization statistics,
  DepthwiseConv kernels, PReLU slopes) are identical compute the same value,
  so one of them with the sum of their outgoing rows computes the same as
  all of them.

Optimizer state (DESIGN.md, "Optimizer state", read backwards): a pruned unit's
slots are dropped and a kept unit's slots are carried unchanged. A merged
unit's producing-side parameters see the *sum* of the twins' gradients, so its
first moments are the sum of theirs and its second moments are
``(sum of sqrt(v))**2``: exact for twins made by a ``symmetry="none"`` split
(their gradients are ``r_j g``, so this gives back ``m`` and ``v`` of the
original unit) and the tightest bound that holds for any twins otherwise. The
merged outgoing row sees the gradient each twin's row saw; the
representative's slots are kept.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Mapping

import numpy as np

from .. import _dispatch, interop
from .._core import aligned_empty
from .._errors import SplitError
from ..compact import CompactPlan, _bf16_bits_to_f32, _f32_to_bf16_bits, compact_many, compact_plan
from . import _vars
from ._errors import GrowthError
from ._event import GrowthEvent
from ._graph import Graph
from ._stats import Reduction, model_inputs, probe, resolve_layers
from ._surgery import Edit, apply, backend_used, check_args, check_number, collect, sync_jax
from ._units import GroupRef, evaluate

# -- plans on tensor axes -----------------------------------------------------------------------------------


def _unit_entries(ref, gid: int, find) -> tuple[np.ndarray | None, int]:
    """(``int64[width, e]``: the entries of the axis that hold each unit of group ``gid``, or None; axis width)."""
    if isinstance(ref, GroupRef):
        w = ref.width * ref.expand
        if find(ref.gid) != gid:
            return None, w
        return np.arange(w, dtype=np.int64).reshape(ref.width, ref.expand), w
    off, found = 0, None
    for sub, width in ref.parts:
        if sub is not None and found is None:
            e, w = _unit_entries(sub, gid, find)
            if e is not None:
                found = e + off
        off += width
    return found, off


# -- the shared in-place compaction --------------------------------------------------------------------------


@dataclasses.dataclass
class _Fold:
    """Add ``sign * consts @ rows(kernel, entries)`` to ``target``: the consumer's bias, or the moving mean
    (``sign = -1``) of the BatchNormalization after a consumer without a bias. A kernel with a window
    (Conv, ConvTranspose) is summed over it."""

    target: object
    path: str
    kernel: object
    axis: int
    entries: np.ndarray
    consts: np.ndarray
    sign: float = 1.0


def _fold_delta(fold: _Fold, kernel_native) -> object:
    """The change of the fold's target, on the array module of the kernel (float64 or float32)."""
    xp = _dispatch.array_module(kernel_native)
    k = kernel_native.array
    if kernel_native.bf16 and kernel_native.device[0] == "cuda":
        k = _bf16_bits_to_f32(xp, k)
    ct = np.float64 if k.dtype == np.float64 else np.float32
    k = xp.moveaxis(k.astype(ct), fold.axis % k.ndim, 0)  # (inputs, window..., outputs)
    k = k.reshape(k.shape[0], -1, k.shape[-1]).sum(axis=1)
    rows = k[xp.asarray(fold.entries)]
    return xp.asarray((fold.sign * fold.consts).astype(ct)) @ rows


def _fold_target(graph: Graph, use, op) -> tuple:
    """(variable, sign) that takes a consumer's folded constants: its bias, else the moving mean of the
    BatchNormalization that alone reads its output (``BN(y + d)`` with mean ``m - d`` is ``BN(y)``)."""
    if getattr(use.layer, "bias", None) is not None:
        return use.layer.bias, 1.0
    nxt = graph.consumers_of.get(graph.canon(op.outputs[0]), [])
    if len(nxt) == 1 and type(nxt[0].layer).__name__ == "BatchNormalization":
        bn = nxt[0].layer
        rank = len(graph.shape(op.outputs[0]))
        if bn.axis % rank == graph.channel_axis(use.layer, rank):
            return bn.moving_mean, -1.0
    return None, 0.0


def _with_delta(native, delta):
    """``native + delta`` as a new array of the same module and dtype (64-byte aligned on the CPU)."""
    xp = _dispatch.array_module(native)
    a = native.array
    raw = native.bf16 and native.device[0] == "cuda"
    ct = delta.dtype
    s = (_bf16_bits_to_f32(xp, a) if raw else a.astype(ct)) + delta
    s = _f32_to_bf16_bits(xp, s).view(a.dtype) if raw else s.astype(a.dtype)
    if isinstance(s, np.ndarray):
        out = aligned_empty(s.shape, s.dtype)
        out[...] = s
        return out
    return s


def _compact(model, graph: Graph, chosen: dict, folds: list, optimizer: str, backend: str, t0: float,
             times: dict, kind: str) -> GrowthEvent:
    """Compact every variable of the groups in ``chosen`` (root gid -> CompactPlan) and add ``folds``, in place.

    ``widen``'s machinery (``_widen._apply``) with ``compact_many`` as the kernel; each folded bias reads
    ``bias + delta`` (made after the export, before the kernel) instead of its own value.
    """
    fold_of: dict = {}
    for f in folds:
        fold_of.setdefault(id(f.target), []).append(f)

    def add_folds(entries):
        natives = {id(e.source): e.native for e in entries if e.source is not None}
        for e in entries:
            fs = fold_of.get(id(e.target)) if e.source is not None else None
            if not fs:
                continue
            delta = None
            for f in fs:
                kn = natives.get(id(f.kernel)) or interop.export(_vars.value_of(f.kernel))
                d = _fold_delta(f, kn)
                delta = d if delta is None else delta + d
            e.base = _with_delta(e.native, delta)

    edit = Edit(kind, chosen, "none", neurons=lambda p: p.removed.tolist(), run=compact_many,
                extra=[f.target for f in folds], prepare=add_folds)
    return apply(model, graph, edit, optimizer=optimizer, backend=backend, t0=t0, times=times)


def _empty_event(model, optimizer: str, backend: str, t0: float, kind: str) -> GrowthEvent:
    n = int(model.count_params())
    return GrowthEvent(params_before=n, params_after=n, symmetry="none", optimizer=optimizer, kind=kind,
                       backend=backend_used(backend, model), keras_backend=_vars.backend_name(),
                       times={"total": time.perf_counter() - t0})


def _recurrent(graph: Graph, root) -> list:
    """Paths of the recurrent layers (RNN, Bidirectional) a group touches."""
    from keras import layers as L

    found = {}
    for g, layers in graph.touched.items():
        if graph.find(g) == root:
            found.update({p: lay for p, lay in layers.items() if isinstance(lay, (L.RNN, L.Bidirectional))})
    return list(found)


def _refuse(grp, path, what, graph: Graph | None = None):
    rnn = [] if graph is None else _recurrent(graph, grp.gid)
    if rnn:
        raise GrowthError(f"cannot {what} {path!r}: its units reach the recurrent layer(s) {rnn}; fastsplit "
                          "splits recurrent units but does not prune or merge them yet")
    if grp.refused:
        raise GrowthError(f"cannot {what} {path!r} (group {grp.producers}): " + "; ".join(grp.refused))
    if grp.in_place:
        raise GrowthError(
            f"cannot {what} {path!r}: layer(s) {grp.in_place} read its units at their positions (a rotary "
            "embedding's frequencies depend on the head size), so removing or merging units changes what the others "
            "compute"
        )
    if grp.uniform:
        raise GrowthError(
            f"cannot {what} {path!r}: layer(s) {grp.uniform} normalise across its units, so removing or merging "
            "units changes the values of the others"
        )


# -- prune --------------------------------------------------------------------------------------------------


def _consumer_op(graph: Graph, layer):
    found = [op for op in graph.ops if op.layer is layer]
    if len(found) != 1:
        raise GrowthError(
            f"layer {graph.layer_paths.get(id(layer), layer.name)!r} is called {len(found)} times; prune cannot fold "
            "constants into a shared layer (pass data=None to prune without folding)"
        )
    return found[0]


def _folds(model, graph: Graph, chosen: dict, data, batch_size: int) -> list:
    """Measure, at each consumer's input, the removed units' values on ``data``; one _Fold per consumer."""
    needs = []  # (use, plan, op, input key, unit axis of the input)
    for use in graph.uses:
        if use.kind != "outgoing":
            continue
        p = evaluate(use.ref, chosen, graph.find)
        if p is None or p.dropped.size == 0:
            continue
        op = _consumer_op(graph, use.layer)
        key = next(graph.canon(k) for k in op.inputs if graph.canon(k) in graph.labels)
        needs.append((use, p, op, key, graph.labels[key].units.axis))
    if not needs:
        return []
    xs = model_inputs(model, data)
    red = {}
    for _, _, _, key, axis in needs:
        red.setdefault(key, Reduction(axis))
    for batch in probe(graph, xs, list(red), batch_size):
        for key, arr in batch.items():
            red[key].add(arr)
    folds = []
    for use, p, op, key, _axis in needs:
        r = red[key]
        n_axis = r.mean.shape[0]
        positions = n_axis // p.width
        drop = p.dropped
        if positions == 1:
            entries = drop
        elif use.channels == "last":
            entries = (np.arange(positions)[:, None] * p.width + drop[None, :]).reshape(-1)
        else:
            entries = (drop[:, None] * positions + np.arange(positions)[None, :]).reshape(-1)
        consts = r.mean[entries]
        spread = r.max[entries] - r.min[entries]
        if np.any(spread > 0):
            i = int(np.argmax(spread))
            warnings.warn(
                f"prune is not exact on this data: {int((spread > 0).sum())} removed entries of the input of "
                f"{use.path!r} are not constant (entry {int(entries[i])} ranges over [{r.min[entries][i]:.4g}, "
                f"{r.max[entries][i]:.4g}]); their mean is folded into the bias of {use.path!r}",
                RuntimeWarning, stacklevel=3,
            )
        if not np.any(consts != 0):
            continue
        target, sign = _fold_target(graph, use, op) if use.fold else (None, 0.0)
        if target is None:
            raise GrowthError(
                f"layer {use.path!r} has no bias (nor a BatchNormalization after it) to take the constant value of "
                f"the removed units (up to {np.abs(consts).max():.4g}); prune without data, or give the layer a bias"
            )
        window = len(use.var.shape) > 2
        transposed = window and use.axis % len(use.var.shape) == len(use.var.shape) - 1
        if transposed or (window and getattr(use.layer, "padding", "valid") != "valid"):
            warnings.warn(
                f"prune is not exact at the borders: {use.path!r} pads its input with zeros or overlaps its "
                f"windows (padding={use.layer.padding!r}), where the removed units had a nonzero constant value",
                RuntimeWarning, stacklevel=3,
            )
        folds.append(_Fold(target, use.path, use.var, use.axis, entries.astype(np.int64),
                           consts.astype(np.float64), sign))
    return folds


def prune(model, units, *, data=None, optimizer: str = "carry", backend: str = "auto",
          batch_size: int = 256) -> GrowthEvent:
    """Remove units of a built Keras model in place.

    Args:
        model: a built Functional or Sequential ``keras.Model`` (compiled or not).
        units: ``{layer name: units}``, the units being integer indices, a
            boolean mask or a :class:`fastsplit.CompactPlan` of the layer's
            width (e.g. the result of :func:`dead_units`). Naming one member of
            a coupled group (a residual stream) prunes the whole group.
        data: inputs (``x`` or ``(x, y)``) on which to measure the value that
            each consumer reads from the removed units; that value (its mean)
            times the unit's outgoing row is added to the consumer's bias, so
            a unit that is constant on ``data`` is removed exactly (in
            inference mode). Without ``data`` nothing is folded: exact for
            units that are zero wherever they are read.
        optimizer: ``"carry"`` keeps the slots of the kept units and drops
            those of the removed ones; ``"reset"`` gives the compacted
            variables fresh slots. The iteration counter is kept.
        backend: fastsplit backend for the gather (``"auto"``, ``"numba"``,
            ``"numpy"``, ``"cupy"``).
        batch_size: samples per forward pass over ``data``.

    Returns:
        The :class:`GrowthEvent` (``new_width < old_width``; ``neurons`` lists
        the removed units), also appended to :func:`fastsplit.keras.history`.

    Raises:
        ValueError: an unknown layer or unit index, pruning every unit of a
            layer, a group that cannot be compacted, data of the wrong shape
            (the message names it); the model, its weights and its optimizer
            are then exactly as before.

    Cost: with ``data``, one inference pass over it up to the consumers;
    then as ``widen``: one read of every touched tensor (weights, statistics,
    optimizer slots) and one write of its smaller version, in one
    ``compact_many`` call (two when a kernel is compacted on both axes).
    """
    t0 = time.perf_counter()
    check_args(model, optimizer, backend)
    if not isinstance(units, Mapping):
        raise GrowthError(f"units must map layer names to unit indices, got {type(units).__name__}")
    sync_jax(model)
    graph = Graph(model)
    groups = graph.groups()

    def make(spec, grp, path):
        if isinstance(spec, CompactPlan):
            if spec.width != grp.width:
                raise GrowthError(f"the plan for {path!r} has width {spec.width}, but the layer has {grp.width} units")
            return spec
        try:
            return compact_plan(grp.width, remove=spec)
        except SplitError as exc:
            raise SplitError(f"cannot prune {path!r}: {exc}") from None

    chosen, named = collect(graph, groups, units, make, "different units to prune; give them once for the group")
    by_root = {g.gid: g for g in groups}
    chosen = {g: p for g, p in chosen.items() if not p.is_identity}
    for g in chosen:
        _refuse(by_root[g], named[g], "prune", graph)
    if not chosen:
        return _empty_event(model, optimizer, backend, t0, "prune")
    times = {}
    folds = _folds(model, graph, chosen, data, batch_size) if data is not None else []
    times["probe"] = time.perf_counter() - t0
    return _compact(model, graph, chosen, folds, optimizer, backend, t0, times, "prune")


# -- merge_twins --------------------------------------------------------------------------------------------


def _features(graph: Graph, gid: int, width: int) -> np.ndarray:
    """``float64[width, D]``: every producing-side value of each unit of group ``gid`` (weights, bias, state)."""
    from keras import ops

    cols = []
    for use in graph.uses:
        if use.kind == "outgoing":
            continue
        ent, w_axis = _unit_entries(use.ref, gid, graph.find)
        if ent is None:
            continue
        a = np.asarray(ops.convert_to_numpy(use.var), dtype=np.float64)
        a = np.moveaxis(a, use.axis % a.ndim, 0)
        positions = a.shape[0] // w_axis
        if positions == 1:
            idx = ent
        elif use.channels == "last":
            idx = (np.arange(positions)[None, None, :] * w_axis + ent[:, :, None]).reshape(width, -1)
        else:
            idx = (ent[:, :, None] * positions + np.arange(positions)[None, None, :]).reshape(width, -1)
        cols.append(a[idx.reshape(-1)].reshape(width, -1))
    return np.concatenate(cols, axis=1) + 0.0  # -0.0 -> 0.0


def find_twins(features: np.ndarray, atol: float) -> dict:
    """``{representative: [twins]}``: rows equal within ``atol`` (max abs difference) to a lower row.

    Exact equality (``atol=0``) groups by the rows' bytes: O(width * D).
    Otherwise greedy in ascending order: O(width^2 * D) at most.
    """
    n = features.shape[0]
    groups: dict = {}
    if atol == 0:
        first: dict = {}
        for u in range(n):
            key = features[u].tobytes()
            if key in first:
                groups.setdefault(first[key], []).append(u)
            else:
                first[key] = u
        return groups
    free = np.ones(n, dtype=bool)
    for u in range(n):
        if not free[u]:
            continue
        rest = np.flatnonzero(free[u + 1:]) + u + 1
        if rest.size == 0:
            break
        close = rest[np.abs(features[rest] - features[u]).max(axis=1) <= atol]
        if close.size:
            groups[u] = close.tolist()
            free[close] = False
    return groups


def merge_twins(model, *, atol: float = 0.0, layers=None, optimizer: str = "carry",
                backend: str = "auto") -> GrowthEvent:
    """Merge units whose incoming weights, bias and per-unit state are identical, in place.

    Each group of twins becomes its lowest-numbered unit, whose outgoing rows
    become the sum of the group's: the model computes the same function (up to
    float rounding of that sum). Split copies that never drifted apart
    (``symmetry="none"`` under a rescaling-invariant optimizer such as Adam)
    merge back into the unit they came from, with its optimizer state.

    Args:
        model: a built Functional or Sequential ``keras.Model``.
        atol: largest absolute difference of any incoming weight, bias or
            per-unit parameter between twins. 0 (the default) merges only
            exact twins; a positive value also merges near-twins (then the
            representative's incoming weights are kept, which is not exact).
        layers: producing layers to search (their groups); None for all.
            Groups that cannot be compacted are skipped unless named here.
        optimizer: ``"carry"`` (see the module docstring for the rule) or ``"reset"``.
        backend: fastsplit backend for the gather.

    Returns:
        The :class:`GrowthEvent` (``neurons`` lists the twins merged away),
        appended to the history when anything was merged.

    Raises:
        ValueError: an unknown layer, a named layer that cannot be compacted,
            a bad ``atol``; the model is then untouched.

    Cost: every producing-side tensor of the searched groups is read to the
    host once to find twins (O(width * D) for exact twins); the merge itself
    as :func:`prune`.
    """
    t0 = time.perf_counter()
    check_args(model, optimizer, backend)
    atol = check_number("atol", atol)
    sync_jax(model)
    graph = Graph(model)
    groups = graph.groups()
    if layers is not None:
        named = set(resolve_layers(graph, layers))
        groups = [g for g in groups if named & set(g.producers)]
        for g in groups:
            _refuse(g, g.producers[0], "merge units of", graph)
    else:
        groups = [g for g in groups if g.removable and not _recurrent(graph, g.gid)]
    chosen = {}
    for g in groups:
        twins = find_twins(_features(graph, g.gid, g.width), atol)
        if twins:
            chosen[g.gid] = compact_plan(g.width, merge=twins)
    if not chosen:
        return _empty_event(model, optimizer, backend, t0, "merge")
    return _compact(model, graph, chosen, [], optimizer, backend, t0, {}, "merge")


__all__ = ["evaluate", "find_twins", "merge_twins", "prune"]
