"""``GrowthEvent``: what one call of ``widen`` changed, as plain JSON-able data."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers

from ._errors import GrowthError

PHASES = ("plan", "export", "kernel", "import", "variables", "swap", "retrace")


@dataclasses.dataclass
class LayerGrowth:
    """One producing layer of a growth event.

    Attributes:
        name: the layer's path in the model (``"block/dense_1"`` inside a nested model).
        old_width: units before.
        new_width: units after.
        neurons: the old units that were split (each one once, ascending).
        params_before: parameters of the layer before (its own weights).
        params_after: parameters of the layer after.
        group: index of the coupled group in this event (layers of one group share a plan).
    """

    name: str
    old_width: int
    new_width: int
    neurons: list
    params_before: int = 0
    params_after: int = 0
    group: int = 0


@dataclasses.dataclass
class GrowthEvent:
    """What one call of :func:`fastsplit.keras.widen` changed.

    Attributes:
        layers: ``{layer path: LayerGrowth}`` for every producing layer widened
            (every member of every group split).
        params_before: trainable + non-trainable parameters of the model before.
        params_after: the same after.
        times: seconds per phase: ``plan`` (graph walk, plans, job list),
            ``export`` (DLPack out of the framework), ``kernel`` (the
            ``split_many`` calls), ``import`` (DLPack back in), ``variables``
            (new backend variables), ``swap`` (install them, update layers,
            optimizer), ``retrace`` (drop cached train/test/predict functions;
            the retrace itself happens on the next step), and ``total``.
        symmetry: the symmetry breaking of the plans made from indices.
        optimizer: ``"carry"``, ``"reset"``, or ``"reset:<Name>"`` for an
            optimizer whose state fastsplit does not know.
        iteration: the optimizer's iteration counter at the event (None without one).
        backend: the fastsplit backend that ran the kernel.
        keras_backend: ``"tensorflow"``, ``"jax"`` or ``"torch"``.
        tensors: how many tensors were split (weights, statistics and slots).
        bytes_new: bytes of the new tensors.
        split_calls: how many ``split_many`` (or ``compact_many``) calls the event needed:
            1 (a kernel that is both a consumer and a producer is one two-axis job).
        kind: ``"split"`` (:func:`~fastsplit.keras.widen`), ``"prune"``
            (:func:`~fastsplit.keras.prune`; ``LayerGrowth.neurons`` lists the
            removed units) or ``"merge"`` (:func:`~fastsplit.keras.merge_twins`).
        transfers: for variables on several JAX devices (``keras.distribution``),
            ``{device: {"received": bytes, "ideal": bytes, "gather": bytes}}``:
            the bytes each device received from other devices during the event,
            the least it could have (the source units of its new shards that it
            did not hold) and what gathering every whole old tensor on it would
            have brought. Empty for single-device models.
    """

    layers: dict = dataclasses.field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    times: dict = dataclasses.field(default_factory=dict)
    symmetry: str = "nudge"
    optimizer: str = "carry"
    iteration: int | None = None
    backend: str = "numpy"
    keras_backend: str = ""
    tensors: int = 0
    bytes_new: int = 0
    split_calls: int = 0
    kind: str = "split"
    transfers: dict = dataclasses.field(default_factory=dict)

    @property
    def neurons_split(self) -> int:
        """Total number of old units that were split."""
        return sum(len(g.neurons) for g in self.layers.values())

    def to_dict(self) -> dict:
        """A JSON-able dict (``json.dumps`` works on it)."""
        d = dataclasses.asdict(self)
        d["layers"] = {k: dataclasses.asdict(v) for k, v in self.layers.items()}
        return json.loads(json.dumps(d))

    @classmethod
    def from_dict(cls, d: dict, where: str = "event") -> GrowthEvent:
        """The event that :meth:`to_dict` wrote; keys it does not know are ignored (a newer fastsplit's).

        Raises ``GrowthError`` naming the entry (``where``, e.g. ``fastsplit_history[2]``) when a
        known field is missing or of the wrong type, so a damaged saved history is refused
        when it is read, not when it is used. Cost: O(layers + neurons).
        """
        check_event_dict(d, where)
        d = dict(d)
        lfields = {f.name for f in dataclasses.fields(LayerGrowth)}
        d["layers"] = {k: LayerGrowth(**{f: x for f, x in v.items() if f in lfields})
                       for k, v in d.get("layers", {}).items()}  # fmt: skip
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    def summary(self) -> str:
        """One line per layer: ``name: old -> new (k split)``."""
        verb = {"split": "split", "prune": "removed", "merge": "merged away"}.get(self.kind, self.kind)
        lines = [f"{n}: {g.old_width} -> {g.new_width} ({len(g.neurons)} {verb})" for n, g in self.layers.items()]
        lines.append(f"params {self.params_before} -> {self.params_after} in {self.times.get('total', 0):.4f}s")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ checking saved events
def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _bad(where, what, value):
    return GrowthError(f"{where} must be {what}; got {value!r}")


def _check_int(d, key, where, *, low=0, optional=False):
    """A missing key passes (the dataclass default fills it); None passes when ``optional``."""
    if key not in d or (optional and d[key] is None):
        return
    v = d[key]
    if not _is_int(v) or v < low:
        raise _bad(f"{where}[{key!r}]", f"an integer >= {low}" + (" or None" if optional else ""), v)


def _check_str(d, key, where):
    if key in d and not isinstance(d[key], str):
        raise _bad(f"{where}[{key!r}]", "a string", d[key])


def check_layer_dict(v, where: str) -> None:
    """``GrowthError`` naming the field when ``v`` is not a :class:`LayerGrowth` as a dict."""
    if not isinstance(v, dict):
        raise _bad(where, "a dict of LayerGrowth fields", v)
    missing = [k for k in ("name", "old_width", "new_width", "neurons") if k not in v]
    if missing:
        raise GrowthError(f"{where} lacks {missing}; got {v!r}")
    _check_str(v, "name", where)
    _check_int(v, "old_width", where, low=1)
    _check_int(v, "new_width", where, low=1)
    for key in ("params_before", "params_after", "group"):
        _check_int(v, key, where)
    neurons = v["neurons"]
    if not isinstance(neurons, list) or not all(_is_int(u) and 0 <= u < v["old_width"] for u in neurons):
        raise _bad(f"{where}['neurons']", f"a list of unit indices in [0, {v['old_width']})", neurons)


def check_event_dict(d, where: str = "event") -> None:
    """``GrowthError`` naming the entry and field when ``d`` is not a :class:`GrowthEvent` as a dict.

    Checks what :meth:`GrowthEvent.from_dict` and the event's methods rely on: the
    types of the known fields, the layer entries, non-negative counts. Unknown keys pass.
    """
    if not isinstance(d, dict):
        raise _bad(where, "a dict (GrowthEvent.to_dict())", d)
    layers = d.get("layers", {})
    if not isinstance(layers, dict):
        raise _bad(f"{where}['layers']", "a dict layer path -> LayerGrowth dict", layers)
    for path, v in layers.items():
        if not isinstance(path, str):
            raise _bad(f"{where}['layers']", "keyed by layer paths (strings)", path)
        check_layer_dict(v, f"{where}['layers'][{path!r}]")
    for key in ("params_before", "params_after", "tensors", "bytes_new", "split_calls"):
        _check_int(d, key, where)
    _check_int(d, "iteration", where, optional=True)
    for key in ("symmetry", "optimizer", "backend", "keras_backend", "kind"):
        _check_str(d, key, where)
    transfers = d.get("transfers", {})
    if not isinstance(transfers, dict) or not all(
        isinstance(k, str) and isinstance(t, dict) and all(_is_int(n) and n >= 0 for n in t.values())
        for k, t in transfers.items()
    ):
        raise _bad(f"{where}['transfers']", "a dict device -> {what: bytes} (non-negative integers)", transfers)
    times = d.get("times", {})
    if not isinstance(times, dict) or not all(
        isinstance(k, str) and isinstance(t, numbers.Real) and not isinstance(t, bool) and math.isfinite(t)
        for k, t in times.items()
    ):
        raise _bad(f"{where}['times']", "a dict phase -> seconds (finite numbers)", times)
