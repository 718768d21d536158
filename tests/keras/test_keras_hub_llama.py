"""Grouped-query attention, rotary embeddings, RMSNorm and gated FFNs: keras_hub's LlamaBackbone and Keras'
GroupQueryAttention grow exactly (DESIGN.md, "Transformers and recurrent layers").

A key/value head with its group of query heads is the unit of ``<attention>/heads``, the query heads of every
group alike that of ``<attention>/query_heads``; the head size (``<attention>/key_dim``) grows in
GroupQueryAttention, and under Llama's rotary embedding by an integer factor, each dimension's copies right
after it (so that it keeps its frequency) with the query reading the first copy only.
"""

import keras
import numpy as np
import pytest
from keras import layers

import fastsplit.keras as fk

RNG = np.random.default_rng(0)
LLAMA = dict(vocabulary_size=1000, num_layers=2, hidden_dim=64, intermediate_dim=128, num_query_heads=4,
             num_key_value_heads=2)
SEQ = 8
PREFIX = "llama_backbone"


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _llama():
    """A LlamaBackbone from a tiny config with a Dense head on its sequence output; its inputs."""
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.LlamaBackbone(**LLAMA)
    inputs = {k: keras.Input((SEQ,), dtype="int32", name=k) for k in backbone.input}
    model = keras.Model(inputs, layers.Dense(3, name="head")(backbone(inputs)))
    x = {"token_ids": RNG.integers(0, 1000, (2, SEQ)), "padding_mask": np.ones((2, SEQ), "int32")}
    return model, x


def _close(after, before):
    assert after.shape == before.shape
    assert np.max(np.abs(after - before)) <= 1e-5 * np.max(np.abs(before))


def _attention(model, i=0):
    return model.get_layer(PREFIX).get_layer(f"transformer_layer_{i}")._self_attention_layer


def _state(model):
    """Everything a refused split must leave alone: weights, the model's config, the attention layers' sizes."""
    atts = [_attention(model, i) for i in range(2)]
    sizes = [(a.num_query_heads, a.num_key_value_heads, a._inv_norm_factor,
              *(d.partial_output_shape for d in (a._query_dense, a._key_dense, a._value_dense, a._output_dense)))
             for a in atts]
    return [_np(w) for w in model.weights], model.get_config(), sizes


def _groups(kind):
    blocks = [f"{PREFIX}/transformer_layer_{i}" for i in range(2)]
    return {
        "ffn": [f"{b}/feedforward_intermediate_dense" for b in blocks],
        "heads": [f"{b}/self_attention/heads" for b in blocks],
        "query_heads": [f"{b}/self_attention/query_heads" for b in blocks],
        "key_dim": [f"{b}/self_attention/key_dim" for b in blocks],
        "d_model": [f"{PREFIX}/token_embedding"],
    }[kind]


def test_llama_grows_exactly_trains_on_and_saves(tmp_path):
    """(a) every FFN, (b) every attention layer's heads, (c) its head size, (d) d_model doubled: each split on its own keeps the
    logits; then Adam, whose slots the splits carried, trains on, and the grown model saves and loads (its
    backbone rebuilt from its first config, the growth replayed)."""
    model, x = _llama()
    y = RNG.standard_normal((2, SEQ, 3)).astype("float32")
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    model.optimizer.build(model.trainable_variables)  # Adam's slots, carried by every split (no compile here)
    groups = {g.name: g for g in fk.coupled_groups(model)}
    att, block = _attention(model), model.get_layer(PREFIX).get_layer("transformer_layer_0")
    before = _np(model(x))
    for kind in ("ffn", "heads", "query_heads", "key_dim", "d_model"):
        for name in _groups(kind):
            assert groups[name].splittable, groups[name].refused
        fk.widen(model, {name: None for name in _groups(kind)}, symmetry="none")
        _close(_np(model(x)), before)
    assert tuple(block._feedforward_gate_dense.kernel.shape) == (128, 256)
    assert tuple(block._feedforward_output_dense.kernel.shape) == (256, 128)
    # every key/value head copied with its two query heads, then every group's query heads doubled, then the
    # head size; it stays under d_model growth
    assert (att.num_key_value_heads, att.num_query_heads, att.num_key_value_groups) == (4, 16, 4)
    assert tuple(att._query_dense.kernel.shape) == (128, 16, 32)
    assert tuple(att._key_dense.kernel.shape) == (128, 4, 32)
    assert tuple(att._output_dense.kernel.shape) == (16, 32, 128)
    assert att._inv_norm_factor == pytest.approx(32 ** -0.5)
    assert tuple(model.get_layer(PREFIX).get_layer("token_embedding").embeddings.shape) == (1000, 128)
    assert tuple(block._self_attention_layernorm.scale.shape) == (128,)
    losses = model.fit(x, y, epochs=3, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] != losses[0]
    model.save(tmp_path / "llama.keras")
    loaded = keras.models.load_model(tmp_path / "llama.keras")
    np.testing.assert_array_equal(_np(loaded(x)), _np(model(x)))
    assert (_attention(loaded).num_key_value_heads, _attention(loaded).num_query_heads) == (4, 16)


