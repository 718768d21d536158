"""score="splitting": the splitting matrix of Splitting Steepest Descent (Liu et al. 2019) and splits along its
eigenvectors, against a numpy reference and a finite difference of the loss; ReLU refused; bad input changes nothing."""

from __future__ import annotations

import numpy as np
import pytest

from fastsplit.keras import GrowthError
from fastsplit.keras._scores import check_score
from fastsplit.keras.splitting import (
    split_along,
    split_by_curvature,
    splitting_matrices,
    splitting_scores,
)

keras = pytest.importorskip("keras")
L = keras.layers


def tiny(d=3, units=4, act="tanh", out=2):
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((d,)), L.Dense(units, activation=act, name="h"), L.Dense(out, name="out")])
    model.compile(optimizer="adam", loss="mse")
    # larger weights than the initialiser's, so that tanh'' is far from 0
    rng = np.random.default_rng(3)
    h, o = model.get_layer("h"), model.get_layer("out")
    h.kernel.assign(rng.standard_normal((d, units)).astype("float32"))
    h.bias.assign(rng.standard_normal(units).astype("float32") * 0.5)
    o.kernel.assign(rng.standard_normal((units, out)).astype("float32"))
    return model


def batch(n=16, d=3, out=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype("float32"), rng.standard_normal((n, out)).astype("float32")


def weights(model):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in model.weights]


def np_loss(w1, b1, w2, b2, x, y, act=np.tanh):
    return np.mean((act(x @ w1 + b1) @ w2 + b2 - y) ** 2)


def model_loss(model, x, y):
    """The mse of a tanh MLP from its weights, in float64."""
    return np_loss(*(a.astype(np.float64) for a in weights(model)), x.astype(np.float64), y.astype(np.float64))


def reference(model, x, y):
    """S_i from the chain rule in float64 numpy (mse: dL/dy_pred = 2 (y_pred - y) / (N * out))."""
    w1, b1, w2, b2 = (a.astype(np.float64) for a in weights(model))
    x, y = x.astype(np.float64), y.astype(np.float64)
    z = x @ w1 + b1
    t = np.tanh(z)
    g = (2 * (t @ w2 + b2 - y) / y.size) @ w2.T
    xt = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    return np.einsum("ni,na,nb->iab", g * (-2 * t * (1 - t * t)), xt, xt)


