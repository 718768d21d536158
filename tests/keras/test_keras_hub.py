"""Transformers fastsplit has no rule for: the keras.io text classifier as published, keras_hub backbones.

Every splittable group is split at once with ``symmetry="none"``; the function is kept to 1e-5 relative in
float32 (DESIGN.md, "Transformers and recurrent layers").
"""

import keras
import numpy as np
import pytest
from keras import layers, ops

import fastsplit.keras as fk

RNG = np.random.default_rng(0)


def _np(x):
    return ops.convert_to_numpy(x)


def _split_everything(model, x):
    """Split every splittable group of ``model`` at once; returns the groups and the outputs before and after."""
    groups = fk.coupled_groups(model)
    before = _np(model(x))
    fk.widen(model, {g.name: None for g in groups if g.splittable}, symmetry="none")
    after = _np(model(x))
    assert after.shape == before.shape
    assert np.max(np.abs(after - before)) <= 1e-5 * np.max(np.abs(before))
    return groups


# -- https://keras.io/examples/nlp/text_classification_with_transformer/, as published --------------------


class TransformerBlock(layers.Layer):
    def __init__(self, embed_dim, num_heads, ff_dim, rate=0.1):
        super().__init__()
        self.att = layers.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
        self.ffn = keras.Sequential(
            [layers.Dense(ff_dim, activation="relu"), layers.Dense(embed_dim),]
        )
        self.layernorm1 = layers.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = layers.LayerNormalization(epsilon=1e-6)
        self.dropout1 = layers.Dropout(rate)
        self.dropout2 = layers.Dropout(rate)

    def call(self, inputs):
        attn_output = self.att(inputs, inputs)
        attn_output = self.dropout1(attn_output)
        out1 = self.layernorm1(inputs + attn_output)
        ffn_output = self.ffn(out1)
        ffn_output = self.dropout2(ffn_output)
        return self.layernorm2(out1 + ffn_output)


class TokenAndPositionEmbedding(layers.Layer):
    def __init__(self, maxlen, vocab_size, embed_dim):
        super().__init__()
        self.token_emb = layers.Embedding(input_dim=vocab_size, output_dim=embed_dim)
        self.pos_emb = layers.Embedding(input_dim=maxlen, output_dim=embed_dim)

    def call(self, x):
        maxlen = ops.shape(x)[-1]
        positions = ops.arange(start=0, stop=maxlen, step=1)
        positions = self.pos_emb(positions)
        x = self.token_emb(x)
        return x + positions


def _text_classifier(vocab_size=50, maxlen=12, embed_dim=8, num_heads=2, ff_dim=16,
                     block=TransformerBlock, embedding=TokenAndPositionEmbedding):
    inputs = layers.Input(shape=(maxlen,))
    embedding_layer = embedding(maxlen, vocab_size, embed_dim)
    x = embedding_layer(inputs)
    transformer_block = block(embed_dim, num_heads, ff_dim)
    x = transformer_block(x)
    x = layers.GlobalAveragePooling1D()(x)
    x = layers.Dropout(0.1)(x)
    x = layers.Dense(20, activation="relu")(x)
    x = layers.Dropout(0.1)(x)
    outputs = layers.Dense(2, activation="softmax")(x)
    return keras.Model(inputs=inputs, outputs=outputs)


