"""EinsumDense and MultiHeadAttention grow exactly (DESIGN.md, "Transformers and recurrent layers")."""

import math

import keras
import numpy as np
import pytest
from keras import layers as L

import fastsplit.keras as fk
from fastsplit.keras._rules_attention import parse_equation

RNG = np.random.default_rng(0)


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _grow_exact(model, x, plans=None):
    """Split ``plans`` (default: every splittable group) with symmetry='none'; the outputs stay the same."""
    before = _np(model(x))
    groups = fk.coupled_groups(model)
    if plans is None:
        plans = {g.name: None for g in groups if g.splittable}
    event = fk.widen(model, plans, symmetry="none")
    after = _np(model(x))
    assert after.shape == before.shape
    assert _rel(after, before) <= 1e-5
    return event


# -- EinsumDense -----------------------------------------------------------------------------------------

EQUATIONS = [
    ("abc,cd->abd", (5, 6), (5, 7), "d"),
    ("abc,cde->abde", (5, 6), (5, 3, 4), "de"),
    ("abcd,cde->abe", (5, 3, 4), (5, 7), "e"),
    ("ab,bc->ac", (6,), (7,), "c"),
    ("...b,bc->...c", (5, 6), (7,), "c"),
]


@pytest.mark.parametrize("equation,in_shape,out_shape,bias", EQUATIONS)
def test_einsum_dense_produces_and_consumes(equation, in_shape, out_shape, bias):
    inp = keras.Input(in_shape)
    h = L.Dense(in_shape[-1], activation="relu", name="before")(inp)
    h = L.EinsumDense(equation, out_shape, bias_axes=bias, activation="relu", name="ed")(h)
    if len(h.shape) > 2:
        h = L.Flatten()(h)
    model = keras.Model(inp, L.Dense(3, name="head")(h))
    names = {g.name: g for g in fk.coupled_groups(model)}
    assert names["before"].splittable  # EinsumDense consumes the units on its contracted axis
    x = RNG.normal(size=(2, *in_shape)).astype("float32")
    _grow_exact(model, x)
    layer = model.get_layer("ed")
    out = layer.compute_output_shape((None, *model.get_layer("before").output.shape[1:]))
    assert tuple(out[1:]) == tuple(model.get_layer("ed").output.shape[1:])  # partial_output_shape followed


def test_einsum_dense_two_produced_axes_each_named():
    inp = keras.Input((5, 6))
    h = L.EinsumDense("abc,cde->abde", (5, 3, 4), bias_axes="de", name="ed")(inp)
    model = keras.Model(inp, L.Dense(2)(L.Flatten()(h)))
    groups = {g.name: g for g in fk.coupled_groups(model)}
    assert groups["ed/e"].splittable
    assert "one unit axis per tensor" in groups["ed/d"].refused[0]
    with pytest.raises(fk.GrowthError, match="ed/d"):
        fk.widen(model, {"ed/d": None}, symmetry="none")


def test_parse_equation():
    assert parse_equation("abc,cd->abd", 3, 3) == ("abc", "cd", "abd", False)
    assert parse_equation("...b,bc->...c", 4, 4) == ("ABCb", "bc", "ABCc", False)
    assert parse_equation("ab...,bc->ac...", 3, 3) == ("abA", "bc", "acA", True)
    assert parse_equation("ab,bc", 2, 2) is None
    assert parse_equation("aa,ab->ab", 2, 2) is None


# -- MultiHeadAttention ----------------------------------------------------------------------------------


def _attention_model(dropout=0.0):
    q = keras.Input((5, 8), name="q")
    kv = keras.Input((7, 6), name="kv")
    hq = L.Dense(8, name="hq")(q)
    hk = L.Dense(6, name="hk")(kv)
    hv = L.Dense(6, name="hv")(kv)
    a = L.MultiHeadAttention(num_heads=2, key_dim=4, name="self")(hq, hq)
    a = L.LayerNormalization(name="norm")(L.Add()([a, hq]))
    c = L.MultiHeadAttention(num_heads=3, key_dim=5, value_dim=5, dropout=dropout, name="cross")(a, hv, hk)
    model = keras.Model([q, kv], L.Dense(4, name="head")(L.Flatten()(c)))
    x = [RNG.normal(size=(2, 5, 8)).astype("float32"), RNG.normal(size=(2, 7, 6)).astype("float32")]
    return model, x


def test_attention_groups_are_named_by_dimension():
    model, _ = _attention_model()
    names = {g.name for g in fk.coupled_groups(model)}
    producers = {p for g in fk.coupled_groups(model) for p in g.producers}
    for layer in ("self", "cross"):
        assert {f"{layer}/heads", f"{layer}/key_dim"} <= names
        assert f"{layer}/value_dim" in producers
    resid = next(g for g in fk.coupled_groups(model) if "hq" in g.producers)
    assert "self" in resid.producers and resid.uniform == ["norm"]  # attention output joins the residual stream
    cross_in = {g.name: g for g in fk.coupled_groups(model)}
    assert "cross" in cross_in["hv"].consumers and "cross" in cross_in["hk"].consumers


