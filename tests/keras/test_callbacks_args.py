"""Nothing silently wrong in the growth callbacks and the growth history (issue 11).

- every argument of SplitOnPlateau / SplitEvery is checked in ``__init__`` and a bad one
  raises :class:`GrowthError` naming it and the value (never a numpy/int() error, never
  after an epoch);
- an epoch whose logs lack a ``val_`` monitor because fit did not validate at its end
  (``validation_freq``) is skipped, as in EarlyStopping; a fit that never showed it warns;
- a grown model saved as ``.h5`` loads again, history included;
- a malformed saved history is refused when the model is loaded, naming the field.

Run per backend: ``KERAS_BACKEND=jax pytest tests/keras/test_callbacks_args.py`` (tensorflow, jax, torch).
"""

from __future__ import annotations

import json
import math
import warnings
import zipfile

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from fitting import N_IN, N_OUT, Counter, Keep, data, fit, make_model  # noqa: E402

import fastsplit.keras as fk  # noqa: E402
from fastsplit.keras import GrowthError, SplitEvery, SplitOnPlateau  # noqa: E402


class ScriptVal(keras.callbacks.Callback):
    """Overwrites ``val_accuracy`` with ``values[epoch]``, only at the epochs where fit validated."""

    def __init__(self, values):
        super().__init__()
        self.values = list(values)

    def on_epoch_end(self, epoch, logs=None):
        if "val_loss" in logs:
            logs["val_accuracy"] = self.values[epoch]


def units(history):
    return [int(u) for u in history.history["units/hidden"]]


# ------------------------------------------------------------------------------------- arguments

BAD = [
    # (kwargs, the text the message must hold)
    ({"monitor": 3}, "monitor=3"),
    ({"monitor": ""}, "monitor=''"),
    ({"mode": "up"}, "mode='up'"),
    ({"mode": None}, "mode=None"),
    ({"min_delta": "0.1"}, "min_delta='0.1'"),
    ({"min_delta": -0.01}, "min_delta=-0.01"),
    ({"min_delta": float("nan")}, "min_delta=nan"),
    ({"min_delta": float("inf")}, "min_delta=inf"),
    ({"min_delta": True}, "min_delta=True"),
    ({"start_from_epoch": -1}, "start_from_epoch=-1"),
    ({"start_from_epoch": 1.0}, "start_from_epoch=1.0"),
    ({"start_from_epoch": True}, "start_from_epoch=True"),
    ({"layers": 5}, "layers=5"),
    ({"layers": []}, "layers=[]"),
    ({"layers": ["hidden", 3]}, "layers=['hidden', 3]"),
    ({"layers": ["hidden", "hidden"]}, "['hidden']"),
    ({"layers": {"hidden": 1}}, "layers={'hidden': 1}"),
    ({"layers": [""]}, "layers=['']"),
    ({"select": 1.5}, "select=1.5"),
    ({"select": 0}, "select=0"),
    ({"select": float("nan")}, "select=nan"),
    ({"select": True}, "select=True"),
    ({"select": "half"}, "select='half'"),
    ({"select": ["a"]}, "select=['a']"),
    ({"select": ("threshold", float("inf"))}, "inf"),
    ({"select": ("threshold", "x")}, "'x'"),
    ({"score": "bogus"}, "score='bogus'"),
    ({"score": 3}, "score=3"),
    ({"symmetry": "mirror"}, "symmetry='mirror'"),
    ({"symmetry": ["nudge"]}, "symmetry=['nudge']"),
    ({"eps": "0.1"}, "eps='0.1'"),
    ({"eps": float("nan")}, "eps=nan"),
    ({"eps": -1e-3}, "eps=-0.001"),
    ({"eps": True}, "eps=True"),
    ({"eps": 1e-3, "symmetry": "noise"}, "eps=0.001"),
    ({"eps": 1e-3, "symmetry": "none"}, "symmetry='none'"),
    ({"max_units": 0}, "max_units=0"),
    ({"max_units": 4.0}, "max_units=4.0"),
    ({"max_units": True}, "max_units=True"),
    ({"max_units": "8"}, "max_units='8'"),
    ({"max_units": {"hidden": 0}}, "max_units['hidden']=0"),
    ({"max_units": {"hidden": 2.5}}, "max_units['hidden']=2.5"),
    ({"max_units": {1: 4}}, "the key 1"),
    ({"max_params": -5}, "max_params=-5"),
    ({"max_params": 1e6}, "max_params=1000000.0"),
    ({"stop_when_grown": "no"}, "stop_when_grown='no'"),
    ({"stop_when_grown": 0}, "stop_when_grown=0"),
    ({"restore_best_weights": "yes"}, "restore_best_weights='yes'"),
    ({"restore_best_weights": None}, "restore_best_weights=None"),
    ({"verbose": -1}, "verbose=-1"),
    ({"verbose": True}, "verbose=True"),
    ({"verbose": "1"}, "verbose='1'"),
    ({"seed": "x"}, "seed='x'"),
    ({"seed": -1}, "seed=-1"),
    ({"seed": 1.5}, "seed=1.5"),
    ({"seed": True}, "seed=True"),
    ({"backup_dir": 5}, "backup_dir=5"),
    ({"backup_dir": ""}, "backup_dir=''"),
    ({"prune_dead": "yes"}, "prune_dead='yes'"),
    ({"prune_dead": 1}, "prune_dead=1"),
    ({"prune_data": np.zeros((2, N_IN))}, "prune_dead=False"),
    ({"prune_dead": True}, "prune_data=None and probe=None"),
    ({"score": "gradient"}, "probe"),
    ({"score": "gradient", "probe": np.zeros((2, N_IN))}, "probe=(x, y)"),
]

