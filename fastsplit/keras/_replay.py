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
from ._errors import GrowthError


def exact(p: SplitPlan) -> SplitPlan:
    """The same copies and shares without symmetry breaking (reproduces a function exactly).

    A ``"fresh"`` plan is kept: its new units' outgoing weights are zero, so it is exact already."""
    if p.symmetry == "fresh":
        return p
    return SplitPlan(width=p.width, src=p.src, ratio=p.ratio, offset=np.zeros_like(p.offset), symmetry="none")


def is_prune(plans) -> bool:
    """Whether one event's plans (layer name -> plan) removed units rather than split them."""
    return any(isinstance(p, CompactPlan) for p in plans.values())


def rebuild(model, config):
    """A fresh model of ``model``'s class from ``config`` (its ``get_config()`` at the best epoch).

    The config taken then holds every width-dependent entry as it was (units, filters, a Reshape's
    target shape, GroupNormalization's groups, nested models, a user's layer's own widths), which
    rewriting only ``units``/``filters`` of today's config could not.
    """
    import copy

    import keras

    cfg = copy.deepcopy(config)
    cfg.pop("fastsplit_history", None)
    base = keras.Sequential if isinstance(model, keras.Sequential) else keras.Model
    return base.from_config(cfg)


def replay(model, weights, config, events, data):
    """``model`` as it was when ``config`` was taken, holding ``weights``, after the event plans ``events``.

    ``data`` is what prunes fold the removed units' values on. Returns the model and the
    ``RuntimeWarning``s of prunes whose units were not dead (their fold is approximate).
    Cost: one model build, then one ``widen`` or ``prune`` call per event.
    """
    from . import prune, widen

    shadow = rebuild(model, config)
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


def restore_best(model, weights, config, events, data, who: str):
    """Put the best epoch's ``weights`` (taken with ``config``) into ``model``, replaying the ``events`` since.

    ``who`` names the callback in the warning. Cost: ``set_weights`` alone when nothing
    happened since the best epoch; else :func:`replay`.
    """
    if not events:
        model.set_weights(weights)
        return
    if isinstance(config, Exception):
        raise GrowthError(f"{who}: restoring the best weights across growth rebuilds the model from its config "
                          f"at the best epoch, which it does not give ({config})") from config
    shadow, inexact = replay(model, weights, config, events, data)
    model.set_weights(shadow.get_weights())
    if inexact:
        warnings.warn(
            f"{who}: units pruned after the best epoch were not dead at it; the restored "
            "weights fold their mean value on the prune data into the next layer's bias, so they compute "
            f"the best epoch's function only approximately ({inexact[0].message})",
            RuntimeWarning,
            stacklevel=3,
        )
