"""Rules for recurrent layers (``LSTM``, ``GRU``, ``SimpleRNN``, ``Bidirectional``) and ``Embedding``.

A recurrent layer of ``u`` units keeps its gates side by side: ``kernel`` is
``(inputs, k * u)``, ``recurrent_kernel`` ``(u, k * u)`` and ``bias``
``(k * u,)`` (a GRU with ``reset_after=True``: ``(2, 3 * u)``), gate ``g`` of
unit ``j`` in column ``g * u + j`` (k = 4 for an LSTM, 3 for a GRU, 1 for a
SimpleRNN). Unit ``j`` owns column ``j`` of every gate block: an axis of
``k`` positions × ``u`` units (``Units.channels="last"``), which the split
kernels already read. Its incoming columns (``kernel``, ``recurrent_kernel``,
``bias``) are copied; its outgoing row of ``recurrent_kernel`` (the unit feeds
itself back) and of the next layer's kernel are split by the plan's ratios.
From equal initial states (zeros) the copies of a unit then hold equal
hidden and cell states at every step, so the layer computes the same function
(DESIGN.md, "Transformers and recurrent layers"). ``recurrent_kernel`` is
consumed and produced by the same group: one two-axis job.

``Bidirectional`` holds two such layers reading the same input; Keras infers
its output shape from the forward layer alone, so the two directions keep one
width: they are one group whatever the ``merge_mode``, whose producers are
called ``"<path>/forward"`` and ``"<path>/backward"`` (``"bidirectional/forward"``
names the group; Keras' own names of the two layers carry counters). With
``"concat"`` the output's unit axis is the forward units then the backward
units; with ``"sum"``, ``"ave"`` and ``"mul"`` unit ``j`` of the output mixes
unit ``j`` of both.

``Embedding`` makes ``output_dim`` units of its own (columns of
``embeddings``); its input is integer ids, so it consumes none.
"""

from __future__ import annotations

from ._rules import ELEMENTWISE
from ._units import ConcatRef, Label, Op


def _act_name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _why_not(walk, op) -> str | None:
    """Why the recurrent layer of ``op`` cannot be split (None: it can)."""
    layer, path = op.layer, op.path
    name = type(layer).__name__
    if type(layer) not in _RECURRENT:
        return (f"layer {path!r} ({name}) is not an LSTM, GRU or SimpleRNN: fastsplit knows the gate layout of "
                "those three only (register a rule for others)")
    if layer.stateful:
        return (f"layer {path!r} ({name}) is stateful: its state variables carry the units from one batch to the "
                "next, and fastsplit does not split them")
    if layer.return_state:
        return (f"layer {path!r} ({name}) returns its states as separate tensors (return_state=True), which "
                "fastsplit does not follow")
    args = getattr(op.node, "arguments", None)
    if (len(op.inputs) != 1 if args is None  # a mask comes in as a second tensor too: only a state counts
            else len(args.args) > 1 or args.kwargs.get("initial_state") is not None):
        return (f"layer {path!r} ({name}) takes its initial state from another tensor, whose units would have to "
                "be split with its own")
    act = getattr(layer.cell, "recurrent_activation", None)
    if act is not None and _act_name(act) not in ELEMENTWISE:
        return (f"layer {path!r} applies recurrent_activation {_act_name(act)!r} across its units; only "
                "elementwise activations keep the function when units are copied")
    return None


def _recurrent(walk, op, lab, why=None):
    """One LSTM / GRU / SimpleRNN call: consume ``lab`` on the kernel's rows, produce ``units``."""
    layer = op.layer
    why = why or _why_not(walk, op)
    if why is not None and type(layer) not in _RECURRENT:
        walk.refuse(lab, why)
        return None
    cell = layer.cell
    if lab is not None:
        if why is not None:
            walk.refuse(lab, why)
        elif lab.units.axis != lab.units.rank - 1:
            walk.refuse(lab, f"layer {op.path!r} ({type(layer).__name__}) reads the last axis, but the units sit "
                             f"on axis {lab.units.axis}")
        else:
            walk.consume(op, lab, cell.kernel, 0, fold=False)  # no bias of its own to fold into (the cell's)
    out = walk.produce(op, cell.units, cell.kernel, -1, cell.bias, None, axis=-1, refused=why, bias_axis=-1)
    walk.incoming(op, out, cell.recurrent_kernel, -1, "recurrent_kernel")
    walk.consume(op, out, cell.recurrent_kernel, 0, attr="recurrent_kernel", fold=False)
    walk.config(cell, "units", out.ref)
    walk.config(cell, "output_size", out.ref)
    if isinstance(cell.state_size, int):
        walk.config(cell, "state_size", out.ref)
    else:
        for i in range(len(cell.state_size)):
            walk.config(cell, "state_size", out.ref, index=i)
    for i in range(len(layer.state_size)):
        walk.config(layer, "state_size", out.ref, index=i)
    return None if layer.return_state else out


def _rnn(walk, op, labels):
    return _recurrent(walk, op, labels[0] if labels else None)


def _bidirectional(walk, op, labels):
    bidi = op.layer
    lab = labels[0] if labels else None
    why = None
    if bidi.merge_mode is None:
        why = (f"layer {op.path!r} (Bidirectional) returns the two directions as separate tensors "
               "(merge_mode=None), which fastsplit does not follow")
    outs = []
    for sub, direction in ((bidi.forward_layer, "forward"), (bidi.backward_layer, "backward")):
        sub_op = Op(sub, f"{op.path}/{direction}", op.inputs, op.outputs, op.node)
        outs.append(_recurrent(walk, sub_op, lab, why))
        if lab is not None:  # each direction keeps its own build shape (saved with its config): it follows too
            walk.layer_inputs.append((sub, op.node, [walk.canon(k) for k in op.inputs]))
    if any(o is None for o in outs):
        walk.refuse(outs, why or f"layer {op.path!r} (Bidirectional): one direction cannot be split")
        return None
    merged = walk.merge(op, outs)  # one width for both directions (Keras infers the shape from the forward one)
    if bidi.merge_mode != "concat":
        return merged
    width = walk.width_of(merged.ref)
    return Label(ConcatRef(((merged.ref, width), (merged.ref, width))), merged.units)


def _embedding(walk, op, labels):
    layer = op.layer
    lab = labels[0] if labels else None
    if lab is not None:
        walk.refuse(lab, f"layer {op.path!r} (Embedding) reads integer ids, not units")
    table = layer._embeddings if hasattr(layer, "_embeddings") else layer.embeddings
    return walk.produce(op, layer.output_dim, table, -1, None, "output_dim", axis=-1)


_RECURRENT: tuple = ()


def register(reg) -> None:
    """Add the rules of this module through ``_rules._builtins``' ``reg(classes, fn, **kw)``."""
    global _RECURRENT
    from keras import layers as L

    _RECURRENT = (L.LSTM, L.GRU, L.SimpleRNN)
    reg(list(_RECURRENT), _rnn, produces=True)
    reg([L.Bidirectional], _bidirectional, produces=True)
    reg([L.Embedding], _embedding, produces=True)


__all__ = ["register"]
