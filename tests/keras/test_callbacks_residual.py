"""SplitEvery on a model whose growing layer is a coupled residual group (several producers, one ``Add``).

Run per backend: ``KERAS_BACKEND=jax pytest tests/keras/test_callbacks_residual.py`` (tensorflow, jax, torch).
The callbacks name a coupled group by its first producer (``a``); every producer feeding the
``Add`` must keep the same width when ``restore_best_weights`` rebuilds the best epoch's model
and when a ``BackupAndRestore`` resume widens a fresh model to the checkpoint's widths.
"""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from fastsplit.keras.split_every import SplitEvery  # noqa: E402

N_IN, N_OUT = 6, 3
L = keras.layers


def data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, N_IN)).astype("float32")
    y = np.argmax(x[:, :N_OUT], axis=1).astype("int64")
    return x, y


def make_model(kind, units=4, seed=0):
    """``chain``: a -> b, Add([a, b]); ``parallel``: a and b both read the input, Add([a, b])."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((N_IN,))
    a = L.Dense(units, activation="relu", name="a")(inp)
    b = L.Dense(units, name="b")(a if kind == "chain" else inp)
    s = L.Add(name="add")([a, b])
    model = keras.Model(inp, L.Dense(N_OUT, activation="softmax", name="out")(s))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def fit(model, callbacks, epochs):
    x, y = data()
    return model.fit(x, y, validation_data=(x, y), epochs=epochs, batch_size=32, callbacks=callbacks, verbose=0)


def widths(model):
    return {n: int(model.get_layer(n).kernel.shape[-1]) for n in ("a", "b")}


class Script(keras.callbacks.Callback):
    """Overwrites ``logs["val_accuracy"]`` with ``values[epoch]`` (list it before the callback under test)."""

    def __init__(self, values):
        super().__init__()
        self.values = list(values)

    def on_epoch_end(self, epoch, logs=None):
        logs["val_accuracy"] = self.values[epoch]


class Predict(keras.callbacks.Callback):
    """Predictions on ``x`` at the end of every epoch (listed before the growth callback: before its event)."""

    def __init__(self, x):
        super().__init__()
        self.x, self.out = x, {}

    def on_epoch_end(self, epoch, logs=None):
        self.out[epoch] = self.model.predict(self.x, verbose=0)


class Interrupt(keras.callbacks.Callback):
    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.at:
            raise RuntimeError("interrupted")


@pytest.mark.parametrize("kind", ["chain", "parallel"])
def test_restore_best_weights_rebuilds_every_producer_of_the_group(kind):
    x, _ = data()
    keep = Predict(x)
    # best at epoch 1 (width 8, before its split), splits 4 -> 8 at 0 and 8 -> 16 (the cap) at 1
    cb = SplitEvery(1, max_units=16, restore_best_weights=True, verbose=0)
    model = make_model(kind)
    assert cb.layers is None
    fit(model, [Script([0.5, 0.9, 0.9, 0.9]), keep, cb], epochs=4)
    assert cb.event_epochs == [0, 1] and cb.best_epoch == 1
    assert widths(model) == {"a": 16, "b": 16}
    np.testing.assert_allclose(model.predict(x, verbose=0), keep.out[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["chain", "parallel"])
def test_backup_and_restore_resumes_a_grown_residual_group(kind, tmp_path):
    backup = str(tmp_path / "backup")

    def callbacks(extra):
        grow = SplitEvery(1, max_units=16, verbose=0, backup_dir=backup)
        return grow, [grow, keras.callbacks.BackupAndRestore(backup), extra]

    grow, cbs = callbacks(Interrupt(1))
    model = make_model(kind)
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(model, cbs, epochs=4)
    assert widths(model) == {"a": 16, "b": 16}  # 4 -> 8 -> 16 at the ends of epochs 0 and 1
    saved = [w.copy() for w in model.get_weights()]
    it = int(keras.ops.convert_to_numpy(model.optimizer.iterations))

    class Look(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.widths = widths(self.model)
            self.weights = [w.copy() for w in self.model.get_weights()]
            self.iterations = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    look = Look()
    grow, cbs = callbacks(look)
    fresh = make_model(kind)
    h = fit(fresh, cbs, epochs=4)
    assert look.widths == {"a": 16, "b": 16}
    assert look.iterations == it > 0
    assert len(look.weights) == len(saved)
    for a, b in zip(look.weights, saved, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert grow.event_epochs == [0, 1]
    assert len(h.history["loss"]) == 2 and widths(fresh) == {"a": 16, "b": 16}
    assert [int(u) for u in h.history["units/a"]] == [16, 16]


@pytest.mark.parametrize("kind", ["chain", "parallel"])
def test_max_params_counts_every_producer_of_the_group(kind):
    # a budget of a 6-unit model: the first split (4 -> 8 wanted) is capped to 6, counting the
    # parameters that one more unit adds to a, b and out together; the second finds no room
    model = make_model(kind, units=4)
    budget = make_model(kind, units=6).count_params()
    cb = SplitEvery(1, max_params=budget, verbose=0)
    fit(model, [cb], epochs=2)
    assert widths(model) == {"a": 6, "b": 6}
    assert cb.event_epochs == [0] and model.count_params() == budget
