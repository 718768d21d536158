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
| ``"splitting"`` | ``-lambda_min`` of each unit's splitting matrix (Splitting Steepest Descent, Liu et al. 2019) on the probe batch; its eigenvector is the unit's split direction (:func:`splitting_scores`) | one forward and backward pass on the probe batch, then one symmetric eigenproblem of size ``min(n, d + 1)`` per unit |
| callable | ``fn(layer, model) -> array of shape (units,)`` | yours |
"""

from __future__ import annotations

import numpy as np

from ._errors import GrowthError

SCORES = ("change", "gradient", "optimizer", "activation", "splitting")
NEEDS_PROBE = {"gradient": "(x, y)", "activation": "x or (x, y)", "splitting": "(x, y)"}

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
        if score in ("gradient", "splitting") and y is None:
            raise GrowthError(f"score={score!r} needs probe=(x, y) with targets; got inputs only")
    return {"change": ChangeScore, "gradient": GradientScore, "optimizer": OptimizerScore, "activation": ActivationScore,
            "splitting": SplittingScore}[score](probe)


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


# -- the splitting matrix (Splitting Steepest Descent) -------------------------------------------------


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for large |z|


def _d2_tanh(z):
    t = np.tanh(z)
    return -2.0 * t * (1.0 - t * t)


def _d2_sigmoid(z):
    s = _sigmoid(z)
    return s * (1.0 - s) * (1.0 - 2.0 * s)


def _d2_softplus(z):
    s = _sigmoid(z)
    return s * (1.0 - s)


def _d2_silu(z):
    s = _sigmoid(z)
    return s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))


def _d2_gelu(z):
    # Keras's default gelu is the exact one, z * Phi(z): its second derivative is phi(z) * (2 - z^2)
    return np.exp(-0.5 * z * z) / np.sqrt(2.0 * np.pi) * (2.0 - z * z)


def _d2_elu(z):
    return np.where(z < 0, np.exp(np.minimum(z, 0.0)), 0.0)  # alpha = 1, Keras's default


#: second derivative of each smooth activation Dense may hold, by the activation function's name
SECOND_DERIVATIVES = {"tanh": _d2_tanh, "sigmoid": _d2_sigmoid, "softplus": _d2_softplus, "silu": _d2_silu,
                      "gelu": _d2_gelu, "elu": _d2_elu}

#: activations whose second derivative is 0 almost everywhere: every splitting matrix is 0
PIECEWISE_LINEAR = ("relu", "relu6", "leaky_relu", "linear", "hard_sigmoid", "hard_silu", "hard_tanh")


def second_derivative(layer):
    """``sigma''`` of ``layer``'s own activation as a numpy function, or ``GrowthError`` saying why there is none.

    ReLU and the other piecewise-linear activations are refused rather than given a proxy: their
    ``sigma''`` is 0 almost everywhere, so every splitting matrix is exactly 0 and no split lowers the
    loss at second order; ranking units by anything else under this name would claim a guarantee it
    does not have. Use ``score="gradient"`` or ``"optimizer"`` there, or a smooth activation.
    """
    act = getattr(layer, "activation", None)
    name = getattr(act, "__name__", None)
    if name in SECOND_DERIVATIVES:
        return SECOND_DERIVATIVES[name]
    if name in PIECEWISE_LINEAR:
        raise GrowthError(
            f"score='splitting' needs a smooth activation: layer {layer.name!r} uses {name!r}, whose second "
            "derivative is 0 almost everywhere, so its splitting matrices are 0 and no split lowers the loss at "
            f"second order; use score='gradient' or 'optimizer' for it, or one of {tuple(SECOND_DERIVATIVES)}"
        )
    raise GrowthError(f"score='splitting' knows the second derivative of {tuple(SECOND_DERIVATIVES)}; layer "
                      f"{layer.name!r} uses activation {name!r}")


def _check_dense(layer):
    import keras

    if not isinstance(layer, keras.layers.Dense) or len(layer.kernel.shape) != 2:
        raise GrowthError(f"score='splitting' reads Dense layers (a unit's input is a vector); layer "
                          f"{getattr(layer, 'name', layer)!r} is a {type(layer).__name__}")
    return second_derivative(layer)


def _around(model, layer):
    """``(head, tail)``: the model's inputs -> ``layer``'s input, and ``layer``'s output -> the model's outputs."""
    import keras

    if isinstance(model, keras.Sequential):
        layers = list(model.layers)
        if layer not in layers:
            raise GrowthError(f"layer {layer.name!r} is not in the model")
        i = layers.index(layer)

        def run(seq):
            def f(h):
                for lay in seq:
                    h = lay(h, training=False)
                return h

            return f

        return run(layers[:i]), run(layers[i + 1:])
    if len(getattr(layer, "_inbound_nodes", ())) > 1:
        raise GrowthError(f"score='splitting' needs layer {layer.name!r} called once in the model")
    try:
        head = keras.Model(model.inputs, layer.input)
        tail = keras.Model(layer.output, model.outputs)
    except Exception as exc:  # Keras says why the graph cannot be cut at the layer
        raise GrowthError(f"score='splitting' needs the model's outputs to depend on the inputs only through "
                          f"layer {layer.name!r}'s output ({type(exc).__name__}: {exc})") from None
    return (lambda x: head(x, training=False)), (lambda h: tail(h, training=False))


def _output_gradient(model, layer, x, y):
    """``(X, dL/dh)``: the layer's inputs ``(N, d)`` and the gradient of the compiled (batch-mean) loss
    with respect to the layer's outputs ``(N, units)``, as float64 numpy. Cost: one forward and one backward pass."""
    import keras

    head, tail = _around(model, layer)
    x = keras.ops.convert_to_tensor(np.asarray(x))
    y = keras.ops.convert_to_tensor(np.asarray(y))
    xin = head(x)
    h = layer(xin, training=False)
    name = keras.backend.backend()
    if name == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(h)
            loss = model.compute_loss(x=x, y=y, y_pred=tail(h), training=False)
        g = tape.gradient(loss, h)
    elif name == "torch":
        import torch

        with torch.enable_grad():
            h = h.detach().requires_grad_(True)
            loss = model.compute_loss(x=x, y=y, y_pred=tail(h), training=False)
            (g,) = torch.autograd.grad(loss, [h])
    elif name == "jax":
        import jax

        def loss_fn(h):
            with keras.StatelessScope():  # the loss tracker's update stays inside the trace
                return model.compute_loss(x=x, y=y, y_pred=tail(h), training=False)

        g = jax.grad(loss_fn)(h)
    else:
        raise GrowthError(f"score='splitting' does not support the {name!r} Keras backend")
    d = int(layer.kernel.shape[0])
    units = int(layer.kernel.shape[1])
    return (_numpy(xin).astype(np.float64).reshape(-1, d), _numpy(g).astype(np.float64).reshape(-1, units))


