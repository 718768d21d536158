"""Rules for grouped-query attention and the RMSNorm/rotary/GQA backbones (Llama).

In grouped-query attention (keras' ``GroupQueryAttention``, keras_hub's ``LlamaAttention``)
``num_key_value_heads = g`` key/value heads are each shared by ``r = num_query_heads / g``
query heads: query head ``h`` reads key/value head ``h // r`` (``ops.repeat(key, r, axis=2)``).
The unit that can be copied on its own is therefore a key/value head *with its group of r
query heads*: copying the K and V slices of the head and the Q slices of its r query heads,
and splitting the output projection's rows of those query heads by the plan's ratios, keeps
the function exactly and keeps ``r`` constant. The groups, named like MultiHeadAttention's:

- ``path/heads``: the key/value heads (width ``g``); a plan for them carries the query heads
  along (the query axis is the plan with each unit repeated ``r`` times, ``GroupRef.expand``);
  ``num_key_value_heads`` and ``num_query_heads`` follow.
- ``path/query_heads``: the query heads of every group alike (width ``r``): a plan for them is
  applied to each group's ``r`` query heads (the query axis holds ``g`` positions of them), the
  key/value heads stay and ``r`` follows. With ``path/heads`` in the same event the query kernel
  would take two plans on one axis, which is refused: grow them one after the other.
- ``path/key_dim``: the head size, which GQA shares among Q, K and V: K and V columns copied,
  Q columns split by the ratios and multiplied by √(d'/d) (the layer's softmax scale becomes
  1/√d'), the output projection's rows split by the ratios. Under LlamaAttention's rotary
  embedding (rotate-half: dimension i of a head of size d turns with dimension i + d/2 at the
  frequency ``base^(-2i/d)``, computed from the head size at call time; Llama 3.1's smoothing
  adjusts each frequency on its own) it grows by an integer factor m only: old dimension i of a
  half is placed at m·i of a head of m·d, whose frequency there is the same (to the bit: 2i/d and
  2mi/(md) round alike), its m - 1 copies right after it (``walk.in_place``). The copies turn at
  other frequencies, so the query reads the first copy only (zero columns at the copies; the
  output projection likewise) while K and V copies may be anything the symmetry gives (copies,
  noise, fresh draws: the zero queries there then get a gradient). A plan that gives the
  dimensions different numbers of copies, or a symmetry that moves the originals, is refused
  (``_widen.in_place_plan``); so are other rotary embeddings (partial rotary dimension, another
  frequency formula) until checked.
- ``path``: the width the output projection writes (``d_model``); the query, key and value
  inputs are consumed by the Q, K and V projections.

keras_hub's ``LlamaLayerNorm`` (RMS normalisation over the last axis with a ``scale``) is
exact for uniform copies of its units, as Keras' own RMSNormalization.

Everything here depends on the graph only. Cost: O(layers).
"""

from __future__ import annotations

import dataclasses
import math

from ._rules_attention import HeadSize, call_arguments, io_refusal, project_in_out, sqrt_ratio
from ._units import GroupRef, Label


