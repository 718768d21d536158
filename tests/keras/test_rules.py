"""The layer-rule registry and the graph idioms of real models, each a regression test of a bug that
main had: Reshape left stale, GrowthEvent.kind 'm2', ``inputs + x`` / ``Conv2D(groups=C)`` / LayerScale
refused, ConvTranspose and SeparableConv not producers, refused producers missing from coupled_groups,
prune refusing a bias-free convolution before BatchNormalization."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKEND, L, assert_same, data, keras, predict, rel_err, snapshot

import fastsplit.keras as fk

TOL = 1e-5


def _roundtrip(model, x, y, tmp_path):
    """The grown model trains on, saves and loads with identical predictions."""
    model.compile(keras.optimizers.Adam(1e-3), "mse", run_eagerly=BACKEND != "jax")
    model.train_on_batch(x, y)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(predict(loaded, x), predict(model, x), rtol=1e-6, atol=1e-6)


def _split_all(model, x, **kw):
    """Split every splittable group (all units); returns the event after checking the function is kept."""
    before = predict(model, x)
    plans = {g.name: None for g in fk.coupled_groups(model) if g.splittable}
    event = fk.widen(model, plans, symmetry="none", **kw)
    assert rel_err(before, predict(model, x)) <= TOL
    return event


def test_every_group_is_named_by_its_first_producer_and_widen_takes_the_name():
    inp = keras.Input((5,))
    s = L.Dense(6, name="stem")(inp)
    s = L.Add()([s, L.Dense(6, name="branch")(s)])
    model = keras.Model(inp, L.Dense(2, name="out")(L.Dense(4, name="fc")(s)))
    groups = fk.coupled_groups(model)
    assert [g.name for g in groups] == [g.producers[0] for g in groups] == ["stem", "fc", "out"]
    assert groups[0].producers == ["stem", "branch"] and "name" in groups[0].to_dict()
    x, _ = data((5,))
    event = _split_all(model, x)
    assert set(event.layers) == {"stem", "branch", "fc"}


def test_reshape_target_shape_follows(tmp_path):
    inp = keras.Input((8, 8, 3))
    h = L.Conv2D(4, 3, padding="same", name="c")(inp)
    s = L.GlobalAveragePooling2D()(h)
    s = L.Reshape((1, 1, 4), name="se_reshape")(s)  # EfficientNet's squeeze-excite
    s = L.Conv2D(4, 1, activation="sigmoid", name="se")(s)
    h = L.Multiply()([h, s])
    h = L.Reshape((8 * 8 * 4,), name="flat")(h)  # into a Dense
    model = keras.Model(inp, L.Dense(2, name="out")(h))
    x, y = data((8, 8, 3))
    groups = {tuple(g.producers): g for g in fk.coupled_groups(model)}
    assert groups[("c", "se")].splittable
    _split_all(model, x)
    assert model.get_layer("se_reshape").target_shape == (1, 1, 8)
    assert model.get_layer("flat").target_shape == (8 * 8 * 8,)
    _roundtrip(model, x, y, tmp_path)


def test_dense_reshaped_to_channels_grows_by_channel(tmp_path):
    """DCGAN: Dense(7*7*c) -> BN -> Reshape((7, 7, c)) -> Conv2DTranspose: a unit is a channel of 49 entries."""
    inp = keras.Input((6,))
    h = L.Dense(3 * 3 * 4, use_bias=False, name="g")(inp)
    h = L.BatchNormalization()(h)
    h = L.LeakyReLU(0.2)(h)
    h = L.Reshape((3, 3, 4), name="r")(h)
    h = L.Conv2DTranspose(5, 3, strides=2, padding="same", name="t")(h)
    h = L.SeparableConv2D(3, 3, depth_multiplier=2, name="sep")(h)
    model = keras.Model(inp, L.Flatten()(h))
    x, y = data((6,), out=int(np.prod(model.output_shape[1:])))
    groups = {tuple(g.producers): g for g in fk.coupled_groups(model)}
    assert groups[("g",)].width == 4 and groups[("g",)].splittable
    assert groups[("t",)].splittable and ("sep",) in groups
    fk.widen(model, {"g": [1, 3], "t": [0]}, symmetry="none")
    assert model.get_layer("g").units == 3 * 3 * 6
    assert model.get_layer("r").target_shape == (3, 3, 6)
    assert model.get_layer("t").filters == 6
    model2 = keras.Model(model.inputs, model.outputs)
    _roundtrip(model2, x, y, tmp_path)


class LayerScale(keras.layers.Layer):
    """ConvNeXt's per-channel scale, written as a user would: no rule registered for it."""

    def __init__(self, dim, **kw):
        super().__init__(**kw)
        self.dim = dim

    def build(self, _):
        self.gamma = self.add_weight(shape=(self.dim,), initializer="ones")

    def call(self, x):
        return x * self.gamma

    def get_config(self):
        return {**super().get_config(), "dim": self.dim}