def test_llama_key_dim_doubles_under_rotary_each_dimension_next_to_its_copy():
    """The rotary frequencies base^(-2i/d): old dimension i of each half sits at 2i of the doubled head, where
    the frequency is the same; the query is zero at the copies (times √2 for the softmax scale), the keys and
    values there are fresh draws, and the output projection reads the first copy only. Adam trains on, and
    the query's columns at the copies leave zero."""
    model, x = _llama()
    att = _attention(model)
    q, k, o = (_np(d.kernel) for d in (att._query_dense, att._key_dense, att._output_dense))
    before = _np(model(x))
    fk.widen(model, dict.fromkeys(_groups("key_dim")))  # the default symmetry, "fresh"
    _close(_np(model(x)), before)
    q2, k2, o2 = (_np(d.kernel) for d in (att._query_dense, att._key_dense, att._output_dense))
    assert q2.shape == (64, 4, 32) and att._inv_norm_factor == pytest.approx(32 ** -0.5)
    np.testing.assert_allclose(q2[..., 0::2], q * np.sqrt(2), rtol=1e-6)
    np.testing.assert_array_equal(q2[..., 1::2], 0.0)
    np.testing.assert_array_equal(k2[..., 0::2], k)
    assert np.all(k2[..., 1::2] != 0)  # fresh keys give the zero queries there a gradient
    np.testing.assert_array_equal(o2[:, 0::2], o)
    np.testing.assert_array_equal(o2[:, 1::2], 0.0)
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    losses = model.fit(x, RNG.standard_normal((2, SEQ, 3)).astype("float32"), epochs=2, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses))
    assert np.any(_np(att._query_dense.kernel)[..., 1::2] != 0)


@pytest.mark.parametrize("plan,symmetry,match", [
    ([0, 3], "none", "same number of copies"),  # two of 16 dimensions
    (list(range(8)), "none", "same number of copies"),  # 16 -> 24: x1.5 cannot keep every frequency
    (None, "direction", "originals must not move"),  # would move the original keys
])
def test_llama_key_dim_plans_that_move_a_frequency_are_refused_and_the_model_is_left_alone(plan, symmetry, match):
    model, _x = _llama()
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    model.optimizer.build(model.trainable_variables)
    name = _groups("key_dim")[0]
    weights, config, sizes = _state(model)
    slots = [_np(v) for v in model.optimizer.variables]
    with pytest.raises(fk.GrowthError, match=rf"(?s)self_attention/key_dim.*rotary.*{match}"):
        fk.widen(model, {name: plan}, symmetry=symmetry)
    after_weights, after_config, after_sizes = _state(model)
    assert after_config == config and after_sizes == sizes
    for a, b in zip(weights + slots, after_weights + [_np(v) for v in model.optimizer.variables]):
        np.testing.assert_array_equal(a, b)


