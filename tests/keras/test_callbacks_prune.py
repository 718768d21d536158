"""``prune_dead``: SplitOnPlateau / SplitEvery remove dead units at a growth event, then split.

Run per backend: ``KERAS_BACKEND=jax pytest tests/keras/test_callbacks_prune.py`` (tensorflow, jax, torch).
The dead units are planted: zero incoming weights and a bias of -5 give a ReLU unit
that is 0 on every input and gets no gradient, so it stays dead while training.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from fitting import N_IN, data  # noqa: E402
from fitting import make_model as plain_model  # noqa: E402

from fastsplit.keras import dead_units  # noqa: E402
from fastsplit.keras.split_every import SplitEvery  # noqa: E402
from fastsplit.keras.split_on_plateau import SplitOnPlateau  # noqa: E402


def make_model(units=6, dead=(1, 4), seed=0):
    model = plain_model(units, seed)
    hidden = model.get_layer("hidden")
    k = keras.ops.convert_to_numpy(hidden.kernel).copy()
    b = keras.ops.convert_to_numpy(hidden.bias).copy()
    k[:, list(dead)] = 0.0
    b[list(dead)] = -5.0
    hidden.kernel.assign(k)
    hidden.bias.assign(b)
    return model


def fit(model, callbacks, epochs, **kw):
    x, y = data()
    return model.fit(x, y, validation_data=(x, y), epochs=epochs, batch_size=32, callbacks=callbacks, verbose=0, **kw)


def width(model):
    return int(model.get_layer("hidden").kernel.shape[-1])


class Script(keras.callbacks.Callback):
    """Overwrites ``logs["val_accuracy"]`` with ``values[epoch]`` (list it before the callback under test)."""

    def __init__(self, values):
        super().__init__()
        self.values = list(values)

    def on_epoch_end(self, epoch, logs=None):
        logs["val_accuracy"] = self.values[epoch]


class Predict(keras.callbacks.Callback):
    """Predictions on ``x`` at the end of every epoch (where it is listed decides before / after an event)."""

    def __init__(self, x):
        super().__init__()
        self.x, self.out = x, {}

    def on_epoch_end(self, epoch, logs=None):
        self.out[epoch] = self.model.predict(self.x, verbose=0)


class Counter(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1


# --------------------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize("cls", [SplitOnPlateau, lambda **kw: SplitEvery(1, **kw)])
def test_prune_dead_without_data_raises_before_training(cls):
    with pytest.raises(ValueError, match="prune_data=None and probe=None"):
        cls(prune_dead=True)
    with pytest.raises(ValueError, match="prune_dead='yes'"):
        cls(prune_dead="yes", prune_data=data()[0])
    with pytest.raises(ValueError, match="prune_dead=False"):
        cls(prune_data=data()[0])
    cls(prune_dead=True, probe=data())  # the probe is the fallback


def test_prune_data_of_the_wrong_shape_raises_before_the_first_batch():
    model = make_model()
    before = [w.copy() for w in model.get_weights()]
    counter = Counter()
    bad = np.zeros((8, N_IN + 1), "float32")
    with pytest.raises(ValueError, match=r"prune_data.*\(8, 7\)"):
        fit(model, [SplitEvery(1, prune_dead=True, prune_data=bad, verbose=0), counter], epochs=2)
    assert counter.batches == 0
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))


# ---------------------------------------------------------------------------------------- the event


def test_dead_units_are_pruned_before_the_split(tmp_path):
    x, _ = data()
    path = tmp_path / "log.csv"
    cb = SplitEvery(1, prune_dead=True, prune_data=x, max_units=16, verbose=0)
    model = make_model(6, dead=(1, 4))
    h = fit(model, [cb, keras.callbacks.CSVLogger(str(path))], epochs=2)
    assert cb.event_kinds == ["prune", "split", "split"]
    assert cb.event_epochs == [0, 0, 1]
    prune_ev, split_ev = cb.events[:2]
    assert prune_ev.layers["hidden"].neurons == [1, 4]
    assert (prune_ev.layers["hidden"].old_width, prune_ev.layers["hidden"].new_width) == (6, 4)
    assert (split_ev.layers["hidden"].old_width, split_ev.layers["hidden"].new_width) == (4, 8)
    assert split_ev.layers["hidden"].neurons == [0, 1, 2, 3]  # only live units are split
    assert prune_ev.params_after == split_ev.params_before < prune_ev.params_before
    assert h.history["units/hidden"] == [8, 16]
    assert h.history["pruned"] == [2, 0] and h.history["split"] == [4, 8]
    assert h.history["params"][-1] == model.count_params()
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [int(float(r["pruned"])) for r in rows] == [2, 0]
    assert not dead_units(model, x)["hidden"].size  # copies of live units are alive


def test_the_prune_preserves_the_function_on_the_prune_data():
    x, _ = data()
    before, after = Predict(x), Predict(x)
    # capped at 4: the prune 6 -> 4 spends the whole event, nothing is split
    cb = SplitEvery(1, prune_dead=True, prune_data=x, max_units=4, verbose=0)
    model = make_model(6, dead=(0, 5))
    fit(model, [before, cb, after], epochs=1)
    assert cb.event_kinds == ["prune"] and width(model) == 4
    np.testing.assert_allclose(after.out[0], before.out[0], rtol=1e-5, atol=1e-6)


def test_prune_then_exact_split_preserves_the_function():
    x, _ = data()
    before, after = Predict(x), Predict(x)
    cb = SplitOnPlateau(symmetry="none", prune_dead=True, probe=x, verbose=0)
    model = make_model(6, dead=(2,))
    fit(model, [Script([0.5, 0.5]), before, cb, after], epochs=2)
    assert cb.event_kinds == ["prune", "split"] and width(model) == 10
    np.testing.assert_allclose(after.out[1], before.out[1], rtol=1e-5, atol=1e-6)


def test_no_dead_units_means_an_ordinary_growth_event():
    x, _ = data()
    cb = SplitEvery(1, prune_dead=True, prune_data=x, verbose=0)
    h = fit(make_model(4, dead=()), [cb], epochs=1)
    assert cb.event_kinds == ["split"] and h.history["pruned"] == [0] and h.history["units/hidden"] == [8]


def test_a_layer_that_is_all_dead_keeps_one_unit():
    x, _ = data()
    cb = SplitEvery(1, prune_dead=True, prune_data=x, verbose=0)
    model = make_model(3, dead=(0, 1, 2))
    h = fit(model, [cb], epochs=1)
    assert cb.events[0].layers["hidden"].neurons == [1, 2]
    assert h.history["units/hidden"] == [2]  # 3 -> 1 -> 2


# --------------------------------------------------------------------------------------------- caps


def test_max_units_counts_the_pruned_units():
    # at the cap of 6 with two dead units: prune 6 -> 4 frees room to split two live units back to 6
    x, _ = data()
    cb = SplitOnPlateau(max_units=6, prune_dead=True, prune_data=x, verbose=0)
    h = fit(make_model(6, dead=(1, 4)), [Script([0.5] * 5), cb], epochs=5)
    assert cb.event_kinds == ["prune", "split"]
    assert [(e.layers["hidden"].old_width, e.layers["hidden"].new_width) for e in cb.events] == [(6, 4), (4, 6)]
    assert max(h.history["units/hidden"]) <= 6
    assert cb.stopped_epoch == 2  # the next plateau finds nothing dead and the layer capped: stop
    # without prune_dead the capped layer cannot grow at all
    cb = SplitOnPlateau(max_units=6, verbose=0)
    fit(make_model(6, dead=(1, 4)), [Script([0.5] * 5), cb], epochs=5)
    assert cb.events == [] and cb.stopped_epoch == 1


def test_max_params_counts_the_pruned_units():
    x, _ = data()
    model = make_model(6, dead=(1, 4))
    limit = model.count_params() + 3  # less than one more unit (N_IN + 1 + N_OUT = 10 parameters)
    cb = SplitOnPlateau(max_params=limit, prune_dead=True, prune_data=x, verbose=0)
    h = fit(model, [Script([0.5] * 4), cb], epochs=4)
    assert cb.event_kinds == ["prune", "split"]
    assert cb.events[1].layers["hidden"].new_width == 6
    assert max(h.history["params"]) <= limit and model.count_params() <= limit


# ------------------------------------------------------------------------------- scores and records


class Nudge(keras.callbacks.Callback):
    """At the end of ``epoch``, moves the incoming weights of hidden ``unit`` (list before the grower)."""

    def __init__(self, epoch, unit):
        super().__init__()
        self.epoch, self.unit = epoch, unit

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            layer = self.model.get_layer("hidden")
            k = keras.ops.convert_to_numpy(layer.kernel).copy()
            k[:, self.unit] += 5.0
            layer.kernel.assign(k)


def test_change_score_follows_the_units_across_the_prune():
    x, _ = data()
    # unit 3 moves most; units 0 and 1 are pruned first, so it is unit 1 of the pruned layer
    cb = SplitEvery(1, select=1, score="change", prune_dead=True, prune_data=x, verbose=0)
    fit(make_model(5, dead=(0, 1)), [Nudge(0, 3), cb], epochs=1)
    assert cb.event_kinds == ["prune", "split"]
    assert cb.events[1].layers["hidden"].neurons == [1]


def test_verbose_lines(capsys):
    x, _ = data()
    fit(make_model(6, dead=(1, 4)), [SplitEvery(1, prune_dead=True, prune_data=x, verbose=1)], epochs=1)
    out = capsys.readouterr().out
    assert "Epoch 1: SplitEvery pruned 2 dead units: hidden 6 → 4; params" in out
    assert "Epoch 1: SplitEvery split hidden 4 → 8 units" in out


def test_restore_best_weights_across_a_prune():
    x, _ = data()
    keep = Predict(x)
    # best at epoch 1, prune 6 -> 4 and split -> 8 at 2, split -> 12 (the cap) at 3, stop at 4:
    # restore epoch 1's function
    cb = SplitOnPlateau(max_units=12, restore_best_weights=True, prune_dead=True, prune_data=x, verbose=0)
    model = make_model(6, dead=(1, 4))
    fit(model, [Script([0.5, 0.9, 0.9, 0.9, 0.9, 0.9]), keep, cb], epochs=6)
    assert cb.event_kinds == ["prune", "split", "split"] and cb.event_epochs == [2, 2, 3]
    assert cb.best_epoch == 1 and cb.stopped_epoch == 4 and width(model) == 12
    np.testing.assert_allclose(model.predict(x, verbose=0), keep.out[1], rtol=1e-5, atol=1e-6)


class Interrupt(keras.callbacks.Callback):
    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.at:
            raise RuntimeError("interrupted")


def test_backup_and_restore_resumes_a_pruned_run(tmp_path):
    # after the prune 6 -> 4 and a split to 5 the checkpoint is narrower than a fresh model's 6 units
    x, _ = data()
    backup = str(tmp_path / "backup")

    def callbacks(extra):
        grow = SplitEvery(1, max_units=5, prune_dead=True, prune_data=x, verbose=0, backup_dir=backup)
        return grow, [grow, keras.callbacks.BackupAndRestore(backup), extra]

    grow, cbs = callbacks(Interrupt(0))
    model = make_model(6, dead=(1, 4))
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(model, cbs, epochs=3)
    assert width(model) == 5
    saved = [w.copy() for w in model.get_weights()]
    it = int(keras.ops.convert_to_numpy(model.optimizer.iterations))

    class Look(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.weights = [w.copy() for w in self.model.get_weights()]
            self.iterations = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    look = Look()
    grow, cbs = callbacks(look)
    fresh = make_model(6, dead=(1, 4))
    h = fit(fresh, cbs, epochs=3)
    assert look.iterations == it
    for a, b in zip(look.weights, saved, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert grow.event_kinds == ["prune", "split"] and grow.event_epochs == [0, 0]
    assert len(h.history["loss"]) == 2 and width(fresh) == 5
