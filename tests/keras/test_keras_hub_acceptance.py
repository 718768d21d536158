"""Issue 13's acceptance on keras_hub ``GPT2Backbone`` and ``BertBackbone`` (tiny configs, random weights).

Inside a model with a head, each of (a) every FFN intermediate, (b) every attention layer's heads,
(c) ``key_dim`` and (d) ``d_model`` is doubled with ``symmetry="none"`` and changes the logits by at
most 1e-5 relative in float32; the grown model then trains with Adam, and ``model.save`` /
``load_model`` give it back exactly: outputs, weights, optimizer variables, history. The backbones'
configs are their constructor arguments, which cannot say how they grew: loading replays the saved
events on them by shape (``fastsplit/keras/_replay.py``, ``restore_widths``).

Unmarked: the four dimensions one after another on one GPT2 and one BERT model, then training and the
round trip (TensorFlow and PyTorch; slow on JAX, where GPT2 passed in 31 s idle, 240 s on a loaded VM); a saved
history that does not fit, and loading a grown GPT2 config (every backend). Slow (TensorFlow in ``make test``):
each dimension alone on a fresh model of each, with one more training step after loading.
"""

import keras
import numpy as np
import pytest
from keras import layers, ops

import fastsplit.keras as fk

keras_hub = pytest.importorskip("keras_hub")

# no dropout: a training step after loading must be the same step as on the saved model
TINY = dict(vocabulary_size=1000, num_layers=2, num_heads=4, hidden_dim=64, intermediate_dim=128,
            max_sequence_length=64, dropout=0.0)
SEQ = 64
PREFIX = {"GPT2Backbone": "gpt2_backbone", "BertBackbone": "bert_backbone"}

# the groups of each dimension, and the widths they have before and after doubling
DIMENSIONS = {
    "ffn": (lambda g: g.name.endswith("/feedforward_intermediate_dense"), 128),
    "heads": (lambda g: g.name.endswith("/heads"), 4),
    "key_dim": (lambda g: g.name.endswith("/key_dim"), 16),
    "d_model": (lambda g: g.name.endswith("/token_embedding"), 64),
}


def _np(x):
    return ops.convert_to_numpy(x)


def _model(name):
    backbone = getattr(keras_hub.models, name)(**TINY)
    inputs = {k: keras.Input((SEQ,), dtype="int32", name=k) for k in backbone.input}
    out = backbone(inputs)
    sequence = out["sequence_output"] if isinstance(out, dict) else out
    model = keras.Model(inputs, layers.Dense(5, name="head")(sequence))
    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(0, 1000, (2, SEQ)).astype("int32"), "padding_mask": np.ones((2, SEQ), "int32"),
         "segment_ids": np.zeros((2, SEQ), "int32")}
    y = rng.standard_normal((2, SEQ, 5)).astype("float32")
    return model, {k: v for k, v in x.items() if k in inputs}, y


def _double(model, x, dim):
    """Split every unit of every group of ``dim`` once; the logits must not move."""
    pick, width = DIMENSIONS[dim]
    groups = [g for g in fk.coupled_groups(model) if pick(g)]
    assert len(groups) == (1 if dim == "d_model" else 2) and {g.width for g in groups} == {width}
    before = _np(model(x))
    event = fk.widen(model, {g.name: None for g in groups}, symmetry="none")
    after = _np(model(x))
    assert np.max(np.abs(after - before)) <= 1e-5 * np.max(np.abs(before)), dim
    assert {(g.old_width, g.new_width) for g in event.layers.values()} == {(width, 2 * width)}


