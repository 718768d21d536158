"""The small classifier and fit the growth-callback tests share (imported by the test files, not collected)."""

from __future__ import annotations

import keras
import numpy as np

N_IN, N_OUT = 6, 3


def data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, N_IN)).astype("float32")
    y = np.argmax(x[:, :N_OUT], axis=1).astype("int64")
    return x, y


def make_model(units=2, seed=0, optimizer="adam"):
    """Input -> Dense(units, relu, name="hidden") -> Dense(N_OUT, softmax, name="out"), compiled."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((N_IN,)),
        keras.layers.Dense(units, activation="relu", name="hidden"),
        keras.layers.Dense(N_OUT, activation="softmax", name="out"),
    ])  # fmt: skip
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def fit(model, callbacks, epochs, **kw):
    """``model.fit`` on :func:`data`, validating on it unless told otherwise."""
    x, y = data()
    kw.setdefault("validation_data", (x, y))
    return model.fit(x, y, epochs=epochs, batch_size=32, callbacks=callbacks, verbose=0, **kw)


class Counter(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1


class Keep(keras.callbacks.Callback):
    """The model's predictions on :func:`data` at the end of epoch ``at``."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.at:
            self.pred = self.model.predict(data()[0], verbose=0)