@pytest.mark.slow
def test_keras_io_text_classifier_grows_everywhere_and_trains_on():
    model = _text_classifier()
    x = RNG.integers(0, 50, size=(4, 12))
    y = np.array([0, 1, 1, 0])
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", run_eagerly=True)
    model.fit(x, y, epochs=1, verbose=0)
    att = model.layers[2].att
    groups = {g.name: g for g in _split_everything(model, x)}
    d_model = next(g for g in groups.values() if "token_and_position_embedding/embedding_1" in g.producers)
    assert d_model.splittable  # token and position embeddings, attention output and FFN output: one stream
    assert {"transformer_block/multi_head_attention", "transformer_block/sequential/dense_1"} <= set(d_model.producers)
    assert sorted(d_model.uniform) == ["transformer_block/layer_normalization",
                                       "transformer_block/layer_normalization_1"]
    for name in ("heads", "key_dim", "value_dim"):
        assert groups[f"transformer_block/multi_head_attention/{name}"].splittable
    assert groups["transformer_block/sequential/dense"].splittable  # the FFN
    assert (att.num_heads, att.key_dim, att.value_dim) == (4, 16, 16)
    assert tuple(model.layers[1].token_emb.embeddings.shape) == (50, 16)
    assert tuple(model.layers[1].pos_emb.embeddings.shape) == (12, 16)
    history = model.fit(x, y, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


# Keras rebuilds a layer with ``cls(**config)``, and the published __init__s take no name, trainable or
# dtype, so the example as published cannot be loaded even ungrown; registered, with **kwargs, it can.
@keras.saving.register_keras_serializable(package="keras_io_example")
class SavableTransformerBlock(TransformerBlock):
    def __init__(self, embed_dim, num_heads, ff_dim, rate=0.1, **kwargs):
        super().__init__(embed_dim, num_heads, ff_dim, rate)


@keras.saving.register_keras_serializable(package="keras_io_example")
class SavableTokenAndPositionEmbedding(TokenAndPositionEmbedding):
    def __init__(self, maxlen, vocab_size, embed_dim, **kwargs):
        super().__init__(maxlen, vocab_size, embed_dim)


# slow on JAX only (a minute of compiling there); TensorFlow and PyTorch run it in make test
@pytest.mark.slow_on_jax
def test_keras_io_text_classifier_saves_and_loads_grown(tmp_path):
    """The block's config is its constructor's arguments, so it comes back at its first widths, and under new
    names (the published __init__ passes no name on); loading replays the growth on it by shape."""
    model = _text_classifier(block=SavableTransformerBlock, embedding=SavableTokenAndPositionEmbedding)
    x = RNG.integers(0, 50, size=(4, 12))
    y = np.array([0, 1, 1, 0])
    _split_everything(model, x)
    fk.widen(model, {"savable_transformer_block/multi_head_attention/heads": [0]}, symmetry="none")  # 4 -> 5
    # one step: TensorFlow's tracing costs more than running it eagerly, JAX's eager ops more than compiling
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
                  run_eagerly=keras.backend.backend() == "tensorflow")
    model.fit(x, y, epochs=1, verbose=0)
    path = str(tmp_path / "classifier.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.layers[2].name != "savable_transformer_block"  # renamed: found by position, not name
    assert (loaded.layers[2].att.num_heads, loaded.layers[2].att.key_dim) == (5, 16)
    np.testing.assert_array_equal(_np(loaded(x)), _np(model(x)))
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(_np(a), _np(b))
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables, strict=True):
        np.testing.assert_array_equal(_np(a), _np(b))
    assert fk.history(loaded) == fk.history(model)
    # grown again under its new names and saved again: the history now names the block both ways
    block = loaded.layers[2]
    fk.widen(loaded, {f"{block.name}/{block.ffn.name}/{block.ffn.layers[0].name}": [0, 0]}, symmetry="none")
    loaded.save(path)
    again = keras.models.load_model(path)
    assert tuple(again.layers[2].ffn.layers[0].kernel.shape) == (16, 34)
    np.testing.assert_array_equal(_np(again(x)), _np(loaded(x)))


def test_non_uniform_d_model_plan_names_the_plans_allowed():
    model = _text_classifier()
    name = next(g.name for g in fk.coupled_groups(model) if g.uniform)
    weights = [_np(w) for w in model.weights]
    with pytest.raises(fk.GrowthError, match="same number of copies"):
        fk.widen(model, {name: [0, 1]}, symmetry="none")
    for a, w in zip(weights, model.weights):
        np.testing.assert_array_equal(a, _np(w))


# -- keras_hub backbones from tiny configs ---------------------------------------------------------------

TINY = dict(vocabulary_size=50, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32, max_sequence_length=16)


def _backbone_with_head(name):
    keras_hub = pytest.importorskip("keras_hub")
    backbone = getattr(keras_hub.models, name)(**TINY)
    inputs = {k: keras.Input((16,), dtype="int32", name=k) for k in backbone.input}
    out = backbone(inputs)
    sequence = out["sequence_output"] if isinstance(out, dict) else out
    model = keras.Model(inputs, layers.Dense(5, name="head")(sequence))
    x = {"token_ids": RNG.integers(0, 50, (2, 16)), "padding_mask": np.ones((2, 16), "int32"),
         "segment_ids": np.zeros((2, 16), "int32")}
    return model, {k: v for k, v in x.items() if k in inputs}


@pytest.mark.parametrize("name,prefix", [("GPT2Backbone", "gpt2_backbone"), ("BertBackbone", "bert_backbone")])
def test_keras_hub_backbone_grows_everywhere(name, prefix):
    model, x = _backbone_with_head(name)
    groups = {g.name: g for g in _split_everything(model, x)}
    assert [n for n, g in groups.items() if not g.splittable] == ["head"]  # only the output's width is fixed
    assert groups[f"{prefix}/token_embedding"].splittable  # d_model: embeddings, attention and FFN outputs
    attention = "self_attention" if name == "GPT2Backbone" else "self_attention_layer"
    for i in range(2):
        block = f"{prefix}/transformer_layer_{i}"
        for dim in ("heads", "key_dim"):
            assert f"{block}/{attention}/{dim}" in groups
        assert f"{block}/feedforward_intermediate_dense" in groups
    backbone = model.get_layer(prefix)
    att = backbone.get_layer("transformer_layer_0")._self_attention_layer
    assert (att.num_heads, att.key_dim) == (4, 16)
    assert tuple(backbone.get_layer("token_embedding").embeddings.shape) == (50, 32)
