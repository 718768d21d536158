"""Nothing silently wrong around the edited model: other models that hold its layers, layers called
twice, weights read by other layers, nudges that cannot act, non-finite data, bad arguments.

Each case either keeps every model that holds a touched layer working, or is refused with every
model exactly as before.
"""

from __future__ import annotations

import gc
import warnings

import numpy as np
import pytest
from conftest import L, assert_same, keras, predict, snapshot

import fastsplit
import fastsplit.keras as fk


def _mlp(name="g"):
    return keras.Sequential([keras.Input((8,)), L.Dense(6, activation="relu", name=f"{name}1"), L.Dense(4)],
                            name=name)


def _xy(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8)).astype("float32"), rng.normal(size=(n, 1)).astype("float32")


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_widening_a_nested_model_retraces_the_outer_one(opt):
    """The outer model's traced train function held the replaced variables: training updated nothing."""
    x, y = _xy()
    g = _mlp()
    outer = keras.Sequential([keras.Input((8,)), g, L.Dense(1)])
    outer.compile(opt, "mse")
    outer.fit(x, y, verbose=0)
    before = predict(outer, x)
    fk.widen(g, {"g1": None}, symmetry="none")
    np.testing.assert_allclose(predict(outer, x), before, rtol=1e-5, atol=1e-5)
    kernel = np.array(g.get_layer("g1").kernel.numpy())
    assert kernel.shape == (8, 12)
    outer.fit(x, 3 * y, epochs=2, verbose=0)
    assert not np.allclose(np.array(g.get_layer("g1").kernel.numpy()), kernel)
    if opt == "adam":  # the outer model's optimizer slots followed the split
        shapes = {tuple(v.shape) for v in outer.optimizer.variables}
        assert (8, 12) in shapes and (8, 6) not in shapes


def _shared():
    inp = keras.Input((8,))
    d = L.Dense(6, name="d")
    a = keras.Model(inp, L.Dense(1, name="o")(d(inp)), name="model_a")
    inp2 = keras.Input((8,))
    b = keras.Model(inp2, L.Dense(2, name="b2")(d(inp2)), name="model_b")
    return a, b


def test_a_layer_shared_with_another_model_is_refused_naming_it():
    a, b = _shared()
    x, _ = _xy()
    before_a, before_b, out_b = snapshot(a), snapshot(b), predict(b, x)
    with pytest.raises(fk.GrowthError, match="model_b"):
        fk.widen(a, {"d": None})
    assert_same(before_a, snapshot(a))
    assert_same(before_b, snapshot(b))
    np.testing.assert_array_equal(predict(b, x), out_b)
    assert fk.history(a) == []


def test_a_feature_extractor_over_the_model_is_refused_until_deleted():
    inp = keras.Input((8,))
    h = L.Dense(6, activation="relu", name="d")(inp)
    model = keras.Model(inp, L.Dense(1, name="o")(h))
    features = keras.Model(inp, h, name="features")
    before = snapshot(model)
    with pytest.raises(fk.GrowthError, match="features"):
        fk.widen(model, {"d": None})
    assert_same(before, snapshot(model))
    del features
    gc.collect()
    fk.widen(model, {"d": None})  # a model that is gone holds nothing
    assert model.get_layer("d").units == 12