def _gqa(walk, op, labels):
    layer = op.layer
    name = type(layer).__name__
    q_dense, k_dense, v_dense, o_dense = layer._query_dense, layer._key_dense, layer._value_dense, layer._output_dense
    gate = getattr(layer, "_gate_dense", None) if getattr(layer, "use_gate", False) else None
    rotary = getattr(layer, "rotary_embedding_layer", None)
    g = int(layer.num_key_value_heads)
    r = int(layer.num_query_heads) // g
    head_dim = int(k_dense.kernel.shape[-1])
    args = call_arguments(op)
    if "hidden_states" in args:  # LlamaAttention: self-attention on one input
        names = {"query": "hidden_states", "key": "hidden_states", "value": "hidden_states"}
    else:
        names = {"query": "query", "value": "value", "key": "key" if args.get("key") is not None else "value"}
    by_id = dict(zip(op.inputs, labels))
    lab = {what: by_id.get(id(args.get(arg))) for what, arg in names.items()}
    known = {id(args.get(arg)) for arg in names.values()}
    why = io_refusal(op, labels, known)
    if why is None and (len(o_dense.kernel.shape) != 3 or len(q_dense.kernel.shape) != 3
                        or int(layer.num_query_heads) != g * r):
        why = f"layer {op.path!r} ({name}) does not have the layout of grouped-query attention fastsplit reads"
    if why is not None:
        walk.refuse(list(lab.values()), why)

    o_kernel = o_dense.kernel
    out = project_in_out(walk, op, o_dense, ((lab["query"], q_dense, "query"), (lab["key"], k_dense, "key"),
                                             (lab["value"], v_dense, "value"), (lab["query"], gate, "gate")), why)

    def bias_state(label, dense, axis, what):
        if dense is not None and dense.bias is not None:
            walk.state(op, label, {f"{what}/bias": dense.bias}, axis)

    def partial(dense, ref, back):
        walk.config(dense, "partial_output_shape", ref, index=len(dense.partial_output_shape) - back)

    # key/value heads, each with its r query heads (query head h reads key/value head h // r)
    heads = walk.produce(op, g, k_dense.kernel, 1, None, "num_key_value_heads", dim="heads", refused=why)
    queries = Label(GroupRef(heads.ref.gid, heads.ref.width, heads.ref.expand * r), heads.units)
    walk.incoming(op, heads, v_dense.kernel, 1, "value/kernel")
    walk.incoming(op, queries, q_dense.kernel, 1, "query/kernel")
    if gate is not None:
        walk.incoming(op, queries, gate.kernel, 1, "gate/kernel")
    for dense, label, what in ((k_dense, heads, "key"), (v_dense, heads, "value"), (q_dense, queries, "query"),
                               (gate, queries, "gate")):
        bias_state(label, dense, 0, what)
        if dense is not None:
            partial(dense, label.ref, 2)
    walk.config(layer, "num_query_heads", queries.ref)
    walk.consume(op, queries, o_kernel, 0, attr="output/kernel", fold=False)

    # the query heads of every group alike (width r): query head h is unit h % r of group h // r, the
    # "last" layout of g positions; the groups' key/value heads are untouched, r follows
    qh = walk.produce(op, r, q_dense.kernel, 1, None, None, dim="query_heads", refused=why)
    if gate is not None:
        walk.incoming(op, qh, gate.kernel, 1, "gate/kernel")
    for dense, what in ((q_dense, "query"), (gate, "gate")):
        bias_state(qh, dense, 0, what)
        if dense is not None:
            partial(dense, qh.ref, 2)
    walk.config(layer, "num_query_heads", qh.ref)
    walk.config(layer, "num_repeats" if hasattr(layer, "num_repeats") else "num_key_value_groups", qh.ref)
    walk.consume(op, qh, o_kernel, 0, attr="output/kernel", fold=False)

    kd_why = why
    if kd_why is None and rotary is not None:
        kd_why = _rotary_refusal(op, name, rotary)
    kd = walk.produce(op, head_dim, k_dense.kernel, 2, None, None, dim="key_dim", refused=kd_why)
    if kd_why is not None:
        return out
    read = kd
    if rotary is not None:
        # old dimension i of a half sits at m*i of a head m times larger, at its own frequency; the copies
        # turn at others, so the query (and, to keep the output exact with any V copies, the output
        # projection) reads the first copy only
        walk.in_place(op, kd)
        read = Label(dataclasses.replace(kd.ref, first=True), kd.units)
    if hasattr(layer, "_inv_norm_factor"):  # LlamaAttention keeps only the softmax scale
        walk.config(_NormFactor.of(layer, "_inv_norm_factor", "_inv_norm_factor"), "size", kd.ref)
    else:
        walk.config(HeadSize.of(layer, "head_dim", "_inverse_sqrt_head_dim"), "size", kd.ref)
    walk.incoming(op, kd, v_dense.kernel, 2, "value/kernel")
    if gate is not None:
        walk.incoming(op, kd, gate.kernel, 2, "gate/kernel")
    for dense, what in ((k_dense, "key"), (v_dense, "value"), (gate, "gate")):
        bias_state(kd, dense, 1, what)
    walk.consume(op, read, q_dense.kernel, 2, attr="query/kernel", fold=False)
    walk.uses[-1].factor = sqrt_ratio
    if q_dense.bias is not None:
        walk.consume(op, read, q_dense.bias, 1, attr="query/bias", fold=False)
        walk.uses[-1].factor = sqrt_ratio
    for dense in (q_dense, k_dense, v_dense, gate):
        if dense is not None:
            partial(dense, kd.ref, 1)
    walk.consume(op, read, o_kernel, 1, attr="output/kernel", fold=False)
    return out


