"""Rules for transformers: EinsumDense, MultiHeadAttention, embeddings (DESIGN.md, "Transformers").

- ``EinsumDense``: the unit axes are read from the equation. A kernel letter that is in the
  output and not in the input is a *producing* axis (one group each; with several, each is
  named ``path/<letter>``); an input letter that the kernel contracts is a *consuming* axis
  (rows split by the ratios); an input letter that goes to the output untouched carries its
  units through (the kernel and bias entries along it are per-unit state).
- ``MultiHeadAttention`` (and keras_hub's ``CachedMultiHeadAttention``) grows in four
  dimensions, each its own group: ``path/heads`` (a head is a unit: its Q, K, V slices are
  copied, the output projection's rows for it split by the ratios), ``path/key_dim`` (K
  columns copied, Q columns split by the ratios and multiplied by √(k'/k), which the
  layer's new softmax scale 1/√k' takes back), ``path/value_dim`` (V columns copied, output
  rows split) and ``path`` itself, the width its output projection writes (``d_model``);
  its query, key and value inputs are consumed by the Q, K and V projections.
- ``Embedding`` and keras_hub's ``PositionEmbedding`` produce the residual stream;
  ``ReversibleEmbedding`` too, and its reverse call (an LM head) consumes it when its
  weights are untied; tied, a copy of a unit cannot be both a copy (lookup) and a share
  (logits), so that call refuses the split.

Everything here depends on the graph only. Cost: O(layers).
"""

from __future__ import annotations

import inspect
import math
import re
import weakref

from ._units import Label, Units

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# -- EinsumDense -----------------------------------------------------------------------------------------


def parse_equation(equation: str, in_rank: int, out_rank: int):
    """``(input letters, kernel letters, output letters, right_elided)`` of an EinsumDense equation with
    any ``...`` spelled out as upper-case letters; None when it cannot be read."""
    m = re.fullmatch(r"\s*([a-z.]+)\s*,\s*([a-z]+)\s*->\s*([a-z.]+)\s*", str(equation))
    if m is None:
        return None
    ins, ks, outs = m.groups()
    right = outs.endswith("...")
    if "..." in ins or "..." in outs:
        if ins.count("...") != 1 or outs.count("...") != 1 or ins.replace("...", "").count(".") or \
                outs.replace("...", "").count("."):
            return None
        n = in_rank - len(ins.replace("...", ""))
        if n < 0 or n > len(_LETTERS):
            return None
        fill = _LETTERS[:n]
        ins, outs = ins.replace("...", fill), outs.replace("...", fill)
    elif "." in ins or "." in outs:
        return None
    if len(ins) != in_rank or len(outs) != out_rank or len(set(ins)) != len(ins) or len(set(ks)) != len(ks):
        return None
    if any(c not in ins and c not in ks for c in outs):
        return None
    return ins, ks, outs, right


def _bias_axis(layer, letter: str, outs: str):
    """The axis of ``layer.bias`` along output letter ``letter`` (None: the bias has no such axis)."""
    bias_axes = getattr(layer, "bias_axes", None)
    if layer.bias is None or not bias_axes or letter not in bias_axes:
        return None
    spec = "".join(c for c in outs if c.islower())
    first = min(spec.find(c) for c in bias_axes)
    return spec.find(letter) - first


def _partial_index(layer, out_axis: int, out_rank: int, right: bool):
    """The entry of ``layer.partial_output_shape`` (the ``output_shape`` config) for ``out_axis``."""
    partial = getattr(layer, "partial_output_shape", None)
    if partial is None:
        return None
    index = out_axis - 1 if right else out_axis - (out_rank - len(partial))
    return index if 0 <= index < len(partial) else None