def _convnext_block():
    inp = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 2, name="stem")(inp)
    for i in range(2):
        y = L.Conv2D(4, 3, padding="same", groups=4, name=f"dw{i}")(x)  # depthwise, as ConvNeXt writes it
        y = L.LayerNormalization(name=f"ln{i}")(y)
        y = L.Dense(8, activation="gelu", name=f"pw{i}a")(y)
        y = L.Dense(4, name=f"pw{i}b")(y)
        y = LayerScale(4, name=f"ls{i}")(y)
        x = x + y  # a keras.ops node, not an Add layer
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(2, name="head")(x))


def test_convnext_idioms(tmp_path):
    model = _convnext_block()
    x, y = data((6, 6, 3))
    model.compile(keras.optimizers.Adam(1e-3), "mse", run_eagerly=BACKEND != "jax")
    model.train_on_batch(x, y)
    groups = {tuple(g.producers): g for g in fk.coupled_groups(model)}
    stream = groups[("stem", "pw0b", "pw1b")]
    assert stream.splittable and stream.uniform == ["ln0", "ln1"]
    assert groups[("pw0a",)].splittable
    event = _split_all(model, x)
    assert event.kind == "split"
    assert model.get_layer("dw0").groups == 8 and model.get_layer("ls1").gamma.shape == (8,)
    with keras.utils.custom_object_scope({"LayerScale": LayerScale}):
        _roundtrip(model, x, y, tmp_path)


def test_event_kind_after_adam_steps():
    """A trained model's optimizer has slots: their kind must not leak into the event's."""
    inp = keras.Input((5,))
    model = keras.Model(inp, L.Dense(2)(L.Dense(16, activation="relu", name="hidden1")(inp)))
    model.compile(keras.optimizers.Adam(1e-3), "mse", run_eagerly=BACKEND != "jax")
    x, y = data((5,))
    model.train_on_batch(x, y)
    event = fk.widen(model, {"hidden1": None})
    assert event.kind == "split"
    assert "hidden1: 16 -> 32 (16 split)" in event.summary()
    assert fk.history(model)[-1].kind == "split"


class Opaque(keras.layers.Layer):
    """A layer whose call cannot be traced on symbolic inputs (it declares its output shape instead)."""

    def call(self, x):
        if isinstance(x, keras.KerasTensor):
            raise TypeError("Opaque needs concrete values")
        return x * 2.0

    def compute_output_shape(self, shape):
        return shape


class Block(keras.layers.Layer):
    """A user's block made of supported layers: looked into, no rule needed."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.inner = L.Dense(6, activation="relu", name="inner")
        self.proj = L.Dense(3, name="proj")

    def call(self, x):
        return x + self.proj(self.inner(x))


def test_custom_layers_traced_refused_and_registered():
    inp = keras.Input((3,))
    h = L.Dense(3, name="a")(inp)
    h = Block(name="block")(h)
    h = L.Dense(4, name="b")(h)
    h = Opaque(name="opaque")(h)
    model = keras.Model(inp, L.Dense(2, name="out")(h))
    x, _ = data((3,))
    groups = {tuple(g.producers): g for g in fk.coupled_groups(model)}
    assert groups[("block/inner",)].splittable
    assert groups[("a", "block/proj")].splittable  # the residual inside the block couples them
    refused = groups[("b",)].refused
    assert any("opaque" in r and "register_rule" in r for r in refused)
    before, snap = predict(model, x), snapshot(model)
    with pytest.raises(fk.GrowthError, match="opaque"):
        fk.widen(model, {"b": None})
    assert_same(snap, snapshot(model))
    with pytest.raises(ValueError, match=r"can be widened are \['a', 'block/inner', 'block/proj'\]"):
        fk.widen(model, {"nope": None})
    fk.widen(model, {"inner": None, "a": [0]}, symmetry="none")
    assert rel_err(before, predict(model, x)) <= TOL

    fk.register_rule(Opaque, "elementwise")
    try:
        assert not {tuple(g.producers): g for g in fk.coupled_groups(model)}[("b",)].refused
    finally:
        from fastsplit.keras import _rules

        del _rules._RULES[Opaque]


def test_coupled_groups_lists_refused_producers():
    inp = keras.Input((6, 6, 4))
    h = L.Conv2D(4, 3, groups=2, name="grouped")(inp)
    h = L.Dense(5, activation="softmax", name="soft")(h)
    model = keras.Model(inp, L.Dense(2, name="out")(L.Flatten()(h)))
    groups = {tuple(g.producers): g for g in fk.coupled_groups(model)}
    assert set(groups) == {("grouped",), ("soft",), ("out",)}
    assert "grouped convolution" in " ".join(groups[("grouped",)].refused)
    assert "softmax" in " ".join(groups[("soft",)].refused)
    assert "model output" in " ".join(groups[("out",)].refused)


def test_prune_folds_into_batchnorm_after_a_bias_free_conv():
    """MobileNetV2's project conv has no bias; the BatchNormalization after it takes the constant."""
    inp = keras.Input((6, 6, 3))
    h = L.Conv2D(6, 1, name="expand")(inp)
    h = L.ReLU(6.0)(h)
    h = L.Conv2D(4, 1, use_bias=False, name="project")(h)
    h = L.BatchNormalization(name="bn")(h)
    model = keras.Model(inp, L.Dense(2, name="out")(L.GlobalAveragePooling2D()(h)))
    x, _ = data((6, 6, 3))
    k, b = model.get_layer("expand").get_weights()
    k[:, :, :, [1, 4]] = 0.0
    b[[1, 4]] = [0.5, 3.0]  # constant, nonzero: the value must go somewhere
    model.get_layer("expand").set_weights([k, b])
    before = predict(model, x)
    dead = fk.dead_units(model, x)
    assert dead["expand"].tolist() == [1, 4]
    fk.prune(model, dead, data=x)
    assert model.get_layer("expand").filters == 4
    assert rel_err(before, predict(model, x)) <= TOL


