"""One rule per layer type: what a layer does to the split units that reach it.

A rule is a function ``rule(walk, op, labels)``. ``op`` is one call of the
layer (``op.layer``; ``op.inputs`` and ``op.outputs`` are tensor keys),
``labels`` holds, for each input tensor, the :class:`Label` of its split units
or ``None`` when it carries none. The rule records through ``walk`` (the graph
walk, :class:`fastsplit.keras._graph.Graph`) every weight that the split
touches and returns the label of the output (``None``: no split units come
out), or refuses with a reason. The library's own layers are registered here
with the same public :func:`register_rule` that users call for their layers.

The ``walk`` methods a rule may call: ``produce``, ``consume``, ``state``,
``incoming``, ``merge``, ``refuse``, ``uniform``, ``config``, ``regroup``, ``in_shape``,
``out_shape``, ``channel_axis`` and ``width_of`` (see ``Graph``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from ._errors import GrowthError
from ._units import ConcatRef, GroupRef, Label, Units

#: activation names that act on each unit alone (copies of a unit stay copies)
ELEMENTWISE = {
    "linear", "relu", "relu6", "sigmoid", "tanh", "elu", "selu", "gelu", "swish", "silu", "softplus",
    "softsign", "exponential", "hard_sigmoid", "hard_silu", "hard_swish", "leaky_relu", "mish", "celu",
    "sparse_plus", "squareplus", "soft_shrink", "hard_shrink", "tanh_shrink", "hard_tanh", "threshold",
    "log_sigmoid", "sparse_sigmoid", "gelu_approximate",
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """A registered rule.

    Attributes:
        fn: ``fn(walk, op, labels) -> Label | None``.
        produces: the layer has output units of its own (the rule runs even
            when no input carries split units).
        unitwise: each output unit is a function of the same input unit only,
            and the output holds the units where the input did (activations,
            dropout, per-unit state): unit statistics may be read after it.
    """

    fn: Callable
    produces: bool = False
    unitwise: bool = False


_RULES: dict = {}
_BY_NAME: dict = {}  # "module.QualName" -> Rule, for classes of packages fastsplit does not import
_LOADED: list = []


def register_rule(layer_class, rule="elementwise", *, produces: bool = False, unitwise: bool | None = None) -> None:
    """Tell fastsplit what ``layer_class`` does to split units.

    Args:
        layer_class: a ``keras.layers.Layer`` (or ``keras.ops`` Operation)
            subclass. Exact class match: a subclass needs its own rule.
        rule: ``"elementwise"`` (the layer acts on each entry, or each unit,
            alone: an activation, a dropout, a clip), ``"per_unit"`` (like
            ``"elementwise"``, and every weight whose shape is the unit axis's
            length is per-unit state: a per-channel scale or shift, split as
            the units are), or a function ``rule(walk, op, labels)`` as the
            built-in rules in ``fastsplit/keras/_rules.py``.
        produces: the function rule gives the layer output units of its own.
        unitwise: whether statistics of a unit may be read after this layer
            (default: True for ``"elementwise"`` and ``"per_unit"``).

    A layer with no rule is looked into: its ``call`` is traced on symbolic
    inputs, so a custom block made of supported layers and ``keras.ops``
    needs no rule. Register one when the trace fails or is refused.
    """
    _builtins()
    if isinstance(rule, str):
        if rule not in ("elementwise", "per_unit"):
            raise GrowthError(f"rule must be 'elementwise', 'per_unit' or a function, got {rule!r}")
        fn = _pass if rule == "elementwise" else _per_unit
        _RULES[layer_class] = Rule(fn, unitwise=True if unitwise is None else unitwise)
        return
    if not callable(rule):
        raise GrowthError(f"rule must be 'elementwise', 'per_unit' or a function, got {type(rule).__name__}")
    _RULES[layer_class] = Rule(rule, produces=produces, unitwise=bool(unitwise))


def rule_for(obj) -> Rule | None:
    _builtins()
    rule = _RULES.get(type(obj))
    if rule is None and _BY_NAME:  # a class of an optional package (keras_hub), never imported here
        rule = _BY_NAME.get(f"{type(obj).__module__}.{type(obj).__qualname__}")
    return rule


def _kernel(layer):
    return layer._kernel if hasattr(layer, "_kernel") else layer.kernel


def _axes(axis, rank: int) -> list[int]:
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return sorted(int(a) % rank for a in axes)


# -- producers -------------------------------------------------------------------------------------------


def _dense(walk, op, labels):
    layer = op.layer
    lab = labels[0] if labels else None
    if lab is not None:
        if lab.units.axis != lab.units.rank - 1:
            walk.refuse(lab, f"layer {op.path!r} (Dense) reads the last axis, but the units sit on axis {lab.units.axis}")
        else:
            walk.consume(op, lab, _kernel(layer), 0)
    return walk.produce(op, layer.units, _kernel(layer), -1, layer.bias, "units", axis=-1)


def _conv_like(kernel_in: int, kernel_out: int):
    """Conv (kernel ``(k.., in/groups, out)``) and ConvTranspose (``(k.., out, in)``)."""

    def rule(walk, op, labels):
        layer = op.layer
        lab = labels[0] if labels else None
        rank = len(walk.out_shape(op))
        ch = walk.channel_axis(layer, rank)
        groups = int(getattr(layer, "groups", 1) or 1)
        kernel = _kernel(layer)
        if groups != 1:
            return _grouped(walk, op, lab, ch, groups)
        if lab is not None:
            if lab.units.axis != ch or lab.units.positions != 1:
                walk.refuse(lab, f"layer {op.path!r} ({type(layer).__name__}) reads channels on another axis")
            else:
                walk.consume(op, lab, kernel, kernel_in)
        return walk.produce(op, layer.filters, kernel, kernel_out, layer.bias, "filters", axis=ch)

    return rule


def _grouped(walk, op, lab, ch, groups):
    """``Conv*D(groups=C)`` with one input channel per group is a depthwise convolution: per-unit state."""
    layer = op.layer
    cin = int(walk.in_shape(op)[ch])
    ok_in = lab is not None and lab.units.axis == ch and lab.units.positions == 1 and isinstance(lab.ref, GroupRef)
    if groups == cin and ok_in:
        mult = int(layer.filters) // groups
        out = Label(GroupRef(lab.ref.gid, lab.ref.width, lab.ref.expand * mult), lab.units)
        walk.state(op, out, {"kernel": _kernel(layer)}, -1)
        if layer.bias is not None:
            walk.state(op, out, {"bias": layer.bias}, 0)
        walk.config(layer, "filters", out.ref)
        walk.config(layer, "groups", lab.ref)
        walk.check_activation(op, lab)
        return out
    why = (f"layer {op.path!r} is a grouped convolution (groups={groups}); fastsplit splits a grouped convolution "
           "only when it has one input channel per group (a depthwise convolution) and its input units come from "
           "a widenable layer")
    if lab is not None:
        walk.refuse(lab, why)
    return walk.produce(op, layer.filters, _kernel(layer), -1, layer.bias, "filters", axis=ch, refused=why)


def _separable(walk, op, labels):
    layer = op.layer
    lab = labels[0] if labels else None
    rank = len(walk.out_shape(op))
    ch = walk.channel_axis(layer, rank)
    if lab is not None:
        if lab.units.axis != ch or lab.units.positions != 1 or not isinstance(lab.ref, GroupRef):
            walk.refuse(lab, f"layer {op.path!r} ({type(layer).__name__}) reads channels on another axis")
        else:
            walk.state(op, lab, {"depthwise_kernel": layer.depthwise_kernel}, -2)
            mult = int(layer.depth_multiplier)
            expanded = Label(GroupRef(lab.ref.gid, lab.ref.width, lab.ref.expand * mult), lab.units)
            walk.consume(op, expanded, layer.pointwise_kernel, -2, attr="pointwise_kernel", fold=False)
    return walk.produce(op, layer.filters, layer.pointwise_kernel, -1, layer.bias, "filters", axis=ch)


# -- per-unit state --------------------------------------------------------------------------------------


def _depthwise(walk, op, labels):
    layer, lab = op.layer, labels[0]
    rank = lab.units.rank
    if lab.units.positions != 1 or lab.units.axis != walk.channel_axis(layer, rank):
        return walk.refuse(lab, f"layer {op.path!r} reads channels on another axis")
    if not isinstance(lab.ref, GroupRef):
        return walk.refuse(lab, f"layer {op.path!r} follows a concatenation (not supported)")
    mult = int(layer.depth_multiplier)
    out = Label(GroupRef(lab.ref.gid, lab.ref.width, lab.ref.expand * mult), lab.units)
    walk.state(op, lab, {"kernel": layer.kernel}, -2)
    if layer.bias is not None:
        walk.state(op, out, {"bias": layer.bias}, 0)
    walk.check_activation(op, lab)
    return out


def _batchnorm(walk, op, labels):
    layer, lab = op.layer, labels[0]
    if layer.axis % lab.units.rank != lab.units.axis:
        return walk.refuse(lab, f"layer {op.path!r} normalises across the split units")
    walk.state(op, lab, walk.weights(layer), 0)
    walk.centers(op, lab)
    return lab


def _layernorm(walk, op, labels):
    """LayerNormalization / RMSNormalization: exact only when every unit gets the same number of copies."""
    layer, lab = op.layer, labels[0]
    axes = _axes(layer.axis, lab.units.rank)
    if lab.units.axis in axes:
        walk.uniform(op, lab)
        walk.state(op, lab, walk.weights(layer), axes.index(lab.units.axis))
    elif type(layer).__name__ != "RMSNormalization" and not getattr(layer, "rms_scaling", False):
        walk.centers(op, lab)  # each unit normalised over other axes on its own
    return lab


def _groupnorm(walk, op, labels):
    layer, lab = op.layer, labels[0]
    if layer.axis % lab.units.rank != lab.units.axis or lab.units.positions != 1:
        return walk.refuse(lab, f"layer {op.path!r} normalises over an axis other than the split units")
    if layer.groups == 1:
        walk.uniform(op, lab)
    elif layer.groups != walk.in_shape(op)[lab.units.axis]:
        return walk.refuse(lab, f"layer {op.path!r} has {layer.groups} groups; only groups=1 (with uniform copies) or "
                                "one group per unit keep the function when units are copied")
    else:
        walk.config(layer, "groups", lab.ref)
        walk.centers(op, lab)
    walk.state(op, lab, walk.weights(layer), 0)
    return lab


def _unitnorm(walk, op, labels):
    layer, lab = op.layer, labels[0]
    if lab.units.axis in _axes(layer.axis, lab.units.rank):
        return walk.refuse(lab, f"layer {op.path!r} divides by the norm over the split units, which copies change")
    return lab


def _prelu(walk, op, labels):
    layer, lab = op.layer, labels[0]
    pa = lab.units.axis - 1
    if layer.alpha.shape[pa] != 1:
        walk.state(op, lab, {"alpha": layer.alpha}, pa)
    return lab


def _per_unit(walk, op, labels):
    """Every weight with the unit axis's length is split as the units are (a LayerScale, a per-channel bias)."""
    lab = next(lb for lb in labels if lb is not None)
    n = walk.in_shape(op)[lab.units.axis]
    for name, w in walk.weights(op.layer).items():
        if len(w.shape) == 1 and w.shape[0] == n:
            walk.state(op, lab, {name: w}, 0)
        elif any(int(s) == n for s in w.shape):
            return walk.refuse(lab, f"layer {op.path!r}: weight {name!r} of shape {tuple(w.shape)} is not a "
                                    "per-unit vector")
    return lab