PLATEAU_ONLY = [
    ({"patience": -1}, "patience=-1"),
    ({"patience": 1.5}, "patience=1.5"),
    ({"patience": True}, "patience=True"),
    ({"patience": "2"}, "patience='2'"),
    ({"cooldown": -1}, "cooldown=-1"),
    ({"cooldown": 1.5}, "cooldown=1.5"),
    ({"cooldown": False}, "cooldown=False"),
]

EVERY_ONLY = [
    ({"epochs": 0}, "epochs=0"),
    ({"epochs": 2.0}, "epochs=2.0"),
    ({"epochs": True}, "epochs=True"),
    ({"epochs": "3"}, "epochs='3'"),
]


def _ids(cases):
    return [",".join(f"{k}={v!r}"[:30] for k, v in kw.items()) for kw, _ in cases]


@pytest.mark.parametrize("kwargs, shown", BAD + PLATEAU_ONLY, ids=_ids(BAD + PLATEAU_ONLY))
def test_split_on_plateau_refuses_a_bad_argument_naming_it(kwargs, shown):
    with pytest.raises(GrowthError) as e:
        SplitOnPlateau(**kwargs)
    assert shown in str(e.value)
    assert isinstance(e.value, ValueError)  # old `except ValueError` still catches it


@pytest.mark.parametrize("kwargs, shown", BAD + EVERY_ONLY, ids=_ids(BAD + EVERY_ONLY))
def test_split_every_refuses_a_bad_argument_naming_it(kwargs, shown):
    kwargs = {"epochs": 1, **kwargs}
    with pytest.raises(GrowthError) as e:
        SplitEvery(**kwargs)
    assert shown in str(e.value)


def test_backup_dir_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(GrowthError, match="backup_dir.*is a file"):
        SplitOnPlateau(backup_dir=f)
    assert f.read_text() == ""


def test_numpy_scalars_and_paths_are_accepted(tmp_path):
    cb = SplitOnPlateau(min_delta=np.float32(0.5), patience=np.int64(2), cooldown=np.int32(1), select=np.float64(0.5),
                        max_units={"hidden": np.int64(8)}, stop_when_grown=np.bool_(False), eps=np.float64(1e-3),
                        symmetry="nudge", seed=np.uint8(3), backup_dir=tmp_path / "b", layers=("hidden",),
                        verbose=0)  # fmt: skip
    assert (cb.patience, cb.cooldown, cb.max_units, cb.seed) == (2, 1, {"hidden": 8}, 3)
    assert cb.stop_when_grown is False and cb.eps == 1e-3 and cb.layers == ["hidden"]
    assert type(cb.min_delta) is float and type(cb.seed) is int
    assert SplitOnPlateau(layers={"b", "a"}).layers == ["a", "b"]
    assert not (tmp_path / "b").exists()  # nothing is created before fit


def test_every_value_error_of_the_callbacks_is_a_growth_error():
    # model-dependent refusals at the start of fit have the same type
    for kwargs in ({"monitor": "val_bogus"}, {"layers": ["out"]}, {"layers": ["nope"]}, {"max_units": {"nope": 4}}):
        model = make_model()
        counter = Counter()
        with pytest.raises(GrowthError):
            fit(model, [SplitOnPlateau(verbose=0, **kwargs), counter], epochs=1)
        assert counter.batches == 0


