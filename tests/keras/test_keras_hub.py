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


def _text_classifier(vocab_size=50, maxlen=12, embed_dim=8, num_heads=2, ff_dim=16):
    inputs = layers.Input(shape=(maxlen,))
    embedding_layer = TokenAndPositionEmbedding(maxlen, vocab_size, embed_dim)
    x = embedding_layer(inputs)
    transformer_block = TransformerBlock(embed_dim, num_heads, ff_dim)
    x = transformer_block(x)
    x = layers.GlobalAveragePooling1D()(x)
    x = layers.Dropout(0.1)(x)
    x = layers.Dense(20, activation="relu")(x)
    x = layers.Dropout(0.1)(x)
    outputs = layers.Dense(2, activation="softmax")(x)
    return keras.Model(inputs=inputs, outputs=outputs)


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


def test_non_uniform_d_model_plan_names_the_plans_allowed():
    model = _text_classifier()
    name = next(g.name for g in fk.coupled_groups(model) if g.uniform)
    weights = [_np(w) for w in model.weights]
    with pytest.raises(fk.GrowthError, match="same number of copies"):
        fk.widen(model, {name: [0, 1]}, symmetry="none")
    for a, w in zip(weights, model.weights):
        np.testing.assert_array_equal(a, _np(w))
