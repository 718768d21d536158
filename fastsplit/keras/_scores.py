"""Unit scores: how much each unit of a producing layer deserves to be split.

A score is one number per unit of a layer (its output axis); higher means split
first. Scores are computed only when a growth event needs them, except that
``"change"`` takes a snapshot of the incoming weights at the start of each epoch.

| name | what it measures | cost |
| --- | --- | --- |
| ``"change"`` | L2 norm of how far each unit's incoming weights moved over the last epoch (the article's "neurons undergoing the most change") | one copy of each kernel per epoch, no extra passes |
| ``"gradient"`` | L2 norm of the gradient of the loss with respect to each unit's incoming weights, on a held-back probe batch | one forward and backward pass on the probe batch per growth event |
| ``"optimizer"`` | the optimizer's second-moment slots (Adam/Nadam/AdamW/Lamb/RMSprop ``v``, Adagrad/Ftrl accumulators, Adamax ``u``, Adadelta accumulated gradients) summed over each unit's incoming weights | free: read from the optimizer |
| ``"activation"`` | mean absolute activation of each unit on the probe inputs | one forward pass up to the layer per growth event |
| callable | ``fn(layer, model) -> array of shape (units,)`` | yours |
"""

from __future__ import annotations

import numpy as np

from ._errors import GrowthError

SCORES = ("change", "gradient", "optimizer", "activation")
NEEDS_PROBE = {"gradient": "(x, y)", "activation": "x or (x, y)"}

#: optimizer attribute holding per-variable second-moment slots, in order of preference
_SECOND_MOMENT_SLOTS = ("_velocities", "_accumulators", "_u", "_accumulated_grads")


def check_score(score, probe):
    """Validate ``score`` (and ``probe`` when the score needs one) before training.

    Returns:
        A :class:`Score`. Raises ``ValueError`` naming the value.
    """
    if callable(score) and not isinstance(score, str):
        return CallableScore(score)
    if not isinstance(score, str) or score not in SCORES:
        raise GrowthError(f"score must be one of {SCORES} or a callable (layer, model) -> scores; got score={score!r}")
    if score in NEEDS_PROBE:
        if probe is None:
            raise GrowthError(f"score={score!r} needs a probe batch: pass probe={NEEDS_PROBE[score]} (held-back data)")
        x, y = _split_probe(probe)
        if score == "gradient" and y is None:
            raise GrowthError("score='gradient' needs probe=(x, y) with targets; got inputs only")
    return {"change": ChangeScore, "gradient": GradientScore, "optimizer": OptimizerScore, "activation": ActivationScore}[
        score
    ](probe)


def _split_probe(probe):
    if isinstance(probe, (tuple, list)) and len(probe) == 2:
        return probe[0], probe[1]
    if isinstance(probe, (tuple, list)):
        raise GrowthError(f"probe must be x or (x, y); got a sequence of length {len(probe)}")
    return probe, None


def kernel_of(layer):
    """The layer's kernel variable (Dense, ConvND; a recurrent layer's input kernel): units on the last axis
    (a recurrent layer's in one block per gate, read by :func:`_by_unit`)."""
    cell = getattr(layer, "cell", None)
    return layer.kernel if cell is None else cell.kernel


def _by_unit(a: np.ndarray, layer) -> np.ndarray:
    """``a`` with its last axis of ``gates * units`` entries read as ``(..., gates, units)`` and flattened to
    ``(-1, units)``: the rows of each unit (one gate block after the other for a recurrent layer)."""
    cell = getattr(layer, "cell", None)
    units = a.shape[-1] if cell is None else int(cell.units)
    return a.reshape(-1, units)


def _numpy(x) -> np.ndarray:
    from keras import ops

    return np.asarray(ops.convert_to_numpy(x))


def _per_unit_norm(a: np.ndarray, layer=None) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return np.sqrt(np.sum(_by_unit(a, layer) ** 2, axis=0))


class Score:
    """Base: ``begin_epoch(layers)`` once per epoch, ``__call__(layer, model)`` per growth event."""

    name = "custom"

    def __init__(self, probe=None):
        self.probe = probe

    def check(self, model):
        """Raise ``ValueError`` if this score cannot work with ``model`` (called at train begin)."""

    def begin_epoch(self, layers):
        """Called at the start of every epoch with the layers that may grow."""

    def pruned(self, name, keep):
        """Called after units of layer ``name`` were removed mid-epoch; ``keep``: the old indices kept."""

    def __call__(self, layer, model) -> np.ndarray:
        raise NotImplementedError


class CallableScore(Score):
    def __init__(self, fn):
        super().__init__(None)
        self.fn = fn
        self.name = getattr(fn, "__name__", "callable")

    def __call__(self, layer, model):
        return np.asarray(self.fn(layer, model), dtype=np.float64).reshape(-1)