@pytest.mark.parametrize("dim", ["heads", "key_dim", "value_dim"])
@pytest.mark.parametrize("layer", ["self", "cross"])
def test_attention_dimension_grows_exactly(layer, dim):
    model, x = _attention_model()
    mha = model.get_layer(layer)
    before = {"heads": mha.num_heads, "key_dim": mha.key_dim, "value_dim": mha.value_dim}
    event = _grow_exact(model, x, {f"{layer}/{dim}": [0]})
    assert event.params_after > event.params_before
    config = mha.get_config()
    want = dict(before)
    want[dim] += 1
    coupled = mha.key_dim == mha.value_dim and before["key_dim"] == before["value_dim"]  # JAX couples them
    if dim in ("key_dim", "value_dim") and coupled and keras.backend.backend() == "jax":
        want["key_dim"] = want["value_dim"] = before[dim] + 1
    assert (config["num_heads"], config["key_dim"], config["value_dim"]) == (
        want["heads"], want["key_dim"], want["value_dim"])
    assert math.isclose(mha._inverse_sqrt_key_dim, 1 / math.sqrt(want["key_dim"]))


def test_attention_everything_at_once_then_save_and_load(tmp_path):
    model, x = _attention_model()
    event = _grow_exact(model, x)
    assert event.split_calls >= 2  # kernels split on three axes take a second kernel call
    path = tmp_path / "grown.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(_np(loaded(x)), _np(model(x)))
    for name in ("self", "cross"):
        assert loaded.get_layer(name).get_config() == model.get_layer(name).get_config()


# slow on JAX only (two minutes of compiling there); test_grow_transformer_in_fit.py checks the slots on every backend
@pytest.mark.slow_on_jax
def test_attention_adam_slots_carried_and_training_goes_on():
    model, x = _attention_model(dropout=0.1)
    y = RNG.normal(size=(2, 4)).astype("float32")
    model.compile(keras.optimizers.Adam(1e-3), "mse", run_eagerly=True)
    model.fit(x, y, epochs=2, verbose=0)
    mha = model.get_layer("cross")
    opt = model.optimizer
    qk = mha._query_dense.kernel
    m_before = _np(opt._momentums[opt._get_variable_index(qk)])
    v_before = _np(opt._velocities[opt._get_variable_index(qk)])
    _grow_exact(model, x, {"cross/key_dim": None})
    s = math.sqrt(10 / 5)  # the query's gradient is 1/s of its source's
    m_after = _np(opt._momentums[opt._get_variable_index(mha._query_dense.kernel)])
    v_after = _np(opt._velocities[opt._get_variable_index(mha._query_dense.kernel)])
    src = np.r_[np.arange(5), np.arange(5)]
    np.testing.assert_allclose(m_after, m_before[..., src] / s, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(v_after, v_before[..., src] / s**2, rtol=1e-6, atol=1e-15)
    history = model.fit(x, y, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_attention_query_gradient_is_transported():
    """The split model's gradients are the transported gradients of the original (key_dim: query 1/s, key r)."""
    model, x = _attention_model()
    y = RNG.normal(size=(2, 4)).astype("float32")
    mha = model.get_layer("self")

    def grads():
        if keras.backend.backend() != "tensorflow":
            pytest.skip("gradient check written with tf.GradientTape")
        import tensorflow as tf

        variables = [mha._query_dense.kernel, mha._key_dense.kernel]
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum((model(x) - y) ** 2)
        return [g.numpy() for g in tape.gradient(loss, [v.value for v in variables])]

    gq, gk = grads()
    plan = fk.widen(model, {"self/key_dim": [1, 3]}, symmetry="none")
    assert plan is not None
    gq2, gk2 = grads()
    src = np.r_[np.arange(4), [1, 3]]
    ratio = np.r_[1, 0.5, 1, 0.5, 0.5, 0.5]
    s = math.sqrt(6 / 4)
    np.testing.assert_allclose(gq2, gq[..., src] / s, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gk2, gk[..., src] * ratio, rtol=1e-4, atol=1e-6)


def test_attention_returning_scores_is_refused():
    q = keras.Input((5, 8))
    h = L.Dense(8, name="h")(q)
    out, scores = L.MultiHeadAttention(num_heads=2, key_dim=4, name="mha")(h, h, return_attention_scores=True)
    model = keras.Model(q, [L.Dense(2)(L.Flatten()(out)), L.Flatten()(scores)])
    groups = {g.name: g for g in fk.coupled_groups(model)}
    assert "returns 2 tensors" in groups["mha/heads"].refused[0]
    assert not groups["h"].splittable
    with pytest.raises(fk.GrowthError, match="mha/heads"):
        fk.widen(model, {"mha/heads": None}, symmetry="none")


def test_head_plan_of_the_wrong_length_leaves_the_model_alone():
    model, x = _attention_model()
    before = [_np(w) for w in model.weights]
    config = model.get_layer("self").get_config()
    with pytest.raises(Exception, match="self/heads"):
        fk.widen(model, {"self/heads": fk_plan(5)}, symmetry="none")
    assert model.get_layer("self").get_config() == config
    for a, w in zip(before, model.weights):
        np.testing.assert_array_equal(a, _np(w))


def fk_plan(width):
    import fastsplit

    return fastsplit.plan(width, [0], symmetry="none")