# ------------------------------------------------------------------------------ validation_freq


def test_split_on_plateau_skips_epochs_that_did_not_validate():
    # fit validates at epochs 1, 3, 5 (0-based); on main the callback stopped fit at epoch 0
    model = make_model()
    cb = SplitOnPlateau(min_delta=0.01, stop_when_grown=False, verbose=0)
    h = fit(model, [ScriptVal([None, 0.5, None, 0.5, None, 0.5]), cb], epochs=6, validation_freq=2)
    assert cb.event_epochs == [3, 5]
    assert units(h) == [2, 2, 2, 4, 4, 8]
    assert len(h.history["loss"]) == 6 and cb.stopped_epoch == 0


def test_skipped_epochs_count_for_neither_patience_nor_cooldown():
    model = make_model()
    cb = SplitOnPlateau(min_delta=0.01, patience=2, stop_when_grown=False, verbose=0)
    fit(model, [ScriptVal([None, 0.5] * 3), cb], epochs=6, validation_freq=2)
    assert cb.event_epochs == [5]  # waits at epochs 3 and 5, never at the epochs without validation
    model = make_model()
    cb = SplitOnPlateau(min_delta=0.01, cooldown=1, stop_when_grown=False, verbose=0)
    fit(model, [ScriptVal([None, 0.5] * 4), cb], epochs=8, validation_freq=2)
    assert cb.event_epochs == [3, 7]  # epoch 5 is the one validated epoch of cooldown


def test_validation_freq_as_a_list():
    model = make_model()
    cb = SplitOnPlateau(min_delta=0.01, stop_when_grown=False, verbose=0)
    fit(model, [ScriptVal([None, None, 0.5, None, 0.5]), cb], epochs=5, validation_freq=[3, 5])
    assert cb.event_epochs == [4]


def test_split_every_restore_best_weights_with_validation_freq():
    x, _ = data()
    keep = Keep(1)
    model = make_model()
    # on main the callback stopped fit at epoch 0, which has no val_accuracy
    cb = SplitEvery(epochs=1, max_units=4, restore_best_weights=True, verbose=0)
    fit(model, [ScriptVal([None, 0.9, None, 0.5]), keep, cb], epochs=4, validation_freq=2)
    assert cb.event_epochs == [0] and cb.best_epoch == 1
    assert model.get_layer("hidden").kernel.shape[-1] == 4
    np.testing.assert_allclose(model.predict(x, verbose=0), keep.pred, rtol=1e-5, atol=1e-6)


def test_a_fit_that_never_shows_the_monitor_warns_once():
    model = make_model()
    x, y = data()
    with pytest.warns(UserWarning, match="monitor='val_accuracy' was in the logs of no epoch") as rec:
        h = model.fit(x, y, epochs=3, verbose=0, callbacks=[SplitOnPlateau(verbose=0)])
    assert units(h) == [2, 2, 2]
    assert sum("val_accuracy" in str(w.message) for w in rec) == 1
    with pytest.warns(UserWarning, match="no best epoch to restore"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[SplitEvery(1, restore_best_weights=True, verbose=0)])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")  # SplitEvery without restore_best_weights does not need the monitor
        model.fit(x, y, epochs=1, verbose=0, callbacks=[SplitEvery(1, max_units=8, verbose=0)])
    assert not [w for w in rec if "monitor=" in str(w.message)]


def test_a_monitor_missing_although_validation_ran_raises():
    # mode="max" skips the name check at train begin; validation ran, so the value should be there
    model = make_model()
    with pytest.raises(GrowthError, match="validation ran.*monitor='val_bogus'.*val_loss"):
        fit(model, [SplitOnPlateau(monitor="val_bogus", mode="max", verbose=0)], epochs=2)
    with pytest.raises(GrowthError, match="monitor='bogus' is not in the logs"):
        fit(make_model(), [SplitOnPlateau(monitor="bogus", mode="max", verbose=0)], epochs=2)


# --------------------------------------------------------------------------------------- .h5


