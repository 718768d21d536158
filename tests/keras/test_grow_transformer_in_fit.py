"""Attention, recurrent and embedding groups grown inside ``fit`` and with optimizer state carried.

The state check is generic, with no table of roles per tensor: before the split every optimizer slot
is set to what it would be after one step on the batch (SGD's momentum and Adam's/Lion's first
moment to the gradient, Adam's second moment to its square), the split carries the slots, and each
slot must then equal the same quantity computed from the split model's own gradient. That holds for
every tensor kind at once, the query's √(k'/k) included, exactly when the DESIGN.md transport rule
is the gradient's transport.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKEND, L, gradients, keras, predict, rel_err

import fastsplit.keras as fk

T, VOCAB, D = 6, 20, 8


def gpt(heads=2, key_dim=4, ffn=12):
    """A pre-LN causal block over a token and position embedding, and a dense head."""
    tok = keras.Input((T,), dtype="int32")
    h = L.Embedding(VOCAB, D, name="embed")(tok)
    a = L.LayerNormalization(name="ln_a")(h)
    a = L.MultiHeadAttention(heads, key_dim, name="att")(a, a, use_causal_mask=True)
    h = L.Add()([h, a])
    f = L.LayerNormalization(name="ln_f")(h)
    f = L.Dense(ffn, activation="gelu", name="ffn")(f)
    h = L.Add()([h, L.Dense(D, name="ffn_out")(f)])
    return keras.Model(tok, L.Dense(3, name="head")(L.Flatten()(h)))


def bi_gru():
    tok = keras.Input((T,), dtype="int32")
    h = L.Embedding(VOCAB, 5, name="embed")(tok)
    h = L.Bidirectional(L.GRU(4, return_sequences=True), name="bi")(h)
    h = L.LSTM(3, name="lstm")(h)
    return keras.Model(tok, L.Dense(3, name="head")(h))


#: model -> (builder, plans: every kind of group the model has, non-uniform where the layer allows)
CASES = {
    # key_dim and value_dim get one plan: where the fused attention kernel needs them equal (JAX) they are one group
    "gpt": (gpt, {"att/heads": [1], "att/key_dim": [0, 3, 3], "att/value_dim": [0, 3, 3], "ffn": [0, 5, 5, 11],
                  "embed": None}),
    "bi_gru": (bi_gru, {"embed": [0, 4], "bi/forward": [1, 3], "lstm": [2]}),
}

#: optimizer -> {slot attribute: what it holds after one step from zero, as a function of the gradient}
#: (Adam's and SGD's slots are AdamW's and Lion's: tests/keras/test_optim.py checks all against the MLP's)
OPTIMIZERS = {
    "adamw": (lambda: keras.optimizers.AdamW(1e-3), {"_momentums": lambda g: g, "_velocities": np.square}),
    "lion": (lambda: keras.optimizers.Lion(1e-4), {"_momentums": lambda g: g}),
}


def _data(seed=0, n=8):
    rng = np.random.default_rng(seed)
    return rng.integers(0, VOCAB, (n, T)).astype("int32"), rng.normal(size=(n, 3)).astype("float32")


def _set_slots(model, table, grads):
    opt = model.optimizer
    for v, g in zip(model.trainable_variables, grads, strict=True):
        for attr, of in table.items():
            getattr(opt, attr)[opt._get_variable_index(v)].assign(of(g).astype("float32"))


def _slots(model, table):
    opt = model.optimizer
    return {attr: [np.asarray(keras.ops.convert_to_numpy(getattr(opt, attr)[opt._get_variable_index(v)]))
                   for v in model.trainable_variables] for attr in table}


# Lion on JAX only under the slow mark (recompiling costs ~35 s a case there): AdamW checks the same slots
@pytest.mark.parametrize("opt", ["adamw", pytest.param("lion", marks=pytest.mark.slow_on_jax)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_carried_slots_are_the_split_models_own(case, opt):
    build, plans = CASES[case]
    make, table = OPTIMIZERS[opt]
    model = build()
    model.compile(make(), "mse")
    x, y = _data()
    model.train_on_batch(x, y)  # builds the optimizer
    _set_slots(model, table, gradients(model, x, y))
    fk.widen(model, plans, symmetry="none", optimizer="carry")
    grads = gradients(model, x, y)
    carried = _slots(model, table)
    paths = [v.path for v in model.trainable_variables]
    for attr, of in table.items():
        for path, g, s in zip(paths, grads, carried[attr], strict=True):
            want = of(g)
            np.testing.assert_allclose(s, want, rtol=2e-4, atol=1e-6 * max(1.0, np.abs(want).max()),
                                       err_msg=f"{opt} {attr} {path}")
    model.train_on_batch(x, y)


class _Outputs(keras.callbacks.Callback):
    """The model's outputs on ``x`` at the end of training step ``step`` (the live values, synced on JAX)."""

    def __init__(self, x, step):
        super().__init__()
        self.x, self.step, self.out = x, step, None

    def on_train_batch_end(self, batch, logs=None):
        if int(np.asarray(self.model.optimizer.iterations)) == self.step:
            if BACKEND == "jax":  # inside a JAX fit the live values are in the trainer's state
                self.model.jax_state_sync()
            self.out = predict(self.model, self.x)


