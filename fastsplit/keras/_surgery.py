"""One surgery pipeline for every edit of a live model: split (``widen``), prune, merge.

An :class:`Edit` says what to do to each coupled group (a plan per group, the
kernel call that applies the plans, the variables to rewrite in place);
:func:`apply` carries it out in phases. Nothing in the model changes before
the ``swap`` phase, and the swap only writes Python attributes, each recorded
so that a failure anywhere puts every one of them back:

1. plan: the jobs (every variable and optimizer slot that the plans touch);
2. export: every tensor leaves its framework through DLPack (no copy);
3. kernel: one ``run`` call (``fastsplit.split_many`` or ``compact_many``)
   writes the new arrays, two-axis kernels included;
4. import: the new arrays enter the framework through DLPack (no copy);
5. variables: new backend variables are made from them;
6. swap: the Keras variables get the new values, layers their new widths
   and configs, symbolic tensors, input specs and build shapes their new
   shapes, the optimizer its new keys;
7. retrace: cached train/test/predict functions are rebuilt so the next
   step traces with the new shapes.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Mapping

import numpy as np

from .. import _core
from .._core import aligned_empty
from .._errors import SplitError
from . import _history, _optim, _shards, _vars
from ._errors import GrowthError
from ._event import GrowthEvent, LayerGrowth
from ._graph import Graph
from ._holders import find_holders
from ._units import evaluate, new_length, same_plan

#: a Use's kind -> the core role of a producing-side tensor
_PRODUCING = {"incoming": "incoming", "bias": "bias", "state": "copy"}
#: a slot kind -> the power of a Use's factor that its slot takes (the variable times f: gradient times 1/f)
_SLOT_POWER = {"m1": -1, "m2": -2, "ema": 1}
#: how messages name each kind of edit
_VERBS = {"split": ("split", "widen"), "prune": ("compacted", "the compaction"), "merge": ("compacted", "the merge")}


@dataclasses.dataclass
class Edit:
    """What one event does: ``plans`` (root gid -> SplitPlan or CompactPlan) applied by ``run``.

    Attributes:
        kind: ``"split"``, ``"prune"`` or ``"merge"`` (the GrowthEvent's kind).
        plans: the plan of each changed group.
        symmetry: the event's symmetry breaking.
        neurons: ``neurons(plan)``, the units each LayerGrowth lists.
        run: ``run(jobs, backend=...)``, the kernel call (``fastsplit.split_many``
            or ``fastsplit.compact.compact_many``).
        extra: variables rewritten without changing their shape (prune: the
            biases and BatchNormalization means that take folded constants).
        prepare: ``prepare(entries)`` after the export; may set ``entry.base``,
            the array an entry's jobs read instead of the variable's value.
    """

    kind: str
    plans: dict
    symmetry: str
    neurons: Callable
    run: Callable = None
    extra: list = dataclasses.field(default_factory=list)
    prepare: Callable | None = None


@dataclasses.dataclass
class Step:
    axis: int
    plan: object
    kind: str  # incoming / bias / state / outgoing
    channels: str
    factor: float = 1.0  # Use.factor(plan)

    @property
    def side(self) -> str:
        return "consuming" if self.kind == "outgoing" else "producing"


@dataclasses.dataclass
class Entry:
    """One tensor to make: ``target`` gets ``source``'s value changed by ``steps`` (or a fresh fill)."""

    target: object
    source: object
    steps: list  # [(axis, plan, role, channels)]
    fill: float | None = None
    native: object = None
    base: object = None  # the array the steps read when it is not ``native.array`` (prune: a folded bias)
    new_shape: tuple = ()
    value: object = None
    factor: float = 1.0  # a constant the first kernel call multiplies the result by (Job.factor)


# -- naming groups --------------------------------------------------------------------------------------


def lookup(graph: Graph, groups, name: str):
    """(path, group) of the producing layer called ``name`` (its path or its plain name)."""
    producers = {}
    for grp in groups:
        for path in grp.producers:
            producers[path] = grp
    if name in producers:
        return name, producers[name]
    matches = [p for p in producers if p.rsplit("/", 1)[-1] == name]
    if len(matches) == 1:
        return matches[0], producers[matches[0]]
    if len(matches) > 1:
        raise GrowthError(f"layer name {name!r} is ambiguous in this model; use one of the paths {matches}")
    splittable = sorted(p for p, g in producers.items() if not g.refused)
    known = {lay.name for lay in graph.model._flatten_layers(include_self=False, recursive=True)}
    if name in known:
        raise GrowthError(
            f"layer {name!r} produces no units that fastsplit can split; the layers that can be widened are "
            f"{splittable}"
        )
    raise GrowthError(f"the model has no layer named {name!r}; the layers that can be widened are {splittable}")


def collect(graph: Graph, groups, specs: Mapping, make, different: str) -> tuple[dict, dict]:
    """``({root gid: plan}, {root gid: the path that named it})`` from ``{layer name: spec}``.

    ``make(spec, group, path)`` gives the plan; two members of one group must get the same plan
    (``different`` ends the message when they do not).
    """
    chosen: dict = {}
    named: dict = {}
    for name, spec in specs.items():
        path, grp = lookup(graph, groups, name)
        p = make(spec, grp, path)
        if grp.gid in chosen and not same_plan(chosen[grp.gid], p):
            raise GrowthError(
                f"layers {named[grp.gid]!r} and {path!r} are coupled (one group: {grp.producers}) but got {different}"
            )
        chosen[grp.gid] = p
        named[grp.gid] = path
    return chosen, named


def check_args(model, optimizer: str, backend: str) -> None:
    """The arguments every edit takes, checked before anything is read."""
    import keras

    if not isinstance(model, keras.Model):
        raise GrowthError(f"model must be a keras.Model, got {type(model).__module__}.{type(model).__qualname__}")
    if optimizer not in ("carry", "reset"):
        raise GrowthError(f"optimizer must be 'carry' or 'reset', got optimizer={optimizer!r}")
    if backend not in ("auto", "numba", "numpy", "cupy"):
        raise GrowthError(f"backend must be 'auto', 'numba', 'numpy' or 'cupy', got backend={backend!r}")
    if not getattr(model, "built", False):
        raise GrowthError(f"model {model.name!r} is not built yet: build or fit it first")


def check_number(name: str, value, *, optional: bool = False) -> float:
    """A finite, non-negative real number (None when ``optional``), or GrowthError naming it."""
    import numbers

    if value is None and optional:
        return None
    if (not isinstance(value, numbers.Real) or isinstance(value, bool) or not np.isfinite(float(value))
            or value < 0):
        raise GrowthError(f"{name} must be a finite non-negative number, got {name}={value!r}")
    return float(value)


def optimizers_of(model) -> list:
    """The model's optimizer and any other optimizer it holds (a GAN's ``g_optimizer``, ``d_optimizer``)."""
    import keras

    found = [getattr(model, "optimizer", None), *vars(model).values()]
    return list({id(o): o for o in found if isinstance(o, keras.optimizers.Optimizer)}.values())


def count_params(layer) -> int:
    return int(sum(int(np.prod(w.shape)) for w in layer.weights))


def sync_jax(model) -> None:
    """Inside a JAX ``fit`` the live state is in ``model._jax_state``; put it back into the variables first."""
    if getattr(model, "_jax_state", None) is not None and not getattr(model, "_jax_state_synced", True):
        model.jax_state_sync()


def reset_functions(model, setattr_undo=setattr) -> None:
    """Rebuild the model's traced functions that exist (the next call traces with the new variables).

    Rebuilt rather than dropped: a running ``fit`` looks ``train_function`` up at every step.
    """
    for kind in ("train", "test", "predict"):
        if getattr(model, f"{kind}_function", None) is not None:
            setattr_undo(model, f"{kind}_function", getattr(model, f"{kind}_function"))
            getattr(model, f"make_{kind}_function")(force=True)


def backend_used(backend: str, model=None) -> str:
    """The split backend ``backend`` picks for the model's variables: where they live decides ``"auto"``
    (CuPy for variables in GPU memory), so a GPU model's event never claims a CPU kernel."""
    from .. import _dispatch

    device = ("cpu", 0)
    for w in [] if model is None or backend != "auto" else model.weights:
        try:
            device = _vars.export(w).device
            break
        except SplitError:  # a variable of a kind the kernels never see (integer state): ask the next
            continue
    return _dispatch.chosen(backend, device)


# -- the pipeline ---------------------------------------------------------------------------------------


def _entries(graph: Graph, edit: Edit, optimizer: str, opts: list) -> tuple[list, str]:
    """Phase 1: every variable and slot (of the optimizers ``opts``) to rewrite, with its steps; the optimizer mode."""
    verb = _VERBS[edit.kind][0]
    steps: dict = {}
    owners: dict = {}
    for use in graph.uses:
        p = evaluate(use.ref, edit.plans, graph.find)
        if p is None:
            continue
        var = use.var
        axis = use.axis % len(var.shape)
        lst = steps.setdefault(id(var), [])
        owners[id(var)] = var
        clash = [s for s in lst if s.axis == axis]
        if clash:
            if clash[0].kind == use.kind and same_plan(clash[0].plan, p):
                continue
            raise GrowthError(f"{use.path}/{use.attr} would be {verb} twice on axis {axis} with different plans")
        if use.kind == "bias":
            _check_offsets(use, p)
        lst.append(Step(axis, p, use.kind, use.channels, 1.0 if use.factor is None else float(use.factor(p))))
    for lst in steps.values():
        lst.sort(key=lambda s: s.side == "consuming")  # producing axis first (noise sees the original columns)
    for var in edit.extra:
        owners.setdefault(id(var), var)

    slots, unknown = {}, None
    for opt in opts:
        more, unknown_here = _optim.slot_map(opt, optimizer)
        for key, lst in more.items():
            slots.setdefault(key, []).extend(lst)
        unknown = unknown or unknown_here
    opt_mode = optimizer if unknown is None else f"reset:{unknown}"
    entries: list[Entry] = []
    for key, var in owners.items():
        lst = steps.get(key, [])
        roles = [(s.axis, s.plan, "outgoing" if s.kind == "outgoing" else _PRODUCING[s.kind], s.channels) for s in lst]
        factor = float(np.prod([s.factor for s in lst]))
        entries.append(Entry(var, var, roles, factor=factor))
        if not lst:
            continue  # an extra variable keeps its shape, and its slots
        for slot, slot_kind in slots.get(key, []):
            if tuple(slot.shape) != tuple(var.shape):
                if len(slot.shape) == 0:
                    continue
                raise GrowthError(
                    f"optimizer slot {slot.path} has shape {tuple(slot.shape)}, not that of {var.path} "
                    f"{tuple(var.shape)}: fastsplit cannot carry it; use optimizer='reset' or a supported optimizer"
                )
            if slot_kind == "reset":
                fill = _optim.reset_value(_optim.owner_of(opts, slot), slot)
                entries.append(Entry(slot, None, roles, fill=fill))
            else:
                sroles = [(a, p, _optim.role(slot_kind, s.side, p), ch)
                          for (a, p, _r, ch), s in zip(roles, lst, strict=True)]
                power = _SLOT_POWER.get(slot_kind, 0)  # a gradient scaled by 1/f: m1 by 1/f, m2 by 1/f²
                entries.append(Entry(slot, slot, sroles, factor=factor ** power))
    if unknown is not None and entries and optimizer == "carry":
        _optim.warn_unknown(unknown)
    for e in entries:
        shape = list(e.target.shape)
        for axis, p, _role, _ch in e.steps:
            shape[axis] = new_length(shape[axis], p)
        e.new_shape = tuple(int(s) for s in shape)
    return entries, opt_mode


def _check_offsets(use, plan) -> None:
    """Offsets that the variable's dtype cannot hold (``eps=1e300`` on float32) are refused, not written as inf."""
    name = str(use.var.dtype)
    limit = 3.0e38 if name == "bfloat16" else float(np.finfo(np.dtype(name)).max)
    biggest = float(np.max(np.abs(plan.offset), initial=0.0))
    if not biggest < limit / 2:
        raise GrowthError(f"{use.path}/{use.attr} ({name}) cannot hold symmetry offsets of size {biggest:.3g}: "
                          "give a smaller eps or nudge")


def apply(model, graph: Graph, edit: Edit, *, optimizer: str, backend: str, t0: float,
          times: dict | None = None) -> GrowthEvent:
    """Carry out ``edit`` on ``model`` in place (phases 1 to 7); returns the recorded GrowthEvent.

    Every other live model that holds a changed layer is checked first (``_holders``): one that would
    stop working refuses the edit; the others get their symbolic shapes, optimizer slots and traced
    functions updated with ``model``'s. Raises GrowthError (or SplitError from the kernel) with the
    models, their optimizers and the history exactly as before.
    """
    times = {} if times is None else times
    name = _VERBS[edit.kind][1]
    t = time.perf_counter()
    holders = find_holders(model, graph, edit.plans)
    times["holders"] = time.perf_counter() - t
    models = [model, *(h.model for h in holders)]
    for m in models[1:]:
        sync_jax(m)  # a holder inside a JAX fit: its live values first, and its next step reads the new ones
    opts = list({id(o): o for m in models for o in optimizers_of(m)}.values())
    entries, opt_mode = _entries(graph, edit, optimizer, opts)
    times["plan"] = time.perf_counter() - t0

    # -- export, kernel, import, variables (nothing in the model changes) -----------------------------
    t = time.perf_counter()
    for e in entries:
        if e.source is not None:
            e.native = _vars.export(e.source, shards=edit.kind == "split")  # a sharded JAX value: _shards
    if edit.prepare is not None:
        edit.prepare(entries)
    times["export"] = time.perf_counter() - t

    t = time.perf_counter()
    split = [e for e in entries if e.source is not None and e.steps]
    transfers: dict = {}
    shards = _shards.Expansion(split, edit.run, transfers)  # one job per output shard of a sharded value
    try:
        calls = run_kernels(shards.entries, backend, run=shards.run)
        shards.finish()
    except SplitError as exc:
        raise SplitError(f"{name} failed before changing the model: {exc}") from exc
    for e in entries:
        if e.source is not None and not e.steps:
            e.value = e.native.array if e.base is None else e.base  # an extra variable that keeps its shape
    times["kernel"] = time.perf_counter() - t

    t = time.perf_counter()
    for e in entries:
        if e.source is not None:
            e.value = _vars.import_(e.value, e.native, e.new_shape)
            e.native = e.base = None
        else:
            e.value = _vars.full(e.target, e.new_shape, e.target.dtype, e.fill)
    times["import"] = time.perf_counter() - t

    t = time.perf_counter()
    prepared = [(e.target, _vars.prepare(e.target, e.value)) for e in entries]
    for e in entries:
        e.value = None
    times["variables"] = time.perf_counter() - t

    # -- swap, retrace, record: every change is undone if any step fails ------------------------------
    t = time.perf_counter()
    opt = getattr(model, "optimizer", None)
    params_before = int(model.count_params())
    members = {g: [(p, lay) for gg in graph.producers for p, lay in graph.producers[gg] if graph.find(gg) == g]
               for g in edit.plans}
    layer_before = {p: count_params(lay) for g in edit.plans for p, lay in members[g]}
    old_keys = {}
    for o in opts:
        for inner in _optim.unwrap(o):
            for v in getattr(inner, "_trainable_variables", []) or []:
                old_keys[id(v)] = inner._var_key(v)
    undo_vars, undo_attrs = [], []
    history_before = _history_state(model)

    def setattr_undo(obj, attr, value):
        undo_attrs.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    try:
        for var, value in prepared:
            undo_vars.append(_vars.install(var, value))
        done: set = set()
        update_graph(graph, edit.plans, setattr_undo, done)
        for h in holders:
            if h.graph is not None:
                update_graph(h.graph, h.plans, setattr_undo, done)
        for o in opts:
            _optim.rekey(o, old_keys)
        for m in models:
            _vars.retrack(m)
        times["swap"] = time.perf_counter() - t
        t = time.perf_counter()
        for m in models:
            reset_functions(m, setattr_undo)
        times["retrace"] = time.perf_counter() - t
        event = GrowthEvent(
            params_before=params_before,
            params_after=int(model.count_params()),
            symmetry=edit.symmetry,
            optimizer=opt_mode,
            iteration=None if opt is None or not getattr(opt, "built", False) else int(np.asarray(opt.iterations)),
            backend=backend_used(backend, model),
            keras_backend=_vars.backend_name(),
            tensors=len(entries),
            bytes_new=int(sum(int(np.prod(e.new_shape)) * _itemsize(e.target) for e in entries)),
            split_calls=calls,
            transfers=transfers,
            kind=edit.kind,
        )
        for i, (g, p) in enumerate(sorted(edit.plans.items())):
            units = edit.neurons(p)
            for path, layer in members[g]:
                event.layers[path] = LayerGrowth(path, p.width, p.new_width, units, layer_before.get(path, 0),
                                                 count_params(layer), i)
        times["total"] = time.perf_counter() - t0
        event.times = times
        _history.record(model, event)
    except BaseException:
        _restore_history(model, history_before)
        for obj, attr, value in reversed(undo_attrs):
            setattr(obj, attr, value)
        for u in reversed(undo_vars):
            _vars.restore(u)
        try:
            for o in opts:
                _optim.rekey(o, {})
            for m in models:
                _vars.retrack(m)
        finally:
            raise
    return event


_ABSENT = object()


def _history_state(model) -> tuple:
    return model.__class__, {k: vars(model).get(k, _ABSENT) for k in ("_fastsplit_history", "get_config")}


def _restore_history(model, state) -> None:
    cls, attrs = state
    model.__class__ = cls
    for k, v in attrs.items():
        if v is _ABSENT:
            vars(model).pop(k, None)
        else:
            vars(model)[k] = v


def _itemsize(var) -> int:
    name = str(var.dtype)
    return 2 if name == "bfloat16" else np.dtype(name).itemsize


def _out(arr, steps):
    """A preallocated, 64-byte aligned result for a CPU job (None on the GPU: CuPy allocates aligned)."""
    if not isinstance(arr, np.ndarray):
        return None
    shape = list(arr.shape)
    for axis, p, _role, _ch in steps:
        shape[axis] = new_length(shape[axis], p)
    return aligned_empty(tuple(shape), arr.dtype)


def run_kernels(split: list, backend: str, run=None) -> int:
    """Write every entry's new array into ``entry.value``; returns the number of ``run`` calls.

    One call, plus one for each further pair of axes of a tensor split on more than two (an
    attention kernel ``(d_model, heads, key_dim)`` with all three growing); ``entry.factor``
    goes to its first call.

    Each entry's steps read ``entry.base`` when it is set, else ``entry.native.array``. ``run`` makes the
    new arrays from a list of jobs: ``fastsplit.split_many`` when None (looked up at each call),
    ``fastsplit.compact.compact_many`` for prune and merge. A kernel that consumes one group and
    produces another is one two-axis job (``Job.also``): gathered on both axes in one pass, with no
    intermediate array.
    """
    if run is None:
        run = _core.split_many
    pending = [(e, e.native.array if e.base is None else e.base, list(e.steps), e.factor) for e in split]
    calls = 0
    while pending:  # a tensor split on three axes or more (an attention kernel): two axes a call
        jobs = []
        for _e, x, steps, factor in pending:
            (axis, plan, role, channels), *more = steps
            also = (more[0][1], more[0][0], more[0][2], more[0][3]) if more else None
            jobs.append(_core.Job(x, plan, axis, role, channels, _out(x, steps[:2]), also=also, factor=factor))
        later = []
        for (e, _x, steps, _f), arr in zip(pending, run(jobs, backend=backend), strict=True):
            if len(steps) > 2:
                later.append((e, arr, steps[2:], 1.0))
            else:
                e.value = arr
        calls += 1
        pending = later
    return calls


# -- the swap: widths, configs and shapes ------------------------------------------------------------------


def update_graph(graph: Graph, plans: dict, setattr_undo, done: set | None = None) -> None:
    """Layer widths and configs, symbolic tensor shapes, input specs and build shapes after the swap.

    ``done`` holds the config entries already rewritten by another graph over the same layers (a model
    that holds them too): each is rewritten once.
    """
    find = graph.find
    done = set() if done is None else done
    for obj, attr, ref, index in graph.configs:
        p = evaluate(ref, plans, find)
        if p is None or (id(obj), attr, index) in done:
            continue
        done.add((id(obj), attr, index))
        value = getattr(obj, attr)
        if index is None:
            setattr_undo(obj, attr, new_length(int(value), p))
        elif value[index] not in (-1, None):
            items = list(value)
            items[index] = new_length(int(items[index]), p)
            setattr_undo(obj, attr, type(value)(items))
    _update_user_configs(graph, plans, setattr_undo, done)
    new_shapes = {}
    for key in dict.fromkeys(graph.shape_tensors):
        lab = graph.labels[key]
        p = evaluate(lab.ref, plans, find)
        if p is None:
            continue
        shape = list(graph.tensors[key].shape)
        shape[lab.units.axis] = new_length(shape[lab.units.axis], p)
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
        if old == new:
            continue
        _fix_input_spec(layer, old, new, setattr_undo)
        _fix_build_shapes(layer, old, new, setattr_undo)


def _update_user_configs(graph: Graph, plans: dict, setattr_undo, done: set) -> None:
    """A user's layer (looked into, or with a registered rule) keeps its widths in its own config
    (``LayerScale(projection_dim)``, ``Block(units)``): every integer config entry equal to the old length
    of an axis the edit changes inside the layer, and held by the attribute of that name, takes the new
    length, so the layer saves and loads at its new size. An entry whose old length maps to two new
    lengths is left alone."""
    for path, layer in graph.user_layers.items():
        if (id(layer), "config", None) in done:
            continue
        done.add((id(layer), "config", None))
        changes: dict = {}
        for use in graph.uses:
            if use.path == path or use.path.startswith(path + "/"):
                p = evaluate(use.ref, plans, graph.find)
                if p is not None:
                    changes.setdefault(use.length, set()).add(new_length(use.length, p))
        if not changes:
            continue
        try:
            config = layer.get_config()
        except (NotImplementedError, AttributeError):  # keras_hub 0.32's LlamaTransformerDecoder reads an
            continue  # attribute it never sets: no config to follow (its backbone's config rebuilds it)
        for key, value in config.items():
            prop = getattr(type(layer), key, None)
            if isinstance(prop, property) and prop.fset is None:
                continue  # read-only (MultiHeadAttention.key_dim): the layer's rule records its own config
            if (isinstance(value, int) and not isinstance(value, bool) and len(changes.get(value, ())) == 1
                    and getattr(layer, key, None) == value):
                setattr_undo(layer, key, next(iter(changes[value])))


def _fix_input_layer(kt, new_shape, setattr_undo):
    hist = getattr(kt, "_keras_history", None)
    op = getattr(hist, "operation", None) if hist is not None else None
    if op is not None and type(op).__name__ == "InputLayer" and tuple(op._batch_shape) != tuple(new_shape):
        setattr_undo(op, "_batch_shape", tuple(new_shape))


def _fix_input_spec(layer, old, new, setattr_undo):
    spec = getattr(layer, "input_spec", None)
    if spec is None:
        return
    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    if len(specs) == len(old):
        pairs = list(zip(specs, zip(old, new, strict=False), strict=False))
    else:
        pairs = [(s, (old[0], new[0])) for s in specs]
    changed = False
    new_specs = []
    for s, (o, n) in pairs:
        s2 = s
        axes = getattr(s, "axes", None)
        if axes:
            rank = len(o)
            fixed = {}
            for a, v in axes.items():
                i = a % rank
                fixed[a] = n[i] if (v is not None and o[i] == v and o[i] != n[i]) else v
            if fixed != axes:
                s2 = copy.copy(s)
                s2.axes = fixed
                changed = True
        if getattr(s, "shape", None) is not None and tuple(s.shape) == tuple(o):
            s2 = copy.copy(s2) if s2 is s else s2
            s2.shape = tuple(n)
            changed = True
        new_specs.append(s2)
    if changed:
        value = new_specs if isinstance(spec, (list, tuple)) else new_specs[0]
        setattr_undo(layer, "input_spec", value)


def _fix_build_shapes(layer, old, new, setattr_undo):
    d = getattr(layer, "_build_shapes_dict", None)
    if not d:
        return
    it = iter(range(len(old)))

    def fix(v):
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, (list, tuple)) for x in v):
            return type(v)(fix(x) for x in v)
        if isinstance(v, (list, tuple)):
            i = next(it, None)
            if i is not None and tuple(v) == old[i]:
                return type(v)(new[i])
            return v
        return v

    fixed = {k: fix(v) for k, v in d.items()}
    setattr_undo(layer, "_build_shapes_dict", fixed)


__all__ = ["Edit", "Entry", "apply", "backend_used", "check_args", "check_number", "collect", "count_params", "lookup", "reset_functions",
           "run_kernels", "sync_jax", "update_graph"]
