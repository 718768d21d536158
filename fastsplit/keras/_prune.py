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

from .. import _core, _dispatch, interop
from .._errors import SplitError
from ..compact import CompactPlan, _bf16_bits_to_f32, _f32_to_bf16_bits, compact_many, compact_plan, concat, identity
from . import _history, _optim, _vars
from ._event import GrowthEvent, LayerGrowth
from ._graph import Graph, GroupRef, _is
from ._stats import Reduction, model_inputs, probe, resolve_layers
from ._widen import (
    _PRODUCING,
    _aligned_empty,
    _backend_used,
    _count,
    _fix_build_shapes,
    _fix_input_layer,
    _fix_input_spec,
    _lookup,
    _np_dtype,
    _reset_functions,
    _sync_jax,
)

# -- plans on tensor axes -----------------------------------------------------------------------------------


def evaluate(ref, plans: dict, find) -> CompactPlan | None:
    """The compaction of a tensor's unit axis given the plans of the groups compacted now (None: unchanged).

    The counterpart of ``_graph.evaluate`` for :class:`CompactPlan`.
    """
    if isinstance(ref, GroupRef):
        p = plans.get(find(ref.gid))
        return None if p is None else p.expand(ref.expand)
    parts, any_change = [], False
    for sub, width in ref.parts:
        p = None if sub is None else evaluate(sub, plans, find)
        any_change |= p is not None
        parts.append(identity(width) if p is None else p)
    if not any_change:
        return None
    return parts[0] if len(parts) == 1 else concat(parts)


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


def _same(a: CompactPlan, b: CompactPlan) -> bool:
    return a.width == b.width and np.array_equal(a.src, b.src) and a.merge == b.merge


# -- the shared in-place compaction --------------------------------------------------------------------------


@dataclasses.dataclass
class _Step:
    axis: int
    plan: CompactPlan
    kind: str
    channels: str

    @property
    def side(self) -> str:
        return "consuming" if self.kind == "outgoing" else "producing"


@dataclasses.dataclass
class _Entry:
    target: object
    source: object
    steps: list  # [(axis, plan, role, channels)]
    fill: float | None = None
    fold: object = None  # _Fold for a consumer bias
    native: object = None
    base: object = None  # the array the steps read (the source, or source + fold)
    new_shape: tuple = ()
    value: object = None


@dataclasses.dataclass
class _Fold:
    """Add ``consts @ rows(kernel, entries)`` to a consumer's bias (conv: the kernel summed over its window)."""

    layer: object
    path: str
    kernel: object
    entries: np.ndarray
    consts: np.ndarray
    conv: bool


def _update_graph(graph: Graph, chosen: dict, setattr_undo) -> None:
    """Layer widths, symbolic shapes, input specs and build shapes (``_widen._update_graph`` for CompactPlans)."""
    find = graph.find
    for layer, attr, ref in graph.width_attrs:
        p = evaluate(ref, chosen, find)
        if p is not None:
            setattr_undo(layer, attr, p.new_width)
    new_shapes = {}
    for key in dict.fromkeys(graph.shape_tensors):
        lab = graph.labels[key]
        p = evaluate(lab.ref, chosen, find)
        if p is None:
            continue
        shape = list(graph.tensors[key].shape)
        shape[lab.units.axis] = shape[lab.units.axis] // p.width * p.new_width
        new_shapes[key] = tuple(shape)
    for key, info in graph.tensors.items():
        c = graph.canon(key)
        if c in new_shapes and info.kt is not None:
            setattr_undo(info.kt, "_shape", new_shapes[c])
            _fix_input_layer(info.kt, new_shapes[c], setattr_undo)

    def shape_of(key, new):
        c = graph.canon(key)
        return new_shapes.get(c, graph.tensors[c].shape) if new else graph.tensors[c].shape

    for layer, _node, keys in list(graph.layer_inputs) + list(graph.nested):
        old = [tuple(shape_of(k, False)) for k in keys]
        new = [tuple(shape_of(k, True)) for k in keys]
        if old != new:
            _fix_input_spec(layer, old, new, setattr_undo)
            _fix_build_shapes(layer, old, new, setattr_undo)


def _out(arr, steps):
    """A 64-byte aligned result for a CPU job (TensorFlow's rule, as in ``widen``); None on the GPU."""
    if not isinstance(arr, np.ndarray):
        return None
    shape = list(arr.shape)
    for axis, p, _role, _ch in steps:
        shape[axis] = shape[axis] // p.width * p.new_width
    return _aligned_empty(tuple(shape), arr.dtype)


