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
  1/√d'), the output projection's rows split by the ratios. Refused under a rotary position
  embedding (LlamaAttention): its frequencies ``base^(-2i/d)`` depend on the head size, so a
  copied dimension would rotate at another frequency. (Doubling d → 2d keeps every old
  frequency at the even pair indices, so zero-padded queries could be exact; not built.)
- ``path``: the width the output projection writes (``d_model``); the query, key and value
  inputs are consumed by the Q, K and V projections.

keras_hub's ``LlamaLayerNorm`` (RMS normalisation over the last axis with a ``scale``) is
exact for uniform copies of its units, as Keras' own RMSNormalization.

Everything here depends on the graph only. Cost: O(layers).
"""

from __future__ import annotations

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
        kd_why = (f"layer {op.path!r} ({name}) applies a rotary position embedding over the head size "
                  f"({head_dim}): its frequencies base^(-2i/d) depend on the head size d, so a copied dimension "
                  "would rotate at another frequency and the function would change. What grows here: "
                  f"{op.path + '/heads'!r} (key/value heads with their query heads), the model width and the FFN")
    kd = walk.produce(op, head_dim, k_dense.kernel, 2, None, None, dim="key_dim", refused=kd_why)
    if kd_why is not None:
        return out
    walk.config(HeadSize.of(layer, "head_dim", "_inverse_sqrt_head_dim"), "size", kd.ref)
    walk.incoming(op, kd, v_dense.kernel, 2, "value/kernel")
    if gate is not None:
        walk.incoming(op, kd, gate.kernel, 2, "gate/kernel")
    for dense, what in ((k_dense, "key"), (v_dense, "value"), (gate, "gate")):
        bias_state(kd, dense, 1, what)
    walk.consume(op, kd, q_dense.kernel, 2, attr="query/kernel", fold=False)
    walk.uses[-1].factor = sqrt_ratio
    if q_dense.bias is not None:
        walk.consume(op, kd, q_dense.bias, 1, attr="query/bias", fold=False)
        walk.uses[-1].factor = sqrt_ratio
    for dense in (q_dense, k_dense, v_dense, gate):
        if dense is not None:
            partial(dense, kd.ref, 1)
    walk.consume(op, kd, o_kernel, 1, attr="output/kernel", fold=False)
    return out


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
