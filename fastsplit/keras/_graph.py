"""The graph walk: which units of a Keras model must be split together.

The model is flattened into one list of :class:`Op` (one per call of a layer
or ``keras.ops`` operation): nested Functional and Sequential models are
inlined, and a layer that has no rule (a user's subclassed block) is looked
into by tracing its ``call`` on symbolic inputs. Then every op, in
topological order, goes through the rule of its class (``_rules``), which
labels its output with where the split units sit and records every variable
that a split touches as a :class:`Use`. A *group* is a set of producing
layers whose units must share one plan: a layer alone, or every producer
feeding a residual stream. Everything here depends on the graph only, never
on variable values.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..plan import SplitPlan
from ._errors import GrowthError
from ._rules import ELEMENTWISE, rule_for
from ._units import (
    ConcatRef,
    CoupledGroup,
    GroupRef,
    Label,
    Op,
    TensorInfo,
    Units,
    Use,
    groups_of,
)


def _model_classes():
    import keras
    from keras.src.models.functional import Functional

    return (keras.Sequential, Functional)


def _is_graph_model(layer) -> bool:
    """A Functional or Sequential model (or fastsplit's registered subclasses of them), whose graph is known."""
    from ._history import GrownFunctional, GrownSequential

    seq, fn = _model_classes()
    if type(layer) in (seq, fn, GrownFunctional, GrownSequential):
        return True
    # a Functional subclass that keeps Functional's call (keras_hub backbones): its graph is the model
    return isinstance(layer, fn) and not isinstance(layer, seq) and type(layer).call is fn.call


def _traceable(layer) -> bool:
    """A user's layer (no rule, not one of Keras' own layers): its ``call`` is traced."""
    import keras

    module = type(layer).__module__
    return isinstance(layer, keras.layers.Layer) and not module.startswith(("keras.src.layers", "keras.layers"))


class _recorded_constant_calls:
    """While a layer is traced, its sublayers called on constants only (``pos_emb(ops.arange(n))``, as in the
    keras.io ``TokenAndPositionEmbedding``) are recorded as graph nodes with no input tensor, not run: their
    output then depends on their weights, which a split may change. A sublayer whose ``compute_output_spec``
    does not take an argument of its ``call`` (keras_hub's ``CachedMultiHeadAttention(cache=None)``) gets the
    others."""

    def __init__(self, sublayers):
        self.sublayers = [s for s in sublayers if getattr(s, "built", False)]

    def __enter__(self):
        from keras.src.backend import any_symbolic_tensors
        from keras.src.ops.node import Node

        def wrap(sub, plain, inside):
            def call(*args, **kwargs):
                if inside or any_symbolic_tensors(args, kwargs):
                    return plain(*args, **kwargs)
                inside.append(True)
                try:
                    outputs = sub.compute_output_spec(*args, **kwargs)
                    Node(operation=sub, call_args=args, call_kwargs=kwargs, outputs=outputs)
                    return outputs
                finally:
                    inside.pop()

            return call

        def spec(plain, inside):
            import inspect

            params = inspect.signature(plain).parameters
            keep = any(p.kind == p.VAR_KEYWORD for p in params.values())

            def compute_output_spec(*args, **kwargs):  # a subclass's extra call arguments left at None
                # its call (and its sublayers') runs inside on the backend's abstract values (JAX tracers),
                # which are no constants to record (LlamaLayerNorm has no compute_output_shape)
                inside.append(True)
                try:
                    if keep:
                        return plain(*args, **kwargs)
                    return plain(*args, **{k: v for k, v in kwargs.items() if k in params or v is not None})
                finally:
                    inside.pop()

            return compute_output_spec

        inside: list = []  # set while a sublayer computes its output spec: nested calls are its own
        for sub in self.sublayers:
            vars(sub)["call"] = wrap(sub, sub.call, inside)
            vars(sub)["compute_output_spec"] = spec(sub.compute_output_spec, inside)
        return self

    def __exit__(self, *exc):
        for sub in self.sublayers:
            vars(sub).pop("call", None)
            vars(sub).pop("compute_output_spec", None)
        return False


#: the length a traced call sees for an unknown axis (batch, sequence), when it cannot be traced without one
_STAND_IN = 7


def _act_name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


class Graph:
    """The flattened graph of a Functional or Sequential model, labelled with unit groups.

    Rules (``_rules``) call the methods under "the rule API" below.
    """

    def __init__(self, model):
        self.model = model
        self.ops: list[Op] = []
        self.tensors: dict = {}
        self.alias: dict = {}  # tensor key -> canonical key (nested model and traced layer boundaries)
        self.model_inputs: list = []
        self.model_outputs: list = []
        self.layer_paths: dict = {}  # id(layer) -> path
        self.nested: list = []  # (nested model, None, outer input keys)
        self.opaque: dict = {}  # id(op) -> why its call could not be looked into
        self.user_layers: dict = {}  # path -> a user's layer that was looked into or has a registered rule
        self.lost_offsets: list = []  # (gid, path, why): where a "nudge" offset cannot act
        self.centering: list = []  # (op, label): ops that subtract each unit's own mean
        self._calls: dict = {}  # id(nested model) -> how often the model's graph calls it
        self._direct_reads: dict = {}  # id(layer) -> paths of traced layers that hold it but do not call it
        self._count_calls(model)
        self._build(model, prefix="", outer_inputs=None, outer_outputs=None, top=True)
        self._parent = {}
        self.labels: dict = {}
        self.uses: list[Use] = []
        self.producers: dict = {}  # gid -> [(path, layer)]
        self.producer_ops: dict = {}  # path -> first Op of each producing layer
        self.group_width: dict = {}
        self.refusals: dict = {}  # gid -> [reason]
        self.uniform_layers: dict = {}  # gid -> [(path, ref, units)]
        self.in_place_layers: dict = {}  # gid -> [path]
        self.touched: dict = {}  # gid -> ordered dict path -> layer
        self.consumers: dict = {}
        self.configs: list = []  # (object, attribute, ref, index): widths in layer configs
        self.shape_tensors: list = []  # tensor keys whose unit axis may change
        self.layer_inputs: list = []  # (layer, node, input keys) for input specs / build shapes
        self._producer_gid: dict = {}
        self._label()

    # -- building the flat graph ------------------------------------------------------------------------

    def canon(self, key):
        while key in self.alias:
            key = self.alias[key]
        return key

    def _add_tensor(self, kt):
        key = id(kt)
        if key not in self.tensors:
            self.tensors[key] = TensorInfo(key, tuple(kt.shape), kt)
        return key

    def _build(self, model, prefix, outer_inputs, outer_outputs, top):
        fn = model
        seq, _ = _model_classes()
        if isinstance(model, seq):
            fn = model._functional
            if fn is None:
                raise GrowthError(
                    f"Sequential model {model.name!r} has no graph yet: build it (give it an Input or call "
                    "build/fit) before widening"
                )
        elif not _is_graph_model(model):
            raise GrowthError(
                f"fastsplit needs a Functional or Sequential model; {model.name!r} is a subclassed "
                f"{type(model).__name__}, whose graph fastsplit cannot see. Call it inside a Functional model "
                "(its blocks are then looked into) or rebuild it with the functional API"
            )
        inputs = [self._add_tensor(t) for t in fn.inputs]
        outputs = [self._add_tensor(t) for t in fn.outputs]
        if top:
            self.model_inputs = inputs
            self.model_outputs = outputs
        else:
            for o, i in zip(outer_inputs, inputs, strict=False):
                self.alias[i] = o
            for o, i in zip(outer_outputs, outputs, strict=False):
                self.alias[o] = i
        for d in sorted(fn._nodes_by_depth.keys(), reverse=True):
            for node in fn._nodes_by_depth[d]:
                self._add_node(node, prefix)

    def _count_calls(self, model):
        seq, _ = _model_classes()
        fn = model._functional if isinstance(model, seq) else model
        for nodes in getattr(fn, "_nodes_by_depth", {}).values():
            for node in nodes:
                layer = node.operation
                if _is_graph_model(layer):
                    self._calls[id(layer)] = self._calls.get(id(layer), 0) + 1
                    if self._calls[id(layer)] == 1:
                        self._count_calls(layer)

    def _add_node(self, node, prefix):
        layer = node.operation
        if type(layer).__name__ == "InputLayer" or (getattr(node, "is_input", False) and not layer.weights):
            return  # a layer with weights called on constants only is kept (_recorded_constant_calls)
        path = prefix + layer.name
        self.layer_paths.setdefault(id(layer), path)
        ins = [self._add_tensor(t) for t in node.input_tensors]
        outs = [self._add_tensor(t) for t in node.output_tensors]
        op = Op(layer, path, ins, outs, node)
        if _is_graph_model(layer):
            if self._calls.get(id(layer), 0) > 1:  # its tensors cannot hold two calls' units: not looked into
                self.opaque[id(op)] = f"the model is called {self._calls[id(layer)]} times in this graph"
                self.ops.append(op)
                return
            self.nested.append((layer, None, ins))
            self._build(layer, path + "/", ins, outs, top=False)
            return
        if rule_for(layer) is None and _traceable(layer):
            try:
                self._trace(op)
                return
            except Exception as exc:  # noqa: BLE001 - any failure of a user's call means "cannot look into it"
                self.opaque[id(op)] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if any(None in tuple(kt.shape)[1:] for kt in node.input_tensors):
                try:  # a call that needs its batch and sequence lengths (a causal mask): traced at stand-ins
                    self._trace(op, unknown=_STAND_IN)
                    del self.opaque[id(op)]
                    return
                except Exception:  # noqa: BLE001, S110 - the first failure is the one reported
                    pass
        self.ops.append(op)

    def _trace(self, op, unknown=None):
        """Inline a user's layer: call its ``call`` on fresh symbolic inputs and add the nodes it records.

        ``unknown``: the length given to unknown axes, the batch's too (None: left unknown).
        """
        from keras import KerasTensor

        layer, node = op.layer, op.node

        def shape(kt):
            dims = tuple(kt.shape)
            return dims if unknown is None else tuple(unknown if d is None else d for d in dims)

        fresh = {id(kt): KerasTensor(shape(kt), dtype=kt.dtype) for kt in node.input_tensors}
        args, kwargs = node.arguments.fill_in(fresh)
        if getattr(layer, "_call_has_training_arg", False):
            kwargs["training"] = False
        touched = [layer, *layer._flatten_layers(include_self=False, recursive=True)]
        saved = [(lay, len(lay._inbound_nodes), len(lay._outbound_nodes)) for lay in touched]
        try:
            with _recorded_constant_calls(touched[1:]):
                result = layer.call(*args, **kwargs)
            outs = result if isinstance(result, (list, tuple)) else [result]
            if len(outs) != len(op.outputs) or not all(isinstance(t, KerasTensor) for t in outs):
                raise GrowthError("its call returned something other than its output tensors")
            nodes = self._recorded_nodes(outs, {id(t) for t in fresh.values()})
        finally:
            for lay, n_in, n_out in saved:
                del lay._inbound_nodes[n_in:]
                del lay._outbound_nodes[n_out:]
        for outer, kt in fresh.items():
            self._add_tensor(kt)
            self.alias[id(kt)] = outer
        for outer, kt in zip(op.outputs, outs, strict=False):
            self._add_tensor(kt)
            self.alias[outer] = id(kt)
        self.user_layers[op.path] = layer
        called = {id(n.operation) for n in nodes}
        for sub in touched[1:]:
            if id(sub) not in called and sub.weights and not any(
                    id(c) in called for c in touched[1:] if sub in c._flatten_layers(include_self=False)):
                self._direct_reads.setdefault(id(sub), []).append(op.path)  # its weights, if used, are read directly
        for n in nodes:
            self._add_node(n, op.path + "/")

    @staticmethod
    def _recorded_nodes(outputs, inputs: set) -> list:
        """The nodes between ``inputs`` (tensor ids) and ``outputs``, each once."""
        seen, order, stack = set(), [], list(outputs)
        while stack:
            kt = stack.pop()
            if id(kt) in inputs:
                continue
            hist = getattr(kt, "_keras_history", None)
            if hist is None or hist.operation is None:
                raise GrowthError("its output depends on a tensor that is not one of its inputs")
            n = hist.operation._inbound_nodes[hist.node_index]
            if id(n) in seen:
                continue
            seen.add(id(n))
            order.append(n)
            stack.extend(n.input_tensors)
        return order

    # -- labelling -------------------------------------------------------------------------------------

    def find(self, gid):
        while self._parent.get(gid, gid) != gid:
            gid = self._parent[gid]
        return gid

    def _union(self, a, b):
        a, b = self.find(a), self.find(b)
        if a != b:
            self._parent[max(a, b)] = min(a, b)
        return min(a, b)

    def _touch(self, ref, path, layer):
        for g in groups_of(ref, self.find):
            self.touched.setdefault(g, {}).setdefault(path, layer)

    def shape(self, key):
        return self.tensors[self.canon(key)].shape

    def _label(self):
        order = self.topological()
        consumers_of: dict = {}
        for op in order:
            for k in op.inputs:
                consumers_of.setdefault(self.canon(k), []).append(op)
        self.consumers_of = consumers_of  # tensor key -> the ops that read it
        calls: dict = {}  # id(layer) -> [(op, input labels, output label)]
        reads: dict = {}  # id(variable) -> ops that take it as an argument (keras.ops calls)
        for op in order:
            for _name, value in self._constants(op):
                if hasattr(value, "path"):
                    reads.setdefault(id(value), []).append(op)
            ins = [self.canon(k) for k in op.inputs]
            outs = [self.canon(k) for k in op.outputs]
            in_labels = [self.labels.get(k) for k in ins]
            carried = any(lab is not None for lab in in_labels)
            rule = rule_for(op.layer)
            out_label = None
            if rule is None:
                if carried:
                    self._no_rule(op, in_labels)
            elif carried or rule.produces:
                out_label = rule.fn(self, op, in_labels)
            for k in outs:
                if out_label is not None:
                    self.labels[k] = out_label
                    self.shape_tensors.append(k)
            if carried:
                self.layer_inputs.append((op.layer, op.node, ins))
            calls.setdefault(id(op.layer), []).append((op, in_labels, out_label))
        self._check_repeated(calls)
        self._check_reads(reads)
        self._place_offsets()
        for k in self.model_outputs:
            lab = self.labels.get(self.canon(k))
            if lab is not None:
                self.refuse(lab, "its units reach the model output, whose shape would change")

    def _no_rule(self, op, labels):
        name = type(op.layer).__name__
        if id(op) in self.opaque:
            why = (f"layer {op.path!r} ({name}) could not be looked into ({self.opaque[id(op)]}); register a rule "
                   "for it with fastsplit.keras.register_rule")
        else:
            why = (f"layer {op.path!r} ({name}) is not supported on the path of split units: fastsplit cannot prove "
                   "that copying units keeps its function (fastsplit.keras.register_rule adds a rule)")
        self.refuse(labels, why)

    def topological(self) -> list[Op]:
        """The ops, each after the ops that produce its inputs."""
        produced_by = {}
        for op in self.ops:
            for k in op.outputs:
                produced_by[self.canon(k)] = op
        done, order, seen = set(), [], set()

        def visit(op):
            if id(op) in done:
                return
            if id(op) in seen:
                raise GrowthError(f"the graph has a cycle at layer {op.path!r}")
            seen.add(id(op))
            for k in op.inputs:
                p = produced_by.get(self.canon(k))
                if p is not None:
                    visit(p)
            done.add(id(op))
            order.append(op)

        for op in self.ops:
            visit(op)
        return order

    # -- the rule API ----------------------------------------------------------------------------------

    def in_shape(self, op, i: int = 0) -> tuple:
        """The shape of ``op``'s ``i``-th input tensor (batch axis first, None where unknown)."""
        return self.shape(op.inputs[i])

    def out_shape(self, op, i: int = 0) -> tuple:
        return self.shape(op.outputs[i])

    @staticmethod
    def channel_axis(layer, rank):
        """The axis of a rank-``rank`` tensor that holds ``layer``'s channels (its ``data_format``)."""
        fmt = getattr(layer, "data_format", "channels_last")
        return 1 if fmt == "channels_first" else rank - 1

    @staticmethod
    def weights(layer) -> dict:
        """``{short name: variable}`` of a layer's own weights."""
        return {w.path.rsplit("/", 1)[-1]: w for w in layer.weights}

    def width_of(self, ref) -> int:
        """The length of a unit axis that holds ``ref`` once (positions apart)."""
        if isinstance(ref, GroupRef):
            return ref.width * ref.expand
        return sum(width for _, width in ref.parts)

    def refuse(self, labels, why: str):
        """Mark every group in ``labels`` (a Label, or a list with Nones) as not splittable; returns None."""
        for lab in labels if isinstance(labels, (list, tuple)) else [labels]:
            if lab is not None:
                for g in groups_of(lab.ref, self.find):
                    self.refusals.setdefault(g, []).append(why)
        return None

    def produce(self, op, width, kernel, kernel_axis: int, bias, attr: str | None, *, axis: int = -1,
                refused: str | None = None, dim: str | None = None, bias_axis: int = 0) -> Label:
        """``op``'s layer makes ``width`` units of its own on ``axis`` of its output: a new group.

        ``kernel``'s axis ``kernel_axis`` is copied (role incoming), ``bias`` too (with the
        symmetry offsets), and the config attribute ``attr`` follows the width. A layer called
        several times (shared) is one group. ``refused`` lists it with that reason. A layer with
        more than one growable dimension names each (``dim``, e.g. ``"heads"``): the group is then
        called ``path/dim`` wherever groups are named (``coupled_groups``, ``widen``, ``layers=``).
        ``bias_axis`` is the bias's unit axis (a GRU's ``(2, 3 * units)`` bias: -1); ``attr=None``
        records no config attribute (the rule records its own with ``config``).
        """
        layer, path = op.layer, op.path
        name = path if dim is None else f"{path}/{dim}"
        g = self._producer_gid.get((id(layer), dim))
        if g is None:
            g = self._producer_gid[(id(layer), dim)] = len(self._producer_gid)
            width = int(width)
            self.group_width[g] = width
            self.producers.setdefault(g, []).append((name, layer))
            self.producer_ops[name] = op
            ref = GroupRef(g, width)
            if refused:
                self.refusals.setdefault(g, []).append(refused)
            self.check_activation(op, Label(ref, Units(-1, 0)))
            if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
                self.refusals.setdefault(g, []).append(f"layer {path!r} uses LoRA or quantization")
            self.uses.append(Use(layer, path, "kernel", kernel, kernel_axis, "incoming", ref))
            if bias is not None:
                self.uses.append(Use(layer, path, "bias", bias, bias_axis, "bias", ref))  # _place_offsets may move it
            if attr is not None:
                self.config(layer, attr, ref)
        ref = GroupRef(g, self.group_width[g])
        rank = len(self.out_shape(op))
        self._touch(ref, path, layer)
        return Label(ref, Units(axis % rank, rank))

    def incoming(self, op, label: Label, var, axis: int, attr: str) -> None:
        """Another weight of ``op``'s producing layer makes the units of ``label`` (the label ``produce``
        returned): its axis ``axis`` is split like the kernel's (role incoming; a recurrent kernel)."""
        self.uses.append(Use(op.layer, op.path, attr, var, axis, "incoming", label.ref))
        self._touch(label.ref, op.path, op.layer)

    def consume(self, op, label: Label, var, axis: int, *, attr: str = "kernel", fold: bool = True) -> None:
        """``var``'s axis ``axis`` reads the units of ``label`` (role outgoing: rows scaled by the ratios)."""
        self.uses.append(Use(op.layer, op.path, attr, var, axis, "outgoing", label.ref, label.units.channels, fold))
        self._touch(label.ref, op.path, op.layer)
        for g in groups_of(label.ref, self.find):
            self.consumers.setdefault(g, {}).setdefault(op.path, op.layer)

    def state(self, op, label: Label, weights: dict, axis: int) -> None:
        """Per-unit weights (``{name: variable}``), copied with the units along ``axis``.

        A centring normaliser's ``beta`` may take the symmetry offsets instead (``_place_offsets``).
        """
        if _traceable(op.layer):
            self.user_layers.setdefault(op.path, op.layer)  # its config may hold the width
        for name, w in weights.items():
            self.uses.append(Use(op.layer, op.path, name, w, axis, "state", label.ref, label.units.channels))
        self._touch(label.ref, op.path, op.layer)

    def centers(self, op, label: Label) -> None:
        """``op`` subtracts each unit's own mean (over the batch or the positions): an offset added to a unit
        before it is lost in training, so the "nudge" offsets go to its ``beta`` (``_place_offsets``)."""
        self.centering.append((op, label))

    def uniform(self, op, label: Label) -> None:
        """``op`` normalises across the units: exact only when every unit gets the same number of copies."""
        for g in groups_of(label.ref, self.find):
            self.uniform_layers.setdefault(g, []).append((op.path, label.ref, label.units))
        self._touch(label.ref, op.path, op.layer)

    def in_place(self, op, label: Label) -> None:
        """``op`` reads each unit at its position on the axis (a rotary embedding's frequencies): a split must
        give every unit the same number of copies, right after it (``_units.in_place``); its consumers read the
        first copy only (``GroupRef.first``); removing or merging units is refused."""
        for g in groups_of(label.ref, self.find):
            self.in_place_layers.setdefault(g, []).append(op.path)
        self._touch(label.ref, op.path, op.layer)

    def config(self, obj, attr: str, ref, *, index: int | None = None) -> None:
        """The config attribute ``obj.attr`` (or its entry ``index``) counts the units of ``ref``."""
        self.configs.append((obj, attr, ref, index))

    def check_activation(self, op, label: Label) -> None:
        act = getattr(op.layer, "activation", None)
        if act is not None and _act_name(act) not in ELEMENTWISE:
            self.refuse(label, f"layer {op.path!r} applies activation {_act_name(act)!r} across its units; only "
                               "elementwise activations keep the function when units are copied")

    def merge(self, op, labels):
        """An elementwise combination (``Add``, ``x * s``, ...): every input's units share one plan.

        An input without split units is fine when it broadcasts along the unit axis (length 1
        there); a variable argument with the unit axis's length is per-unit state.
        """
        lab = next(lb for lb in labels if lb is not None)
        out_rank = len(self.out_shape(op))
        u = lab.units
        n = self.in_shape(op, labels.index(lab))[u.axis]
        for i, lb in enumerate(labels):
            if lb is None and self._along(self.in_shape(op, i), u) not in (1, None):
                return self.refuse(labels, f"layer {op.path!r} ({type(op.layer).__name__}) combines split units with "
                                           "a tensor that no widenable layer produces (a model input or an "
                                           "unsupported layer)")
        for name, value in self._constants(op):
            along = self._along(tuple(getattr(value, "shape", ())), u)
            if along in (1, None):
                continue
            if along != n or not hasattr(value, "path") or len(value.shape) == 0:
                return self.refuse(labels, f"{op.path!r} combines split units with a constant {name!r} of shape "
                                           f"{tuple(value.shape)}")
            self.state(op, lab, {name: value}, len(value.shape) - (u.rank - u.axis))
        others = [lb for lb in labels if lb is not None and lb is not lab]
        for lb in others:
            if not (isinstance(lb.ref, GroupRef) and isinstance(lab.ref, GroupRef)):
                return self.refuse(labels, f"layer {op.path!r} combines a concatenation of units with another stream")
            if (lb.units.rank - lb.units.axis, lb.units.positions, lb.units.channels, lb.ref.expand) != (
                    u.rank - u.axis, u.positions, u.channels, lab.ref.expand):
                return self.refuse(labels, f"layer {op.path!r} combines tensors whose units sit on different axes")
        for lb in others:
            self._union(lab.ref.gid, lb.ref.gid)
        ref = GroupRef(self.find(lab.ref.gid), lab.ref.width, lab.ref.expand) if others else lab.ref
        self._touch(ref, op.path, op.layer)
        return Label(ref, dataclasses.replace(u, axis=u.axis + out_rank - u.rank, rank=out_rank))

    @staticmethod
    def _along(shape, u: Units):
        """The length of a broadcast operand along the unit axis (None: it has no such axis)."""
        k = u.rank - u.axis
        return None if len(shape) < k else shape[len(shape) - k]

    @staticmethod
    def _constants(op):
        """``(name, value)`` of the array arguments of a ``keras.ops`` call that are not graph tensors."""
        if op.node is None:
            return []
        from keras import KerasTensor

        out = []
        values = list(op.node.arguments.args) + list(op.node.arguments.kwargs.values())
        for i, v in enumerate(values):
            if not isinstance(v, KerasTensor) and hasattr(v, "shape") and hasattr(v, "dtype"):
                out.append((getattr(v, "name", f"argument {i}"), v))
        return out

    def regroup(self, label: Label, n: int) -> bool:
        """Read a producer's ``width`` units as ``width // n`` positions of ``n`` units (a Dense reshaped to
        ``(H, W, n)`` grows by channels). Only for a group of one producer whose units no concatenation holds."""
        ref = label.ref
        if not isinstance(ref, GroupRef) or ref.expand != 1 or label.units.channels != "last":
            return False
        g = self.find(ref.gid)
        if any(self.find(m) == g and m != g for m in self.group_width) or len(self.producers.get(g, [])) != 1:
            return False
        if any(isinstance(lb.ref, ConcatRef) and g in groups_of(lb.ref, self.find) for lb in self.labels.values()):
            return False
        factor = ref.width // n
        new = GroupRef(g, n)
        self.group_width[g] = n
        for lb in {id(x): x for x in [*self.labels.values(), label]}.values():
            if lb.ref == ref:
                lb.ref = new
                lb.units = dataclasses.replace(lb.units, positions=lb.units.positions * factor)
        for use in self.uses:
            if use.ref == ref:
                use.ref = new
        self.configs = [(o, a, new if r == ref else r, i) for o, a, r, i in self.configs]
        return True

    def unitwise(self, layer) -> bool:
        """Whether each output unit of ``layer`` is a function of the same input unit only."""
        rule = rule_for(layer)
        return rule is not None and rule.unitwise

    # -- checks after the walk ---------------------------------------------------------------------------

    def _sig(self, lab):
        if lab is None:
            return None

        def ref_sig(ref):
            if ref is None or isinstance(ref, GroupRef):
                return ref and (self.find(ref.gid), ref.width, ref.expand)
            return tuple((ref_sig(sub), width) for sub, width in ref.parts)

        return ref_sig(lab.ref), lab.units

    def _check_repeated(self, calls: dict) -> None:
        """A layer called several times has one set of weights: every call must see the units alike
        (``d(d(x))`` or one BatchNormalization on two streams would follow a split of one call only)."""
        for entries in calls.values():
            if len(entries) < 2:
                continue
            if len({(tuple(self._sig(lb) for lb in ins), self._sig(out)) for _op, ins, out in entries}) > 1:
                op = entries[0][0]
                self.refuse([lb for _op, ins, out in entries for lb in (*ins, out)],
                            f"layer {op.path!r} is called {len(entries)} times on tensors whose units differ: its one "
                            "set of weights cannot follow a split seen by only some of its calls")

    def _check_reads(self, reads: dict) -> None:
        """A weight read directly by another op (tied weights: ``ops.matmul(h, ops.transpose(self.src.kernel))``)
        changes shape under that op too: refused unless the op's own rule took it into account."""
        known = {(id(u.var), u.path) for u in self.uses}
        for use in self.uses:
            readers = [op.path for op in reads.get(id(use.var), []) if (id(use.var), op.path) not in known]
            readers += self._direct_reads.get(id(use.layer), [])
            for path in readers:
                self.refuse(Label(use.ref, Units(0, 1)),
                            f"{path!r} reads the weight {use.path}/{use.attr} directly (tied weights), which a split "
                            "would reshape under it")

    def _place_offsets(self) -> None:
        """Where each group's "nudge" offsets go. An offset added to a unit before an op that subtracts each
        unit's own mean (BatchNormalization, one-channel groups) is lost in training, so it goes to the
        ``beta`` of the last such op on each path to the consumers; with no ``beta`` there (``center=False``)
        the nudge cannot act. With no such op, the producers' biases take it."""
        roots = {self.find(g) for g in self.group_width}
        for root in sorted(roots):
            producers = [lay for g in self.group_width if self.find(g) == root for _p, lay in self.producers.get(g, [])]
            norms = [op for op, lab in self.centering if root in groups_of(lab.ref, self.find)]
            if not norms:
                for g in self.group_width:
                    for path, layer in self.producers.get(g, []) if self.find(g) == root else []:
                        if not any(u.layer is layer and u.kind == "bias" for u in self.uses):
                            self.lost_offsets.append((root, path, f"layer {path!r} has no bias and no normalisation "
                                                                  "after it"))
                continue
            reached = {id(op): self._reached(op, root) for op in norms}
            last = [op for op in norms if not any(id(o) in reached[id(op)] for o in norms if o is not op)]
            for use in self.uses:
                if use.kind == "bias" and any(use.layer is lay for lay in producers):
                    use.kind = "state"
            for op in last:
                betas = [u for u in self.uses
                         if u.layer is op.layer and u.attr == "beta" and root in groups_of(u.ref, self.find)]
                for u in betas:
                    u.kind = "bias"
                if not betas:
                    self.lost_offsets.append((root, op.path, f"layer {op.path!r} subtracts each unit's mean and has "
                                                             "no beta (center=False) to carry the offsets"))

    def _reached(self, start, root) -> set:
        """ids of the ops that the units of group ``root`` reach from ``start``'s output."""
        seen: set = set()
        consumers = {p for g, paths in self.consumers.items() if self.find(g) == root for p in paths}
        stack = [self.canon(k) for k in start.outputs]
        while stack:
            for op in self.consumers_of.get(stack.pop(), []):
                if id(op) in seen:
                    continue
                seen.add(id(op))
                if op.path in consumers:
                    continue  # its output holds new values, even where it is coupled to the same units
                for k in op.outputs:
                    lab = self.labels.get(self.canon(k))
                    if lab is not None and root in groups_of(lab.ref, self.find):
                        stack.append(self.canon(k))
        return seen

    # -- public view -----------------------------------------------------------------------------------

    def groups(self) -> list[CoupledGroup]:
        out = []
        roots: dict = {}
        for g in self.group_width:
            roots.setdefault(self.find(g), []).append(g)
        for root in sorted(roots):
            members = roots[root]
            producers = [p for g in members for p, _ in self.producers.get(g, [])]
            layers, consumers, refused, uniform, in_place = {}, {}, [], [], []
            for g in members:
                in_place += self.in_place_layers.get(g, [])
                layers.update(self.touched.get(g, {}))
                consumers.update(self.consumers.get(g, {}))
                refused += self.refusals.get(g, [])
                uniform += [p for p, _, _ in self.uniform_layers.get(g, [])]
            out.append(CoupledGroup(
                name=producers[0] if producers else "",
                producers=producers,
                width=self.group_width[root],
                layers=list(layers),
                consumers=list(consumers),
                refused=list(dict.fromkeys(refused)),
                uniform=list(dict.fromkeys(uniform)),
                in_place=list(dict.fromkeys(in_place)),
                gid=root,
            ))
        return out


def check_plan(plan, width: int, name: str) -> None:
    if not isinstance(plan, SplitPlan):
        raise GrowthError(
            f"the plan for {name!r} must be a SplitPlan, neuron indices or None, got {type(plan).__name__}")
    if plan.width != width:
        raise GrowthError(f"the plan for {name!r} has width {plan.width}, but the layer has {width} units")
    for what in ("ratio", "offset"):
        values = np.asarray(getattr(plan, what), dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise GrowthError(f"the plan for {name!r} has a non-finite {what}: {values[~np.isfinite(values)][:3]}")


__all__ = ["Graph", "check_plan"]
