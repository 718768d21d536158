"""prune, merge_twins, unit_stats, dead_units: exactness, slots, atomicity, refusals."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import L, assert_same, compiled, data, keras, predict, rel_err, snapshot

import fastsplit
import fastsplit.keras as fk
from fastsplit.keras import _surgery, _vars
from fastsplit.keras._prune import merge_twins, prune
from fastsplit.keras._stats import dead_units, unit_stats

TOL = 1e-5

#: model -> (a producing layer, the producers of its group, units to kill, where its units are measured)
CASES = {
    "mlp": ("h1", ["h1"], [0, 3], "h1"),
    "cnn": ("conv", ["conv"], [1, 2], "re_lu"),
    "residual": ("stem", ["stem", "r1", "r2"], [2, 5], "stem"),
    "concat": ("side", ["side"], [0, 2], "side"),
    "depthwise": ("pw1", ["pw1"], [1], "pw1"),
    "nested": ("b1", ["block/b1"], [0, 4], "block/dropout"),
}


def model_for(case):
    return compiled("residual" if case == "concat" else case)


def kill(model, producers, units, bias):
    """Make ``units`` constant: zero incoming weights, bias ``bias``, in every producer of the group."""
    for path in producers:
        layer = model.get_layer(path.rsplit("/", 1)[-1]) if "/" not in path else model.get_layer(
            path.split("/")[0]).get_layer(path.split("/")[1])
        k = np.array(layer.kernel.numpy())
        k[..., units] = 0
        layer.kernel.assign(k)
        b = np.array(layer.bias.numpy())
        b[units] = bias
        layer.bias.assign(b)


def slots(model, var):
    """{slot name: numpy} of one model variable (Adam: momentum, velocity)."""
    opt = model.optimizer
    i = opt._get_variable_index(var)
    return {"m": np.array(opt._momentums[i].numpy()), "v": np.array(opt._velocities[i].numpy())}


# -- unit_stats / dead_units ----------------------------------------------------------------------------


def test_unit_stats_values_and_where():
    model, x, _ = compiled("cnn")
    stats = unit_stats(model, x, batch_size=5)
    assert list(stats) == ["conv", "fc", "out"]
    s = stats["conv"]
    assert s.where == "re_lu" and s.samples == len(x) and s.width == 4
    # the same numbers from a plain probe model on the ReLU output
    probe = keras.Model(model.inputs[0], model.get_layer("re_lu").output)
    a = np.asarray(keras.ops.convert_to_numpy(probe(x, training=False)), dtype=np.float64)
    np.testing.assert_allclose(s.mean, a.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(s.max, a.max(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(s.active, (a != 0).any(axis=(1, 2)).mean(axis=0))
    assert not s.constant.any()
    assert unit_stats(model, (x, None), layers=["fc"])["fc"].where == "fc"


def test_dead_units_finds_killed_units():
    model, x, _ = compiled("mlp")
    kill(model, ["h1"], [1, 4], -1.0)  # relu(-1) = 0: never active
    kill(model, ["h2"], [2], 0.5)  # tanh(0.5): constant, always active
    stats = unit_stats(model, x)
    assert stats["h1"].dead[[1, 4]].all() and stats["h2"].constant[2] and not stats["h2"].dead[2]
    dead = dead_units(model, x)
    assert list(dead) == ["h1", "h2"]  # not "out": its units reach the model output
    np.testing.assert_array_equal(dead["h1"], [1, 4])
    np.testing.assert_array_equal(dead["h2"], [2])
    loose = dead_units(model, x, threshold=0.99)
    assert set(loose["h1"]) >= {1, 4}
    assert list(dead_units(model, x, layers="h2")) == ["h2"]


# -- prune exactness -----------------------------------------------------------------------------------


#: (model, bias of the killed units): a nonzero constant is folded into the consumer's bias (through a
#: BatchNormalization for "cnn", a residual stream, a Concatenate); 0 and -1 (a dead ReLU) fold nothing;
#: "depthwise" needs 0 (a nonzero constant is not constant after a zero-padded DepthwiseConv)
EXACT = [("mlp", 0.7), ("mlp", -1.0), ("cnn", 0.7), ("cnn", -1.0), ("residual", 0.7), ("concat", 0.7),
         ("depthwise", 0.0), ("nested", -1.0), ("nested", 0.7)]


@pytest.mark.parametrize("case, bias", EXACT)
def test_prune_constant_units_is_exact_on_the_data(case, bias):
    model, x, y = model_for(case)
    layer, producers, units, where = CASES[case]
    kill(model, producers, units, bias)
    before = predict(model, x)
    dead = dead_units(model, x, layers=layer)
    key = producers[0]
    assert set(units) <= set(dead[key].tolist())
    assert unit_stats(model, x, layers=producers[:1])[producers[0]].where == where
    params = model.count_params()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        event = prune(model, {layer: units}, data=x)
    assert rel_err(before, predict(model, x)) <= TOL
    for p in producers:
        g = event.layers[p]
        assert g.new_width == g.old_width - len(units) and g.neurons == sorted(units)
    assert event.params_before == params and event.params_after == model.count_params() < params
    assert fk.history(model)[-1] == event
    model.train_on_batch(x, y)  # keeps training with the new shapes
    assert np.isfinite(predict(model, x)).all()


def test_prune_without_data_is_exact_for_zero_units_and_folds_nothing():
    model, x, _ = compiled("mlp")
    kill(model, ["h1"], [0, 5], -2.0)
    before = predict(model, x)
    b2 = np.array(model.get_layer("h2").bias.numpy())
    prune(model, {"h1": [0, 5]})
    assert rel_err(before, predict(model, x)) <= TOL
    np.testing.assert_array_equal(model.get_layer("h2").bias.numpy(), b2)
    assert model.get_layer("h1").units == 4 and tuple(model.get_layer("h2").kernel.shape) == (4, 5)


def test_prune_live_units_warns_and_folds_the_mean():
    model, x, _ = compiled("mlp")
    with pytest.warns(RuntimeWarning, match="not exact on this data"):
        prune(model, {"h1": [1]}, data=x)
    assert model.get_layer("h1").units == 5


def test_prune_both_axes_of_a_kernel_and_a_mask():
    model, x, y = compiled("mlp")
    kill(model, ["h1"], [2], -1.0)
    kill(model, ["h2"], [0, 4], 0.25)
    before = predict(model, x)
    mask = np.zeros(5, dtype=bool)
    mask[[0, 4]] = True
    event = prune(model, {"h1": [2], "h2": mask}, data=x)
    assert rel_err(before, predict(model, x)) <= TOL
    assert tuple(model.get_layer("h2").kernel.shape) == (5, 3)
    assert event.split_calls == 1  # h2's kernel compacted on both axes in the same call
    model.train_on_batch(x, y)


def test_prune_inside_fit():
    model, x, y = compiled("mlp", eager=False)
    kill(model, ["h1"], [3], -5.0)  # stays dead: no gradient reaches it

    class Prune(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                prune(self.model, dead_units(self.model, x, layers="h1"), data=x)

    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[Prune()])
    assert model.get_layer("h1").units == 5
    assert model.predict(x, verbose=0).shape == (len(x), 2)


def test_slots_of_kept_units_are_carried():
    model, x, _ = compiled("mlp")
    h1, h2 = model.get_layer("h1"), model.get_layer("h2")
    old = {n: slots(model, v) for n, v in (("k1", h1.kernel), ("b1", h1.bias), ("k2", h2.kernel))}
    it = int(np.asarray(model.optimizer.iterations))
    keep = [0, 2, 3, 5]
    prune(model, {"h1": [1, 4]})
    new = {n: slots(model, v) for n, v in (("k1", h1.kernel), ("b1", h1.bias), ("k2", h2.kernel))}
    for s in ("m", "v"):
        np.testing.assert_array_equal(new["k1"][s], old["k1"][s][:, keep])
        np.testing.assert_array_equal(new["b1"][s], old["b1"][s][keep])
        np.testing.assert_array_equal(new["k2"][s], old["k2"][s][keep, :])
    assert int(np.asarray(model.optimizer.iterations)) == it


def test_optimizer_reset_gives_fresh_slots():
    model, x, _ = compiled("mlp")
    event = prune(model, {"h1": [1]}, optimizer="reset")
    assert event.optimizer == "reset"
    assert not slots(model, model.get_layer("h1").kernel)["m"].any()


def test_save_and_load_after_prune(tmp_path):
    model, x, y = compiled("residual")
    kill(model, ["side"], [1], 0.3)
    prune(model, {"side": [1]}, data=x)
    path = str(tmp_path / "p.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(predict(loaded, x), predict(model, x), rtol=0, atol=1e-6)
    assert fk.history(loaded)[-1].layers["side"].new_width == 2


# -- merge_twins ---------------------------------------------------------------------------------------


def everything(model):
    snap = snapshot(model)
    return {k: v for k, v in snap.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_split_then_merge_gives_back_the_original(case):
    model, x, y = model_for(case)
    layer = CASES[case][0]
    before, out = everything(model), predict(model, x)
    grown = fk.widen(model, {layer: None}, symmetry="none")
    assert grown.params_after > grown.params_before
    event = merge_twins(model)
    assert event.params_after == grown.params_before
    after = everything(model)
    assert after.keys() == before.keys()
    for k in before:
        if isinstance(before[k], np.ndarray):
            np.testing.assert_allclose(after[k], before[k], rtol=1e-6, atol=1e-7, err_msg=k)
        else:
            assert after[k] == before[k], k
    np.testing.assert_allclose(predict(model, x), out, rtol=1e-5, atol=1e-6)
    assert [e.layers[next(iter(e.layers))].new_width for e in fk.history(model)][-1] == grown.layers[
        next(iter(grown.layers))].old_width
    model.train_on_batch(x, y)


def test_merge_uneven_copies_gives_back_the_moments():
    model, x, y = compiled("mlp")
    h1 = model.get_layer("h1")
    old = {n: slots(model, v) for n, v in (("k1", h1.kernel), ("k2", model.get_layer("h2").kernel))}
    p = fastsplit.plan(6, [1, 4], copies=3, ratios=[0.5, 0.3, 0.2], symmetry="none")
    fk.widen(model, {"h1": p})
    event = merge_twins(model)
    assert event.layers["h1"].neurons == [6, 7, 8, 9]
    for n, v in (("k1", h1.kernel), ("k2", model.get_layer("h2").kernel)):
        new = slots(model, v)
        for s in ("m", "v"):
            np.testing.assert_allclose(new[s], old[n][s], rtol=1e-6, atol=0, err_msg=n + s)


def test_merge_after_training_follows_the_moment_rule():
    """Even copies get equal gradients, so they stay exact twins while they train; merged, m adds, sqrt(v) adds."""
    model, x, y = compiled("mlp")
    h1 = model.get_layer("h1")
    fk.widen(model, {"h1": [1, 4]}, symmetry="none")  # copies: 6 of 1, 7 of 4
    model.train_on_batch(x, y)
    model.train_on_batch(x, y)
    before = predict(model, x)
    old = slots(model, h1.kernel)
    event = merge_twins(model)
    assert event.layers["h1"].new_width == 6 and event.layers["h1"].neurons == [6, 7]
    assert rel_err(before, predict(model, x)) <= TOL
    new = slots(model, h1.kernel)
    for rep, twin in ((1, 6), (4, 7)):
        np.testing.assert_allclose(new["m"][:, rep], old["m"][:, rep] + old["m"][:, twin], rtol=1e-6)
        np.testing.assert_allclose(new["v"][:, rep], (np.sqrt(old["v"][:, rep]) + np.sqrt(old["v"][:, twin])) ** 2,
                                   rtol=1e-6)
    np.testing.assert_array_equal(new["m"][:, [0, 2, 3, 5]], old["m"][:, [0, 2, 3, 5]])


def test_merge_crafted_twins_and_atol():
    model, x, _ = compiled("mlp")
    h1 = model.get_layer("h1")
    k, b = np.array(h1.kernel.numpy()), np.array(h1.bias.numpy())
    k[:, 4], b[4] = k[:, 1], b[1]
    k[:, 5], b[5] = k[:, 2] + 1e-4, b[2]
    h1.kernel.assign(k)
    h1.bias.assign(b)
    before = predict(model, x)
    m_before = slots(model, h1.kernel)["m"]
    event = merge_twins(model)
    assert event.layers["h1"].neurons == [4]
    assert rel_err(before, predict(model, x)) <= TOL
    np.testing.assert_allclose(slots(model, h1.kernel)["m"][:, 1], m_before[:, 1] + m_before[:, 4], rtol=1e-6)
    event = merge_twins(model, atol=1e-3)
    assert event.layers["h1"].neurons == [4]  # unit 5 of the 5-unit layer was unit 5 before; now index 4
    assert model.get_layer("h1").units == 4


def test_merge_without_twins_changes_nothing():
    model, x, _ = compiled("cnn")
    before = snapshot(model)
    event = merge_twins(model)
    assert event.layers == {} and event.params_after == event.params_before
    assert_same(before, snapshot(model))
    assert fk.history(model) == []


# -- refusals and atomicity ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, x: prune(m, {"nope": [0]}), "no layer named 'nope'"),
        (lambda m, x: prune(m, {"h1": [6]}), "'h1'.*index 6 is out of range"),
        (lambda m, x: prune(m, {"h1": list(range(6))}), "'h1'.*remove all 6 units"),
        (lambda m, x: prune(m, {"out": [0]}), "model output"),
        (lambda m, x: prune(m, {"h1": [0]}, data=x[:, :2]), "shape"),
        (lambda m, x: prune(m, {"h1": [0]}, data=np.zeros((0, 3, 4), "float32")), "no samples"),
        (lambda m, x: prune(m, {"h1": [0]}, optimizer="keep"), "optimizer must be"),
        (lambda m, x: prune(m, [0]), "units must map"),
        (lambda m, x: prune(m, {"h1": fastsplit.compact_plan(5, [0])}), "width 5"),
        (lambda m, x: unit_stats(m, x, layers=["nope"]), "named 'nope'"),
        (lambda m, x: unit_stats(m, x.reshape(16, 12)), "shape"),
        (lambda m, x: dead_units(m, x, threshold=1.5), "threshold"),
        (lambda m, x: merge_twins(m, atol=-1), "atol"),
        (lambda m, x: merge_twins(m, layers="out"), "model output"),
    ],
)
def test_bad_input_names_it_and_leaves_the_model_untouched(call, match):
    model, x, _ = compiled("mlp")
    before, out = snapshot(model), predict(model, x)
    with pytest.raises(ValueError, match=match):
        call(model, x)
    assert_same(before, snapshot(model))
    np.testing.assert_array_equal(out, predict(model, x))
    assert fk.history(model) == []


def test_consumer_without_bias_refuses_a_nonzero_constant():
    inp = keras.Input((4,))
    h = L.Dense(5, activation="sigmoid", name="h")(inp)
    model = keras.Model(inp, L.Dense(2, use_bias=False, name="out")(h))
    x, _ = data((4,))
    kill(model, ["h"], [0], 0.0)  # sigmoid(0) = 0.5
    before = snapshot(model)
    with pytest.raises(ValueError, match="'out' has no bias"):
        prune(model, {"h": [0]}, data=x)
    assert_same(before, snapshot(model))


class Boom(RuntimeError):
    pass


def _fail_on(monkeypatch, module, name, n):
    real = getattr(module, name)
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise Boom(f"injected failure in {name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


@pytest.mark.filterwarnings("ignore:prune is not exact")
@pytest.mark.parametrize("what", ["prune", "merge"])
@pytest.mark.parametrize("where", [(_vars, "prepare", 4), (_vars, "install", 6), (_surgery, "_fix_build_shapes", 2),
                                   (_vars, "retrack", 1)])
def test_atomic_on_failure(monkeypatch, what, where):
    model, x, y = compiled("cnn")
    if what == "merge":
        fk.widen(model, {"conv": None, "fc": [1, 2]}, symmetry="none")
    else:
        kill(model, ["conv"], [1], 0.2)
    before, out = snapshot(model), predict(model, x)
    hist = fk.history(model)
    _fail_on(monkeypatch, *where)
    if where[1] == "retrack" and _vars.backend_name() != "torch":
        pytest.skip("retrack only does work on torch")
    with pytest.raises(Boom):
        if what == "prune":
            prune(model, {"conv": [1], "fc": [0]}, data=x)
        else:
            merge_twins(model)
    monkeypatch.undo()
    assert_same(before, snapshot(model))
    np.testing.assert_array_equal(out, predict(model, x))
    assert fk.history(model) == hist
    model.train_on_batch(x, y)
    (prune(model, {"conv": [1]}, data=x) if what == "prune" else merge_twins(model))
    model.train_on_batch(x, y)


def test_events_say_what_kind_of_change_they_were():
    import keras

    import fastsplit.keras as fk

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).standard_normal((64, 6)).astype("float32")
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu", name="h"),
                              keras.layers.Dense(2, name="o")])
    model.compile("adam", "mse")
    h = model.get_layer("h")
    h.bias.assign(np.where(np.arange(8) < 2, -100.0, 0.0).astype("float32"))
    assert fk.widen(model, {"h": [3]}, symmetry="none").kind == "split"
    pruned = fk.prune(model, fk.dead_units(model, x), data=x)
    assert pruned.kind == "prune" and "removed" in pruned.summary()
    merged = fk.merge_twins(model)
    assert merged.kind == "merge" and merged.layers["h"].new_width == 6
    assert [e.kind for e in fk.history(model)] == ["split", "prune", "merge"]
    assert fk.GrowthEvent.from_dict(merged.to_dict()).kind == "merge"
