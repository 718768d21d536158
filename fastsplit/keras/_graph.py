"""The graph walk: which units of a Keras model must be split together.

A *group* is a set of producing layers (Dense, Conv1D/2D/3D) whose output
units reach the same consumers, so they must be split with one plan: a layer
on its own, or every producer feeding a residual stream through ``Add`` and
friends. The walk labels every tensor of the (flattened, nested models
included) graph in topological order with where its unit axis comes from and
records every variable that the split of a group touches as a :class:`Use`.
Everything here depends on the graph only, never on variable values.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from .._errors import SplitError
from ..compact import CompactPlan
from ..compact import concat as compact_concat
from ..compact import identity as compact_identity
from ..plan import SplitPlan

# -- layer classes ---------------------------------------------------------------------------------------

_ELEMENTWISE = {
    "linear", "relu", "relu6", "sigmoid", "tanh", "elu", "selu", "gelu", "swish", "silu", "softplus",
    "softsign", "exponential", "hard_sigmoid", "hard_silu", "hard_swish", "leaky_relu", "mish", "celu",
    "sparse_plus", "squareplus", "soft_shrink", "hard_shrink", "tanh_shrink", "hard_tanh", "threshold",
}


def _keras_classes():
    import keras
    from keras import layers as L

    c = {}
    c["dense"] = (L.Dense,)
    c["conv"] = (L.Conv1D, L.Conv2D, L.Conv3D)
    c["depthwise"] = tuple(getattr(L, n) for n in ("DepthwiseConv1D", "DepthwiseConv2D") if hasattr(L, n))
    c["bn"] = (L.BatchNormalization,)
    c["ln"] = (L.LayerNormalization,)
    c["gn"] = (L.GroupNormalization,)
    c["prelu"] = (L.PReLU,)
    c["act"] = (L.Activation,)
    c["act_ew"] = (L.ReLU, L.LeakyReLU, L.ELU)
    c["softmax"] = (L.Softmax,)
    c["noop"] = tuple(
        getattr(L, n)
        for n in ("Dropout", "GaussianNoise", "GaussianDropout", "AlphaDropout", "Identity")
        if hasattr(L, n)
    )
    c["spatial_drop"] = (L.SpatialDropout1D, L.SpatialDropout2D, L.SpatialDropout3D)
    c["spatial"] = (
        L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D, L.AveragePooling1D, L.AveragePooling2D,
        L.AveragePooling3D, L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D, L.Cropping1D, L.Cropping2D,
        L.Cropping3D, L.UpSampling1D, L.UpSampling2D, L.UpSampling3D,
    )
    c["global"] = (
        L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D,
        L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D,
    )
    c["flatten"] = (L.Flatten,)
    c["reshape"] = (L.Reshape,)
    c["merge"] = (L.Add, L.Subtract, L.Multiply, L.Maximum, L.Minimum, L.Average)
    c["concat"] = (L.Concatenate,)
    c["input"] = (L.InputLayer,)
    from keras.src.models.functional import Functional

    from ._history import GrownFunctional, GrownSequential

    c["sequential"] = (keras.Sequential, GrownSequential)
    c["functional"] = (Functional, GrownFunctional)
    return c


_CLASSES: dict = {}


def classes() -> dict:
    if not _CLASSES:
        _CLASSES.update(_keras_classes())
    return _CLASSES


def _is(layer, kind: str) -> bool:
    """Exact-type membership: a user's subclass of Dense may override ``call``, so it is refused."""
    return type(layer) in classes()[kind]


def _act_name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


# -- plan expressions ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GroupRef:
    """The units of group ``gid``; each unit repeated ``expand`` times (DepthwiseConv multiplier)."""

    gid: int
    width: int
    expand: int = 1


@dataclasses.dataclass(frozen=True)
class ConcatRef:
    """A Concatenate along the unit axis: ``parts`` are (GroupRef | ConcatRef | None, width)."""

    parts: tuple


def _identity(width: int, like=None):
    """The plan that keeps all ``width`` units, of the kind of ``like`` (a SplitPlan unless it is a CompactPlan)."""
    if isinstance(like, CompactPlan):
        return compact_identity(width)
    return SplitPlan(width, np.arange(width), np.ones(width), np.zeros(width))


