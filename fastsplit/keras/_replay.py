"""Best-weight replay: ``restore_best_weights`` across growth.

When the model grew (or was pruned) after its best epoch, the best weights no longer fit
it. A model rebuilt at the best epoch's widths takes them and replays every event since:
splits exactly, without symmetry breaking, and prunes with the same fold of the removed
units into the next layer's bias. Its weights then fit the grown model, which computes
the best epoch's function (only approximately when a pruned unit was alive at the best
epoch; a ``RuntimeWarning`` says so).
"""

from __future__ import annotations

import warnings

import numpy as np

from ..compact import CompactPlan
from ..plan import SplitPlan
from ._layers import model_at_widths


def exact(p: SplitPlan) -> SplitPlan:
    """The same copies and shares without symmetry breaking (reproduces a function exactly)."""
    return SplitPlan(width=p.width, src=p.src, ratio=p.ratio, offset=np.zeros_like(p.offset), symmetry="none")


def is_prune(plans) -> bool:
    """Whether one event's plans (layer name -> plan) removed units rather than split them."""
    return any(isinstance(p, CompactPlan) for p in plans.values())


def replay(model, weights, widths, events, data):
    """``model``'s architecture at ``widths`` holding ``weights``, after the event plans ``events`` are replayed.

    ``data`` is what prunes fold the removed units' values on. Returns the model and the
    ``RuntimeWarning``s of prunes whose units were not dead (their fold is approximate).
    Cost: one model build, then one ``widen`` or ``prune`` call per event.
    """
    from . import prune, widen

    shadow = model_at_widths(model, widths)
    shadow.set_weights(weights)
    inexact = []
    for plans in events:
        if is_prune(plans):
            # the units pruned since may have been alive at the best epoch: then their mean on the
            # prune data is folded into the consumer's bias, which is close to, not exactly, that function
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                prune(shadow, plans, data=data, optimizer="reset")
            inexact += [w for w in caught if issubclass(w.category, RuntimeWarning)]
        else:
            widen(shadow, {k: exact(p) for k, p in plans.items()}, symmetry="none", optimizer="reset")
    return shadow, inexact


def restore_best(model, weights, widths, events, data, who: str):
    """Put the best epoch's ``weights`` (taken at ``widths``) into ``model``, replaying the ``events`` since.

    ``who`` names the callback in the warning. Cost: ``set_weights`` alone when nothing
    happened since the best epoch; else :func:`replay`.
    """
    if not events:
        model.set_weights(weights)
        return
    shadow, inexact = replay(model, weights, widths, events, data)
    model.set_weights(shadow.get_weights())
    if inexact:
        warnings.warn(
            f"{who}: units pruned after the best epoch were not dead at it; the restored "
            "weights fold their mean value on the prune data into the next layer's bias, so they compute "
            f"the best epoch's function only approximately ({inexact[0].message})",
            RuntimeWarning,
            stacklevel=3,
        )
