"""Optimizer state transport (DESIGN.md, "Optimizer state").

For every trainable variable that a growth event reshapes, the optimizer's
per-variable slots are found and given a *kind*:

- ``"m1"``: linear in the gradient (Adam ``m``, SGD momentum, Lion, gradient
  accumulators, RMSprop's centred mean): producing side ``m[src]·r``,
  consuming side ``m[src]``;
- ``"m2"``: quadratic in the gradient (Adam ``v`` and ``v_hat``, RMSprop and
  Adagrad accumulators): producing side ``v[src]·r²``, consuming side ``v[src]``;
- ``"inv"``: invariant to a rescaling of the gradient (RMSprop's momentum,
  which accumulates ``g/sqrt(v)``): copied on both sides;
- ``"ema"``: an average of the variable itself (``use_ema``): split like the
  variable (copied on the producing side, scaled by ``r`` on the consuming side).

An optimizer fastsplit does not know has its per-variable slots reset (with
a warning that names it); the iteration counter is always kept.
"""

from __future__ import annotations

import warnings

#: optimizer class name -> {attribute holding one slot per trainable variable: kind}
KNOWN = {
    "SGD": {"momentums": "m1"},
    "Adam": {"_momentums": "m1", "_velocities": "m2", "_velocity_hats": "m2"},
    "AdamW": {"_momentums": "m1", "_velocities": "m2", "_velocity_hats": "m2"},
    "Nadam": {"_momentums": "m1", "_velocities": "m2"},
    "RMSprop": {"_velocities": "m2", "_momentums": "inv", "_average_gradients": "m1"},
    "Adagrad": {"_accumulators": "m2"},
    "Lion": {"_momentums": "m1"},
    "Adamax": {"_m": "m1", "_u": "m1"},
    "Adadelta": {"_accumulated_grads": "m2", "_accumulated_delta_vars": "inv"},
}
#: slots every Keras optimizer may have
COMMON = {"_accumulated_gradients": "m1", "_model_variables_moving_average": "ema"}

#: (kind, side) -> role of fastsplit.Job; side is "producing" or "consuming"
ROLE = {
    ("m1", "producing"): "moment1",
    ("m1", "consuming"): "copy",
    ("m2", "producing"): "moment2",
    ("m2", "consuming"): "copy",
    ("inv", "producing"): "copy",
    ("inv", "consuming"): "copy",
    ("ema", "producing"): "copy",
    ("ema", "consuming"): "outgoing",
}


def role(kind: str, side: str, plan) -> str:
    """The split role of a slot of ``kind`` on ``side`` for ``plan``.

    A ``"fresh"`` unit is new, not a copy: its zero outgoing row starts without the source
    unit's first moment (``"moment1"`` gives it 0 and leaves the originals, whose share is 1,
    as they were); the second moment stays the source's, so its first steps are no larger than
    the source's. Measured on MNIST under Adam: the source's first moment there costs a third of
    what fresh units gain (issue 12).
    """
    if kind == "m1" and side == "consuming" and getattr(plan, "symmetry", None) == "fresh":
        return "moment1"
    return ROLE[(kind, side)]


def unwrap(optimizer):
    """The optimizers that hold state: ``[outer, inner]`` for a LossScaleOptimizer, else ``[opt]``."""
    if optimizer is None:
        return []
    out = [optimizer]
    inner = getattr(optimizer, "inner_optimizer", None)
    while inner is not None:
        out.append(inner)
        inner = getattr(inner, "inner_optimizer", None)
    return out


def _aligned_lists(opt):
    """Every attribute of ``opt`` that is a list with one optimizer variable (or None) per trainable variable."""
    n = len(getattr(opt, "_trainable_variables", []))
    own = {id(v) for v in getattr(opt, "_variables", [])}
    found = {}
    for name, value in vars(opt).items():
        if not isinstance(value, list) or len(value) != n or n == 0:
            continue
        if name in ("_trainable_variables", "_variables"):
            continue
        if all(v is None or id(v) in own for v in value) and any(v is not None for v in value):
            found[name] = value
    return found


def slot_map(optimizer, mode: str):
    """Per-variable slots of ``optimizer``: ``{id(model variable): [(slot variable, kind)]}``.

    ``kind`` is ``"m1"``, ``"m2"``, ``"inv"``, ``"ema"`` or ``"reset"``. Also returns the
    name of an optimizer whose slots are reset because fastsplit does not know it (or None).
    """
    slots: dict = {}
    unknown = None
    for opt in unwrap(optimizer):
        if not getattr(opt, "built", False):
            continue
        tvars = list(getattr(opt, "_trainable_variables", []))
        lists = _aligned_lists(opt)
        cls = type(opt).__name__
        if cls == "LossScaleOptimizer":
            continue
        known = KNOWN.get(cls)
        if known is None:
            unknown = cls
        table = dict(COMMON)
        table.update(known or {})
        for name, lst in lists.items():
            kind = table.get(name)
            if kind is None or known is None or mode == "reset":
                kind = "reset"
            for v, s in zip(tvars, lst, strict=False):
                if s is not None:
                    slots.setdefault(id(v), []).append((s, kind))
    return slots, unknown


def warn_unknown(name: str) -> None:
    warnings.warn(
        f"fastsplit does not know how to carry the state of optimizer {name!r}: the slots of the widened "
        "variables start from zero (iterations are kept)",
        RuntimeWarning,
        stacklevel=3,
    )


def reset_value(opt_of_slot, slot):
    """The value a fresh slot starts from (Adagrad's initial accumulator, else zero)."""
    if type(opt_of_slot).__name__ == "Adagrad":
        return float(getattr(opt_of_slot, "initial_accumulator_value", 0.0))
    return 0.0


def owner_of(optimizers, slot):
    """The optimizer among ``optimizers`` (and those they wrap) that holds ``slot``."""
    for outer in optimizers:
        for opt in unwrap(outer):
            if any(v is slot for v in getattr(opt, "_variables", [])):
                return opt
    return optimizers[0]


def rekey(optimizer, old_keys: dict) -> None:
    """Rebuild every mapping keyed by ``_var_key`` (TensorFlow keys on the tf.Variable inside).

    ``old_keys`` maps id(keras variable) -> the key it had before the swap.
    """
    for opt in unwrap(optimizer):
        tvars = getattr(opt, "_trainable_variables", None)
        if tvars is None:
            continue
        opt._trainable_variables_indices = {opt._var_key(v): i for i, v in enumerate(tvars)}
        excl = getattr(opt, "_exclude_from_weight_decay", None)
        if excl:
            back = {}
            for v in tvars:
                k = old_keys.get(id(v))
                if k is not None:
                    back[k] = opt._var_key(v)
            opt._exclude_from_weight_decay = {back.get(k, k) for k in excl}
        if hasattr(opt, "_exclude_from_weight_decay_cache"):
            opt._exclude_from_weight_decay_cache = {}
