"""SplitOnPlateau / SplitEvery on small synthetic data, on the Keras backend of this process.

Run per backend: ``KERAS_BACKEND=jax pytest tests/keras`` (tensorflow, jax, torch).
The plateau tests drive the monitored value from a script (a callback listed
before the growth callback overwrites ``val_accuracy``), so every growth epoch
is known in advance.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from fitting import N_IN, N_OUT, Counter, Keep, data, fit, make_model  # noqa: E402,F401 - SCRIPT imports two

from fastsplit.keras import _scores, _select  # noqa: E402
from fastsplit.keras.split_every import SplitEvery  # noqa: E402
from fastsplit.keras.split_on_plateau import SplitOnPlateau  # noqa: E402


class Script(keras.callbacks.Callback):
    """Overwrites ``logs[key]`` with ``values[epoch]`` (list it before the callback under test)."""

    def __init__(self, values, key="val_accuracy"):
        super().__init__()
        self.values, self.key = list(values), key

    def on_epoch_end(self, epoch, logs=None):
        logs[self.key] = self.values[epoch]


def widths(history):
    return [int(u) for u in history.history["units/hidden"]]


# --------------------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        ({"select": 1.5}, "1.5"),
        ({"select": 0.0}, "0.0"),
        ({"select": -2}, "-2"),
        ({"select": "half"}, "'half'"),
        ({"select": ("threshold", "x")}, "'x'"),
        ({"score": "bogus"}, "'bogus'"),
        ({"score": "gradient"}, "probe"),
        ({"mode": "up"}, "'up'"),
        ({"patience": -1}, "-1"),
        ({"cooldown": 1.5}, "1.5"),
        ({"max_units": 0}, "max_units=0"),
        ({"max_params": -5}, "-5"),
        ({"symmetry": "mirror"}, "'mirror'"),
        ({"layers": []}, "[]"),
        ({"min_delta": float("nan")}, "nan"),
    ],
)
def test_bad_arguments_raise_naming_the_value(kwargs, shown):
    with pytest.raises(ValueError, match=None) as e:
        SplitOnPlateau(**kwargs)
    assert shown in str(e.value)


def test_split_every_needs_a_positive_period():
    with pytest.raises(ValueError, match="epochs=0"):
        SplitEvery(epochs=0)


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        ({"monitor": "val_bogus"}, "val_bogus"),
        ({"layers": ["out"]}, "'out'"),
        ({"layers": ["nope"]}, "'nope'"),
        ({"max_units": {"nope": 4}}, "nope"),
    ],
)
def test_model_dependent_errors_raise_before_the_first_batch(kwargs, shown):
    model = make_model()
    before = [w.copy() for w in model.get_weights()]
    counter = Counter()
    with pytest.raises(ValueError) as e:
        fit(model, [SplitOnPlateau(verbose=0, **kwargs), counter], epochs=2)
    assert shown in str(e.value)
    assert counter.batches == 0
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))


def test_optimizer_score_needs_second_moments():
    with pytest.raises(ValueError, match="SGD"):
        fit(make_model(optimizer="sgd"), [SplitOnPlateau(score="optimizer", select=1, verbose=0)], epochs=1)


def test_missing_validation_data_is_named():
    # as in EarlyStopping, an epoch without the val_ quantity is skipped (fit cannot tell a callback
    # whether validation comes later, validation_freq > 1); a fit that never showed it warns once
    model = make_model()
    x, y = data()
    with pytest.warns(UserWarning, match="monitor='val_accuracy' was in the logs of no epoch.*validation_data"):
        h = model.fit(x, y, epochs=2, verbose=0, callbacks=[SplitOnPlateau(verbose=0)])
    assert widths(h) == [2, 2]


# --------------------------------------------------------------------------------------------- select


def test_select_rules():
    s = np.array([0.1, 0.9, 0.5, 0.7, 0.0])
    assert _select.choose(_select.check_select("all"), 5, None).tolist() == [0, 1, 2, 3, 4]
    assert _select.choose(_select.check_select(0.4), 5, s).tolist() == [1, 3]
    assert _select.choose(_select.check_select(0.01), 5, s).tolist() == [1]  # at least one unit
    assert _select.choose(_select.check_select(3), 5, s).tolist() == [1, 3, 2]
    assert _select.choose(_select.check_select(9), 5, s).tolist() == [1, 3, 2, 0, 4]
    assert _select.choose(_select.check_select(("threshold", 0.4)), 5, s).tolist() == [1, 3, 2]
    assert _select.cap_units(np.array([1, 3, 2]), 5, 7).tolist() == [1, 3]
    capped = _select.cap_params({"a": np.arange(10), "b": np.arange(4)}, {"a": 10, "b": 100}, 250)
    assert sum(len(v) * c for v, c in zip(capped.values(), (10, 100), strict=True)) <= 250
    assert len(capped["a"]) >= 1 and len(capped["b"]) >= 1


# ------------------------------------------------------------------------------------------ plateau


def test_grows_exactly_when_the_plateau_rule_says():
    # min_delta=0.01, patience=0: grow at the end of every epoch that improves by less than 0.01
    values = [0.50, 0.60, 0.605, 0.70, 0.70, 0.80, 0.85, 0.851]
    cb = SplitOnPlateau(min_delta=0.01, verbose=0)
    h = fit(make_model(2), [Script(values), cb], epochs=len(values))
    assert cb.event_epochs == [2, 4, 7]
    assert widths(h) == [2, 2, 4, 4, 8, 8, 8, 16]
    assert [e.layers["hidden"].new_width for e in cb.events] == [4, 8, 16]


@pytest.mark.slow_on_jax  # a minute of recompiling per width there
def test_patience_cooldown_and_start_from_epoch():
    flat = [0.5] * 9
    cb = SplitOnPlateau(patience=2, verbose=0)
    fit(make_model(2), [Script(flat), cb], epochs=9)
    assert cb.event_epochs == [2, 4, 6, 8]  # every second epoch without improvement
    cb = SplitOnPlateau(cooldown=2, verbose=0)
    fit(make_model(2), [Script(flat), cb], epochs=9)
    assert cb.event_epochs == [1, 4, 7]  # two quiet epochs after each event
    cb = SplitOnPlateau(start_from_epoch=5, verbose=0)
    fit(make_model(2), [Script(flat), cb], epochs=8)
    assert cb.event_epochs == [6, 7]  # epoch 5 is the first watched (the best so far)


def test_mode_min_on_loss():
    values = [1.0, 0.8, 0.795, 0.5]
    cb = SplitOnPlateau(monitor="val_loss", min_delta=0.01, verbose=0)
    fit(make_model(2), [Script(values, "val_loss"), cb], epochs=4)
    assert cb.event_epochs == [2]


# --------------------------------------------------------------------------------------------- caps


def test_max_units_caps_and_stop_when_grown_stops():
    flat = [0.5] * 10
    cb = SplitOnPlateau(max_units=5, verbose=0)
    h = fit(make_model(2), [Script(flat), cb], epochs=10)
    assert widths(h) == [2, 4, 5, 5]  # 2 -> 4 -> 5 (one unit left under the cap), then capped: stop
    assert cb.stopped_epoch == 3
    assert len(h.history["loss"]) == 4


def test_stop_when_grown_false_trains_on():
    cb = SplitOnPlateau(max_units=4, stop_when_grown=False, verbose=0)
    h = fit(make_model(2), [Script([0.5] * 5), cb], epochs=5)
    assert widths(h) == [2, 4, 4, 4, 4]
    assert len(h.history["loss"]) == 5 and cb.stopped_epoch == 0


def test_max_params_caps_the_whole_model():
    model = make_model(2)
    cost = (N_IN + 1) + N_OUT  # one more hidden unit: incoming column, bias, outgoing row
    limit = model.count_params() + 5 * cost + 3
    cb = SplitOnPlateau(max_params=limit, verbose=0)
    h = fit(model, [Script([0.5] * 8), cb], epochs=8)
    assert max(h.history["params"]) <= limit
    assert widths(h)[-1] == 7  # 2 -> 4 -> 7: the budget allows exactly five more units
    assert cb.stopped_epoch > 0


# ------------------------------------------------------------------------------------------- scores


def _hidden(model):
    return model.get_layer("hidden")


def test_change_score_ranks_the_unit_that_moved_most_first():
    model = make_model(5)
    layer = _hidden(model)
    score = _scores.check_score("change", None)
    score.begin_epoch([layer])
    k = keras.ops.convert_to_numpy(layer.kernel).copy()
    k[:, 3] += 1.0
    k[:, 1] += 0.1
    layer.kernel.assign(k)
    s = score(layer, model)
    assert _select.rank(s)[:2].tolist() == [3, 1]
    assert s[0] == s[2] == s[4] == 0


def test_optimizer_score_is_the_summed_second_moment():
    model = make_model(4)
    fit(model, [], epochs=2)
    layer = _hidden(model)
    opt = model.optimizer
    v = keras.ops.convert_to_numpy(opt._velocities[opt._get_variable_index(layer.kernel)])
    np.testing.assert_allclose(_scores.check_score("optimizer", None)(layer, model), v.sum(axis=0), rtol=1e-6)


def test_gradient_score_is_zero_for_a_unit_without_outgoing_weights():
    model = make_model(4)
    out = model.get_layer("out")
    k = keras.ops.convert_to_numpy(out.kernel).copy()
    k[2] = 0.0  # unit 2 reaches nothing: its incoming weights get no gradient
    out.kernel.assign(k)
    s = _scores.check_score("gradient", data())(_hidden(model), model)
    assert s.shape == (4,) and s[2] == 0 and np.all(np.delete(s, 2) > 0)


def test_activation_score_is_the_mean_absolute_activation():
    model = make_model(3)
    layer = _hidden(model)
    layer.kernel.assign(np.zeros((N_IN, 3), "float32"))
    layer.bias.assign(np.array([0.0, 2.0, 0.5], "float32"))
    s = _scores.check_score("activation", data()[0])(layer, model)
    np.testing.assert_allclose(s, [0.0, 2.0, 0.5], rtol=1e-6)


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


def test_selective_growth_splits_the_unit_that_moved_most():
    cb = SplitOnPlateau(select=1, score="change", verbose=0)
    h = fit(make_model(4), [Script([0.5, 0.5, 0.9]), Nudge(1, 2), cb], epochs=3)
    assert cb.event_epochs == [1]
    assert cb.events[0].layers["hidden"].neurons == [2]
    assert widths(h) == [4, 5, 5]


def test_threshold_and_callable_score():
    cb = SplitOnPlateau(select=("threshold", 0.5), score=lambda layer, model: np.arange(4) / 4, verbose=0)
    fit(make_model(4), [Script([0.5, 0.5]), cb], epochs=2)
    assert cb.events[0].layers["hidden"].neurons == [3]  # only 0.75 > 0.5


# ------------------------------------------------------------------------------------------- records


def test_events_reach_logs_history_and_csvlogger(tmp_path):
    path = tmp_path / "log.csv"
    cb = SplitOnPlateau(verbose=0)
    h = fit(make_model(2), [Script([0.5, 0.5, 0.6]), cb, keras.callbacks.CSVLogger(str(path))], epochs=3)
    assert widths(h) == [2, 4, 4]
    model_params = [int(p) for p in h.history["params"]]
    assert model_params[0] == (N_IN + 1) * 2 + (2 + 1) * N_OUT
    assert model_params[1] == (N_IN + 1) * 4 + (4 + 1) * N_OUT
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [int(float(r["units/hidden"])) for r in rows] == [2, 4, 4]
    assert [int(float(r["params"])) for r in rows] == model_params
    ev = cb.events[0]
    assert ev.params_before == model_params[0] and ev.params_after == model_params[1]
    json.dumps(ev.to_dict())


def test_verbose_line(capsys):
    fit(make_model(2), [Script([0.5, 0.5]), SplitOnPlateau(verbose=1)], epochs=2)
    out = capsys.readouterr().out
    assert "Epoch 2: SplitOnPlateau split hidden 2 → 4 units" in out
    assert "val_accuracy 0.5000" in out


def test_split_every():
    cb = SplitEvery(epochs=2, max_units=6, verbose=0)
    h = fit(make_model(2), [cb], epochs=7)
    assert cb.event_epochs == [1, 3]
    assert widths(h) == [2, 4, 4, 6, 6, 6, 6]


def test_training_goes_on_after_growth_and_loss_is_kept():
    x, y = data(256)
    model = make_model(2)
    cb = SplitEvery(epochs=3, symmetry="none", verbose=0)
    h = model.fit(x, y, epochs=6, batch_size=32, verbose=0, callbacks=[cb])
    assert widths(h) == [2, 2, 4, 4, 4, 8]
    assert np.all(np.isfinite(h.history["loss"]))
    # an exact split does not change the function: the loss right after it equals the loss before
    before = model.evaluate(x, y, verbose=0)[0]
    cb2 = SplitEvery(epochs=1, symmetry="none", verbose=0)
    cb2.set_model(model)
    cb2.on_train_begin()
    cb2.grow(0)
    np.testing.assert_allclose(model.evaluate(x, y, verbose=0)[0], before, rtol=1e-5)


def test_restore_best_weights_after_growth():
    x, y = data()
    keep = Keep(1)
    # best at epoch 1, then growth at 2 and 3, capped at 8, stop at 4: restore epoch 1's function
    cb = SplitOnPlateau(max_units=8, restore_best_weights=True, verbose=0)
    model = make_model(2)
    fit(model, [Script([0.5, 0.9, 0.9, 0.9, 0.9, 0.9]), keep, cb], epochs=6)
    assert cb.event_epochs == [2, 3] and cb.stopped_epoch == 4 and cb.best_epoch == 1
    assert _hidden(model).kernel.shape[-1] == 8
    np.testing.assert_allclose(model.predict(x, verbose=0), keep.pred, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ BackupAndRestore

SCRIPT = """
import json, os, sys
import numpy as np
import keras
sys.path.insert(0, {tests!r})
from test_callbacks import make_model, data
from fastsplit.keras.split_every import SplitEvery

