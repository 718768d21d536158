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


# -- the default: "fresh" in the Keras API, "nudge" in the core ---------------------------------------------


def test_the_default_symmetry_is_fresh_in_the_keras_api_and_nudge_in_the_core_as_the_docs_say():
    import argparse
    import inspect
    import pathlib

    import fastsplit
    from fastsplit import demo
    from fastsplit.keras._widen import DEFAULT_SYMMETRY

    assert DEFAULT_SYMMETRY == "fresh"
    for fn in (fk.widen, fk.SplitOnPlateau, fk.SplitEvery, demo.run_demo, demo.check_args, demo.grower):
        assert inspect.signature(fn).parameters["symmetry"].default == "fresh", fn
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert parser.parse_args([]).symmetry == "fresh"
    assert '``"fresh"`` (default' in fk.widen.__doc__
    assert '``"fresh"`` (default' in fk.SplitOnPlateau.__doc__
    assert "symmetry" in fk.SplitEvery.__doc__ and "SplitOnPlateau" in fk.SplitEvery.__doc__  # its args are those
    assert inspect.signature(fastsplit.plan).parameters["symmetry"].default == "nudge"
    assert '``"nudge"`` (default)' in fastsplit.plan.__doc__
    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert '`"fresh"` is the default' in readme
    signature = next(line for line in readme.splitlines() if line.startswith("Arguments of `SplitOnPlateau("))
    assert 'symmetry="fresh"' in signature
    row = next(line for line in readme.splitlines() if line.startswith("| `symmetry` |"))
    assert '`"fresh"` (the default)' in row


def test_widen_by_default_adds_fresh_units_and_keeps_the_function():
    model, x, _ = _trained()
    before = predict(model, x)
    event = fk.widen(model, {"h": None})
    assert event.symmetry == "fresh"
    np.testing.assert_allclose(predict(model, x), before, rtol=1e-5, atol=1e-6)
    assert np.all(np.array(model.get_layer("o").kernel.numpy())[4:] == 0)
    kernel = np.array(model.get_layer("h").kernel.numpy())
    assert np.linalg.norm(kernel[:, 4:] - kernel[:, :4]) > 0.5 * np.linalg.norm(kernel[:, :4])  # new, not copies


def test_eps_with_a_symmetry_that_has_none_is_refused():
    model, _, _ = _trained()
    weights = model.get_weights()
    with pytest.raises(fk.GrowthError, match=r"eps=0.001 with symmetry='fresh'"):
        fk.widen(model, {"h": None}, eps=1e-3)  # the default is fresh, which has no eps
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), weights))
    with pytest.raises(fk.GrowthError, match="eps=0.001"):
        fk.SplitEvery(1, eps=1e-3)
    fk.widen(model, {"h": None}, symmetry="nudge", eps=1e-3)


def _normalised(units=4):
    """Dense -> LayerNormalization (across the units) -> Dense: fresh units would change the normaliser."""
    model = keras.Sequential([keras.Input((8,)), L.Dense(units, name="h"), L.LayerNormalization(name="ln"),
                              L.Activation("tanh"), L.Dense(1, name="o")])  # fmt: skip
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    return model


def test_fresh_gives_way_to_direction_where_a_layer_normalises_across_the_units():
    from fastsplit.plan import plan

    model, (x, y) = _normalised(), _trained()[1:]
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    before = predict(model, x)
    with pytest.warns(RuntimeWarning, match=r"symmetry='fresh' would change the function of 'h'.*'ln'.*direction"):
        fk.widen(model, {"h": None})
    change = float(np.abs(predict(model, x) - before).mean())
    assert change < 2 * 0.1**2 * float(np.abs(before).mean() + 1)  # direction's bound, eps 0.1
    kernel = np.array(model.get_layer("h").kernel.numpy())
    assert np.linalg.norm(kernel[:, 4:] - kernel[:, :4]) == pytest.approx(0.2 * np.linalg.norm(kernel[:, :4]), rel=0.5)
    weights = model.get_weights()
    with pytest.raises(fk.GrowthError, match=r"'fresh' plan for 'h'.*'ln'.*direction"):
        fk.widen(model, {"h": plan(8, symmetry="fresh")})
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), weights))