def _weights(model, layer, x, y):
    """``(X~, W)``: the layer's inputs with a column of ones for the bias ``(N, d + 1)``, and each sample's
    weight ``dL/dh_i * sigma''(z_i)`` ``(N, units)``, so that ``S_i = X~^T diag(W[:, i]) X~``."""
    d2 = _check_dense(layer)
    xs, g = _output_gradient(model, layer, x, y)
    kernel = _numpy(layer.kernel).astype(np.float64)
    z = xs @ kernel
    if layer.use_bias:
        z = z + _numpy(layer.bias).astype(np.float64)
    xt = np.concatenate([xs, np.ones((xs.shape[0], 1))], axis=1)
    return xt, g * d2(z)


def splitting_matrices(model, layer, x, y) -> np.ndarray:
    """The splitting matrix of every unit of a Dense ``layer``, ``float64[units, d + 1, d + 1]``.

    ``S_i = sum_n dL/dh_i(x_n) * sigma''(theta_i . x~_n) * x~_n x~_n^T`` over the batch ``(x, y)``,
    ``L`` the model's compiled loss (a mean over the batch, so the sum is the expectation of Liu et
    al. 2019), ``x~_n`` the layer's input with a trailing 1 for the bias, ``h_i`` the unit's output
    after its activation. Splitting unit ``i`` into two copies with halved outgoing weights and
    incoming weights ``theta_i +- eps * v`` changes the loss by ``eps^2 / 2 * v^T S_i v + O(eps^3)``.
    Cost: one forward and backward pass, then ``O(units * N * d^2)``; the memory is ``units * (d+1)^2``
    floats, so this explicit form is for small layers and tests: :func:`splitting_scores` needs only
    the smallest eigenpair.
    """
    xt, w = _weights(model, layer, x, y)
    return np.einsum("ni,na,nb->iab", w, xt, xt)


