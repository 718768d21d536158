"""The symmetries of ``widen`` on a live model: what each does to the function and to the optimizer state."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import L, keras, predict

import fastsplit.keras as fk


def _trained(opt="adam"):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    model = keras.Sequential([keras.Input((8,)), L.Dense(4, activation="tanh", name="h"), L.Dense(1, name="o")])
    model.compile(keras.optimizers.Adam(1e-2) if opt == "adam" else keras.optimizers.SGD(1e-2, momentum=0.9), "mse")
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    return model, x, y


def test_fresh_units_keep_the_function_and_start_without_the_sources_first_moment():
    model, x, y = _trained()
    before = predict(model, x)
    fk.widen(model, {"h": None}, symmetry="fresh")
    np.testing.assert_allclose(predict(model, x), before, rtol=1e-5, atol=1e-6)
    out = np.array(model.get_layer("o").kernel.numpy())
    assert np.all(out[4:] == 0)  # zero outgoing rows
    opt = model.optimizer
    out_var = model.get_layer("o").kernel
    m = np.array(opt._momentums[opt._get_variable_index(out_var)].numpy())
    v = np.array(opt._velocities[opt._get_variable_index(out_var)].numpy())
    assert np.all(m[4:] == 0) and np.any(m[:4] != 0)
    np.testing.assert_array_equal(v[4:], v[:4])  # the source's scale: first steps no larger than its own
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert np.any(np.array(model.get_layer("o").kernel.numpy())[4:] != 0)  # the new units learn


@pytest.mark.parametrize("eps", [0.1, 0.05])
def test_direction_changes_the_function_at_second_order(eps):
    model, x, _ = _trained()
    before = predict(model, x)
    fk.widen(model, {"h": None}, symmetry="direction", eps=eps)
    change = float(np.abs(predict(model, x) - before).mean())
    kernel = np.array(model.get_layer("h").kernel.numpy())
    separation = np.linalg.norm(kernel[:, 4:] - kernel[:, :4]) / np.linalg.norm(kernel[:, :4])
    assert separation == pytest.approx(2 * eps, rel=0.5)  # a pair moves +-eps along one direction
    assert change < 2 * eps**2 * float(np.abs(before).mean() + 1)


def test_direction_halving_eps_quarters_the_change():
    trained, x, _ = _trained()
    changes = []
    for eps in (0.2, 0.1):
        model = keras.models.clone_model(trained)
        model.set_weights(trained.get_weights())
        before = predict(model, x)
        fk.widen(model, {"h": None}, symmetry="direction", eps=eps, backend="numpy")
        changes.append(float(np.abs(predict(model, x) - before).mean()))
    assert 2.5 < changes[0] / changes[1] < 6


@pytest.mark.parametrize("symmetry", ["fresh", "direction"])
def test_the_callbacks_grow_with_the_symmetries_for_adam_and_restore_across_them(symmetry):
    from fastsplit.keras import SplitEvery

    model, x, y = _trained()

    class Keep(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                self.pred = self.model.predict(x, verbose=0)

    class Best(keras.callbacks.Callback):  # epoch 0 is the best: the growth after it is replayed
        def on_epoch_end(self, epoch, logs=None):
            logs["val_loss"] = 0.0 if epoch == 0 else 1.0

    keep = Keep()
    cb = SplitEvery(1, symmetry=symmetry, eps=0.1 if symmetry == "direction" else None, restore_best_weights=True,
                    monitor="val_loss", verbose=0)
    model.fit(x, y, validation_data=(x, y), epochs=3, batch_size=16, verbose=0, callbacks=[keep, Best(), cb])
    assert model.get_layer("h").units > 4
    assert {e.symmetry for e in fk.history(model)} == {symmetry}
    np.testing.assert_allclose(predict(model, x), keep.pred, rtol=1e-4, atol=1e-5)