# -- pass through ----------------------------------------------------------------------------------------


def _pass(walk, op, labels):
    return next(lb for lb in labels if lb is not None)


def _activation(walk, op, labels):
    walk.check_activation(op, labels[0])
    return labels[0]


def _softmax(walk, op, labels):
    lab = labels[0]
    if lab.units.axis in _axes(op.layer.axis, lab.units.rank):
        return walk.refuse(lab, f"layer {op.path!r} normalises across the split units")
    return lab


def _spatial(walk, op, labels):
    """Pooling, padding, cropping, upsampling, spatial dropout: they work per channel."""
    lab = labels[0]
    if lab.units.positions != 1 or lab.units.axis != walk.channel_axis(op.layer, lab.units.rank):
        return walk.refuse(lab, f"layer {op.path!r} ({type(op.layer).__name__}) works on the axis that holds the units")
    return lab


def _global_pool(walk, op, labels):
    lab = _spatial(walk, op, labels)
    if lab is None or getattr(op.layer, "keepdims", False):
        return lab
    return Label(lab.ref, Units(1, 2))


def _rescaling(walk, op, labels):
    import numpy as np

    lab = labels[0]
    if np.size(op.layer.scale) != 1 or np.size(op.layer.offset) != 1:
        return walk.refuse(lab, f"layer {op.path!r} rescales each channel differently")
    return lab