#: the rotary embeddings whose frequencies are read as ``base^(-2i/d)`` per dimension pair (i, i + d/2), with
#: any elementwise adjustment of each frequency (Llama 3.1's smoothing): "module.QualName"
_ROTARY = ("keras_hub.src.models.llama.llama_rotary_embedding.LlamaRotaryEmbedding",)


def _rotary_refusal(op, name, rotary):
    """Why ``key_dim`` cannot grow under ``rotary`` (None when it can: a verified rotate-half layout)."""
    kind = f"{type(rotary).__module__}.{type(rotary).__qualname__}"
    if kind in _ROTARY and rotary.feature_axis in (-1, 3) and rotary.sequence_axis == 1:
        return None
    return (f"layer {op.path!r} ({name}) applies the rotary embedding {type(rotary).__name__} (feature axis "
            f"{rotary.feature_axis}), whose frequencies fastsplit has not checked against a larger head size: "
            f"only {[k.rsplit('.', 1)[-1] for k in _ROTARY]} over the whole head (rotate-half, frequencies "
            f"base^(-2i/d)) grow. What grows here: {op.path + '/heads'!r} (key/value heads with their query heads), "
            "the model width and the FFN")


class _NormFactor(HeadSize):
    """A head size kept only as its softmax scale 1/√d (LlamaAttention's ``_inv_norm_factor``)."""

    @property
    def size(self) -> int:
        return round(getattr(self._layer(), self._inverse) ** -2)

    @size.setter
    def size(self, value) -> None:
        setattr(self._layer(), self._inverse, 1.0 / math.sqrt(float(value)))


def _rms_norm(walk, op, labels):
    """keras_hub's RMS norm over the last axis (``LlamaLayerNorm``): exact for uniform copies of its units."""
    layer, lab = op.layer, labels[0]
    if lab.units.axis != lab.units.rank - 1 or lab.units.positions != 1:
        return walk.refuse(lab, f"layer {op.path!r} ({type(layer).__name__}) normalises over the last axis, but the "
                                f"units sit on axis {lab.units.axis}")
    walk.uniform(op, lab)
    walk.state(op, lab, {"scale": layer.scale}, 0)
    return lab


#: keras_hub classes (by "module.QualName", never imported here) -> rule
_KERAS_HUB = {
    "keras_hub.src.models.llama.llama_attention.LlamaAttention": _gqa,
    "keras_hub.src.models.llama.llama_layernorm.LlamaLayerNorm": _rms_norm,
}


def register(reg, reg_by_name) -> None:
    """Add this module's rules (as ``_rules_attention.register``)."""
    from keras import layers as L

    reg([getattr(L, "GroupQueryAttention", None)], _gqa, produces=True)
    for name, fn in _KERAS_HUB.items():
        reg_by_name(name, fn, produces=name.endswith("Attention"))


__all__ = ["register"]
