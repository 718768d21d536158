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
    hist = cfg.pop("fastsplit_history", None)
    base = keras.Sequential if isinstance(model, keras.Sequential) else keras.Model
    shadow = base.from_config(unbuilt(cfg) if hist else cfg)
    restore_widths(shadow, hist or [], cfg.get("name"))  # widths the config could not hold (a keras_hub backbone)
    return shadow


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


# ------------------------------------------------------------------------------ widths on load
def _children(layer) -> list:
    # tracking order: what Keras saves the weights by, so it is the same in a model rebuilt from the config
    return list(layer._flatten_layers(include_self=False, recursive=False))


def locate(model, path: str) -> list:
    """``path`` (``"block/att/heads"``) as child indices from ``model`` (``[2, 0, "heads"]``).

    Sublayers that a user's layer makes in ``__init__`` are named from a per-process
    counter (``dense_7``), and a layer whose constructor takes no ``name`` gets a new one
    when rebuilt, so a saved path may name nothing, or another layer, after loading; the
    indices do not change. Whatever is not a child's name (``heads``) stays a string.
    Cost: O(depth x children)."""
    out, layer = [], model
    for part in path.split("/"):
        kids = _children(layer) if layer is not None else []
        i = next((k for k, c in enumerate(kids) if c.name == part), None)
        out.append(part if i is None else i)
        layer = None if i is None else kids[i]
    return out


def resolve(model, at) -> str | None:
    """The path in ``model`` of what :func:`locate` gave as ``at``; None where an index names no child."""
    parts, layer = [], model
    for part in at:
        if isinstance(part, str):
            parts.append(part)
            layer = None
            continue
        kids = _children(layer) if layer is not None else []
        if not 0 <= part < len(kids):
            return None
        layer = kids[part]
        parts.append(layer.name)
    return "/".join(parts)


def check_at(at, where):
    """GrowthError naming ``where`` unless ``at`` is None (a history from before ``at``) or what :func:`locate` gives."""
    if at is not None and (not isinstance(at, list) or not at or not all(
            isinstance(a, str) or isinstance(a, int) and not isinstance(a, bool) and a >= 0 for a in at)):
        raise GrowthError(f"{where}['at'] must be a list of child indices and names; got {at!r:.200}")


_MODELS = ("Functional", "Sequential", "Model", "GrownFunctional", "GrownSequential")


def unbuilt(config: dict) -> dict:
    """``config`` (a Functional's or Sequential's) without its layers' ``build_config``, nested models' too.

    Keras builds a layer from its saved input shape before calling it; a layer fed by one
    that comes back at its first widths (a user's block, a keras_hub backbone) would then
    be built for the grown width and refuse the smaller input. Every layer of a Functional
    or Sequential is called while the model is rebuilt, so it is built from the shape it
    receives, and :func:`restore_widths` grows it with its producers. Cost: O(layers)."""
    layers = config.get("layers")
    if not isinstance(layers, list):
        return config
    out = []
    for entry in layers:
        if isinstance(entry, dict):
            entry = {k: v for k, v in entry.items() if k != "build_config"}
            if isinstance(entry.get("config"), dict) and entry.get("class_name") in _MODELS:
                entry["config"] = unbuilt(entry["config"])
        out.append(entry)
    return {**config, "layers": out}


def _structural_plan(kind: str, old: int, new: int):
    """Any plan from ``old`` to ``new`` units: the weights are loaded over it, only the shapes count.

    Copies go round the units (``arange(new) % old``), so a group that a norm requires to split
    uniformly gets the same number of copies per unit whenever the saved growth did."""
    if kind == "split":
        src = np.arange(new) % old
        counts = np.bincount(src, minlength=old)
        return SplitPlan(width=old, src=src, ratio=1.0 / counts[src], offset=np.zeros(new), symmetry="none")
    return list(range(new, old))  # prune and merge: the units removed; which ones does not matter here