def test_two_models_over_the_same_graph_are_both_updated():
    """A second model built over the same tensors changes the same weights: both keep working."""
    inp = keras.Input((8,))
    out = L.Dense(1, name="o")(L.Dense(6, activation="relu", name="d")(inp))
    m1 = keras.Model(inp, out, name="m1")
    m2 = keras.Model(inp, out, name="m2")
    x, _ = _xy()
    ref = predict(m2, x)
    fk.widen(m1, {"d": None}, symmetry="none")
    np.testing.assert_allclose(predict(m2, x), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(predict(m1, x), ref, rtol=1e-5, atol=1e-5)
    assert fk.widen(m2, {"d": None}, symmetry="none").layers["d"].new_width == 24


def test_a_layer_called_on_its_own_output_is_refused():
    inp = keras.Input((6,))
    d = L.Dense(6, activation="tanh", name="d")
    model = keras.Model(inp, L.Dense(1, name="o")(d(d(inp))))
    before = snapshot(model)
    with pytest.raises(fk.GrowthError, match="called 2 times"):
        fk.widen(model, {"d": None})
    assert_same(before, snapshot(model))
    assert not [g for g in fk.coupled_groups(model) if "d" in g.producers and g.splittable]


def test_one_normaliser_on_two_streams_is_refused():
    inp = keras.Input((8,))
    bn = L.BatchNormalization(name="bn")
    a = bn(L.Dense(4, name="a")(inp))
    b = bn(L.Dense(4, name="b")(inp))
    model = keras.Model(inp, L.Dense(1)(L.Concatenate()([a, b])))
    with pytest.raises(fk.GrowthError, match="'bn' is called 2 times"):
        fk.widen(model, {"a": None})


def test_a_nested_model_called_twice_is_not_split_through():
    inner = keras.Sequential([keras.Input((6,)), L.Dense(5, activation="relu", name="i1"), L.Dense(6, name="i2")],
                             name="inner")
    inp = keras.Input((8,))
    h = L.Dense(6, name="stem")(inp)
    model = keras.Model(inp, L.Dense(1, name="o")(inner(inner(h))))
    before = snapshot(model)
    with pytest.raises(fk.GrowthError):
        fk.widen(model, {"stem": None})
    with pytest.raises(fk.GrowthError):
        fk.widen(model, {"i1": None})
    assert_same(before, snapshot(model))


class ReadsKernel(keras.layers.Layer):
    """A decoder tied to an encoder's kernel, applied to another tensor."""

    def __init__(self, src, **kwargs):
        super().__init__(**kwargs)
        self.src = src

    def call(self, h):
        return keras.ops.matmul(h, keras.ops.transpose(self.src.kernel))


def test_weights_read_by_another_layer_are_refused():
    inp = keras.Input((8,))
    side = keras.Input((4,))
    enc = L.Dense(4, name="enc")
    h = enc(inp)
    out = L.Concatenate()([L.Dense(1, name="o")(h), ReadsKernel(enc, name="dec")(side)])
    model = keras.Model([inp, side], out)
    before = snapshot(model)
    with pytest.raises(fk.GrowthError, match="tied weights"):
        fk.widen(model, {"enc": None})
    assert_same(before, snapshot(model))


def _norm_model(center, use_bias=True):
    inp = keras.Input((8,))
    h = L.Dense(6, use_bias=use_bias, name="d")(inp)
    h = L.BatchNormalization(center=center, name="bn")(h)
    return keras.Model(inp, L.Dense(1, name="o")(L.ReLU()(h)))


@pytest.mark.parametrize("use_bias", [True, False])
def test_a_nudge_that_a_normaliser_cancels_warns(use_bias):
    model = _norm_model(center=False, use_bias=use_bias)
    with pytest.warns(RuntimeWarning, match="center=False.*cannot separate"):
        fk.widen(model, {"d": None}, symmetry="nudge")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fk.widen(_norm_model(center=True, use_bias=use_bias), {"d": None}, symmetry="nudge")
        fk.widen(_norm_model(center=False, use_bias=use_bias), {"d": None}, symmetry="noise")
        fk.widen(_norm_model(center=False, use_bias=use_bias), {"d": None})  # fresh, the default, needs no offset


def test_the_nudge_goes_past_a_normaliser_after_a_residual_add():
    """Pre-activation blocks (ResNetV2): the stream's BatchNormalization comes after the Add, so an offset on
    the producers' biases would be subtracted again in training. It goes to that normaliser's beta."""
    inp = keras.Input((6, 6, 3))
    s = L.Conv2D(4, 1, name="stem")(inp)
    r = L.Conv2D(4, 3, padding="same", name="branch")(L.ReLU()(L.BatchNormalization(name="pre1")(s)))
    s = L.Add()([s, r])
    h = L.ReLU()(L.BatchNormalization(name="post")(s))
    model = keras.Model(inp, L.Dense(1)(L.GlobalAveragePooling2D()(h)))
    fk.widen(model, {"stem": [0]}, symmetry="nudge")
    for name in ("stem", "branch"):
        bias = np.array(model.get_layer(name).bias.numpy())
        assert bias[0] == bias[4], name  # a copy keeps the bias: no offset before the normalisers
    for name in ("pre1", "post"):
        beta = np.array(model.get_layer(name).beta.numpy())
        assert beta[0] != beta[4], name


def test_non_finite_data_is_refused_before_anything_changes():
    inp = keras.Input((8,))
    h = L.Dense(6, activation="relu", name="d")(inp)
    model = keras.Model(inp, L.Dense(1, name="o")(h))
    x, _ = _xy()
    bad = x.copy()
    bad[3, 2] = np.nan
    before = snapshot(model)
    with pytest.raises(fk.GrowthError, match="NaN"):
        fk.dead_units(model, bad)
    with pytest.raises(fk.GrowthError, match="NaN"):
        fk.prune(model, {"d": [5]}, data=bad)
    big = x.copy()
    big[0, 0] = 1e38  # finite input, infinite activations
    model.get_layer("d").kernel.assign(np.full((8, 6), 1e10, "float32"))
    before = snapshot(model)
    with pytest.raises(fk.GrowthError, match="not finite"):
        fk.unit_stats(model, big)
    with pytest.raises(fk.GrowthError, match="not finite"):
        fk.prune(model, {"d": [5]}, data=big)
    assert_same(before, snapshot(model))


def _small():
    inp = keras.Input((8,))
    return keras.Model(inp, L.Dense(1, name="o")(L.Dense(6, activation="relu", name="d")(inp)))


@pytest.mark.parametrize("kwargs, match", [
    ({"eps": "0.1"}, "eps"),
    ({"eps": float("nan")}, "eps"),
    ({"eps": -1.0}, "eps"),
    ({"eps": 1e300, "symmetry": "nudge"}, "eps must be finite"),
    ({"nudge": 1e300, "symmetry": "nudge"}, "eps must be finite"),
    ({"nudge": True}, "nudge"),
    ({"nudge": 1e-2}, "nudge=0.01 with symmetry='fresh'"),
    ({"eps": 1e-3}, "eps=0.001 with symmetry='fresh'"),  # the default has no eps
    ({"symmetry": 5}, "symmetry"),
    ({"optimizer": "keep"}, "optimizer"),
    ({"backend": "cuda"}, "backend"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    model = _small()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        fk.widen(model, {"d": None}, **kwargs)
    assert_same(before, snapshot(model))


def test_offsets_the_weights_dtype_cannot_hold_are_refused():
    inp = keras.Input((8,))
    model = keras.Model(inp, L.Dense(1, name="o")(L.Dense(6, activation="relu", name="d", dtype="float16")(inp)))
    before = snapshot(model)
    with pytest.raises(fk.GrowthError, match="d/bias .float16. cannot hold"):
        fk.widen(model, {"d": None}, symmetry="nudge", eps=1e5)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("plans, match", [
    ({"d": fastsplit.compact_plan(6, [0])}, "CompactPlan"),
    ({"d": [1.5]}, "the plan for 'd'"),
    ({"d": [9]}, "the plan for 'd'"),
    ({"d": "all"}, "the plan for 'd'"),
    ([("d", None)], "plans must map"),
])
def test_bad_plans_name_the_layer(plans, match):
    model = _small()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        fk.widen(model, plans)
    assert_same(before, snapshot(model))


def test_a_plan_made_non_finite_after_it_was_made_is_refused():
    model = _small()
    p = fastsplit.plan(6, [0, 1])
    offset = np.array(p.offset, dtype=np.float64)
    offset[0] = np.inf
    try:
        object.__setattr__(p, "offset", offset)
    except Exception:  # noqa: BLE001 - a plan that cannot be changed after it is made is fine too
        pytest.skip("SplitPlan cannot be changed after it is made")
    before = snapshot(model)
    with pytest.raises(ValueError, match="non-finite"):
        fk.widen(model, {"d": p})
    assert_same(before, snapshot(model))


def test_not_a_model():
    with pytest.raises(fk.GrowthError, match="keras.Model"):
        fk.widen(object(), {"d": None})
    with pytest.raises(fk.GrowthError, match="keras.Model"):
        fk.prune(L.Dense(3), {"d": [0]})


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the keras.io GAN's train_step uses tf.GradientTape")
def test_widening_the_generator_of_a_subclassed_gan_keeps_it_training():
    """keras.io's DCGAN: a subclassed model holds the generator and two optimizers of its own."""
    import tensorflow as tf

    latent = 4

    class GAN(keras.Model):
        def __init__(self, discriminator, generator):
            super().__init__()
            self.discriminator, self.generator = discriminator, generator

        def compile(self, d_optimizer, g_optimizer, loss_fn):
            super().compile()
            self.d_optimizer, self.g_optimizer, self.loss_fn = d_optimizer, g_optimizer, loss_fn

        def train_step(self, real):
            n = tf.shape(real)[0]
            z = tf.random.normal((n, latent))
            fake = self.generator(z)
            both = tf.concat([fake, real], 0)
            labels = tf.concat([tf.ones((n, 1)), tf.zeros((n, 1))], 0)
            with tf.GradientTape() as tape:
                d_loss = self.loss_fn(labels, self.discriminator(both))
            grads = tape.gradient(d_loss, self.discriminator.trainable_weights)
            self.d_optimizer.apply_gradients(zip(grads, self.discriminator.trainable_weights))
            with tf.GradientTape() as tape:
                g_loss = self.loss_fn(tf.zeros((n, 1)), self.discriminator(self.generator(z)))
            grads = tape.gradient(g_loss, self.generator.trainable_weights)
            self.g_optimizer.apply_gradients(zip(grads, self.generator.trainable_weights))
            return {"d_loss": d_loss, "g_loss": g_loss}

    gen = keras.Sequential([keras.Input((latent,)), L.Dense(2 * 2 * 3, name="g_dense"), L.LeakyReLU(0.2),
                            L.Reshape((2, 2, 3)), L.Conv2DTranspose(4, 2, strides=2, name="g_up"), L.LeakyReLU(0.2),
                            L.Conv2D(1, 3, padding="same", activation="sigmoid")], name="generator")
    disc = keras.Sequential([keras.Input((4, 4, 1)), L.Conv2D(3, 2, name="d_conv"), L.LeakyReLU(0.2), L.Flatten(),
                             L.Dense(1, activation="sigmoid")], name="discriminator")
    gan = GAN(disc, gen)
    gan.compile(keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3), keras.losses.BinaryCrossentropy())
    real = np.random.default_rng(0).uniform(size=(16, 4, 4, 1)).astype("float32")
    gan.fit(real, epochs=1, batch_size=8, verbose=0)
    z = np.random.default_rng(1).normal(size=(5, latent)).astype("float32")
    before = predict(gen, z)
    fk.widen(gen, {"g_dense": None, "g_up": None}, symmetry="none")
    np.testing.assert_allclose(predict(gen, z), before, rtol=1e-4, atol=1e-5)
    up = np.array(gen.get_layer("g_up").kernel.numpy())
    assert up.shape == (2, 2, 8, 6)
    assert {(2, 2, 8, 6)} <= {tuple(v.shape) for v in gan.g_optimizer.variables}  # its slots followed
    gan.fit(real, epochs=1, batch_size=8, verbose=0)
    assert not np.allclose(np.array(gen.get_layer("g_up").kernel.numpy()), up)


def test_widening_a_nested_model_from_a_callback_of_the_outer_fit():
    """Mid-fit (JAX keeps the live values in the outer model's state): the outer model trains on at the new size."""
    x, y = _xy()
    g = _mlp()
    outer = keras.Sequential([keras.Input((8,)), g, L.Dense(1)])
    outer.compile(keras.optimizers.Adam(1e-2), "mse")

    class Grow(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                self.kernel = np.array(fk.widen(g, {"g1": None}) and g.get_layer("g1").kernel.numpy())

    grow = Grow()
    outer.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[grow])
    kernel = np.array(g.get_layer("g1").kernel.numpy())
    assert kernel.shape == grow.kernel.shape == (8, 12)
    assert not np.allclose(kernel, grow.kernel)  # trained after the split
    assert predict(outer, x).shape == (32, 1)
