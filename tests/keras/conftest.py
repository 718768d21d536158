"""Shared models and helpers for the Keras tests; run once per backend (``KERAS_BACKEND``).

The models are tiny so that the whole suite stays fast on a 2-core CPU.
"""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
L = keras.layers

BACKEND = keras.backend.backend()


def _full_float32_on_gpus():
    """Float32 matrix products in float32 on a GPU: TensorFloat-32 (JAX's default there, cuDNN's
    convolutions in PyTorch) rounds inputs to 10 bits, and the outputs a split preserves exactly
    would differ by ~1e-4 between the two widths for that reason alone."""
    if BACKEND == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
    elif BACKEND == "torch":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


_full_float32_on_gpus()


@pytest.hookimpl(tryfirst=True)  # before -m "not slow" deselects
def pytest_collection_modifyitems(items):
    """``slow_on_jax`` tests count as ``slow`` under JAX only, where recompiling after every growth
    event makes them minutes long; `make test` runs them under TensorFlow and PyTorch."""
    if BACKEND == "jax":
        for item in items:
            if item.get_closest_marker("slow_on_jax"):
                item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield
    keras.backend.clear_session()


def data(shape, n=16, seed=0, out=2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *shape)).astype("float32")
    y = rng.standard_normal((n, out)).astype("float32")
    return x, y


# -- models ---------------------------------------------------------------------------------------------


def mlp():
    """Flatten -> Dense -> Dense -> Dense, Sequential."""
    return keras.Sequential([
        keras.Input((3, 4)), L.Flatten(), L.Dense(6, activation="relu", name="h1"),
        L.Dense(5, activation="tanh", name="h2"), L.Dense(2, name="out"),
    ])


def cnn():
    """Conv2D -> BatchNorm -> ReLU -> MaxPool -> Flatten -> Dense."""
    inp = keras.Input((6, 6, 2))
    h = L.Conv2D(4, 3, padding="same", name="conv")(inp)
    h = L.BatchNormalization(name="bn")(h)
    h = L.ReLU()(h)
    h = L.MaxPooling2D()(h)
    h = L.Flatten()(h)
    h = L.Dense(5, activation="relu", name="fc")(h)
    return keras.Model(inp, L.Dense(2, name="out")(h))


def residual():
    """Two residual blocks (Add) on a stream, then Concatenate with a side branch."""
    inp = keras.Input((5,))
    s = L.Dense(6, name="stem")(inp)
    r = L.Dense(6, name="r1")(L.ReLU()(s))
    s = L.Add(name="add1")([s, r])
    r = L.Dense(6, name="r2")(L.ReLU()(s))
    s = L.Add(name="add2")([s, r])
    side = L.Dense(3, activation="tanh", name="side")(inp)
    c = L.Concatenate(name="cat")([L.ReLU()(s), side])
    h = L.Dense(4, activation="relu", name="fc")(c)
    return keras.Model(inp, L.Dense(2, name="out")(h))


def depthwise():
    """Conv2D -> DepthwiseConv2D (multiplier 2) -> BatchNorm -> Conv2D -> GlobalAveragePooling -> Dense."""
    inp = keras.Input((6, 6, 2))
    h = L.Conv2D(3, 1, name="pw1")(inp)
    h = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(h)
    h = L.BatchNormalization(name="bn")(h)
    h = L.Activation("relu")(h)
    h = L.Conv2D(4, 1, name="pw2")(h)
    h = L.GlobalAveragePooling2D()(h)
    return keras.Model(inp, L.Dense(2, name="out")(h))


def nested():
    """A Sequential block inside a functional model."""
    block = keras.Sequential(
        [keras.Input((6,)), L.Dense(7, activation="relu", name="b1"), L.Dropout(0.1), L.Dense(5, name="b2")],
        name="block",
    )
    inp = keras.Input((4,))
    h = L.Dense(6, activation="relu", name="pre")(inp)
    h = block(h)
    return keras.Model(inp, L.Dense(2, name="out")(L.ReLU()(h)))


#: name -> (builder, input shape, producing layers that may be widened)
MODELS = {
    "mlp": (mlp, (3, 4), ["h1", "h2"]),
    "cnn": (cnn, (6, 6, 2), ["conv", "fc"]),
    "residual": (residual, (5,), ["stem", "side", "fc"]),
    "depthwise": (depthwise, (6, 6, 2), ["pw1", "pw2"]),
    "nested": (nested, (4,), ["pre", "b1", "b2"]),
}


def compiled(name, optimizer=None, steps=2, eager=None):
    """A model from MODELS, compiled with ``optimizer`` (Adam) and trained for ``steps`` batches.

    ``eager`` (run_eagerly) defaults to what is fastest for tiny models: eager on TensorFlow and
    PyTorch, jitted on JAX (whose eager mode compiles every op for every new shape).
    """
    if eager is None:
        eager = BACKEND != "jax"
    build, shape, _ = MODELS[name]
    model = build()
    model.compile(optimizer=optimizer or keras.optimizers.Adam(1e-2), loss="mse", run_eagerly=eager)
    x, y = data(shape)
    for _ in range(steps):
        model.train_on_batch(x, y)
    return model, x, y


# -- snapshots and gradients ---------------------------------------------------------------------------


def snapshot(model):
    """Every model and optimizer variable (path -> numpy copy), plus layer widths."""
    snap = {}
    for v in model.weights:
        snap["w:" + v.path] = np.array(v.numpy(), copy=True)
    opt = getattr(model, "optimizer", None)
    if opt is not None and getattr(opt, "built", False):
        for i, v in enumerate(opt.variables):
            snap[f"o{i}:" + v.path] = np.array(v.numpy(), copy=True)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        for attr in ("units", "filters", "groups"):
            if hasattr(layer, attr):
                snap[f"a:{layer.name}.{attr}"] = getattr(layer, attr)
    return snap


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].shape == b[k].shape, k
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k


def predict(model, x):
    if BACKEND == "jax":  # one jitted function instead of one compilation per op
        return np.asarray(model.predict_on_batch(x))
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))


def rel_err(a, b):
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))


def gradients(model, x, y):
    """d mse / d trainable variables, as numpy arrays in ``model.trainable_variables`` order."""
    tvars = model.trainable_variables
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x, training=False) - y) ** 2)
        return [tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, tvars)]  # an embedding's: sparse
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        ntv = [v.value for v in model.non_trainable_variables]

        def f(tv):
            out, _ = model.stateless_call(tv, ntv, x, training=False)
            return jnp.mean((out - y) ** 2)

        return [np.asarray(g) for g in jax.grad(f)([v.value for v in tvars])]
    import torch

    for v in tvars:
        v.value.grad = None
    out = model(x, training=False)
    loss = torch.mean((out - torch.as_tensor(y, device=out.device)) ** 2)
    loss.backward()
    return [v.value.grad.detach().cpu().numpy().copy() for v in tvars]