backup, report, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])

def state(model):
    opt = model.optimizer
    return {{
        "units": int(model.get_layer("hidden").kernel.shape[-1]),
        "iterations": int(keras.ops.convert_to_numpy(opt.iterations)),
        "weights": [float(np.sum(np.abs(w))) for w in model.get_weights()],
        "slots": [float(np.sum(np.abs(keras.ops.convert_to_numpy(v)))) for v in opt.variables[2:]],
    }}

class Kill(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == kill_at:
            with open(report, "w") as f:
                json.dump({{"killed_after_epoch": epoch, **state(self.model)}}, f)
            os.kill(os.getpid(), 9)

class Look(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        with open(report, "w") as f:
            json.dump({{"resumed": state(self.model)}}, f)

x, y = data()
model = make_model(2)
grow = SplitEvery(epochs=1, max_units=8, verbose=1, backup_dir=backup)
cbs = [grow, keras.callbacks.BackupAndRestore(backup), Kill() if kill_at >= 0 else Look()]
h = model.fit(x, y, epochs=5, batch_size=16, callbacks=cbs, verbose=0)
with open(report) as f:
    rep = json.load(f)
rep["epochs_run"] = len(h.history["loss"])
rep["units_history"] = [int(u) for u in h.history["units/hidden"]]
rep["event_epochs"] = grow.event_epochs
rep["final"] = state(model)
with open(report, "w") as f:
    json.dump(rep, f)
"""


@pytest.mark.slow_on_jax
def test_backup_and_restore_resumes_a_killed_grown_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=os.path.dirname(__file__)))
    backup, killed, resumed = str(tmp_path / "backup"), str(tmp_path / "killed.json"), str(tmp_path / "resumed.json")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, str(script), backup, killed, "1"], env=env, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr[-3000:]
    with open(killed) as f:
        before = json.load(f)
    assert before["units"] == 8  # grew 2 -> 4 -> 8 at the ends of epochs 0 and 1, then killed
    r = subprocess.run([sys.executable, str(script), backup, resumed, "-1"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(resumed) as f:
        after = json.load(f)
    got = after["resumed"]
    assert got["units"] == 8
    assert got["iterations"] == before["iterations"] > 0
    np.testing.assert_allclose(got["weights"], before["weights"], rtol=1e-6)
    np.testing.assert_allclose(got["slots"], before["slots"], rtol=1e-6)
    assert after["epochs_run"] == 3  # epochs 2, 3, 4
    assert after["units_history"] == [8, 8, 8]  # capped at 8
    assert after["event_epochs"] == [0, 1]  # the events before the kill are remembered
    assert not os.path.exists(backup)  # BackupAndRestore cleaned up after finishing


def test_producers_the_callbacks_cannot_rank_grow_whole_when_named():
    """A Conv2DTranspose keeps its units on the kernel's axis -2: the callbacks read its width from the
    graph (not the kernel's last axis), grow it when named, with select="all" only, and leave it out
    of the default layers."""
    L = keras.layers
    inp = keras.Input((4, 4, 2))
    h = L.Conv2DTranspose(3, 3, padding="same", name="t")(inp)
    h = L.Dense(5, activation="relu", name="d")(h)
    model = keras.Model(inp, L.Dense(2, name="out")(L.Flatten()(h)))
    model.compile("adam", "mse")
    x, y = np.zeros((4, 4, 4, 2), "float32"), np.zeros((4, 2), "float32")
    with pytest.raises(ValueError, match=r"\['t'\].*select='all'"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[SplitEvery(epochs=1, layers=["t"], select=1, verbose=0)])
    grow = SplitEvery(epochs=1, layers=["t"], max_units=5, symmetry="none", verbose=0)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[grow])
    assert grow.widths() == {"t": 5} and model.get_layer("t").filters == 5
    grow = SplitEvery(epochs=1, verbose=0)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[grow])
    assert [list(e.layers) for e in grow.events] == [["d"]]


# ------------------------------------------------------------- layers whose config holds the width


def _reshaped_model():
    """The hidden units go through a Reshape whose target_shape names their count (rebuilt from today's
    config with only units changed, the best epoch's architecture could not be built)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((N_IN,))
    h = keras.layers.Dense(4, activation="relu", name="hidden")(inp)
    h = keras.layers.Reshape((4, 1))(h)
    out = keras.layers.Dense(N_OUT, activation="softmax", name="out")(keras.layers.Flatten()(h))
    model = keras.Model(inp, out)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def test_restore_best_weights_after_growth_through_a_reshape():
    x, _ = data()
    keep = Keep(1)
    cb = SplitOnPlateau(max_units=16, restore_best_weights=True, verbose=0)
    model = _reshaped_model()
    fit(model, [Script([0.5, 0.9, 0.9, 0.9, 0.9, 0.9]), keep, cb], epochs=6)
    assert cb.event_epochs == [2, 3] and cb.best_epoch == 1
    assert _hidden(model).kernel.shape[-1] == 16
    np.testing.assert_allclose(model.predict(x, verbose=0), keep.pred, rtol=1e-5, atol=1e-6)


def test_max_params_prices_units_through_a_reshape():
    model = _reshaped_model()
    cost = (N_IN + 1) + N_OUT  # incoming column, bias and outgoing row; the Reshape holds no weights
    limit = model.count_params() + 4 * cost
    cb = SplitOnPlateau(max_params=limit, verbose=0)
    h = fit(model, [Script([0.5] * 6), cb], epochs=6)
    assert max(h.history["params"]) <= limit
    assert widths(h)[-1] == 8  # 4 -> 8: the budget allows exactly four more units