def expand_plan(plan, k: int):
    """Each unit ``u`` read as ``k`` consecutive channels ``u*k .. u*k+k-1`` (no bias offsets)."""
    if isinstance(plan, CompactPlan):
        return plan.expand(k)
    if k == 1:
        return plan
    q = np.arange(k)
    src = (plan.src[:, None] * k + q[None, :]).reshape(-1)
    ratio = np.repeat(plan.ratio, k)
    return SplitPlan(plan.width * k, src, ratio, np.zeros(src.shape[0]), plan.symmetry, plan.sigma, plan.seed)


def concat_plans(parts: list):
    """The plan of a concatenated axis: each part's new units take the place of its old ones."""
    if any(isinstance(p, CompactPlan) for p in parts):
        return compact_concat(parts)
    srcs, ratios, offsets, off = [], [], [], 0
    for p in parts:
        srcs.append(p.src + off)
        ratios.append(p.ratio)
        offsets.append(p.offset)
        off += p.width
    first = next((p for p in parts if not p.is_identity), parts[0])
    return SplitPlan(off, np.concatenate(srcs), np.concatenate(ratios), np.concatenate(offsets),
                     first.symmetry, first.sigma, first.seed)


def same_plan(a, b) -> bool:
    """Whether two plans (both SplitPlans or both CompactPlans) do the same to an axis."""
    if isinstance(a, CompactPlan) or isinstance(b, CompactPlan):
        return (type(a) is type(b) and a.width == b.width and np.array_equal(a.src, b.src)
                and a.merge == b.merge)
    return (a.width == b.width and np.array_equal(a.src, b.src) and np.array_equal(a.ratio, b.ratio)
            and np.array_equal(a.offset, b.offset))


def evaluate(ref, plans: dict, find):
    """The plan of a tensor's unit axis given the plans of the groups changed now (None: unchanged).

    ``plans`` maps root gids to :class:`SplitPlan` (widen) or :class:`fastsplit.CompactPlan` (prune,
    merge_twins), all of one kind; the result is of that kind.
    """
    if isinstance(ref, GroupRef):
        p = plans.get(find(ref.gid))
        return None if p is None else expand_plan(p, ref.expand)
    subs = [(None if sub is None else evaluate(sub, plans, find), width) for sub, width in ref.parts]
    like = next((p for p, _ in subs if p is not None), None)
    if like is None:
        return None
    parts = [_identity(width, like) if p is None else p for p, width in subs]
    if len(parts) == 1:
        return parts[0]
    return concat_plans(parts)


def groups_of(ref, find) -> set[int]:
    if ref is None:
        return set()
    if isinstance(ref, GroupRef):
        return {find(ref.gid)}
    out = set()
    for sub, _ in ref.parts:
        out |= groups_of(sub, find)
    return out


# -- graph records ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Units:
    """Where the units sit in a tensor: ``axis`` of a tensor of rank ``rank`` (batch axis 0).

    A flattened axis holds ``positions * width`` entries, read positions × units
    (``channels="last"``) or units × positions (``"first"``).
    """

    axis: int
    rank: int
    positions: int = 1
    channels: str = "last"


@dataclasses.dataclass
class Label:
    ref: Any  # GroupRef | ConcatRef
    units: Units


@dataclasses.dataclass
class Use:
    """One variable touched when the group(s) in ``ref`` are split.

    ``kind``: ``"incoming"`` (producer kernel, output axis), ``"bias"`` (producer
    bias or a normaliser's beta that carries the symmetry offsets), ``"state"``
    (per-unit parameter or statistic between producer and consumer, producing
    side) or ``"outgoing"`` (consumer kernel, input axis).
    """

    layer: Any
    path: str
    attr: str  # name of the weight in the layer (for messages)
    var: Any
    axis: int
    kind: str
    ref: Any
    channels: str = "last"


@dataclasses.dataclass
class Op:
    layer: Any
    path: str
    inputs: list  # tensor keys
    outputs: list
    node: Any = None


@dataclasses.dataclass
class TensorInfo:
    key: Any
    shape: tuple
    kt: Any = None  # the KerasTensor, when there is one


@dataclasses.dataclass
class CoupledGroup:
    """Units that must be split together (see ``coupled_groups``).

    Attributes:
        producers: paths of the layers whose output units form the group, in graph order.
        width: the number of units.
        layers: every layer touched when the group is split (producers, per-unit
            state, pass-through, consumers).
        consumers: layers whose incoming weights receive the units.
        refused: why the group cannot be split (empty when it can).
        uniform: layers that require every unit to get the same number of copies.
    """

    producers: list
    width: int
    layers: list
    consumers: list
    refused: list
    uniform: list
    gid: int = -1

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("gid")
        return d