def _einsum_dense(walk, op, labels):
    layer = op.layer
    lab = labels[0] if labels else None
    kernel = layer._kernel if hasattr(layer, "_kernel") else layer.kernel
    in_rank, out_rank = len(walk.in_shape(op)), len(walk.out_shape(op))
    parsed = parse_equation(layer.equation, in_rank, out_rank)
    if parsed is None:
        why = (f"layer {op.path!r} (EinsumDense): fastsplit cannot read its equation {layer.equation!r} (it reads "
               "'<input>,<kernel>-><output>' with lower-case letters and at most one '...' on each side)")
        walk.refuse(lab, why)
        return walk.produce(op, kernel.shape[-1], kernel, -1, None, None, axis=-1, refused=why)
    ins, ks, outs, right = parsed
    out_label = None
    if lab is not None:
        u = lab.units
        c = ins[u.axis]
        if u.positions != 1:
            walk.refuse(lab, f"layer {op.path!r} (EinsumDense) reads flattened units (several per axis entry)")
        elif c in ks and c not in outs:
            walk.consume(op, lab, kernel, ks.index(c), fold=False)
        elif c in outs:
            if c in ks:
                walk.state(op, lab, {"kernel": kernel}, ks.index(c))
            b = _bias_axis(layer, c, outs)
            if b is not None:
                walk.state(op, lab, {"bias": layer.bias}, b)
            walk.check_activation(op, lab)
            out_label = Label(lab.ref, Units(outs.index(c), out_rank))
            i = _partial_index(layer, outs.index(c), out_rank, right)
            if i is not None:
                walk.config(layer, "partial_output_shape", lab.ref, index=i)
        else:
            walk.refuse(lab, f"layer {op.path!r} (EinsumDense {layer.equation!r}) sums over the split units "
                             f"(letter {c!r}) without a weight per unit")
    made = []
    produced = [c for c in ks if c in outs and c not in ins]
    for c in produced:
        o = outs.index(c)
        b = _bias_axis(layer, c, outs)
        made.append(walk.produce(op, kernel.shape[ks.index(c)], kernel, ks.index(c), None if b is None else layer.bias,
                                 None, axis=o, dim=None if len(produced) == 1 else c, bias_axis=b or 0))
        i = _partial_index(layer, o, out_rank, right)
        if i is not None:
            walk.config(layer, "partial_output_shape", made[-1].ref, index=i)
    if out_label is None and made:
        out_label = made[-1]
    for m in made:
        if m is not out_label:
            walk.refuse(m, f"layer {op.path!r} (EinsumDense {layer.equation!r}) writes units on output axis "
                           f"{m.units.axis} and on axis {out_label.units.axis}; fastsplit follows one unit axis per "
                           f"tensor, that of axis {out_label.units.axis}")
    return out_label


# -- MultiHeadAttention ----------------------------------------------------------------------------------

class HeadSize:
    """An attention layer's head size (``attr``) and its softmax scale (``inverse``, 1/√size), set together.

    The swap rewrites ``size`` as a config (``walk.config(HeadSize.of(...), "size", ref)``); one holder
    per layer and attribute, so that two graphs over the same layer rewrite it once.
    """

    _held: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> {attr: holder}

    def __init__(self, layer, attr, inverse):
        self._layer, self._attr, self._inverse = weakref.ref(layer), attr, inverse

    @classmethod
    def of(cls, layer, attr, inverse) -> HeadSize:
        held = cls._held.setdefault(layer, {})
        if attr not in held:
            held[attr] = cls(layer, attr, inverse)
        return held[attr]

    @property
    def size(self) -> int:
        return getattr(self._layer(), self._attr)

    @size.setter
    def size(self, value) -> None:
        layer = self._layer()
        setattr(layer, self._attr, int(value))
        setattr(layer, self._inverse, 1.0 / math.sqrt(float(value)))


def call_arguments(op, positional=()) -> dict:
    """The arguments of a layer's call by parameter name; where the signature does not bind, the
    positional arguments are named by ``positional`` and the keywords kept."""
    args, kwargs = list(op.node.arguments.args), dict(op.node.arguments.kwargs)
    try:
        bound = inspect.signature(op.layer.call).bind(*args, **kwargs)
    except TypeError:
        return dict(zip(positional, args)) | kwargs
    return dict(bound.arguments)


def io_refusal(op, labels, known) -> str | None:
    """Why an attention layer cannot be split whatever its layout (None when it can): it returns more than
    its output, or split units reach it through an argument other than the inputs in ``known`` (ids)."""
    name = type(op.layer).__name__
    if len(op.outputs) != 1:
        return (f"layer {op.path!r} ({name}) returns {len(op.outputs)} tensors (attention scores or a cache); "
                "fastsplit splits an attention layer that returns its output only")
    if any(lb is not None for k, lb in zip(op.inputs, labels) if k not in known):
        return f"layer {op.path!r} ({name}) takes split units in a mask or cache argument"
    return None