def _fold_delta(fold: _Fold, kernel_native) -> object:
    """The bias change of one fold, on the array module of the kernel (float64 or float32)."""
    xp = _dispatch.array_module(kernel_native)
    k = kernel_native.array
    if kernel_native.bf16 and kernel_native.device[0] == "cuda":
        k = _bf16_bits_to_f32(xp, k)
    ct = np.float64 if k.dtype == np.float64 else np.float32
    if fold.conv:  # (..., cin, cout): the window summed, then the removed input channels
        k = k.astype(ct).reshape(-1, k.shape[-2], k.shape[-1]).sum(axis=0)
    rows = k[xp.asarray(fold.entries)].astype(ct)
    return xp.asarray(fold.consts.astype(ct)) @ rows


def _with_delta(native, delta):
    """``native + delta`` as a new array of the same module and dtype (64-byte aligned on the CPU)."""
    xp = _dispatch.array_module(native)
    a = native.array
    raw = native.bf16 and native.device[0] == "cuda"
    ct = delta.dtype
    s = (_bf16_bits_to_f32(xp, a) if raw else a.astype(ct)) + delta
    s = _f32_to_bf16_bits(xp, s).view(a.dtype) if raw else s.astype(a.dtype)
    if isinstance(s, np.ndarray):
        out = _aligned_empty(s.shape, s.dtype)
        out[...] = s
        return out
    return s