@pytest.mark.parametrize("optimizer", ["adamw", pytest.param("lion", marks=pytest.mark.slow)])
def test_split_every_grows_attention_groups_by_name_inside_fit(optimizer):
    model = gpt()
    x, y = _data(n=32)
    model.compile(OPTIMIZERS[optimizer][0](), "mse")
    names = ["att/heads", "att/key_dim", "att/value_dim", "ffn", "embed"]
    grow = fk.SplitEvery(steps=2, layers=names, symmetry="none", verbose=0,
                         max_units={"att/heads": 4, "att/key_dim": 8, "att/value_dim": 8, "ffn": 24, "embed": 16})
    before, after = _Outputs(x, 2), _Outputs(x, 2)
    history = model.fit(x, y, batch_size=8, epochs=2, callbacks=[before, grow, after], verbose=0)
    att = model.get_layer("att")
    assert (att.num_heads, att.key_dim, att.value_dim, model.get_layer("ffn").units) == (4, 8, 8, 24)
    assert model.get_layer("embed").output_dim == 16
    assert len(grow.events) == 1  # every group reached its cap at the first event
    assert rel_err(before.out, after.out) <= 1e-5  # the event inside fit kept the function
    assert history.history["units/att/heads"] == [4, 4] and history.history["units/embed"] == [16, 16]
    assert len(history.history["loss"]) == 2 and np.all(np.isfinite(history.history["loss"]))


def test_split_on_plateau_grows_recurrent_and_embedding_groups():
    model = bi_gru()
    x, y = _data(n=16)
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    grow = fk.SplitOnPlateau(monitor="loss", patience=0, min_delta=1e9, layers=["bi/forward", "embed", "lstm"],
                             max_units={"bi/forward": 8, "embed": 10, "lstm": 6}, verbose=0)
    model.fit(x, y, batch_size=8, epochs=2, callbacks=[grow], verbose=0)
    assert model.get_layer("bi").forward_layer.units == 8 and model.get_layer("lstm").units == 6
    assert model.get_layer("embed").output_dim == 10


def test_groups_without_scores_refuse_ranked_selection_before_training():
    model = gpt()
    model.compile("adam", "mse")
    x, y = _data()
    weights = [np.copy(keras.ops.convert_to_numpy(w)) for w in model.weights]
    grow = fk.SplitEvery(steps=1, layers=["att/heads"], select=1, verbose=0)
    with pytest.raises(fk.GrowthError, match=r"att/heads.*select=.all."):
        model.fit(x, y, epochs=1, callbacks=[grow], verbose=0)
    for a, w in zip(weights, model.weights, strict=True):
        np.testing.assert_array_equal(a, keras.ops.convert_to_numpy(w))


def test_an_unknown_group_name_lists_the_names_that_grow():
    model = gpt()
    model.compile("adam", "mse")
    x, y = _data()
    with pytest.raises(fk.GrowthError, match=r"no layer named 'att/nope'.*'att/heads'"):
        model.fit(x, y, epochs=1, callbacks=[fk.SplitEvery(steps=1, layers=["att/nope"], verbose=0)], verbose=0)