def project_in_out(walk, op, o_dense, reads, why):
    """The width an attention layer's output projection writes (its group, returned), and the split units
    its input projections read: ``reads`` holds ``(label, dense, what)`` per projection (a None label
    or dense is skipped). The output comes first: its kernel is the layer's first incoming weight."""
    name = type(op.layer).__name__
    o_kernel = o_dense.kernel
    out = walk.produce(op, o_kernel.shape[-1], o_kernel, -1, o_dense.bias, None, axis=-1, refused=why)
    walk.config(o_dense, "partial_output_shape", out.ref, index=len(o_dense.partial_output_shape) - 1)
    for lb, dense, what in reads:
        if lb is None or dense is None or why is not None:
            continue
        if lb.units.axis != lb.units.rank - 1 or lb.units.positions != 1:
            walk.refuse(lb, f"layer {op.path!r} ({name}) reads its {what} on the last axis, but the units sit on "
                            f"axis {lb.units.axis}")
        else:
            walk.consume(op, lb, dense.kernel, 0, attr=f"{what}/kernel", fold=False)
    return out


def sqrt_ratio(plan) -> float:
    """√(k'/k): the factor on the query's columns that the new softmax scale 1/√k' takes back."""
    return math.sqrt(plan.new_width / plan.width)


def _attention(walk, op, labels):
    layer = op.layer
    name = type(layer).__name__
    q_dense, k_dense, v_dense, o_dense = layer._query_dense, layer._key_dense, layer._value_dense, layer._output_dense
    gate = getattr(layer, "_gate_dense", None) if getattr(layer, "_use_gate", False) else None
    args = call_arguments(op, ("query", "value", "key"))
    by_id = {k: lb for k, lb in zip(op.inputs, labels)}

    def label_of(arg):
        t = args.get(arg)
        return None if t is None else by_id.get(id(t))

    q_lab, v_lab = label_of("query"), label_of("value")
    k_lab = label_of("key") if args.get("key") is not None else v_lab
    known = {id(args.get(a)) for a in ("query", "value", "key") if args.get(a) is not None}
    why = io_refusal(op, labels, known)
    if why is None and len(o_dense.kernel.shape) != 3:
        why = f"layer {op.path!r} ({name}) has an output_shape of several axes"
    if why is not None:
        walk.refuse([q_lab, v_lab, k_lab], why)
    o_kernel = o_dense.kernel
    out = project_in_out(walk, op, o_dense, ((q_lab, q_dense, "query"), (k_lab, k_dense, "key"),
                                             (v_lab, v_dense, "value"), (q_lab, gate, "gate")), why)

    def bias_state(lab, dense, axis, what):
        if dense is not None and dense.bias is not None:
            walk.state(op, lab, {f"{what}/bias": dense.bias}, axis)

    def partial(dense, lab, back):
        walk.config(dense, "partial_output_shape", lab.ref, index=len(dense.partial_output_shape) - back)

    heads = walk.produce(op, layer._num_heads, q_dense.kernel, 1, None, "_num_heads", dim="heads", refused=why)
    for dense, what in ((k_dense, "key"), (v_dense, "value"), (gate, "gate")):
        if dense is not None:
            walk.incoming(op, heads, dense.kernel, 1, f"{what}/kernel")
    for dense, what in ((q_dense, "query"), (k_dense, "key"), (v_dense, "value"), (gate, "gate")):
        bias_state(heads, dense, 0, what)
        if dense is not None:
            partial(dense, heads, 2)
    walk.consume(op, heads, o_kernel, 0, attr="output/kernel", fold=False)

    kd = walk.produce(op, layer._key_dim, k_dense.kernel, 2, None, None, dim="key_dim", refused=why)
    walk.config(HeadSize.of(layer, "_key_dim", "_inverse_sqrt_key_dim"), "size", kd.ref)
    bias_state(kd, k_dense, 1, "key")
    walk.consume(op, kd, q_dense.kernel, 2, attr="query/kernel", fold=False)
    walk.uses[-1].factor = sqrt_ratio
    if q_dense.bias is not None:
        walk.consume(op, kd, q_dense.bias, 1, attr="query/bias", fold=False)
        walk.uses[-1].factor = sqrt_ratio
    partial(q_dense, kd, 1)
    partial(k_dense, kd, 1)

    vd = walk.produce(op, layer._value_dim, v_dense.kernel, 2, None, "_value_dim", dim="value_dim", refused=why)
    bias_state(vd, v_dense, 1, "value")
    if gate is not None:
        walk.incoming(op, vd, gate.kernel, 2, "gate/kernel")
        bias_state(vd, gate, 1, "gate")
        partial(gate, vd, 1)
    partial(v_dense, vd, 1)
    walk.consume(op, vd, o_kernel, 1, attr="output/kernel", fold=False)
    if _fused_needs_equal_dims(layer):
        walk._union(kd.ref.gid, vd.ref.gid)
    return out


