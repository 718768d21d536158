"""Everything widen refuses, and atomicity: after any failure the model is exactly as before."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKEND, L, assert_same, compiled, data, keras, predict, snapshot

import fastsplit
import fastsplit.keras as fk
from fastsplit.keras import _history, _surgery, _vars


class Scale(keras.layers.Layer):
    def call(self, x):
        return x * 2.0


def _sequence_model(middle):
    inp = keras.Input((4, 3))
    h = L.Dense(4, name="a")(inp)
    h = middle(h)
    return keras.Model(inp, L.Dense(2, name="out")(h))


def _lambda():
    return _sequence_model(lambda h: L.Flatten()(L.Lambda(lambda t: t * 2.0, name="lam")(h)))


def _custom():
    return _sequence_model(lambda h: L.Flatten()(Scale(name="scale")(h)))


def _lstm():
    """An LSTM that returns its states (return_state=True): its input units are not followed there."""
    return _sequence_model(lambda h: L.LSTM(3, return_state=True, name="lstm")(h)[0])


def _attention():
    """Attention that returns its scores too: the scores are not followed (attention alone now grows)."""
    return _sequence_model(
        lambda h: L.Flatten()(L.MultiHeadAttention(2, 2, name="mha")(h, h, return_attention_scores=True)[0]))


def _softmax_producer():
    inp = keras.Input((3,))
    h = L.Dense(4, activation="softmax", name="a")(inp)
    return keras.Model(inp, L.Dense(2, name="out")(h))


def _group_norm():
    inp = keras.Input((3,))
    h = L.Dense(4, name="a")(inp)
    h = L.GroupNormalization(groups=2, name="gn")(h)
    return keras.Model(inp, L.Dense(2, name="out")(h))


def _layer_norm():
    inp = keras.Input((3,))
    h = L.Dense(4, name="a")(inp)
    h = L.LayerNormalization(name="ln")(h)
    return keras.Model(inp, L.Dense(2, name="out")(h))


def _input_skip():
    inp = keras.Input((4,))
    h = L.Add(name="skip")([L.Dense(4, name="a")(inp), inp])
    return keras.Model(inp, L.Dense(2, name="out")(h))


def _bn_across():
    inp = keras.Input((4, 3))
    h = L.Dense(4, name="a")(inp)
    h = L.BatchNormalization(axis=1, name="bnx")(h)
    return keras.Model(inp, L.Dense(2, name="out")(L.Flatten()(h)))


#: builder, input shape, plans, the text the error must contain
CASES = {
    "lambda": (_lambda, (4, 3), {"a": None}, "lam"),
    "lstm": (_lstm, (4, 3), {"a": None}, "lstm"),
    "attention": (_attention, (4, 3), {"a": None}, "mha"),
    "softmax": (_softmax_producer, (3,), {"a": None}, "softmax"),
    "group_norm": (_group_norm, (3,), {"a": None}, "gn"),
    "layer_norm_uneven": (_layer_norm, (3,), {"a": [0, 1]}, "ln"),
    "model_output": (_layer_norm, (3,), {"out": None}, "model output"),
    "model_input": (_input_skip, (4,), {"a": None}, "skip"),
    "bn_other_axis": (_bn_across, (4, 3), {"a": None}, "bnx"),
    "unknown_name": (_layer_norm, (3,), {"nope": None}, "nope"),
    "not_a_producer": (_layer_norm, (3,), {"ln": None}, "ln"),
    "plan_width": (_layer_norm, (3,), {"a": fastsplit.plan(5)}, "width 5"),
    "bad_index": (_layer_norm, (3,), {"a": [7]}, "7"),
    "bad_plan_type": (_layer_norm, (3,), {"a": "all"}, "a"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_and_untouched(case):
    build, shape, plans, text = CASES[case]
    model = build()
    model.compile(keras.optimizers.Adam(0.01), "mse", run_eagerly=BACKEND != "jax")
    x, y = data(shape)
    model.train_on_batch(x, y)
    before, out = snapshot(model), predict(model, x)
    with pytest.raises(ValueError, match=text):
        fk.widen(model, plans)
    assert_same(before, snapshot(model))
    np.testing.assert_array_equal(out, predict(model, x))
    model.train_on_batch(x, y)
    assert fk.history(model) == []


def test_custom_layer_is_traced():
    """A user's layer with no rule is looked into: ``x * 2.0`` keeps copies equal, so the split is accepted."""
    model = _custom()
    x, _ = data((4, 3))
    before = predict(model, x)
    fk.widen(model, {"a": None}, symmetry="none")
    np.testing.assert_allclose(predict(model, x), before, rtol=1e-5, atol=1e-6)


def test_layer_norm_uniform_is_accepted():
    model = _layer_norm()
    x, _ = data((3,))
    before = predict(model, x)
    fk.widen(model, {"a": fastsplit.plan(4, None, copies=3, symmetry="none")})
    np.testing.assert_allclose(predict(model, x), before, rtol=1e-5, atol=1e-6)


def test_coupled_plans_must_agree():
    model, x, _ = compiled("residual")
    before = snapshot(model)
    with pytest.raises(ValueError, match="coupled"):
        fk.widen(model, {"r1": [0], "r2": [1]})
    assert_same(before, snapshot(model))


def test_bad_arguments():
    model, _, _ = compiled("mlp")
    with pytest.raises(ValueError, match="optimizer"):
        fk.widen(model, {"h1": None}, optimizer="keep")
    with pytest.raises(ValueError, match="plans"):
        fk.widen(model, ["h1"])
    with pytest.raises(ValueError, match="symmetry"):
        fk.widen(model, {"h1": None}, symmetry="wobble")

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = L.Dense(3)

        def call(self, x):
            return self.d(x)

    sub = Sub()
    sub(np.zeros((1, 2), "float32"))
    with pytest.raises(ValueError, match="subclassed"):
        fk.widen(sub, {"d": None})


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


@pytest.mark.parametrize("where", [(_vars, "prepare", 5), (_vars, "install", 7), (_surgery, "_fix_build_shapes", 2),
                                   (_vars, "retrack", 1), (_surgery, "reset_functions", 1), (_history, "record", 1)])
def test_atomic_on_failure(monkeypatch, where):
    model, x, y = compiled("cnn")
    before, out = snapshot(model), predict(model, x)
    summary = []
    model.summary(print_fn=lambda s, **k: summary.append(s))
    _fail_on(monkeypatch, *where)
    if where[1] == "retrack" and _vars.backend_name() != "torch":
        pytest.skip("retrack only does work on torch")
    with pytest.raises(Boom):
        fk.widen(model, {"conv": None, "fc": [1, 2]})
    monkeypatch.undo()
    assert_same(before, snapshot(model))
    np.testing.assert_array_equal(out, predict(model, x))
    again = []
    model.summary(print_fn=lambda s, **k: again.append(s))
    assert again == summary
    assert fk.history(model) == []
    # still trains, and can still grow
    model.train_on_batch(x, y)
    fk.widen(model, {"conv": None})
    model.train_on_batch(x, y)