def _grown(kind):
    x, y = data()
    keras.utils.set_random_seed(0)
    if kind == "sequential":
        model = keras.Sequential([keras.Input((N_IN,)), keras.layers.Dense(3, activation="relu", name="h"),
                                  keras.layers.Dense(N_OUT, name="o")])  # fmt: skip
        path = "h"
    elif kind == "functional":
        inp = keras.Input((N_IN,))
        h = keras.layers.Dense(3, activation="relu", name="h")(inp)
        model = keras.Model(inp, keras.layers.Dense(N_OUT, name="o")(h))
        path = "h"
    else:  # a grown Sequential inside a Functional
        block = keras.Sequential([keras.Input((N_IN,)), keras.layers.Dense(3, activation="relu", name="h"),
                                  keras.layers.Dense(4, name="o")], name="block")  # fmt: skip
        inp = keras.Input((N_IN,))
        model = keras.Model(inp, keras.layers.Dense(N_OUT, name="top")(block(inp)))
        path = "block/h"
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.train_on_batch(x, y)
    fk.widen(model, {path: None})
    fk.widen(model, {path: [0, 2]})
    model.train_on_batch(x, y)
    return model, x


@pytest.mark.parametrize("kind", ["sequential", "functional", "nested"])
def test_a_grown_model_saved_as_h5_loads(kind, tmp_path):
    model, x = _grown(kind)
    # the .keras format still works beside it (saved first: Keras' .h5 save drops the optimizer
    # from the model's own compile config)
    loaded = keras.models.load_model(_save_keras(model, tmp_path))
    assert type(loaded) is type(model) and len(fk.history(loaded)) == 2
    path = str(tmp_path / "grown.h5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras: "HDF5 ... is considered legacy"
        model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is type(model)
    assert [e.layers for e in fk.history(loaded)] == [e.layers for e in fk.history(model)]
    assert len(fk.history(loaded)) == 2
    for a, b in zip(loaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=0, atol=1e-6)


def _save_keras(model, tmp_path):
    path = str(tmp_path / "grown.keras")
    model.save(path)
    return path


# ----------------------------------------------------------------------------- saved history


@pytest.fixture(scope="module")
def grown_config():
    """A grown Sequential's class and config (two events); each test damages a copy."""
    model, _ = _grown("sequential")
    return type(model), model.get_config(), fk.history(model)


def _copy(grown_config):
    cls, config, hist = grown_config
    return cls, json.loads(json.dumps(config)), hist


MALFORMED = [
    # (how the saved history is damaged, the text the message must hold)
    (lambda h: "not a list", "fastsplit_history must be a list"),
    (lambda h: {"0": h[0]}, "fastsplit_history must be a list"),
    (lambda h: [3], "fastsplit_history[0] must be a dict"),
    (lambda h: [h[0], None], "fastsplit_history[1] must be a dict"),
    (lambda h: [{**h[0], "layers": ["h"]}], "fastsplit_history[0]['layers'] must be a dict"),
    (lambda h: [{**h[0], "layers": {"h": 4}}], "fastsplit_history[0]['layers']['h'] must be a dict"),
    (lambda h: [_layer(h, old_width="3")], "['old_width'] must be an integer >= 1; got '3'"),
    (lambda h: [_layer(h, new_width=-6)], "['new_width'] must be an integer >= 1; got -6"),
    (lambda h: [_layer(h, new_width=6.0)], "got 6.0"),
    (lambda h: [_layer(h, neurons="all")], "['neurons'] must be a list of unit indices in [0, 3)"),
    (lambda h: [_layer(h, neurons=[0, 7])], "[0, 7]"),
    (lambda h: [_layer(h, neurons=[True])], "[True]"),
    (lambda h: [_layer(h, group="0")], "['group'] must be an integer"),
    (lambda h: [_layer(h, drop="old_width")], "lacks ['old_width']"),
    (lambda h: [_layer(h, name=3)], "['name'] must be a string"),
    (lambda h: [{**h[0], "params_before": -1}], "['params_before'] must be an integer >= 0; got -1"),
    (lambda h: [{**h[0], "iteration": "5"}], "['iteration'] must be an integer >= 0 or None"),
    (lambda h: [{**h[0], "kind": 5}], "['kind'] must be a string"),
    (lambda h: [{**h[0], "times": {"total": "fast"}}], "['times'] must be a dict phase -> seconds"),
    (lambda h: [{**h[0], "times": {"total": math.nan}}], "['times']"),
]


def _layer(hist, drop=None, **change):
    ev = json.loads(json.dumps(hist[0]))
    lg = ev["layers"]["h"]
    lg.update(change)
    if drop:
        del lg[drop]
    return ev


@pytest.mark.parametrize("damage, shown", MALFORMED, ids=[m[1][:40] for m in MALFORMED])
def test_a_malformed_history_is_refused_at_load_time(damage, shown, grown_config):
    cls, config, _ = _copy(grown_config)
    config["fastsplit_history"] = damage(config["fastsplit_history"])
    with pytest.raises(GrowthError) as e:
        cls.from_config(config)
    assert "the saved growth history of model" in str(e.value) and shown in str(e.value)


def test_a_malformed_history_in_a_keras_file_is_refused_by_load_model(tmp_path):
    model, _ = _grown("functional")
    path = _save_keras(model, tmp_path)
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    cfg = json.loads(files["config.json"])
    cfg["config"]["fastsplit_history"][1]["layers"]["h"]["neurons"] = ["x"]
    files["config.json"] = json.dumps(cfg).encode()
    bad = str(tmp_path / "bad.keras")
    with zipfile.ZipFile(bad, "w") as z:
        for n, b in files.items():
            z.writestr(n, b)
    with pytest.raises(GrowthError, match=r"fastsplit_history\[1\]\['layers'\]\['h'\]\['neurons'\].*\['x'\]"):
        keras.models.load_model(bad)


def test_a_history_from_a_newer_fastsplit_with_unknown_keys_loads(grown_config):
    cls, config, hist = _copy(grown_config)
    config["fastsplit_history"][0]["future_field"] = {"x": 1}
    config["fastsplit_history"][0]["layers"]["h"]["future_field"] = [1, 2]
    loaded = cls.from_config(config)
    assert fk.history(loaded) == hist


# ----------------------------------------------------------------------------- resume state

RESUME_DAMAGE = [
    # (how each saved callback state is damaged, the text the message must hold)
    (lambda st: st.pop("plans"), "the state lacks ['plans']"),
    (lambda st: st["plans"][0]["hidden"].update(src=["x"]), "plans[0]['hidden']['src'] must be a list of unit"),
    (lambda st: st["plans"][0]["hidden"].update(ratio=[0.5]), "plans[0]['hidden']['ratio'] must be a list of"),
    (lambda st: st["events"].pop(), "one entry per event"),
    (lambda st: st["events"][0].update(layers=3), "events[0]['layers'] must be a dict"),
    (lambda st: st.update(widths={"hidden": "4"}), "widths must map layer names to integers"),
    (lambda st: st.update(wait=-1), "wait must be an integer >= 0; got -1"),
    (lambda st: st.update(event_kinds=["grow"] * len(st["events"])), "event_kinds must be 'split' or 'prune'"),
]


def _backed_up_run(d):
    model = make_model()
    fit(model, [SplitEvery(1, max_units=8, backup_dir=d, verbose=0),
                keras.callbacks.BackupAndRestore(str(d), delete_checkpoint=False)], epochs=2)  # fmt: skip
    return d / "fastsplit_state.json"


@pytest.mark.parametrize("damage, shown", RESUME_DAMAGE, ids=[m[1][:40] for m in RESUME_DAMAGE])
def test_a_malformed_resume_state_is_refused_before_the_model_changes(damage, shown, tmp_path):
    path = _backed_up_run(tmp_path / "backup")
    states = json.loads(path.read_text())
    for st in states.values():
        damage(st)
    path.write_text(json.dumps(states))
    fresh, counter = make_model(), Counter()
    with pytest.raises(GrowthError) as e:
        fit(fresh, [SplitEvery(1, max_units=8, backup_dir=tmp_path / "backup", verbose=0),
                    keras.callbacks.BackupAndRestore(str(tmp_path / "backup"), delete_checkpoint=False), counter],
            epochs=3)  # fmt: skip
    assert "cannot resume from" in str(e.value) and "fastsplit_state.json" in str(e.value) and shown in str(e.value)
    assert fresh.get_layer("hidden").kernel.shape[-1] == 2 and counter.batches == 0


def test_an_unreadable_resume_state_is_refused(tmp_path):
    path = _backed_up_run(tmp_path / "backup")
    path.write_text('{"2": {"epoch": ')
    fresh = make_model()
    with pytest.raises(GrowthError, match="cannot resume from .*fastsplit_state.json"):
        fit(fresh, [SplitEvery(1, max_units=8, backup_dir=tmp_path / "backup", verbose=0),
                    keras.callbacks.BackupAndRestore(str(tmp_path / "backup"), delete_checkpoint=False)], epochs=3)  # fmt: skip
    assert fresh.get_layer("hidden").kernel.shape[-1] == 2
