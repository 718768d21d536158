"""The layers that may grow, read from the public graph API, and the model rebuilt at other widths.

Everything here asks :func:`fastsplit.keras.coupled_groups`: a coupled group can grow
when its ``refused`` list is empty and it has a consumer, and the callbacks name it by
its first producer. A width given for one producer of a group applies to every producer of it
(all the layers that feed one ``Add``).
"""

from __future__ import annotations

from ._errors import GrowthError


def graph_groups(model) -> list:
    """:func:`fastsplit.keras.coupled_groups` (imported on first use). Cost: one walk over the graph."""
    from . import coupled_groups

    return coupled_groups(model)


def check_layer_names(layers):
    """``None`` or a non-empty list of distinct layer names (a single name is a list of one, a set a sorted list).

    ``GrowthError`` names the value otherwise (a dict, a number, a name twice, a non-string).
    """
    if layers is None:
        return None
    given = layers
    if isinstance(layers, str):
        layers = [layers]
    if isinstance(layers, (set, frozenset)) and all(isinstance(n, str) for n in layers):
        layers = sorted(layers)
    if isinstance(layers, (list, tuple)):
        layers = list(layers)
        if layers and all(isinstance(n, str) and n for n in layers):
            twice = sorted({n for n in layers if layers.count(n) > 1})
            if twice:
                raise GrowthError(f"layers names {twice} more than once; got layers={given!r}")
            return layers
    raise GrowthError(f"layers must be None or a non-empty list of layer names; got layers={given!r}")


def width_of(layer) -> int:
    """The unit count of a Dense/Conv layer (its kernel's last axis) or a recurrent layer (its ``units``)."""
    cell = getattr(layer, "cell", None)
    if cell is not None:
        return int(cell.units)
    return int(layer.kernel.shape[-1])


#: the producers whose kernel's last axis holds their units (a recurrent layer's: one block per gate),
#: which the scores and widths here assume
_SCORED = ("Dense", "Conv1D", "Conv2D", "Conv3D", "LSTM", "GRU", "SimpleRNN")


def _unscored(model, group) -> str | None:
    """Why the callbacks cannot rank and count the units of ``group`` (None when they can).

    ConvTranspose and SeparableConv kernels keep their units elsewhere, and a Dense reshaped into
    channels has fewer units than kernel columns: the callbacks split those with ``select="all"``.
    """
    layers = {lay.name: lay for lay in model._flatten_layers(include_self=False, recursive=True)}
    for path in group.producers:
        layer = layers.get(path.rsplit("/", 1)[-1])
        if (layer is None or type(layer).__name__ not in _SCORED or getattr(layer, "groups", 1) != 1
                or width_of(layer) != int(group.width)):
            kind = "?" if layer is None else type(layer).__name__
            return (f"the growth callbacks rank and count units of Dense/Conv layers whose kernel's last axis "
                    f"holds them; {path!r} ({kind}, {group.width} units) can be split with fastsplit.keras.widen")
    return None


def growable_layers(model, groups=None) -> list[str]:
    """Names of the hidden Dense/Conv layers whose units can be split, in graph order: the callbacks'
    default ``layers``.

    One name per coupled group whose ``refused`` is empty, that has a consumer and whose
    producers keep their units on the kernel's last axis: its first producer. The output
    layer is never among them (the graph refuses units that reach a model output). Any other
    splittable group (attention heads, ``d_model``) grows when ``layers=`` names it.
    Cost: one walk over the graph unless ``groups`` is given.
    """
    groups = graph_groups(model) if groups is None else groups
    return [g.producers[0] for g in groups if not g.refused and g.consumers and _unscored(model, g) is None]


def group_named(groups, name):
    """The coupled group ``name`` names (its own name or one of its producers), or None."""
    return next((g for g in groups if g.name == name), None) or next((g for g in groups if name in g.producers), None)


def why_not_growable(model, name, groups=None) -> str | None:
    """Why ``name`` (a layer or a coupled group's name) cannot grow (from its group's ``refused``), or None."""
    groups = graph_groups(model) if groups is None else groups
    group = group_named(groups, name)
    if group is not None:
        if group.refused:
            return f"layer {name!r} cannot grow: " + "; ".join(group.refused)
        if not group.consumers:
            return f"layer {name!r} has no consuming layer; the output layer never grows"
        return None
    can = f"the layers that can be grown are {[g.name for g in groups if g.splittable and g.consumers]}"
    try:
        layer = model.get_layer(name)
    except ValueError:
        return f"the model has no layer named {name!r}; {can}"
    return f"layer {name!r} is a {type(layer).__name__}, not a layer whose units can be split; {can}"


def group_widths(model, names, groups=None) -> dict:
    """name -> the unit count of the group it names. Cost: one walk over the graph unless ``groups`` is given."""
    groups = graph_groups(model) if groups is None else groups
    return {n: int(group_named(groups, n).width) for n in names}


def scored_layer(model, name, groups=None):
    """The layer whose kernel the scores read for ``name``, or None when its units are not a kernel's last
    axis (attention heads, ``key_dim``, an embedding's width, a ConvTranspose): those grow with
    ``select="all"`` and are not ranked."""
    groups = graph_groups(model) if groups is None else groups
    group = group_named(groups, name)
    if group is None or _unscored(model, group) is not None:
        return None
    try:
        return model.get_layer(name if name in group.producers else group.producers[0])
    except ValueError:  # a layer inside a block
        return None


def refusals(groups) -> list[str]:
    """``"producer: reason; reason"`` for each coupled group that cannot be split."""
    return [f"{g.producers[0]!r}: " + "; ".join(g.refused) for g in groups if g.refused]