def test_llama_key_dim_is_not_pruned_under_rotary():
    model, _x = _llama()
    name = _groups("key_dim")[0]
    weights, config, sizes = _state(model)
    with pytest.raises(fk.GrowthError, match=r"(?s)cannot prune .*self_attention/key_dim.*rotary"):
        fk.prune(model, {name: [0]})
    after_weights, after_config, after_sizes = _state(model)
    assert after_config == config and after_sizes == sizes
    for a, b in zip(weights, after_weights):
        np.testing.assert_array_equal(a, b)


def test_llama_non_uniform_d_model_plan_is_refused():
    model, _x = _llama()
    weights, config, sizes = _state(model)
    with pytest.raises(fk.GrowthError, match="same number of copies"):
        fk.widen(model, {f"{PREFIX}/token_embedding": [0, 1]}, symmetry="none")
    after_weights, after_config, after_sizes = _state(model)
    assert after_config == config and after_sizes == sizes
    for a, b in zip(weights, after_weights):
        np.testing.assert_array_equal(a, b)


# -- keras.layers.GroupQueryAttention --------------------------------------------------------------------


def _gqa_model(use_gate=False):
    q = keras.Input((5, 8))
    h = layers.Dense(8, name="h")(q)
    kwargs = {"use_gate": True} if use_gate else {}
    a = layers.GroupQueryAttention(head_dim=4, num_query_heads=6, num_key_value_heads=2, name="gqa", **kwargs)(h, h)
    return keras.Model(q, layers.Dense(2, name="out")(layers.Flatten()(a))), RNG.standard_normal((3, 5, 8))


def test_group_query_attention_grows_heads_head_size_and_width_exactly():
    model, x = _gqa_model(use_gate=True)
    groups = {g.name: g for g in fk.coupled_groups(model)}
    assert all(groups[n].splittable for n in ("gqa/heads", "gqa/key_dim", "h")), groups
    att = model.get_layer("gqa")
    before = _np(model(x))
    fk.widen(model, {"gqa/heads": [1]}, symmetry="none")  # key/value head 1 and its query heads 3, 4, 5
    _close(_np(model(x)), before)
    assert (att.num_key_value_heads, att.num_query_heads, att.num_repeats) == (3, 9, 3)
    fk.widen(model, {"gqa/query_heads": [0, 2]}, symmetry="none")  # query heads 0 and 2 of every group
    _close(_np(model(x)), before)
    assert (att.num_key_value_heads, att.num_query_heads, att.num_repeats) == (3, 15, 5)
    fk.widen(model, {"gqa/key_dim": [0, 3], "h": None}, symmetry="none")
    _close(_np(model(x)), before)
    assert att.head_dim == 6 and att._inverse_sqrt_head_dim == pytest.approx(6 ** -0.5)
    assert tuple(att._query_dense.kernel.shape) == (16, 15, 6)
    assert tuple(att._gate_dense.kernel.shape) == (16, 15, 6)
    assert tuple(att._output_dense.kernel.shape) == (15, 6, 8)
    config = att.get_config()
    assert (config["num_key_value_heads"], config["num_query_heads"], config["head_dim"]) == (3, 15, 6)


@pytest.mark.parametrize("plans,match", [
    ({"gqa/heads": 6}, "gqa/heads"),  # a plan of the wrong width (6 query heads, 2 key/value heads)
    ({"gqa/heads": None, "gqa/query_heads": None}, "twice on axis 1"),  # two plans on the query heads' axis
])
def test_group_query_attention_bad_plans_leave_the_model_alone(plans, match):
    import fastsplit

    model, _x = _gqa_model()
    plans = {k: fastsplit.plan(v, [0], symmetry="none") if isinstance(v, int) else v for k, v in plans.items()}
    weights, config = [_np(w) for w in model.weights], model.get_config()
    with pytest.raises(fk.GrowthError, match=match):
        fk.widen(model, plans, symmetry="none")
    assert model.get_config() == config
    for a, w in zip(weights, model.weights):
        np.testing.assert_array_equal(a, _np(w))
