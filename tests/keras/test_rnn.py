"""Recurrent layers grow exactly: LSTM, GRU (reset_after both ways), SimpleRNN, Bidirectional, Embedding.

Each model is tiny (a few units, 5 to 7 steps) so that a test takes about a second on a 2-core CPU.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from conftest import BACKEND, L, assert_same, gradients, keras, predict, rel_err, snapshot

import fastsplit
import fastsplit.keras as fk

TOL = 1e-5
T, F, VOCAB = 4, 3, 20
EXACT = ("none", "fresh", "asymmetric")  # the symmetries that keep the function exactly


def imdb_bilstm():
    """keras.io "Bidirectional LSTM on IMDB" as published (Embedding -> BiLSTM(seq) -> BiLSTM -> Dense), tiny."""
    inputs = keras.Input(shape=(None,), dtype="int32")
    x = L.Embedding(VOCAB, 6, name="embedding")(inputs)
    x = L.Bidirectional(L.LSTM(4, return_sequences=True), name="bi1")(x)
    x = L.Bidirectional(L.LSTM(3), name="bi2")(x)
    outputs = L.Dense(1, activation="sigmoid", name="out")(x)
    return keras.Model(inputs, outputs)


def gru(reset_after):
    """Conv1D -> GRU(seq) -> GRU -> Dense -> Dense: a conv feeding an RNN, a stacked RNN, an RNN head."""
    inp = keras.Input((T, F))
    h = L.Conv1D(4, 2, activation="relu", name="conv")(inp)
    h = L.GRU(5, return_sequences=True, reset_after=reset_after, name="g1")(h)
    h = L.GRU(3, reset_after=reset_after, name="g2")(h)
    h = L.Dense(4, activation="tanh", name="fc")(h)
    return keras.Model(inp, L.Dense(2, name="out")(h))


def simple_rnn():
    """Embedding (masked) -> SimpleRNN(seq) -> LSTM(seq) -> GlobalMaxPooling1D -> Dense."""
    inp = keras.Input((T,), dtype="int32")
    h = L.Embedding(VOCAB, 4, mask_zero=True, name="emb")(inp)
    h = L.SimpleRNN(5, return_sequences=True, name="srnn")(h)
    h = L.LSTM(3, return_sequences=True, unroll=True, name="lstm")(h)
    h = L.GlobalMaxPooling1D()(h)
    return keras.Model(inp, L.Dense(2, name="out")(h))


def bidirectional(merge_mode, cell="lstm"):
    """Dense -> Bidirectional(cell, merge_mode, seq) -> Bidirectional(cell) -> Dense."""
    rnn = {"lstm": L.LSTM, "gru": L.GRU, "simple": L.SimpleRNN}[cell]
    inp = keras.Input((T, F))
    h = L.Dense(4, name="pre")(inp)
    h = L.Bidirectional(rnn(3, return_sequences=True), merge_mode=merge_mode, name="bi")(h)
    h = L.Bidirectional(rnn(2), merge_mode=merge_mode, name="bi_last")(h)
    return keras.Model(inp, L.Dense(2, name="out")(h))


#: name -> (builder, token inputs?, groups that grow)
MODELS = {
    "imdb_bilstm": (imdb_bilstm, True, ["embedding", "bi1/forward", "bi2/forward"]),
    "gru_reset_after": (lambda: gru(True), False, ["conv", "g1", "g2", "fc"]),
    "gru_reset_before": (lambda: gru(False), False, ["conv", "g1", "g2", "fc"]),
    "simple_rnn": (simple_rnn, True, ["emb", "srnn", "lstm"]),
    "bi_concat_gru": (lambda: bidirectional("concat", "gru"), False, ["pre", "bi/forward", "bi_last/forward"]),
    "bi_sum_lstm": (lambda: bidirectional("sum"), False, ["pre", "bi/forward", "bi_last/forward"]),
    "bi_ave_simple": (lambda: bidirectional("ave", "simple"), False, ["pre", "bi/forward", "bi_last/forward"]),
    "bi_mul_lstm": (lambda: bidirectional("mul"), False, ["pre", "bi/forward", "bi_last/forward"]),
}


def inputs(tokens, n=8, seed=0):
    rng = np.random.default_rng(seed)
    if tokens:
        x = rng.integers(1, VOCAB, size=(n, T)).astype("int32")
        x[: n // 2, -1:] = 0  # padding (masked where the Embedding says so)
    else:
        x = rng.standard_normal((n, T, F)).astype("float32")
    return x


def compiled(name, steps=1):
    """The model, compiled with Adam and trained ``steps`` batches (so the optimizer has slots)."""
    build, tokens, _ = MODELS[name]
    model = build()
    model.compile(keras.optimizers.Adam(1e-2), "mse", run_eagerly=BACKEND != "jax")
    x = inputs(tokens)
    y = np.random.default_rng(1).standard_normal((len(x), model.output.shape[-1])).astype("float32")
    for _ in range(steps):
        model.train_on_batch(x, y)
    return model, x, y


def _random_plans(model, names, rng):
    widths = {g.name: g.width for g in fk.coupled_groups(model)}
    return {n: rng.choice(widths[n], size=int(rng.integers(1, widths[n] + 1))).tolist() for n in names}


def _keeps_training(model, x, y):
    loss = model.train_on_batch(x, y)
    assert np.all(np.isfinite(np.asarray(loss, dtype=np.float64)))


SLOW = pytest.mark.slow


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("how", ["all", pytest.param("random", marks=SLOW)])
def test_function_preserved(name, how):
    model, x, y = compiled(name)
    before = predict(model, x)
    names = MODELS[name][2]
    plans = {n: None for n in names} if how == "all" else _random_plans(model, names, np.random.default_rng(3))
    event = fk.widen(model, plans, symmetry="none")
    assert rel_err(before, predict(model, x)) <= TOL
    assert event.params_after == model.count_params() > event.params_before
    _keeps_training(model, x, y)


@pytest.mark.parametrize("name", ["imdb_bilstm", "gru_reset_after", pytest.param("gru_reset_before", marks=SLOW),
                                  pytest.param("bi_mul_lstm", marks=SLOW)])
@pytest.mark.parametrize("symmetry", ["fresh", pytest.param("asymmetric", marks=SLOW), "default"])
def test_exact_symmetries(name, symmetry):
    default = inspect.signature(fk.widen).parameters["symmetry"].default
    if symmetry == "default" and default not in EXACT:
        pytest.skip(f"the default symmetry {default!r} does not claim exactness")
    model, x, y = compiled(name)
    before = predict(model, x)
    kw = {} if symmetry == "default" else {"symmetry": symmetry}
    fk.widen(model, {n: None for n in MODELS[name][2]}, **kw)
    assert rel_err(before, predict(model, x)) <= TOL
    _keeps_training(model, x, y)


def test_groups_and_names():
    groups = {g.name: g for g in fk.coupled_groups(imdb_bilstm())}
    assert set(groups) == {"embedding", "bi1/forward", "bi2/forward", "out"}
    assert groups["bi1/forward"].producers == ["bi1/forward", "bi1/backward"]  # the directions keep one width
    assert groups["bi1/forward"].width == 4
    assert set(groups["bi1/forward"].consumers) == {"bi1/forward", "bi1/backward", "bi2/forward", "bi2/backward"}
    assert set(groups["embedding"].consumers) == {"bi1/forward", "bi1/backward"}
    assert not any(groups[n].refused for n in ("embedding", "bi1/forward", "bi2/forward"))
    groups = {g.name: g for g in fk.coupled_groups(gru(True))}
    assert groups["g1"].consumers == ["g1", "g2"]  # its own recurrent kernel, then the next layer
    assert groups["g2"].consumers == ["g2", "fc"]
    assert groups["conv"].consumers == ["g1"]


def test_shapes_and_configs():
    model, x, y = compiled("imdb_bilstm")
    fk.widen(model, {"embedding": [0, 5], "bi1/backward": [1, 1, 3], "bi2/forward": None}, symmetry="none")
    emb, bi1, bi2 = (model.get_layer(n) for n in ("embedding", "bi1", "bi2"))
    assert emb.output_dim == 8 and tuple(emb.embeddings.shape) == (VOCAB, 8)
    for lay in (bi1.forward_layer, bi1.backward_layer):
        cell = lay.cell
        assert (lay.units, cell.units, cell.output_size, list(cell.state_size), lay.state_size) == (
            7, 7, 7, [7, 7], [7, 7])
        assert tuple(cell.kernel.shape) == (8, 28) and tuple(cell.recurrent_kernel.shape) == (7, 28)
        assert tuple(cell.bias.shape) == (28,)
    assert bi2.forward_layer.units == bi2.backward_layer.units == 6
    assert tuple(bi2.forward_layer.cell.kernel.shape) == (14, 24)  # concat of 7 + 7 units in
    assert tuple(model.get_layer("out").kernel.shape) == (12, 1)
    assert model.output.shape[-1] == 1


def test_gru_reset_after_bias():
    model, x, y = compiled("gru_reset_after")
    before = predict(model, x)
    fk.widen(model, {"g1": [0, 4], "g2": [2]}, symmetry="none")
    cell = model.get_layer("g1").cell
    assert tuple(cell.bias.shape) == (2, 21) and tuple(cell.recurrent_kernel.shape) == (7, 21)
    assert model.get_layer("g2").cell.state_size == 4
    assert rel_err(before, predict(model, x)) <= TOL


def _gradient_steps(p_conv, p1, p2):
    """variable path suffix -> [(axis, plan, side)] for gru(): how each gradient is transported."""
    return {
        "conv/kernel": [(2, p_conv, "p")], "conv/bias": [(0, p_conv, "p")],
        "g1/gru_cell/kernel": [(1, p1, "p"), (0, p_conv, "c")],
        "g1/gru_cell/recurrent_kernel": [(1, p1, "p"), (0, p1, "c")],
        "g1/gru_cell/bias": [(1, p1, "p")],
        "g2/gru_cell/kernel": [(1, p2, "p"), (0, p1, "c")],
        "g2/gru_cell/recurrent_kernel": [(1, p2, "p"), (0, p2, "c")],
        "g2/gru_cell/bias": [(1, p2, "p")],
        "fc/kernel": [(0, p2, "c")], "fc/bias": [], "out/kernel": [], "out/bias": [],
    }


def test_gradients_and_adam_slots_transported():
    """The split model's gradients are the original's transported (incoming x ratio, outgoing copied), per
    tensor kind, recurrent kernels included; Adam's slots follow the same rule."""
    model, x, y = compiled("gru_reset_after")
    pc = fastsplit.plan(4, [1, 3], symmetry="none")
    p1 = fastsplit.plan(5, [0, 2, 2], symmetry="none")
    p2 = fastsplit.plan(3, [1], symmetry="none")
    g0 = dict(zip([v.path for v in model.trainable_variables], gradients(model, x, y), strict=True))
    opt = model.optimizer
    m0 = {v.path: opt._momentums[opt._get_variable_index(v)].numpy().copy() for v in model.trainable_variables}
    v0 = {v.path: opt._velocities[opt._get_variable_index(v)].numpy().copy() for v in model.trainable_variables}
    fk.widen(model, {"conv": pc, "g1": p1, "g2": p2})
    g1 = dict(zip([v.path for v in model.trainable_variables], gradients(model, x, y), strict=True))
    steps = _gradient_steps(pc, p1, p2)
    checked = 0
    for path in g0:
        st = next(s for suffix, s in steps.items() if path.endswith(suffix))
        if not st:
            continue

        def move(a, prod, cons, st=st):
            for axis, p, side in st:
                a = fastsplit.split(a, p, axis, role=prod if side == "p" else cons, backend="numpy")
            return a

        np.testing.assert_allclose(g1[path], move(g0[path], "moment1", "copy"), rtol=1e-4, atol=1e-6, err_msg=path)
        v = next(v for v in model.trainable_variables if v.path == path)
        i = opt._get_variable_index(v)
        np.testing.assert_allclose(opt._momentums[i].numpy(), move(m0[path], "moment1", "copy"), rtol=1e-6,
                                   atol=1e-9, err_msg=path)
        np.testing.assert_allclose(opt._velocities[i].numpy(), move(v0[path], "moment2", "copy"), rtol=1e-6,
                                   atol=1e-12, err_msg=path)
        checked += 1
    assert checked == 9
    _keeps_training(model, x, y)