def _train(model, x, y):
    # two steps: TensorFlow's tracing of fit costs more than running them eagerly; JAX's eager ops cost more
    model.compile(keras.optimizers.Adam(1e-3), "mse", run_eagerly=keras.backend.backend() == "tensorflow")
    losses = model.fit(x, y, epochs=2, batch_size=2, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[1] != losses[0]


def _round_trip(model, x, tmp_path):
    path = str(tmp_path / "grown.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(_np(loaded(x)), _np(model(x)), rtol=0, atol=1e-6)
    assert [tuple(w.shape) for w in loaded.weights] == [tuple(w.shape) for w in model.weights]
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(_np(a), _np(b))
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables)
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(_np(a), _np(b))  # moments and iteration count
    assert fk.history(loaded) == fk.history(model)
    return loaded


# JAX compiles the grown model's steps anew after every event: 31 s there on the idle 2-core VM (TF 8 s, torch 4 s): slow there only


@pytest.mark.parametrize("name", [pytest.param("GPT2Backbone", marks=pytest.mark.slow_on_jax),
                                  pytest.param("BertBackbone", marks=pytest.mark.slow_on_jax)])
def test_each_dimension_grows_exactly_then_trains_and_round_trips(name, tmp_path):
    model, x, y = _model(name)
    for dim in DIMENSIONS:
        _double(model, x, dim)
    backbone = model.get_layer(PREFIX[name])
    block = backbone.get_layer("transformer_layer_1")
    att = block._self_attention_layer
    assert (att.num_heads, att.key_dim) == (8, 32)
    assert tuple(backbone.get_layer("token_embedding").embeddings.shape) == (1000, 128)
    assert tuple(block._feedforward_intermediate_dense.kernel.shape) == (128, 256)
    _train(model, x, y)
    _round_trip(model, x, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("dim", list(DIMENSIONS))
@pytest.mark.parametrize("name", ["GPT2Backbone", "BertBackbone"])
def test_one_dimension_alone_grows_exactly_trains_and_round_trips(name, dim, tmp_path):
    model, x, y = _model(name)
    _double(model, x, dim)
    _train(model, x, y)
    loaded = _round_trip(model, x, tmp_path)
    # the optimizer state came back, not just its shapes: one more step is the same step
    a = loaded.train_on_batch(x, y)
    b = model.train_on_batch(x, y)
    assert np.isclose(a, b, rtol=1e-6)
    for u, v in zip(model.weights, loaded.weights):
        np.testing.assert_allclose(_np(v), _np(u), rtol=0, atol=1e-6)


# -- a saved history that does not fit the model ---------------------------------------------------------


@pytest.fixture(scope="module")
def grown_gpt2_config():
    """A GPT2 model's config after two events (every layer's heads, then d_model)."""
    model, x, _ = _model("GPT2Backbone")
    fk.widen(model, {g.name: None for g in fk.coupled_groups(model) if g.name.endswith("/heads")}, symmetry="none")
    fk.widen(model, {"gpt2_backbone/token_embedding": None}, symmetry="none")
    return type(model), keras.saving.serialize_keras_object(model)


def _damaged(grown, damage):
    import json

    cls, saved = grown
    saved = json.loads(json.dumps(saved))
    damage(saved["config"]["fastsplit_history"])
    return saved


HEADS0 = "gpt2_backbone/transformer_layer_0/self_attention/heads"


def _set(hist, i, path, **change):
    hist[i]["layers"][path].update(change)


BAD_HISTORY = [
    # (damage, the text the GrowthError must hold)
    (lambda h: _set(h, 0, HEADS0, at=[99, 0]), f"grew {HEADS0!r} (child indices [99, 0]), which this model does not"),
    (lambda h: _set(h, 0, HEADS0, at=[3, 2, 1, 0, "x"]), "which this model does not have"),
    (lambda h: _set(h, 0, HEADS0, at="heads"), "['at'] must be a list of child indices"),
    (lambda h: _set(h, 0, HEADS0, old_width=8, new_width=16),
     f"group {HEADS0!r} has 4 units, but the history takes it from 8 (fastsplit_history[0]) to 16"),
    (lambda h: h.append(json_copy(h[0])), f"takes {HEADS0!r} from 4 units, but fastsplit_history[0] left it"),
    (lambda h: _set(h, 1, "gpt2_backbone/token_embedding", new_width=48), "is a 'split' event but takes"),
    (lambda h: _set(h, 1, "gpt2_backbone/position_embedding", new_width=192),
     "takes 'gpt2_backbone/token_embedding' from 64 to 128 units but 'gpt2_backbone/position_embedding', of the "
     "same group, from 64 to 192"),
]


def json_copy(d):
    import json

    return json.loads(json.dumps(d))


@pytest.mark.parametrize("damage, shown", BAD_HISTORY, ids=[str(i) for i in range(len(BAD_HISTORY))])
def test_a_history_that_does_not_fit_is_refused_before_anything_grows(damage, shown, grown_gpt2_config,
                                                                      monkeypatch):
    saved = _damaged(grown_gpt2_config, damage)
    calls = []
    real = fk.widen
    monkeypatch.setattr(fk, "widen", lambda *a, **k: calls.append(a) or real(*a, **k))
    with pytest.raises(fk.GrowthError) as e:
        keras.saving.deserialize_keras_object(saved)
    assert "the saved growth history of model " in str(e.value) and shown in str(e.value)
    assert calls == []  # refused while checking: nothing was replayed, no model is returned


def test_an_event_half_at_each_width_is_refused(grown_gpt2_config, monkeypatch):
    # the head's config says how it grew: it comes back at the new width, the backbone's heads at the old
    def damage(h):
        h[0]["layers"]["head"] = {"name": "head", "old_width": 5, "new_width": 5, "neurons": [], "group": 0}
    saved = _damaged(grown_gpt2_config, damage)
    with pytest.raises(fk.GrowthError, match=r"as one group, but the model has .*heads.* at the width before it "
                                             r"and \['head'\] at the width after"):
        keras.saving.deserialize_keras_object(saved)


def test_the_undamaged_history_loads(grown_gpt2_config):
    model = keras.saving.deserialize_keras_object(_damaged(grown_gpt2_config, lambda h: None))
    att = model.get_layer("gpt2_backbone").get_layer("transformer_layer_0")._self_attention_layer
    assert att.num_heads == 8
    assert tuple(model.get_layer("head").kernel.shape) == (128, 5)