def _apply(model, graph: Graph, chosen: dict, folds: list, optimizer: str, backend: str, t0: float,
           times: dict) -> GrowthEvent:
    """Compact every variable of the groups in ``chosen`` (root gid -> CompactPlan) and add ``folds``, in place."""
    steps: dict = {}
    owners: dict = {}
    for use in graph.uses:
        p = evaluate(use.ref, chosen, graph.find)
        if p is None:
            continue
        var = use.var
        axis = use.axis % len(var.shape)
        lst = steps.setdefault(id(var), [])
        owners[id(var)] = var
        clash = [s for s in lst if s.axis == axis]
        if clash:
            if clash[0].kind == use.kind and _same(clash[0].plan, p):
                continue
            raise ValueError(f"{use.path}/{use.attr} would be compacted twice on axis {axis} with different plans")
        lst.append(_Step(axis, p, use.kind, use.channels))
    for lst in steps.values():
        lst.sort(key=lambda s: s.side == "consuming")

    fold_of = {}
    for f in folds:
        bias = f.layer.bias
        fold_of.setdefault(id(bias), []).append(f)
        owners.setdefault(id(bias), bias)

    opt = getattr(model, "optimizer", None)
    slots, unknown = _optim.slot_map(opt, optimizer)
    opt_mode = optimizer if unknown is None else f"reset:{unknown}"
    entries: list[_Entry] = []
    for key, var in owners.items():
        lst = steps.get(key, [])
        roles = [(s.axis, s.plan, "outgoing" if s.kind == "outgoing" else _PRODUCING[s.kind], s.channels) for s in lst]
        entries.append(_Entry(var, var, roles, fold=fold_of.get(key)))
        if not lst:
            continue  # a folded bias keeps its shape, and its slots (its gradient does not change)
        for slot, kind in slots.get(key, []):
            if tuple(slot.shape) != tuple(var.shape):
                if len(slot.shape) == 0:
                    continue
                raise ValueError(
                    f"optimizer slot {slot.path} has shape {tuple(slot.shape)}, not that of {var.path} "
                    f"{tuple(var.shape)}: fastsplit cannot carry it; use optimizer='reset' or a supported optimizer"
                )
            if kind == "reset":
                fill = _optim.reset_value(_optim.owner_of(opt, slot), slot)
                entries.append(_Entry(slot, None, roles, fill=fill))
            else:
                sroles = [(a, p, _optim.ROLE[(kind, s.side)], ch) for (a, p, _r, ch), s in zip(roles, lst, strict=False)]
                entries.append(_Entry(slot, slot, sroles))
    if unknown is not None and entries and optimizer == "carry":
        _optim.warn_unknown(unknown)
    for e in entries:
        shape = list(e.target.shape)
        for axis, p, _role, _ch in e.steps:
            shape[axis] = shape[axis] // p.width * p.new_width
        e.new_shape = tuple(int(s) for s in shape)
    times["plan"] = time.perf_counter() - t0

    # -- export, folds, kernel, import, variables (nothing in the model changes) -----------------------
    t = time.perf_counter()
    natives = {}
    for e in entries:
        if e.source is not None:
            e.native = interop.export(_vars.value_of(e.source))
            natives[id(e.source)] = e.native
            e.base = e.native.array
    for e in entries:
        if e.fold:
            delta = None
            for f in e.fold:
                kn = natives.get(id(f.kernel)) or interop.export(_vars.value_of(f.kernel))
                d = _fold_delta(f, kn)
                delta = d if delta is None else delta + d
            e.base = _with_delta(e.native, delta)
    times["export"] = time.perf_counter() - t

    t = time.perf_counter()
    split = [e for e in entries if e.source is not None and e.steps]
    calls = 0
    if split:
        try:
            out1 = compact_many(
                [_core.Job(e.base, e.steps[0][1], e.steps[0][0], e.steps[0][2], e.steps[0][3],
                           _out(e.base, e.steps[:1])) for e in split],
                backend=backend,
            )
            calls = 1
            two = [i for i, e in enumerate(split) if len(e.steps) > 1]
            if two:
                out2 = compact_many(
                    [_core.Job(out1[i], split[i].steps[1][1], split[i].steps[1][0], split[i].steps[1][2],
                               split[i].steps[1][3], _out(out1[i], split[i].steps[1:])) for i in two],
                    backend=backend,
                )
                calls = 2
                for i, arr in zip(two, out2, strict=False):
                    out1[i] = arr
        except SplitError as exc:
            raise SplitError(f"the compaction failed before changing the model: {exc}") from exc
        for e, arr in zip(split, out1, strict=False):
            e.value = arr
    for e in entries:
        if e.source is not None and not e.steps:
            e.value = e.base  # a folded bias that keeps its width
    times["kernel"] = time.perf_counter() - t

    t = time.perf_counter()
    for e in entries:
        if e.source is not None:
            e.value = interop.import_(e.value, e.native)
            e.native = e.base = None
        else:
            e.value = _vars.full(e.target, e.new_shape, e.target.dtype, e.fill)
    times["import"] = time.perf_counter() - t

    t = time.perf_counter()
    prepared = [(e.target, _vars.prepare(e.target, e.value)) for e in entries]
    for e in entries:
        e.value = None
    times["variables"] = time.perf_counter() - t

    # -- swap --------------------------------------------------------------------------------------
    t = time.perf_counter()
    params_before = int(model.count_params())
    members = {g: [(p, lay) for gg in graph.producers for p, lay in graph.producers[gg] if graph.find(gg) == g]
               for g in chosen}
    layer_before = {p: _count(lay) for g in chosen for p, lay in members[g]}
    old_keys = {}
    for o in _optim.unwrap(opt):
        for v in getattr(o, "_trainable_variables", []) or []:
            old_keys[id(v)] = o._var_key(v)
    undo_vars, undo_attrs = [], []

    def setattr_undo(obj, attr, value):
        undo_attrs.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    try:
        for var, value in prepared:
            undo_vars.append(_vars.install(var, value))
        _update_graph(graph, chosen, setattr_undo)
        _optim.rekey(opt, old_keys)
        _vars.retrack(model)
    except BaseException:
        for obj, attr, value in reversed(undo_attrs):
            setattr(obj, attr, value)
        for u in reversed(undo_vars):
            _vars.restore(u)
        try:
            _optim.rekey(opt, {})
            _vars.retrack(model)
        finally:
            raise
    prepared = None
    times["swap"] = time.perf_counter() - t

    t = time.perf_counter()
    _reset_functions(model)
    times["retrace"] = time.perf_counter() - t

    event = GrowthEvent(
        params_before=params_before,
        params_after=int(model.count_params()),
        symmetry="none",
        optimizer=opt_mode,
        iteration=None if opt is None or not getattr(opt, "built", False) else int(np.asarray(opt.iterations)),
        backend=_backend_used(backend),
        keras_backend=_vars.backend_name(),
        tensors=len(entries),
        bytes_new=int(sum(int(np.prod(e.new_shape)) * np.dtype(_np_dtype(e.target)).itemsize for e in entries)),
        split_calls=calls,
    )
    for i, (g, p) in enumerate(sorted(chosen.items())):
        for path, layer in members[g]:
            event.layers[path] = LayerGrowth(path, p.width, p.new_width, p.removed.tolist(),
                                             layer_before.get(path, 0), _count(layer), i)
    times["total"] = time.perf_counter() - t0
    event.times = times
    _history.record(model, event)
    return event


def _empty_event(model, optimizer: str, backend: str, t0: float) -> GrowthEvent:
    n = int(model.count_params())
    return GrowthEvent(params_before=n, params_after=n, symmetry="none", optimizer=optimizer,
                       backend=_backend_used(backend), keras_backend=_vars.backend_name(),
                       times={"total": time.perf_counter() - t0})


def _check_common(model, optimizer):
    if optimizer not in ("carry", "reset"):
        raise ValueError(f"optimizer must be 'carry' or 'reset', got {optimizer!r}")
    if not getattr(model, "built", False):
        raise ValueError(f"model {model.name!r} is not built yet: build or fit it first")


def _refuse(grp, path, what):
    if grp.refused:
        raise ValueError(f"cannot {what} {path!r} (group {grp.producers}): " + "; ".join(grp.refused))
    if grp.uniform:
        raise ValueError(
            f"cannot {what} {path!r}: layer(s) {grp.uniform} normalise across its units, so removing or merging "
            "units changes the values of the others"
        )