def _permute(walk, op, labels):
    lab = labels[0]
    dims = [0] + [int(d) for d in op.layer.dims]
    return Label(lab.ref, dataclasses.replace(lab.units, axis=dims.index(lab.units.axis)))


def _unit_stride(shape, units: Units) -> tuple[int, int]:
    """(stride S, positions×width L): unit ``u`` of entry ``f`` of a sample, flat, is ``(f // S) % width``."""
    inner = math.prod(int(s) for s in shape[units.axis + 1:])
    if units.channels == "first":
        return inner * units.positions, inner
    return inner, inner


def _reshape(walk, op, labels):
    """Flatten and Reshape: the units are found again in the new shape; Reshape's ``target_shape`` follows."""
    layer, lab = op.layer, labels[0]
    shape, out = list(walk.in_shape(op)), list(walk.out_shape(op))
    units = lab.units
    if type(layer).__name__ == "Flatten" and getattr(layer, "data_format", "") == "channels_first" and len(shape) > 2:
        perm = [0] + list(range(2, len(shape))) + [1]  # Flatten moves channels last first
        shape = [shape[a] for a in perm]
        units = dataclasses.replace(units, axis=perm.index(units.axis))
    width = walk.width_of(lab.ref)
    stride, _ = _unit_stride(shape, units)
    found = None
    for k in range(1, len(out)):
        t = math.prod(int(s) for s in out[k + 1:])
        n = int(out[k])
        if t == stride and n % width == 0:
            found = Units(k, len(out), n // width, "last")
        elif stride % t == 0 and n == width * (stride // t) and stride // t > 1:
            found = Units(k, len(out), stride // t, "first")
        elif t == stride and width % n == 0 and walk.regroup(lab, n):
            found = Units(k, len(out), 1, "last")  # the producer's units become channels of n entries
        if found is not None:
            break
    if found is None:
        return walk.refuse(lab, f"layer {op.path!r} ({type(layer).__name__}) spreads each unit over several axes "
                                f"({tuple(shape[1:])} -> {tuple(out[1:])})")
    if type(layer).__name__ == "Reshape":
        walk.config(layer, "target_shape", lab.ref, index=found.axis - 1)
    return Label(lab.ref, found)


def _merge(walk, op, labels):
    """Add, Subtract, Multiply, Maximum, Minimum, Average (layers and ``keras.ops``): one plan for all inputs."""
    return walk.merge(op, labels)


def _concat_axis(op):
    return getattr(op.layer, "axis", -1)


def _concat(walk, op, labels):
    lab = next(lb for lb in labels if lb is not None)
    rank = lab.units.rank
    if int(_concat_axis(op)) % rank != lab.units.axis:
        return walk.merge(op, labels)  # along time or space: the inputs' units line up, one plan for all
    if any(lb is not None and lb.units.positions != 1 for lb in labels):
        return walk.refuse(labels, f"layer {op.path!r} concatenates flattened tensors")
    parts = []
    for i, lb in enumerate(labels):
        parts.append((None if lb is None else lb.ref, int(walk.in_shape(op, i)[lab.units.axis])))
    return Label(ConcatRef(tuple(parts)), lab.units)


def _reduce(walk, op, labels):
    """``ops.mean``/``sum``/``max``/``min`` over axes other than the units'."""
    lab = labels[0]
    rank = lab.units.rank
    axis = getattr(op.layer, "axis", None)
    if axis is None:
        return walk.refuse(lab, f"{op.path!r} reduces over every axis, the units' too")
    axes = _axes(axis, rank)
    if lab.units.axis in axes or 0 in axes:
        return walk.refuse(lab, f"{op.path!r} reduces over the axis that holds the units")
    if getattr(op.layer, "keepdims", False):
        return lab
    new_axis = lab.units.axis - sum(1 for a in axes if a < lab.units.axis)
    return Label(lab.ref, Units(new_axis, rank - len(axes), lab.units.positions, lab.units.channels))


# -- the built-in registry -------------------------------------------------------------------------------

_ELEMENTWISE_OPS = (
    "Absolute", "Fabs", "Arctan", "Arcsinh", "Cbrt", "Ceil", "Clip", "Copy", "Cos", "Cosh", "Exp", "Exp2", "Expm1",
    "Floor", "Log", "Log10", "Log1p", "Log2", "Negative", "Reciprocal", "Round", "Sign", "Sin", "Sinh", "Sqrt",
    "Square", "Tan", "Tanh", "Trunc", "NanToNum", "Arccos", "Arcsin", "Arctanh", "Arccosh", "Power",
)
_ELEMENTWISE_NN = (
    "Relu", "Relu6", "Sigmoid", "SparseSigmoid", "Softplus", "Softsign", "SoftShrink", "SparsePlus", "Silu",
    "Squareplus", "LogSigmoid", "LeakyRelu", "HardSigmoid", "HardSilu", "Elu", "Selu", "Gelu", "Celu", "TanhShrink",
    "HardTanh", "HardShrink", "Threshold",
)
_BINARY_OPS = ("Add", "Subtract", "Multiply", "Divide", "TrueDivide", "Maximum", "Minimum", "Fmax", "Fmin",
               "DivideNoNan")


def _builtins() -> None:
    if _LOADED:
        return
    _LOADED.append(True)
    from keras import layers as L
    from keras.src.ops import core as ops_core
    from keras.src.ops import nn as ops_nn
    from keras.src.ops import numpy as ops_np

    def reg(classes, fn, **kw):
        for c in classes:
            if c is not None:
                _RULES[c] = Rule(fn, **kw)

    def opt(mod, *names):
        return [getattr(mod, n, None) for n in names]

    reg([L.Dense], _dense, produces=True)
    reg([L.Conv1D, L.Conv2D, L.Conv3D], _conv_like(-2, -1), produces=True)
    reg([L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose], _conv_like(-1, -2), produces=True)
    reg([L.SeparableConv1D, L.SeparableConv2D], _separable, produces=True)
    reg([L.DepthwiseConv1D, L.DepthwiseConv2D], _depthwise)
    reg([L.BatchNormalization], _batchnorm, unitwise=True)
    reg([L.LayerNormalization, *opt(L, "RMSNormalization")], _layernorm)
    reg([L.GroupNormalization], _groupnorm)
    reg([L.UnitNormalization], _unitnorm)
    reg([L.PReLU], _prelu, unitwise=True)
    reg([L.Activation], _activation, unitwise=True)
    reg([L.ReLU, L.LeakyReLU, L.ELU, L.Identity, L.ActivityRegularization, L.Dropout, L.GaussianNoise,
         L.GaussianDropout, L.AlphaDropout], _pass, unitwise=True)
    reg([L.Softmax], _softmax)
    reg([L.SpatialDropout1D, L.SpatialDropout2D, L.SpatialDropout3D], _spatial, unitwise=True)
    reg([L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D, L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D,
         L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D, L.Cropping1D, L.Cropping2D, L.Cropping3D,
         L.UpSampling1D, L.UpSampling2D, L.UpSampling3D,
         *opt(L, "AdaptiveAveragePooling1D", "AdaptiveAveragePooling2D", "AdaptiveAveragePooling3D",
              "AdaptiveMaxPooling1D", "AdaptiveMaxPooling2D", "AdaptiveMaxPooling3D")], _spatial)
    reg([L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D, L.GlobalMaxPooling1D,
         L.GlobalMaxPooling2D, L.GlobalMaxPooling3D], _global_pool)
    reg([L.Flatten, L.Reshape], _reshape)
    reg([L.Permute], _permute)
    reg([L.Rescaling], _rescaling)
    reg([L.Add, L.Subtract, L.Multiply, L.Maximum, L.Minimum, L.Average], _merge)
    reg([L.Concatenate, ops_np.Concatenate], _concat)
    reg(opt(ops_np, *_BINARY_OPS), _merge)
    reg(opt(ops_np, *_ELEMENTWISE_OPS) + opt(ops_nn, *_ELEMENTWISE_NN) + opt(ops_core, "Cast"), _pass, unitwise=True)
    reg(opt(ops_np, "Mean", "Sum", "Max", "Min", "Amax", "Amin"), _reduce)
    from . import _rules_rnn  # LSTM, GRU, SimpleRNN, Bidirectional, Embedding

    _rules_rnn.register(reg)
    from . import _rules_attention  # EinsumDense, MultiHeadAttention, keras_hub's embeddings

    def by_name(name, fn, **kw):
        _BY_NAME[name] = Rule(fn, **kw)

    _rules_attention.register(reg, by_name)
    from . import _rules_gqa  # GroupQueryAttention, keras_hub's LlamaAttention and LlamaLayerNorm

    _rules_gqa.register(reg, by_name)


__all__ = ["ELEMENTWISE", "Rule", "register_rule", "rule_for"]
