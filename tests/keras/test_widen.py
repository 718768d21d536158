"""widen: function preservation, in-place use, saving, refusals, atomicity."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import BACKEND, MODELS, L, compiled, data, keras, predict, rel_err

import fastsplit
import fastsplit.keras as fk

TOL = 1e-5


def _random_plans(model, names, rng):
    widths = {g.producers[0]: g.width for g in fk.coupled_groups(model)}
    plans = {}
    for name in names:
        path = next(p for p in widths if p.rsplit("/", 1)[-1] == name)
        n = widths[path]
        k = int(rng.integers(1, n + 1))
        plans[name] = rng.choice(n, size=k, replace=True).tolist()
    return plans


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("how", ["all", "random"])
def test_function_preserved(name, how):
    model, x, _ = compiled(name)
    before = predict(model, x)
    names = MODELS[name][2]
    if how == "all":
        plans = {n: None for n in names}
    else:
        plans = _random_plans(model, names, np.random.default_rng(len(name)))
    event = fk.widen(model, plans, symmetry="none")
    after = predict(model, x)
    assert rel_err(before, after) <= TOL
    assert event.params_after > event.params_before
    assert event.params_after == model.count_params()
    for _path, g in event.layers.items():
        assert g.new_width > g.old_width or not g.neurons
    # the same object keeps training with the new shapes
    model.train_on_batch(x, np.zeros_like(before))


def test_split_plan_with_copies_and_ratios():
    model, x, _ = compiled("mlp")
    before = predict(model, x)
    p = fastsplit.plan(6, [0, 2], copies=3, ratios=[0.5, 0.3, 0.2], symmetry="none")
    event = fk.widen(model, {"h1": p})
    assert event.layers["h1"].new_width == 10
    assert rel_err(before, predict(model, x)) <= TOL


def test_event_record_is_json():
    model, x, _ = compiled("cnn")
    event = fk.widen(model, {"conv": [1, 3], "fc": None})
    d = event.to_dict()
    back = fk.GrowthEvent.from_dict(json.loads(json.dumps(d)))
    assert back == event
    assert set(event.times) >= {"export", "kernel", "variables", "retrace", "total"}
    assert event.layers["conv"].old_width == 4 and event.layers["conv"].new_width == 6
    assert event.layers["conv"].neurons == [1, 3]
    assert event.layers["fc"].params_after > event.layers["fc"].params_before
    assert event.neurons_split == 2 + 5
    assert fk.history(model) == [event]


def test_summary_config_and_widths_follow():
    model, x, _ = compiled("mlp")
    fk.widen(model, {"h1": None, "h2": [0]})
    assert model.get_layer("h1").units == 12
    assert model.get_layer("h2").units == 6
    cfg = model.get_config()
    units = {lc["config"]["name"]: lc["config"].get("units") for lc in cfg["layers"]}
    assert units["h1"] == 12 and units["h2"] == 6
    model.summary(print_fn=lambda *a, **k: None)
    assert tuple(model.get_layer("h2").kernel.shape) == (12, 6)


def test_widen_inside_fit_callback():
    model, x, y = compiled("cnn", eager=False)
    seen = []

    class Grow(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch in (0, 1):
                seen.append(fk.widen(self.model, {"conv": None, "fc": [0]}))

    hist = model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[Grow()], validation_data=(x, y))
    assert len(seen) == 2
    assert model.predict(x, verbose=0).shape == (len(x), 2)
    model.evaluate(x, y, verbose=0)
    assert model.get_layer("conv").filters == 16
    assert len(hist.history["loss"]) == 3 and np.isfinite(hist.history["loss"]).all()


def test_widen_inside_fit_batch_callback():
    """Mid-epoch growth: on JAX the live training state is synced back first."""
    model, x, y = compiled("mlp", eager=False)

    class Grow(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 0 and self.model.get_layer("h1").units == 6:
                fk.widen(self.model, {"h1": None}, symmetry="none")

    w_before = model.get_layer("h1").kernel.numpy().copy()
    model.fit(x, y, epochs=1, batch_size=4, verbose=0, callbacks=[Grow()])
    k = model.get_layer("h1").kernel.numpy()
    assert k.shape == (12, 12)
    assert not np.allclose(k[:, :6], w_before)  # trained before and after the growth


def test_save_and_load(tmp_path):
    model, x, y = compiled("residual")
    fk.widen(model, {"r1": None, "side": [1]})
    fk.widen(model, {"fc": [0, 0, 3]})
    model.train_on_batch(x, y)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(predict(loaded, x), predict(model, x), rtol=0, atol=1e-6)
    hist = fk.history(loaded)
    assert [list(e.layers) for e in hist] == [["stem", "r1", "r2", "side"], ["fc"]]
    assert hist == fk.history(model)
    # the loaded model keeps training and growing
    loaded.train_on_batch(x, y)
    fk.widen(loaded, {"fc": None})
    assert len(fk.history(loaded)) == 3


def test_save_and_load_sequential(tmp_path):
    model, x, y = compiled("mlp")
    fk.widen(model, {"h2": None})
    path = str(tmp_path / "s.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, keras.Sequential)
    np.testing.assert_allclose(predict(loaded, x), predict(model, x), rtol=0, atol=1e-6)
    assert len(fk.history(loaded)) == 1


def test_nested_name_by_path_and_input_layer(tmp_path):
    model, x, y = compiled("nested")
    before = predict(model, x)
    fk.widen(model, {"pre": None, "block/b2": [1]}, symmetry="none")
    assert rel_err(before, predict(model, x)) <= TOL
    path = str(tmp_path / "n.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(predict(loaded, x), predict(model, x), rtol=0, atol=1e-6)


def test_channels_first():
    if BACKEND == "tensorflow":
        pytest.skip("TensorFlow 2.21 with Keras 3.15 rejects NCHW Conv2D on the CPU (UnimplementedError), before any split")
    inp = keras.Input((2, 6, 6))
    h = L.Conv2D(3, 3, data_format="channels_first", name="c")(inp)
    h = L.BatchNormalization(axis=1)(h)
    h = L.ZeroPadding2D(1, data_format="channels_first")(h)
    h = L.AveragePooling2D(2, data_format="channels_first")(h)
    h = L.Conv2D(4, 1, data_format="channels_first", name="c2")(h)
    h = L.Flatten()(h)  # channels_last flatten of a channels_first map: (units, positions)
    m = keras.Model(inp, L.Dense(2)(h))
    x = data((2, 6, 6))[0]
    before = predict(m, x)
    fk.widen(m, {"c": [0, 2], "c2": None}, symmetry="none")
    assert rel_err(before, predict(m, x)) <= TOL


def test_conv1d_3d():
    inp = keras.Input((9, 2))
    h = L.Conv1D(3, 2, name="c")(inp)
    h = L.Cropping1D(1)(h)
    h = L.UpSampling1D(2)(h)
    h = L.GlobalMaxPooling1D()(h)
    m = keras.Model(inp, L.Dense(2)(h))
    x = data((9, 2))[0]
    before = predict(m, x)
    fk.widen(m, {"c": None}, symmetry="none")
    assert rel_err(before, predict(m, x)) <= TOL

    inp = keras.Input((4, 4, 4, 1))
    h = L.Conv3D(3, 2, name="c")(inp)
    h = L.MaxPooling3D()(h)
    h = L.Flatten()(h)
    m = keras.Model(inp, L.Dense(2)(h))
    x = data((4, 4, 4, 1))[0]
    before = predict(m, x)
    fk.widen(m, {"c": [2]}, symmetry="none")
    assert rel_err(before, predict(m, x)) <= TOL


def test_layer_norm_uniform_and_group_norm():
    inp = keras.Input((5,))
    h = L.Dense(4, name="a")(inp)
    h = L.LayerNormalization()(h)
    h = L.Dense(6, name="b")(h)
    h = L.Reshape((3, 2))(h)  # units on the last axis stay there
    h = L.Dense(4, name="c")(h)
    h = L.GroupNormalization(groups=4)(h)  # one group per unit
    h = L.Flatten()(h)
    m = keras.Model(inp, L.Dense(2)(h))
    x = data((5,))[0]
    before = predict(m, x)
    fk.widen(m, {"a": None, "c": [0, 3]}, symmetry="none")
    assert rel_err(before, predict(m, x)) <= TOL
    assert m.layers[-3].groups == 6


def test_coupled_groups_residual():
    model, _, _ = compiled("residual")
    groups = {tuple(g.producers): g for g in fk.coupled_groups(model)}
    assert ("stem", "r1", "r2") in groups
    g = groups[("stem", "r1", "r2")]
    assert g.width == 6 and not g.refused
    assert "add1" in g.layers and "fc" in g.consumers
    assert groups[("out",)].refused  # reaches the model output
    # naming one member splits the whole group
    event = fk.widen(model, {"r2": [0, 5]})
    assert set(event.layers) == {"stem", "r1", "r2"}
    assert all(lg.new_width == 8 for lg in event.layers.values())


def test_two_axis_kernel_in_one_call():
    """A kernel that consumes one split layer and produces another is one two-axis job: the whole
    event is one split_many call, with the same result as splitting each axis on its own."""
    keras.utils.set_random_seed(7)
    model, x, _ = compiled("mlp")
    before = predict(model, x)
    w = model.get_layer("h2").kernel.numpy()
    event = fk.widen(model, {"h1": [1, 4], "h2": None}, symmetry="none")
    assert event.split_calls == 1
    p1, p2 = fastsplit.plan(w.shape[0], [1, 4], symmetry="none"), fastsplit.plan(w.shape[1], None, symmetry="none")
    expected = fastsplit.split(fastsplit.split(w, p2, 1), p1, 0, role="outgoing")
    np.testing.assert_array_equal(model.get_layer("h2").kernel.numpy(), expected)
    assert rel_err(before, predict(model, x)) <= TOL


def test_nudge_goes_to_batchnorm_beta_or_warns():
    inp = keras.Input((6, 6, 2))
    h = L.Conv2D(3, 3, use_bias=False, name="c")(inp)
    h = L.BatchNormalization(name="bn")(h)
    h = L.ReLU()(h)
    m = keras.Model(inp, L.Dense(2)(L.Flatten()(h)))
    beta = m.get_layer("bn").beta.numpy().copy()
    fk.widen(m, {"c": [1]}, symmetry="nudge", eps=0.01)
    new = m.get_layer("bn").beta.numpy()
    np.testing.assert_allclose(new[[1, 3]] - beta[[1, 1]], [0.01, -0.01], atol=1e-7)

    inp = keras.Input((4,))
    h = L.Dense(3, use_bias=False, name="nb")(inp)
    m = keras.Model(inp, L.Dense(2)(h))
    with pytest.warns(RuntimeWarning, match="nb"):
        fk.widen(m, {"nb": None}, symmetry="nudge")


def test_prelu_spatial_dropout_softmax_and_concat_on_another_axis():
    inp = keras.Input((5, 3))
    a = L.Dense(4, name="a")(inp)
    a = L.PReLU(alpha_initializer=keras.initializers.RandomUniform(0.1, 0.5))(a)
    a = L.SpatialDropout1D(0.2)(a)
    b = L.Dense(4, name="b")(inp)
    h = L.Concatenate(axis=1)([a, b])  # along time: a and b must share one plan
    h = L.Softmax(axis=1)(h)  # over time, not over the units
    m = keras.Model(inp, L.Dense(2)(L.Flatten()(h)))
    groups = {tuple(g.producers) for g in fk.coupled_groups(m)}
    assert ("a", "b") in groups
    x = data((5, 3))[0]
    before = predict(m, x)
    fk.widen(m, {"a": [0, 2]}, symmetry="none")
    assert m.get_layer("b").units == 6
    assert rel_err(before, predict(m, x)) <= TOL