def _fused_needs_equal_dims(layer) -> bool:
    """JAX's fused attention (Keras' path without dropout) takes one head size for keys and values: there
    ``key_dim`` and ``value_dim`` grow together (one group) when they are equal, and stay equal."""
    from keras import backend

    return (backend.backend() == "jax" and not layer._dropout > 0 and layer._key_dim == layer._value_dim)


# -- embeddings ------------------------------------------------------------------------------------------


def _embedding(walk, op, labels):
    """The rule registered for ``keras.layers.Embedding`` (a producer of ``output_dim`` units)."""
    from keras import layers as L

    from ._rules import _RULES

    return _RULES[L.Embedding].fn(walk, op, labels)


def _reversible_embedding(walk, op, labels):
    layer = op.layer
    reverse = bool(call_arguments(op).get("reverse", False))
    if not reverse:
        return _embedding(walk, op, labels)
    lab = labels[0] if labels else None
    if lab is None:
        return None
    if layer.tie_weights:
        return walk.refuse(lab, f"layer {op.path!r} ({type(layer).__name__}) is a tied embedding used as an output "
                                "head: a unit's copies would have to be copies in the lookup and shares in the "
                                "logits of one matrix; untie the weights (tie_weights=False) to grow d_model")
    if lab.units.axis != lab.units.rank - 1 or lab.units.positions != 1:
        return walk.refuse(lab, f"layer {op.path!r} reads the last axis, but the units sit on axis {lab.units.axis}")
    walk.consume(op, lab, layer.reverse_embeddings, 0, attr="reverse_embeddings", fold=False)
    return None


def _position_embedding(walk, op, labels):
    """keras_hub ``PositionEmbedding``: reads only its input's shape; writes its own units."""
    layer = op.layer
    return walk.produce(op, layer.position_embeddings.shape[-1], layer.position_embeddings, -1, None, None, axis=-1)


def _get_item(walk, op, labels):
    """``x[:, 0, :]`` (BERT's pooled token): indexing that keeps the unit axis whole passes the units on."""
    lab = labels[0]
    key = op.node.arguments.args[1] if len(op.node.arguments.args) > 1 else None
    key = key if isinstance(key, tuple) else (key,)
    rank, u = lab.units.rank, lab.units.axis
    if sum(k is Ellipsis for k in key) > 1 or any(k is None for k in key):
        return walk.refuse(lab, f"{op.path!r} indexes the split units in a way fastsplit does not read")
    if Ellipsis in key:
        e = key.index(Ellipsis)
        key = key[:e] + (slice(None),) * (rank - len(key) + 1) + key[e + 1:]
    key = key + (slice(None),) * (rank - len(key))
    if not (isinstance(key[u], slice) and key[u] == slice(None)):
        return walk.refuse(lab, f"{op.path!r} indexes the axis that holds the split units")
    axis = sum(1 for k in key[:u] if isinstance(k, slice))
    return Label(lab.ref, Units(axis, sum(1 for k in key if isinstance(k, slice)), lab.units.positions,
                                lab.units.channels))


#: keras_hub classes (by "module.QualName", never imported here) -> rule
_KERAS_HUB = {
    "keras_hub.src.layers.modeling.cached_multi_head_attention.CachedMultiHeadAttention": _attention,
    "keras_hub.src.layers.modeling.position_embedding.PositionEmbedding": _position_embedding,
    "keras_hub.src.layers.modeling.reversible_embedding.ReversibleEmbedding": _reversible_embedding,
}


def register(reg, reg_by_name) -> None:
    """Add this module's rules: ``reg(classes, fn, **kw)`` for Keras' layers, ``reg_by_name(path, fn, **kw)``
    for keras_hub's (found by class path, so that fastsplit never imports keras_hub)."""
    from keras import layers as L

    reg([L.EinsumDense], _einsum_dense, produces=True)
    reg([L.MultiHeadAttention], _attention, produces=True)
    reg([getattr(L, "ReversibleEmbedding", None)], _reversible_embedding, produces=True)
    from keras.src.ops import numpy as ops_np

    reg([ops_np.GetItem], _get_item)
    for name, fn in _KERAS_HUB.items():
        reg_by_name(name, fn, produces=True)


__all__ = ["parse_equation", "register"]