@pytest.mark.parametrize("name", ["imdb_bilstm", "gru_reset_after", pytest.param("simple_rnn", marks=SLOW),
                                  pytest.param("bi_concat_gru", marks=SLOW)])
def test_save_and_load(tmp_path, name):
    model, x, y = compiled(name)
    fk.widen(model, {n: [0, 0, 1] for n in MODELS[name][2]})
    model.train_on_batch(x, y)
    path = str(tmp_path / "rnn.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(predict(loaded, x), predict(model, x), rtol=0, atol=1e-6)
    _keeps_training(loaded, x, y)
    fk.widen(loaded, {MODELS[name][2][1]: [0]})  # and grows again


def test_refusals_name_the_layer_and_leave_the_model_alone():
    inp = keras.Input((T, F), batch_size=4)
    a = L.Dense(4, name="a")(inp)
    h, state_h, _ = L.LSTM(3, return_state=True, return_sequences=True, name="with_state")(a)
    s = L.GRU(3, stateful=True, return_sequences=True, name="keeps_state")(h)
    d = L.LSTM(3, name="from_state")(s, initial_state=[state_h, state_h])
    b = L.Bidirectional(L.GRU(2, return_sequences=True), merge_mode=None, name="split_dirs")(a)
    out = L.Concatenate()([d, L.Flatten()(b[0]), L.Flatten()(b[1])])
    model = keras.Model(inp, L.Dense(2, name="out")(out))
    groups = {g.name: g for g in fk.coupled_groups(model)}
    assert any("return_state" in r and "with_state" in r for r in groups["with_state"].refused)
    assert any("stateful" in r and "keeps_state" in r for r in groups["keeps_state"].refused)
    assert any("initial state" in r and "from_state" in r for r in groups["from_state"].refused)
    assert any("merge_mode=None" in r for r in groups["split_dirs/forward"].refused)
    assert any("return_state" in r for r in groups["a"].refused)  # its consumer returns states
    model.compile(keras.optimizers.Adam(0.01), "mse", run_eagerly=BACKEND != "jax")
    model.optimizer.build(model.trainable_variables)  # slots, without a step (torch cannot train a stateful GRU
    x = inputs(False, n=4)                             # whose state feeds another layer's initial state)
    model.get_layer("keeps_state").reset_state()
    before, out = snapshot(model), predict(model, x)
    for name in ("with_state", "keeps_state", "from_state", "split_dirs/forward", "a"):
        with pytest.raises(ValueError, match=name.split("/")[0]):
            fk.widen(model, {name: None})
    assert_same(before, snapshot(model))
    model.get_layer("keeps_state").reset_state()
    np.testing.assert_array_equal(out, predict(model, x))


def test_units_on_the_time_axis_are_refused():
    inp = keras.Input((T, F))
    h = L.Dense(4, name="a")(inp)
    h = L.Permute((2, 1))(h)  # (batch, 4 units, T): the RNN reads the units as time steps
    model = keras.Model(inp, L.Dense(2, name="out")(L.LSTM(3, name="lstm")(h)))
    groups = {g.name: g for g in fk.coupled_groups(model)}
    assert any("lstm" in r and "axis" in r for r in groups["a"].refused)
    assert groups["lstm"].splittable


@pytest.mark.slow
def test_split_every_grows_the_lstm_inside_fit():
    inp = keras.Input((T,), dtype="int32")
    h = L.Embedding(VOCAB, 4, name="emb")(inp)
    h = L.LSTM(3, name="lstm")(h)
    model = keras.Model(inp, L.Dense(2, activation="softmax", name="out")(h))
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy", metrics=["accuracy"])
    x = inputs(True, n=32)
    y = (x[:, 0] % 2).astype("int64")
    cb = fk.SplitEvery(epochs=1, start_from_epoch=1, layers=["lstm"], symmetry="none", verbose=0)
    hist = model.fit(x, y, epochs=3, batch_size=16, callbacks=[cb], verbose=0)
    assert model.get_layer("lstm").units > 3
    assert tuple(model.get_layer("lstm").cell.recurrent_kernel.shape) == (model.get_layer("lstm").units,
                                                                           4 * model.get_layer("lstm").units)
    assert [list(e.layers) for e in fk.history(model)][0] == ["lstm"]
    assert np.all(np.isfinite(hist.history["loss"]))


def test_prune_and_merge_refuse_recurrent_groups_and_leave_the_model_alone():
    """Splitting recurrent units is exact; removing them is not implemented: refused by name, nothing changes."""
    inp = keras.Input((5, 3))
    h = keras.layers.Dense(4, name="pre")(inp)
    h = keras.layers.LSTM(3, name="lstm")(h)
    model = keras.Model(inp, keras.layers.Dense(2, name="out")(h))
    x = np.random.default_rng(0).standard_normal((8, 5, 3)).astype("float32")
    before = [w.copy() for w in model.get_weights()]
    for name in ("lstm", "pre"):
        with pytest.raises(fk.GrowthError, match="recurrent"):
            fk.prune(model, {name: [0]}, data=x)
    with pytest.raises(fk.GrowthError, match="recurrent"):
        fk.merge_twins(model, layers=["lstm"])
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