class Graph:
    """The flattened graph of a Functional or Sequential model, labelled with unit groups."""

    def __init__(self, model):
        self.model = model
        self.ops: list[Op] = []
        self.tensors: dict = {}
        self.alias: dict = {}  # tensor key -> canonical key (nested model boundaries)
        self.model_inputs: list = []
        self.model_outputs: list = []
        self.layer_paths: dict = {}  # id(layer) -> path
        self.nested: list = []  # (nested model, None, outer input keys)
        self.missing_bias: list = []  # (gid, path): producers where a "nudge" offset has nowhere to go
        self._build(model, prefix="", outer_inputs=None, outer_outputs=None, top=True)
        self._parent = {}
        self.labels: dict = {}
        self.uses: list[Use] = []
        self.producers: dict = {}  # gid -> [(path, layer)]
        self.group_width: dict = {}
        self.refusals: dict = {}  # gid -> [reason]
        self.uniform: dict = {}  # gid -> [(path, ref, units)]
        self.touched: dict = {}  # gid -> ordered dict path -> layer
        self.consumers: dict = {}
        self.width_attrs: list = []  # (layer, attr, GroupRef): Dense.units / Conv.filters / GroupNorm.groups
        self.shape_tensors: list = []  # tensor keys whose unit axis may change
        self.layer_inputs: list = []  # (layer, node-input keys) for input specs / build shapes
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
        c = classes()
        fn = model
        if isinstance(model, c["sequential"]):
            fn = model._functional
            if fn is None:
                raise ValueError(
                    f"Sequential model {model.name!r} has no graph yet: build it (give it an Input or call "
                    "build/fit) before widening"
                )
        elif not isinstance(model, c["functional"]):
            raise ValueError(
                f"widen needs a Functional or Sequential model; {model.name!r} is a subclassed "
                f"{type(model).__name__}, whose graph fastsplit cannot see"
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
        depths = sorted(fn._nodes_by_depth.keys(), reverse=True)
        for d in depths:
            for node in fn._nodes_by_depth[d]:
                layer = node.operation
                if _is(layer, "input") or getattr(node, "is_input", False):
                    continue
                path = prefix + layer.name
                self.layer_paths.setdefault(id(layer), path)
                ins = [self._add_tensor(t) for t in node.input_tensors]
                outs = [self._add_tensor(t) for t in node.output_tensors]
                if isinstance(layer, c["sequential"]) or isinstance(layer, c["functional"]):
                    if type(layer) in c["sequential"] or type(layer) in c["functional"]:
                        self.nested.append((layer, None, ins))
                        self._build(layer, path + "/", ins, outs, top=False)
                        continue
                self.ops.append(Op(layer, path, ins, outs, node))

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

    def _refuse(self, ref, reason):
        for g in groups_of(ref, self.find):
            self.refusals.setdefault(g, []).append(reason)

    def _touch(self, ref, path, layer):
        for g in groups_of(ref, self.find):
            self.touched.setdefault(g, {}).setdefault(path, layer)

    def _shape(self, key):
        return self.tensors[self.canon(key)].shape

    def _label(self):
        order = self.topological()
        consumers_of: dict = {}
        for op in order:
            for k in op.inputs:
                consumers_of.setdefault(self.canon(k), []).append(op)
        self.consumers_of = consumers_of  # tensor key -> the ops that read it
        gid = 0
        producer_gid: dict = {}
        for op in order:
            layer, path = op.layer, op.path
            ins = [self.canon(k) for k in op.inputs]
            outs = [self.canon(k) for k in op.outputs]
            in_labels = [self.labels.get(k) for k in ins]
            carried = [lab for lab in in_labels if lab is not None]
            out_label = None

            if _is(layer, "dense") or _is(layer, "conv"):
                if carried:
                    self._consume(op, in_labels[0])
                # this layer's own output units
                if id(layer) not in producer_gid:
                    producer_gid[id(layer)] = gid
                    gid += 1
                g = producer_gid[id(layer)]
                width = int(layer.units if _is(layer, "dense") else layer.filters)
                ref = GroupRef(g, width)
                rank = len(self._shape(outs[0]))
                axis = self.channel_axis(layer, rank)
                if g not in self.group_width:
                    self.group_width[g] = width
                    self.producers.setdefault(g, []).append((path, layer))
                    self._producer_uses(op, ref, g)
                out_label = Label(ref, Units(axis, rank))
                self._touch(ref, path, layer)
            elif not carried:
                out_label = None  # no split units flow here; nothing to do
            else:
                out_label = self._through(op, in_labels, ins)

            for k in outs:
                if out_label is not None:
                    self.labels[k] = out_label
                    self.shape_tensors.append(k)
            if carried:
                self.layer_inputs.append((layer, op.node, [k for k in ins]))
        for k in self.model_outputs:
            lab = self.labels.get(self.canon(k))
            if lab is not None:
                self._refuse(lab.ref, "its units reach the model output, whose shape would change")


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
                raise ValueError(f"the graph has a cycle at layer {op.path!r}")
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

    @staticmethod
    def channel_axis(layer, rank):
        """The axis of a rank-``rank`` tensor that holds ``layer``'s channels (its ``data_format``)."""
        fmt = getattr(layer, "data_format", "channels_last")
        return 1 if fmt == "channels_first" else rank - 1

    def _weights(self, layer):
        return {w.path.rsplit("/", 1)[-1]: w for w in layer.weights}

    def _producer_uses(self, op, ref, g):
        layer, path = op.layer, op.path
        act = _act_name(getattr(layer, "activation", None))
        if act not in _ELEMENTWISE:
            self.refusals.setdefault(g, []).append(
                f"layer {path!r} applies activation {act!r} across its units; only elementwise activations "
                "keep the function when units are copied"
            )
        if _is(layer, "conv") and getattr(layer, "groups", 1) != 1:
            self.refusals.setdefault(g, []).append(f"layer {path!r} is a grouped convolution (groups={layer.groups})")
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            self.refusals.setdefault(g, []).append(f"layer {path!r} uses LoRA or quantization")
        kernel = layer._kernel if hasattr(layer, "_kernel") else layer.kernel
        self.uses.append(Use(layer, path, "kernel", kernel, -1, "incoming", ref))
        if layer.bias is not None:
            kind = "bias" if self._offset_target(op) is None else "state"
            self.uses.append(Use(layer, path, "bias", layer.bias, 0, kind, ref))
        elif self._offset_target(op) is None:
            self.missing_bias.append((g, path))
        attr = "units" if _is(layer, "dense") else "filters"
        self.width_attrs.append((layer, attr, ref))

    def _offset_target(self, op):
        """The last normaliser with a beta on the producer's private chain, if any (see widen docs)."""
        cache = getattr(self, "_offset_cache", None)
        if cache is None:
            cache = self._offset_cache = {}
        if id(op) in cache:
            return cache[id(op)]
        target = None
        key = self.canon(op.outputs[0])
        consumers_of = self.consumers_of
        while key not in {self.canon(k) for k in self.model_outputs}:
            nxt = consumers_of.get(key, [])
            if len(nxt) != 1 or len(nxt[0].inputs) != 1 or len(nxt[0].outputs) != 1:
                break
            lay = nxt[0].layer
            if _is(lay, "bn") or _is(lay, "ln") or _is(lay, "gn"):
                if getattr(lay, "center", False):
                    target = nxt[0]
            elif not (_is(lay, "act") or _is(lay, "act_ew") or _is(lay, "noop") or _is(lay, "spatial_drop")
                      or _is(lay, "prelu") or _is(lay, "spatial")):
                break
            key = self.canon(nxt[0].outputs[0])
        cache[id(op)] = target
        return target

    def _is_offset_target(self, op) -> bool:
        return any(t is op for t in getattr(self, "_offset_cache", {}).values())

    def _consume(self, op, label):
        layer, path = op.layer, op.path
        u = label.units
        kernel = layer._kernel if hasattr(layer, "_kernel") else layer.kernel
        rank = u.rank
        if _is(layer, "dense"):
            if u.axis != rank - 1:
                self._refuse(label.ref, f"layer {path!r} (Dense) reads axis {rank - 1}, but the units sit on axis {u.axis}")
                return
            self.uses.append(Use(layer, path, "kernel", kernel, 0, "outgoing", label.ref, u.channels))
        else:
            if u.axis != self.channel_axis(layer, rank) or u.positions != 1:
                self._refuse(label.ref, f"layer {path!r} ({type(layer).__name__}) reads channels on another axis")
                return
            if getattr(layer, "groups", 1) != 1:
                self._refuse(label.ref, f"layer {path!r} is a grouped convolution (groups={layer.groups})")
                return
            self.uses.append(Use(layer, path, "kernel", kernel, kernel.ndim - 2, "outgoing", label.ref))
        self._touch(label.ref, path, layer)
        for g in groups_of(label.ref, self.find):
            self.consumers.setdefault(g, {}).setdefault(path, layer)

    def _state(self, op, label, layer, weights, param_axis, channels="last"):
        """Per-unit weights: every weight of ``weights`` split along ``param_axis``."""
        target = self._is_offset_target(op)
        for name, w in weights.items():
            kind = "bias" if (target and name == "beta") else "state"
            self.uses.append(Use(layer, op.path, name, w, param_axis, kind, label.ref, channels))

    def _through(self, op, in_labels, ins):
        """Label of the output of a non-producing layer whose input carries split units."""
        layer, path = op.layer, op.path
        lab = next(lab for lab in in_labels if lab is not None)
        u = lab.units
        ref = lab.ref
        name = type(layer).__name__
        self._touch(ref, path, layer)
        rank_in = u.rank

        def refuse(why):
            for lb in in_labels:
                if lb is not None:
                    self._refuse(lb.ref, f"layer {path!r} ({name}) {why}")
            return None

        if _is(layer, "merge") or (_is(layer, "concat") and self._norm_axis(layer.axis, rank_in) != u.axis):
            if any(lb is None for lb in in_labels):
                return refuse("combines split units with a tensor that no widenable layer produces "
                              "(a model input or an unsupported layer)")
            if any(not isinstance(lb.ref, GroupRef) for lb in in_labels):
                return refuse("combines a concatenation of units with another stream")
            first = in_labels[0]
            for lb in in_labels[1:]:
                if lb.units != first.units or lb.ref.expand != first.ref.expand:
                    return refuse("combines tensors whose units sit on different axes")
                self._union(first.ref.gid, lb.ref.gid)
            return Label(GroupRef(self.find(first.ref.gid), first.ref.width, first.ref.expand), first.units)
        if _is(layer, "concat"):
            if any(lb is not None and lb.units.positions != 1 for lb in in_labels):
                return refuse("concatenates flattened tensors")
            parts = []
            for k, lb in zip(ins, in_labels, strict=False):
                width = int(self._shape(k)[u.axis])
                parts.append((None if lb is None else lb.ref, width))
            return Label(ConcatRef(tuple(parts)), u)
        if len(op.inputs) != 1:
            return refuse("is not supported on the path of split units")
        if _is(layer, "act"):
            act = _act_name(layer.activation)
            if act not in _ELEMENTWISE:
                return refuse(f"applies activation {act!r} across units")
            return lab
        if _is(layer, "act_ew") or _is(layer, "noop"):
            return lab
        if _is(layer, "softmax"):
            axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
            if u.axis in [self._norm_axis(a, rank_in) for a in axes]:
                return refuse("normalises across the split units")
            return lab
        if _is(layer, "spatial_drop") or _is(layer, "spatial"):
            if u.positions != 1 or u.axis != self.channel_axis(layer, rank_in):
                return refuse("works on the axis that holds the split units")
            return lab
        if _is(layer, "global"):
            if u.positions != 1 or u.axis != self.channel_axis(layer, rank_in):
                return refuse("pools over the axis that holds the split units")
            if getattr(layer, "keepdims", False):
                return lab
            return Label(ref, Units(1, 2))
        if _is(layer, "bn"):
            if self._norm_axis(layer.axis, rank_in) != u.axis:
                return refuse("normalises across the split units")
            self._state(op, lab, layer, self._weights(layer), 0, u.channels)
            return lab
        if _is(layer, "ln"):
            axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
            axes = sorted(self._norm_axis(a, rank_in) for a in axes)
            if u.axis in axes:
                self.uniform_add(ref, path, u)
                pos = axes.index(u.axis)
                self._state(op, lab, layer, self._weights(layer), pos, u.channels)
            return lab
        if _is(layer, "gn"):
            if self._norm_axis(layer.axis, rank_in) != u.axis or u.positions != 1:
                return refuse("normalises over an axis other than the split units")
            if layer.groups == 1:
                self.uniform_add(ref, path, u)
            elif layer.groups != self._shape(ins[0])[u.axis]:
                return refuse(f"has {layer.groups} groups; only groups=1 (with uniform copies) or one group per "
                              "unit keep the function when units are copied")
            else:
                self.width_attrs.append((layer, "groups", ref))
            self._state(op, lab, layer, self._weights(layer), 0)
            return lab
        if _is(layer, "prelu"):
            alpha = layer.alpha
            pa = u.axis - 1
            if alpha.shape[pa] != 1:
                self._state(op, lab, layer, {"alpha": alpha}, pa, u.channels)
            return lab
        if _is(layer, "depthwise"):
            if u.positions != 1 or u.axis != self.channel_axis(layer, rank_in):
                return refuse("reads channels on another axis")
            if not isinstance(ref, GroupRef):
                return refuse("follows a concatenation (not supported)")
            mult = int(layer.depth_multiplier)
            self.uses.append(Use(layer, path, "kernel", layer.kernel, layer.kernel.ndim - 2, "state", ref))
            out_ref = GroupRef(ref.gid, ref.width, ref.expand * mult)
            if layer.bias is not None:
                self.uses.append(Use(layer, path, "bias", layer.bias, 0, "state", out_ref))
            act = _act_name(getattr(layer, "activation", None))
            if act not in _ELEMENTWISE:
                return refuse(f"applies activation {act!r} across units")
            return Label(out_ref, u)
        if _is(layer, "flatten") or _is(layer, "reshape"):
            shape = self._shape(ins[0])
            out_shape = self._shape(op.outputs[0])
            rank = len(shape)
            if u.positions != 1:
                return refuse("reshapes an already flattened tensor")
            if _is(layer, "reshape") and len(out_shape) > 2:
                if u.axis == rank - 1 and out_shape[-1] == shape[-1]:
                    return Label(ref, Units(len(out_shape) - 1, len(out_shape)))
                return refuse("reshapes the axis that holds the split units")
            if rank == 2:
                return Label(ref, Units(1, 2))
            order = list(range(1, rank))
            if _is(layer, "flatten") and getattr(layer, "data_format", "channels_last") == "channels_first":
                order = order[1:] + order[:1]
            pos = math.prod(int(shape[a]) for a in order if a != u.axis)
            if order[-1] == u.axis:
                return Label(ref, Units(1, 2, pos, "last"))
            if order[0] == u.axis:
                return Label(ref, Units(1, 2, pos, "first"))
            return refuse("flattens units that sit between other axes")
        return refuse("is not supported on the path of split units: fastsplit cannot prove that copying units "
                      "keeps its function")

    def uniform_add(self, ref, path, units):
        for g in groups_of(ref, self.find):
            self.uniform.setdefault(g, []).append((path, ref, units))

    @staticmethod
    def _norm_axis(a, rank):
        return a % rank

    # -- public view -----------------------------------------------------------------------------------

    def groups(self) -> list[CoupledGroup]:
        out = []
        roots: dict = {}
        for g in self.group_width:
            roots.setdefault(self.find(g), []).append(g)
        for root in sorted(roots):
            members = roots[root]
            producers = [p for g in members for p, _ in self.producers.get(g, [])]
            layers, consumers, refused, uniform = {}, {}, [], []
            for g in members:
                layers.update(self.touched.get(g, {}))
                consumers.update(self.consumers.get(g, {}))
                refused += self.refusals.get(g, [])
                uniform += [p for p, _, _ in self.uniform.get(g, [])]
            out.append(CoupledGroup(
                producers=producers,
                width=self.group_width[members[0]],
                layers=list(layers),
                consumers=list(consumers),
                refused=list(dict.fromkeys(refused)),
                uniform=list(dict.fromkeys(uniform)),
                gid=root,
            ))
        return out


def check_plan(plan, width: int, name: str) -> None:
    if not isinstance(plan, SplitPlan):
        raise ValueError(f"the plan for {name!r} must be a SplitPlan, neuron indices or None, got {type(plan).__name__}")
    if plan.width != width:
        raise ValueError(f"the plan for {name!r} has width {plan.width}, but the layer has {width} units")


__all__ = ["CoupledGroup", "Graph", "SplitError", "check_plan"]