# -- prune --------------------------------------------------------------------------------------------------


def _consumer_op(graph: Graph, layer):
    found = [op for op in graph.ops if op.layer is layer]
    if len(found) != 1:
        raise ValueError(
            f"layer {graph.layer_paths.get(id(layer), layer.name)!r} is called {len(found)} times; prune cannot fold "
            "constants into a shared layer (pass data=None to prune without folding)"
        )
    return found[0]


def _folds(model, graph: Graph, chosen: dict, data, batch_size: int) -> list:
    """Measure, at each consumer's input, the removed units' values on ``data``; one _Fold per consumer."""
    needs = []  # (use, plan, op, axis kept)
    for use in graph.uses:
        if use.kind != "outgoing":
            continue
        p = evaluate(use.ref, chosen, graph.find)
        if p is None or p.dropped.size == 0:
            continue
        op = _consumer_op(graph, use.layer)
        key = graph.canon(op.inputs[0])
        rank = len(graph.tensors[key].shape)
        conv = not _is(use.layer, "dense")
        axis = graph._channel_axis(use.layer, rank) if conv else rank - 1
        needs.append((use, p, key, axis, conv))
    if not needs:
        return []
    xs = model_inputs(model, data)
    red = {}
    for _, _, key, axis, _ in needs:
        red.setdefault(key, Reduction(axis))
    for batch in probe(graph, xs, list(red), batch_size):
        for key, arr in batch.items():
            red[key].add(arr)
    folds = []
    for use, p, key, _axis, conv in needs:
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
        if use.layer.bias is None:
            raise ValueError(
                f"layer {use.path!r} has no bias to take the constant value of the removed units "
                f"(up to {np.abs(consts).max():.4g}); prune without data, or give the layer a bias"
            )
        if conv and getattr(use.layer, "padding", "valid") != "valid":
            warnings.warn(
                f"prune is not exact at the borders: {use.path!r} pads its input with zeros (padding="
                f"{use.layer.padding!r}), where the removed units had a nonzero constant value",
                RuntimeWarning, stacklevel=3,
            )
        folds.append(_Fold(use.layer, use.path, use.var, entries.astype(np.int64), consts.astype(np.float64), conv))
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
    _check_common(model, optimizer)
    if not isinstance(units, Mapping):
        raise ValueError(f"units must map layer names to unit indices, got {type(units).__name__}")
    _sync_jax(model)
    graph = Graph(model)
    groups = graph.groups()
    chosen, named = {}, {}
    for name, spec in units.items():
        path, grp = _lookup(graph, groups, name)
        if isinstance(spec, CompactPlan):
            if spec.width != grp.width:
                raise ValueError(f"the plan for {path!r} has width {spec.width}, but the layer has {grp.width} units")
            p = spec
        else:
            try:
                p = compact_plan(grp.width, remove=spec)
            except SplitError as exc:
                raise SplitError(f"cannot prune {path!r}: {exc}") from None
        if grp.gid in chosen and not _same(chosen[grp.gid], p):
            raise ValueError(
                f"layers {named[grp.gid]!r} and {path!r} are coupled (one group: {grp.producers}) but got "
                "different units to prune; give them once for the group"
            )
        chosen[grp.gid] = p
        named[grp.gid] = path
    by_root = {g.gid: g for g in groups}
    chosen = {g: p for g, p in chosen.items() if not p.is_identity}
    for g in chosen:
        _refuse(by_root[g], named[g], "prune")
    if not chosen:
        return _empty_event(model, optimizer, backend, t0)
    times = {}
    folds = _folds(model, graph, chosen, data, batch_size) if data is not None else []
    times["probe"] = time.perf_counter() - t0
    return _apply(model, graph, chosen, folds, optimizer, backend, t0, times)


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
    _check_common(model, optimizer)
    atol = float(atol)
    if not np.isfinite(atol) or atol < 0:
        raise ValueError(f"atol must be a non-negative number, got atol={atol!r}")
    _sync_jax(model)
    graph = Graph(model)
    groups = graph.groups()
    if layers is not None:
        named = set(resolve_layers(graph, layers))
        groups = [g for g in groups if named & set(g.producers)]
        for g in groups:
            _refuse(g, g.producers[0], "merge units of")
    else:
        groups = [g for g in groups if not g.refused and not g.uniform]
    chosen = {}
    for g in groups:
        twins = find_twins(_features(graph, g.gid, g.width), atol)
        if twins:
            chosen[g.gid] = compact_plan(g.width, merge=twins)
    if not chosen:
        return _empty_event(model, optimizer, backend, t0)
    return _apply(model, graph, chosen, [], optimizer, backend, t0, {})


__all__ = ["evaluate", "find_twins", "merge_twins", "prune"]