def test_nudge_is_relative_to_each_units_scale():
    """With symmetry="nudge" the offset is by default 1e-3 of the unit's own size: its incoming weights' norm,
    or |gamma| when the offset goes to a BatchNormalization's beta; ``eps`` stays an absolute override."""
    inp = keras.Input((8,))
    model = keras.Model(inp, L.Dense(3, name="o")(L.Dense(4, activation="relu", name="h")(inp)))
    k, b = model.get_layer("h").get_weights()
    k[:, 1] *= 10.0
    model.get_layer("h").set_weights([k, np.zeros_like(b)])
    fk.widen(model, {"h": None}, symmetry="nudge")
    np.testing.assert_allclose(model.get_layer("h").bias.numpy()[4:], -1e-3 * np.linalg.norm(k, axis=0), rtol=1e-5)

    inp = keras.Input((8,))
    h = L.BatchNormalization(name="bn")(L.Dense(4, use_bias=False, name="h")(inp))
    model = keras.Model(inp, L.Dense(3, name="o")(h))
    model.get_layer("bn").gamma.assign(np.array([1.0, 2.0, -3.0, 4.0], "float32"))
    fk.widen(model, {"h": None}, symmetry="nudge", nudge=1e-2)
    np.testing.assert_allclose(model.get_layer("bn").beta.numpy(),
                               [0.01, 0.02, 0.03, 0.04, -0.01, -0.02, -0.03, -0.04], rtol=1e-5)

    inp = keras.Input((8,))
    model = keras.Model(inp, L.Dense(3, name="o")(L.Dense(4, name="h")(inp)))
    fk.widen(model, {"h": [2]}, symmetry="nudge", eps=0.5)
    assert model.get_layer("h").bias.numpy()[[2, 4]].tolist() == [0.5, -0.5]


def test_asymmetric_split_is_exact_and_copies_part_under_adam():
    model, x, y = _asym_model()
    before = predict(model, x)
    fk.widen(model, {"h": None}, symmetry="asymmetric")
    assert rel_err(before, predict(model, x)) <= TOL
    for _ in range(5):
        model.train_on_batch(x, y)
    k = model.get_layer("h").kernel.numpy()
    assert np.abs(k[:, :6] - k[:, 6:]).max() > 1e-4  # the copies are different units now


def _asym_model():
    inp = keras.Input((5,))
    model = keras.Model(inp, L.Dense(2, name="o")(L.Dense(6, activation="tanh", name="h")(inp)))
    model.compile(keras.optimizers.Adam(1e-2), "mse", run_eagerly=BACKEND != "jax")
    x, y = data((5,))
    model.train_on_batch(x, y)
    return model, x, y


class Shift(keras.layers.Layer):
    """A per-channel shift whose width is in its config, registered as "per_unit" instead of traced."""

    def __init__(self, dim, **kw):
        super().__init__(**kw)
        self.dim = dim

    def build(self, _):
        self.shift = self.add_weight(shape=(self.dim,), initializer="random_normal")

    def call(self, x):
        return x + self.shift

    def compute_output_shape(self, shape):
        return shape

    def get_config(self):
        return {**super().get_config(), "dim": self.dim}


def test_registered_per_unit_layer_splits_and_saves(tmp_path):
    fk.register_rule(Shift, "per_unit")
    try:
        inp = keras.Input((5,))
        h = Shift(4, name="shift")(L.Dense(4, name="h")(inp))
        model = keras.Model(inp, L.Dense(2, name="o")(h))
        x, y = data((5,))
        before = predict(model, x)
        fk.widen(model, {"h": [0, 3]}, symmetry="none")
        assert rel_err(before, predict(model, x)) <= TOL
        assert model.get_layer("shift").dim == 6 and model.get_layer("shift").shift.shape == (6,)
        with keras.utils.custom_object_scope({"Shift": Shift}):
            _roundtrip(model, x, y, tmp_path)
    finally:
        from fastsplit.keras import _rules

        del _rules._RULES[Shift]