def test_matrix_matches_numpy_and_the_loss_second_difference():
    model = tiny()
    x, y = batch()
    s = splitting_matrices(model, model.get_layer("h"), x, y)
    ref = reference(model, x, y)
    np.testing.assert_allclose(s, ref, rtol=1e-4, atol=1e-6)
    # the loss of the split network (theta +- eps v, halved outgoing weights) moves by eps^2/2 v^T S v
    w1, b1, w2, b2 = (a.astype(np.float64) for a in weights(model))
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    base = np_loss(w1, b1, w2, b2, xd, yd)
    rng = np.random.default_rng(1)
    eps = 1e-3
    for i in range(4):
        v = rng.standard_normal(4)
        v /= np.linalg.norm(v)
        w1s = np.concatenate([w1, w1[:, i:i + 1]], axis=1)
        b1s = np.concatenate([b1, b1[i:i + 1]])
        w1s[:, i] += eps * v[:3]
        b1s[i] += eps * v[3]
        w1s[:, -1] -= eps * v[:3]
        b1s[-1] -= eps * v[3]
        w2s = np.concatenate([w2, w2[i:i + 1] / 2], axis=0)
        w2s[i] /= 2
        change = np_loss(w1s, b1s, w2s, b2, xd, yd) - base
        np.testing.assert_allclose(change / (eps**2 / 2), v @ ref[i] @ v, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("d,n", [(3, 16), (6, 4)])  # (d+1)^2 matrices, and the QR form for N < d + 1
def test_scores_are_the_smallest_eigenpairs(d, n):
    model = tiny(d=d)
    x, y = batch(n=n, d=d)
    layer = model.get_layer("h")
    lam, vec = splitting_scores(model, layer, x, y)
    ref = reference(model, x, y)
    for i in range(4):
        e = np.linalg.eigvalsh(ref[i])
        assert lam[i] == pytest.approx(min(e[0], 0.0) if n < d + 1 else e[0], abs=1e-6)
        assert np.linalg.norm(vec[:, i]) == pytest.approx(1.0)
        assert vec[:, i] @ ref[i] @ vec[:, i] == pytest.approx(lam[i], abs=1e-6)
    score = check_score("splitting", (x, y))
    np.testing.assert_allclose(score(layer, model), -lam)
    np.testing.assert_allclose(score.directions["h"], vec)


def test_chosen_units_and_directions_lower_the_loss_more_than_random_ones():
    model = tiny(d=5, units=6)
    x, y = batch(n=32, d=5)
    before = model_loss(model, x, y)
    lam, vec = splitting_scores(model, model.get_layer("h"), x, y)
    assert lam.min() < 0
    units = np.argsort(lam)[:2]
    w0 = weights(model)
    rand = []
    for seed in range(3):  # the same units along random directions
        m = tiny(d=5, units=6)
        for v, w in zip(m.weights, w0):
            v.assign(w)
        split_along(m, "h", units, np.random.default_rng(seed).standard_normal((6, 2)), eps=0.05)
        rand.append(model_loss(m, x, y))
    event, lam2 = split_by_curvature(model, "h", (x, y), count=2, eps=0.05)
    np.testing.assert_allclose(lam2, lam)
    after = model_loss(model, x, y)
    assert event.params_after > event.params_before
    assert model.get_layer("h").kernel.shape == (5, 8)
    assert after < before
    assert after < min(rand)
    # second order: about eps^2 |theta|^2 lambda / 2 summed over the split units
    w1, b1 = w0[0].astype(np.float64), w0[1].astype(np.float64)
    theta2 = np.sum(w1 ** 2, axis=0) + b1 ** 2
    predicted = np.sum(0.05 ** 2 * theta2[units] * lam[units] / 2)
    assert after - before == pytest.approx(predicted, rel=0.3)


def test_relu_is_refused_and_changes_nothing():
    model = tiny(act="relu")
    x, y = batch()
    w0 = weights(model)
    with pytest.raises(GrowthError, match="smooth activation.*relu"):
        splitting_scores(model, model.get_layer("h"), x, y)
    with pytest.raises(GrowthError, match="smooth activation"):
        split_by_curvature(model, "h", (x, y), count=1)
    with pytest.raises(GrowthError, match="targets"):
        check_score("splitting", x)
    with pytest.raises(GrowthError, match="needs a probe"):
        check_score("splitting", None)
    assert model.get_layer("h").kernel.shape == (3, 4)
    for a, b in zip(w0, weights(model)):
        np.testing.assert_array_equal(a, b)


BAD = [
    (dict(units=[0, 0], directions=np.ones((4, 2))), "distinct"),
    (dict(units=[4], directions=np.ones((4, 1))), "distinct"),
    (dict(units=[1.0], directions=np.ones((4, 1))), "distinct"),
    (dict(units=[1], directions=np.ones((3, 1))), "shape"),
    (dict(units=[1], directions=np.full((4, 1), np.nan)), "finite"),
    (dict(units=[1], directions=np.zeros((4, 4))), "nonzero"),
    (dict(units=[1], directions=np.ones((4, 1)), eps=-1.0), "eps"),
    (dict(units=[1], directions=np.ones((4, 1)), eps=float("inf")), "eps"),
]


def test_bad_input_leaves_the_model_bit_identical():
    model = tiny()
    x, y = batch()
    model.fit(x, y, epochs=1, verbose=0)  # optimizer slots exist and are nonzero
    w0 = weights(model)
    o0 = [np.array(keras.ops.convert_to_numpy(v)) for v in model.optimizer.variables]
    for kwargs, match in BAD:
        with pytest.raises(GrowthError, match=match):
            split_along(model, "h", **kwargs)
    with pytest.raises(GrowthError, match="no layer"):
        split_along(model, "nope", [0], np.ones((4, 1)))
    with pytest.raises(GrowthError, match="count"):
        split_by_curvature(model, "h", (x, y), count=5)
    for a, b in zip(w0, weights(model)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(o0, [np.array(keras.ops.convert_to_numpy(v)) for v in model.optimizer.variables]):
        np.testing.assert_array_equal(a, b)


def test_a_callback_splits_the_units_with_the_most_negative_curvature():
    from fastsplit.keras import SplitEvery

    model = tiny(d=5, units=4)
    x, y = batch(n=32, d=5)
    probe = (x[:16], y[:16])
    lam, _ = splitting_scores(model, model.get_layer("h"), *probe)
    cb = SplitEvery(epochs=1, select=1, score="splitting", probe=probe, layers=["h"], symmetry="none")
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[cb])
    # one unit split into two exact copies: the new unit repeats the incoming weights of the best-ranked one
    k = weights(model)[0]
    assert k.shape == (5, 5)
    twin = [u for u in range(4) if np.array_equal(k[:, u], k[:, 4])]
    lam_end = cb._score.eigenvalues["h"]  # ranked after the epoch's step
    assert twin == [int(np.argmin(lam_end))]
    assert lam.shape == lam_end.shape


def test_functional_models_match_and_a_skip_around_the_layer_is_refused():
    seq = tiny(d=5, units=4)
    x, y = batch(n=8, d=5)
    i = keras.Input((5,))
    o = L.Dense(2, name="out")(L.Dense(4, activation="tanh", name="h")(i))
    fn = keras.Model(i, o)
    fn.compile(optimizer="adam", loss="mse")
    fn.set_weights(seq.get_weights())
    np.testing.assert_allclose(splitting_scores(fn, fn.get_layer("h"), x, y)[0],
                               splitting_scores(seq, seq.get_layer("h"), x, y)[0], rtol=1e-6, atol=1e-9)
    i = keras.Input((5,))
    o = L.Dense(2, name="out")(L.Add()([L.Dense(5, activation="tanh", name="h")(i), i]))
    skip = keras.Model(i, o)
    skip.compile(optimizer="adam", loss="mse")
    with pytest.raises(GrowthError, match="only through layer 'h'"):
        splitting_scores(skip, skip.get_layer("h"), x, y)