def _chains(model, hist, events, owner, fail):
    """Per group of the rebuilt model: ``[(event index, old, new, saved path), ...]`` in history order,
    and the rebuilt group of each ``(event index, saved path)``.

    Each event names the producers it grew; they are found among the rebuilt model's
    groups (``owner``: producer path -> CoupledGroup) by their child indices (``at``,
    :func:`locate`) where the history has them, else by path. ``fail`` makes the GrowthError."""
    chains: dict = {}
    found: dict = {}  # (event index, saved path) -> the rebuilt group's name
    for i, ev in enumerate(events):
        for path, lg in ev.layers.items():
            at = hist[i]["layers"][path].get("at")  # checked with the rest of the history (check_at)
            grp = owner.get(path if at is None else resolve(model, at))
            if grp is None:
                raise fail(f"fastsplit_history[{i}] grew {path!r}"
                           + ("" if at is None else f" (child indices {at})") + ", which this model does not have")
            found[i, path] = grp.name
            if ev.kind == "split" and lg.new_width < lg.old_width or ev.kind != "split" and lg.new_width > lg.old_width:
                raise fail(f"fastsplit_history[{i}] is a {ev.kind!r} event but takes {path!r} from "
                           f"{lg.old_width} to {lg.new_width} units")
            chain = chains.setdefault(grp.name, [])
            if chain and chain[-1][0] == i:
                if chain[-1][1:3] != (lg.old_width, lg.new_width):
                    raise fail(f"fastsplit_history[{i}] takes {chain[-1][3]!r} from {chain[-1][1]} to {chain[-1][2]} "
                               f"units but {path!r}, of the same group, from {lg.old_width} to {lg.new_width}")
                continue
            if chain and chain[-1][2] != lg.old_width:
                raise fail(f"fastsplit_history[{i}] takes {path!r} from {lg.old_width} units, but "
                           f"fastsplit_history[{chain[-1][0]}] left it ({chain[-1][3]!r}) at {chain[-1][2]}")
            chain.append((i, lg.old_width, lg.new_width, path))
    return chains, found


def restore_widths(model, hist: list, model_name=None) -> None:
    """Grow ``model``, just built from its config, to the widths its saved history ``hist`` gives it.

    A layer whose config records its width (``Dense.units``, ``MultiHeadAttention.num_heads``)
    is rebuilt grown; one built from constructor arguments that cannot say how it grew (a
    keras_hub backbone's ``hidden_dim``/``num_heads``, a user's block that makes its
    sublayers in ``__init__``) is rebuilt at its first widths. Each group of the rebuilt model
    is therefore at the width before the first event that touched it (every one of those
    events is replayed on it, in order, by shape only: ``widen``/``prune`` with plans of the
    right widths, since the saved weights are loaded over the result) or at the width after
    the last (nothing to do). Everything is checked before anything changes: a history naming a
    layer the model lacks, events that do not chain, a group at neither width, or an event
    whose producers are partly at either width raise GrowthError naming the entry and group.
    Cost: one graph walk; then one ``widen``/``prune`` per event that needs replaying.
    """
    if not hist:
        return
    from . import coupled_groups, prune, widen
    from ._event import GrowthEvent

    whose = f" of model {model_name!r}" if isinstance(model_name, str) else ""

    def fail(msg):
        return GrowthError(f"the saved growth history{whose} does not fit the model built from its config: {msg}")

    events = [GrowthEvent.from_dict(d, f"fastsplit_history[{i}]") for i, d in enumerate(hist)]
    groups = coupled_groups(model)
    owner = {p: g for g in groups for p in g.producers}
    width = {g.name: g.width for g in groups}
    chains, found = _chains(model, hist, events, owner, fail)
    replay = set()
    for name, chain in chains.items():
        first, last = chain[0][1], chain[-1][2]
        if width[name] == last:
            continue  # its config recorded the growth
        if width[name] != first:
            raise fail(f"group {name!r} has {width[name]} units, but the history takes it from {first} "
                       f"(fastsplit_history[{chain[0][0]}]) to {last} (fastsplit_history[{chain[-1][0]}])")
        replay.add(name)
    for i, ev in enumerate(events):
        # the producers one event grew as one group must be all rebuilt at the old widths or all at the new
        for gi in {lg.group for lg in ev.layers.values()}:
            paths = [p for p, lg in ev.layers.items() if lg.group == gi]
            redo = {p: found[i, p] in replay for p in paths}
            if len(set(redo.values())) > 1:
                old = [p for p, r in redo.items() if r]
                raise fail(f"fastsplit_history[{i}] grew {paths} as one group, but the model has {old} at the "
                           f"width before it and {[p for p, r in redo.items() if not r]} at the width after")
    for i, ev in enumerate(events):
        plans = {name: _structural_plan(ev.kind, old, new)
                 for name, chain in chains.items() if name in replay
                 for j, old, new, _ in chain if j == i and old != new}
        if not plans:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # values here are placeholders for the saved weights
                if ev.kind == "split":
                    widen(model, plans, symmetry="none", optimizer="reset")
                else:
                    prune(model, plans, optimizer="reset")
        except (GrowthError, ValueError) as exc:
            raise fail(f"replaying fastsplit_history[{i}] on {sorted(plans)} failed: {exc}") from exc