def splitting_scores(model, layer, x, y):
    """The smallest eigenvalue of each unit's splitting matrix and its eigenvector (the split direction).

    Returns:
        ``(lam, v)``: ``lam`` ``float64[units]``, ``v`` ``float64[d + 1, units]`` of unit norm (the
        kernel's ``d`` rows, then the bias), each with its largest entry positive. A negative
        ``lam[i]`` means that splitting unit ``i`` along ``+-v[:, i]`` lowers the loss by about
        ``eps^2 |lam[i]| / 2``; ``lam[i] = 0`` when no direction lowers it.

    Cost: one forward and backward pass on the batch, then per unit one dense symmetric
    eigenproblem of size ``r = min(N, d + 1)``: ``S_i`` has rank at most ``N``, and with
    ``X~^T = Q R`` (one thin QR, ``O(N^2 d)``) its nonzero spectrum is that of
    ``R diag(w_i) R^T``, so the work is ``O(N^2 d + units * r^3)`` and never builds a
    ``(d+1)^2`` matrix when ``N <= d``. MNIST's 785 inputs with a 256-sample probe: 16 units in
    well under a second. Raises :class:`GrowthError` for a layer that is not Dense, an activation
    with no known second derivative, and ReLU (see :func:`second_derivative`).
    """
    xt, w = _weights(model, layer, x, y)
    n, dim = xt.shape
    units = w.shape[1]
    lam = np.empty(units)
    vec = np.empty((dim, units))
    if n < dim:
        q, r = np.linalg.qr(xt.T)  # (dim, n), (n, n)
        for i in range(units):
            m = (r * w[:, i]) @ r.T
            e, u = np.linalg.eigh((m + m.T) / 2)
            lam[i], vec[:, i] = e[0], q @ u[:, 0]
            if lam[i] > 0:  # S_i is singular here: its smallest eigenvalue is 0, in the null space of X~
                lam[i] = 0.0
                vec[:, i] = _null_vector(q, i)
    else:
        for i in range(units):
            s = (xt * w[:, i:i + 1]).T @ xt
            e, u = np.linalg.eigh((s + s.T) / 2)
            lam[i], vec[:, i] = e[0], u[:, 0]
    vec /= np.linalg.norm(vec, axis=0, keepdims=True)
    flip = vec[np.argmax(np.abs(vec), axis=0), np.arange(units)] < 0
    vec[:, flip] *= -1
    return lam, vec


def _null_vector(q, i):
    """A unit vector orthogonal to the columns of ``q`` (they span fewer than all dimensions)."""
    e = np.zeros(q.shape[0])
    for k in range(q.shape[0]):
        e[:] = 0.0
        e[(i + k) % q.shape[0]] = 1.0
        v = e - q @ (q.T @ e)
        if np.linalg.norm(v) > 1e-6:
            return v
    return e


class SplittingScore(Score):
    """``-lambda_min`` of each unit's splitting matrix on the probe batch; the eigenvectors are kept.

    After a call, ``directions[layer.name]`` holds the ``(d + 1, units)`` split directions and
    ``eigenvalues[layer.name]`` the ``lambda_min`` of the layer's units, for
    :func:`fastsplit.keras.splitting.split_along`.
    """

    name = "splitting"

    def __init__(self, probe=None):
        super().__init__(probe)
        self.directions = {}
        self.eigenvalues = {}

    def __call__(self, layer, model):
        x, y = _split_probe(self.probe)
        lam, vec = splitting_scores(model, layer, x, y)
        self.directions[layer.name] = vec
        self.eigenvalues[layer.name] = lam
        return -lam