def test_the_callbacks_fall_back_to_direction_before_a_normaliser_across_the_units_and_restore_exactly():
    model, (x, y) = _normalised(), _trained()[1:]

    class Keep(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                self.pred = self.model.predict(x, verbose=0)
            logs["val_loss"] = 0.0 if epoch == 0 else 1.0  # epoch 0 is the best

    keep = Keep()
    cb = fk.SplitEvery(1, restore_best_weights=True, monitor="val_loss", verbose=0)
    with pytest.warns(RuntimeWarning, match="SplitEvery: symmetry='fresh' would change the function of 'h'"):
        model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[keep, cb])
    assert model.get_layer("h").units == 32  # 4 -> 8 -> 16 -> 32 at the ends of epochs 0, 1, 2
    assert all(p["h"].symmetry == "direction" for p in cb._plans)
    np.testing.assert_allclose(predict(model, x), keep.pred, rtol=1e-4, atol=1e-5)


def test_fresh_needs_no_bias_or_normaliser_to_act():
    """The nudge's "cannot act" warning (tests/keras/test_holders.py) has no fresh counterpart: fresh units
    differ by their incoming weights, whatever follows them."""
    import warnings

    inp = keras.Input((8,))
    h = L.Dense(6, use_bias=False, name="d")(inp)
    h = L.BatchNormalization(center=False, name="bn")(h)
    model = keras.Model(inp, L.Dense(1, name="o")(L.ReLU()(h)))
    x = np.random.default_rng(0).normal(size=(16, 8)).astype("float32")
    before = predict(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fk.widen(model, {"d": None})
    np.testing.assert_allclose(predict(model, x), before, rtol=1e-5, atol=1e-5)
    kernel = np.array(model.get_layer("d").kernel.numpy())
    assert np.all(np.abs(kernel[:, 6:] - kernel[:, :6]).sum(axis=0) > 0)


def test_a_saved_fresh_plan_comes_back_with_its_draws():
    from fastsplit.keras._resume import _check_plan_dict, plan_dict, plan_from_dict
    from fastsplit.plan import plan

    p = plan(3, [0, 2], symmetry="fresh", sigma=0.5, seed=7)
    d = plan_dict(p)
    _check_plan_dict(d, "plans[0]['h']")
    q = plan_from_dict(d)
    assert (q.symmetry, q.sigma, q.seed) == ("fresh", 0.5, 7)
    np.testing.assert_array_equal(q.src, p.src)
    np.testing.assert_array_equal(q.ratio, p.ratio)
    old = {k: v for k, v in d.items() if k in ("width", "src", "ratio")}  # as saved before fresh was the default
    assert plan_from_dict(old).symmetry == "fresh"
    with pytest.raises(fk.GrowthError, match="symmetry can only be 'fresh'"):
        _check_plan_dict({**d, "symmetry": "nudge"}, "plans[0]['h']")


def test_the_cnn_with_batchnorm_grows_fresh_in_fit_prunes_and_restores_exactly():
    """Conv2D + BatchNorm and a Dense after Flatten, all grown by the default (fresh) with dead units pruned
    first, then the best epoch's function restored across both kinds of event."""
    from conftest import cnn

    model = cnn()
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6, 6, 2)).astype("float32")
    y = rng.normal(size=(32, 2)).astype("float32")

    class Keep(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                self.pred = self.model.predict(x, verbose=0)
            logs["val_loss"] = 0.0 if epoch == 0 else 1.0

    keep = Keep()
    cb = fk.SplitEvery(1, restore_best_weights=True, monitor="val_loss", verbose=0, prune_dead=True, prune_data=x)
    model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[keep, cb])
    assert model.get_layer("conv").filters > 4 and model.get_layer("fc").units > 5
    assert {e.symmetry for e in cb.events if e.kind == "split"} == {"fresh"}
    np.testing.assert_allclose(predict(model, x), keep.pred, rtol=1e-4, atol=1e-5)