class ChangeScore(Score):
    """How far each unit's incoming weights (and bias) moved since the epoch began."""

    name = "change"

    def __init__(self, probe=None):
        super().__init__(probe)
        self._start = {}

    def begin_epoch(self, layers):
        self._start = {layer.name: _numpy(kernel_of(layer)).copy() for layer in layers}

    def pruned(self, name, keep):
        # a prune at a growth event, before the split: keep the snapshot of the units that stay
        start = self._start.get(name)
        if start is not None:
            self._start[name] = start[..., np.asarray(keep)]

    def __call__(self, layer, model):
        now = _numpy(kernel_of(layer))
        start = self._start.get(layer.name)
        if start is None or start.shape != now.shape:
            # no snapshot of this shape (the first epoch of a resumed run): rank by weight norm
            return _per_unit_norm(now, layer)
        return _per_unit_norm(now.astype(np.float64) - start.astype(np.float64), layer)


class OptimizerScore(Score):
    """The optimizer's second-moment slots of each unit's incoming weights, summed."""

    name = "optimizer"

    @staticmethod
    def _inner(optimizer):
        while hasattr(optimizer, "inner_optimizer"):  # LossScaleOptimizer
            optimizer = optimizer.inner_optimizer
        return optimizer

    def check(self, model):
        opt = self._inner(model.optimizer)
        known = type(opt).__name__ in _SLOT_HINTS or any(getattr(opt, a, None) for a in _SECOND_MOMENT_SLOTS)
        if not known:
            raise GrowthError(
                "score='optimizer' needs an optimizer with second-moment slots (Adam, Nadam, AdamW, Lamb, "
                f"RMSprop, Adagrad, Adamax, Adadelta, Ftrl); the model uses {type(opt).__name__}"
            )

    def __call__(self, layer, model):
        opt = self._inner(model.optimizer)
        var = kernel_of(layer)
        for attr in _SECOND_MOMENT_SLOTS:
            slots = getattr(opt, attr, None)
            if slots:
                v = _numpy(slots[opt._get_variable_index(var)])
                return np.sum(_by_unit(np.abs(v.astype(np.float64)), layer), axis=0)
        # optimizer not built yet (no step taken): nothing learned, every unit equal
        return np.zeros(_by_unit(np.zeros(var.shape[-1]), layer).shape[-1])


#: optimizer class -> slot attribute names it creates in build()
_SLOT_HINTS = {
    "Adam": ("velocities",),
    "AdamW": ("velocities",),
    "Nadam": ("velocities",),
    "Lamb": ("velocities",),
    "RMSprop": ("velocities",),
    "Adagrad": ("accumulators",),
    "Ftrl": ("accumulators",),
    "Adamax": ("u",),
    "Adadelta": ("accumulated_grads",),
}


class GradientScore(Score):
    """Norm of the loss gradient w.r.t. each unit's incoming weights on the probe batch."""

    name = "gradient"

    def __call__(self, layer, model):
        x, y = _split_probe(self.probe)
        (g,) = gradients(model, [kernel_of(layer)], x, y)
        return _per_unit_norm(g, layer)


class ActivationScore(Score):
    """Mean absolute output of each unit on the probe inputs (all axes but the unit axis)."""

    name = "activation"

    def __call__(self, layer, model):
        x, _ = _split_probe(self.probe)
        out = _numpy(layer_output(model, layer, x)).astype(np.float64)
        axis = 1 if getattr(layer, "data_format", "channels_last") == "channels_first" and out.ndim > 2 else -1
        out = np.moveaxis(np.abs(out), axis, -1)
        return out.reshape(-1, out.shape[-1]).mean(axis=0)


def layer_output(model, layer, x):
    """Output of ``layer`` (after its own activation) for inputs ``x``. Cost: a forward pass up to the layer."""
    import keras

    if isinstance(model, keras.Sequential):
        h = keras.ops.convert_to_tensor(x)
        for lay in model.layers:
            h = lay(h, training=False)
            if lay is layer:
                return h
        raise GrowthError(f"layer {layer.name!r} is not in the model")
    sub = keras.Model(model.inputs, layer.output)
    return sub(x, training=False)


def gradients(model, variables, x, y):
    """Gradients of the model's compiled loss w.r.t. ``variables`` on one batch, as numpy arrays.

    Works on every Keras backend (TensorFlow tape, ``jax.grad`` over
    ``stateless_call``, PyTorch autograd). Cost: one forward and one backward pass.
    """
    import keras

    name = keras.backend.backend()
    x = keras.ops.convert_to_tensor(np.asarray(x))
    y = keras.ops.convert_to_tensor(np.asarray(y))
    if name == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            y_pred = model(x, training=False)
            loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=False)
        return [_numpy(g) for g in tape.gradient(loss, [v.value for v in variables])]
    if name == "torch":
        import torch

        with torch.enable_grad():
            y_pred = model(x, training=False)
            loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=False)
            return [_numpy(g) for g in torch.autograd.grad(loss, [v.value for v in variables])]
    if name == "jax":
        import jax

        trainable = model.trainable_variables
        index = [next(i for i, t in enumerate(trainable) if t is v) for v in variables]
        tv = [v.value for v in trainable]
        ntv = [v.value for v in model.non_trainable_variables]
        mv = [v.value for v in model.metrics_variables]

        def loss_fn(tv):
            loss, _ = model.compute_loss_and_updates(tv, ntv, mv, x, y, None, training=False)
            return loss

        grads = jax.grad(loss_fn)(tv)
        return [_numpy(grads[i]) for i in index]
    raise GrowthError(f"score='gradient' does not support the {name!r} Keras backend")
