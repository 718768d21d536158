"""``GrowthEvent``: what one call of ``widen`` changed, as plain JSON-able data."""

from __future__ import annotations

import dataclasses
import json

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
    def from_dict(cls, d: dict) -> GrowthEvent:
        d = dict(d)
        d["layers"] = {k: LayerGrowth(**v) for k, v in d.get("layers", {}).items()}
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    def summary(self) -> str:
        """One line per layer: ``name: old -> new (k split)``."""
        verb = {"split": "split", "prune": "removed", "merge": "merged away"}.get(self.kind, self.kind)
        lines = [f"{n}: {g.old_width} -> {g.new_width} ({len(g.neurons)} {verb})" for n, g in self.layers.items()]
        lines.append(f"params {self.params_before} -> {self.params_after} in {self.times.get('total', 0):.4f}s")
        return "\n".join(lines)
