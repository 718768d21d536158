"""The symmetries that let Adam separate copies: ``"direction"`` and ``"fresh"`` (issue 12).

Under Adam a copy's gradient is the original's times ``r_j`` and Adam's step
ignores that factor, so plain, nudged or lightly noised copies stay twins.
``"direction"`` moves every copy of a unit along one shared random direction
with coefficients ``c_j`` that satisfy ``sum_j r_j c_j = 0`` (the function
changes at second order); ``"fresh"`` adds new units with fresh incoming
weights and zero outgoing weights (the function does not change).

Checked here: the plans (coefficients, ratios, defaults, determinism); every
backend against the numpy reference (numba, and ``kernels/split.cu`` built
with g++ behind a stand-in CuPy); the bounds on a small numpy MLP; what the
optimizer-slot roles do with a ``"fresh"`` plan.
"""

import dataclasses
import sys

import numpy as np
import pytest
from fs_testing import CPU_BACKENDS, DTYPES, as_dtype
from test_cupy_backend import FakeCupy, assert_noise_close, host_kernel  # noqa: F401 - host_kernel is a fixture

from fastsplit import Job, SplitError, SplitPlan, _config, _noise, _reference, plan, split, split_many
from fastsplit.backends import cupy_cuda

#: sup |tanh''| = 4 / (3 sqrt 3), at tanh(z) = 1/sqrt(3)
TANH2 = 4 / (3 * np.sqrt(3))

ROLES = ["incoming", "bias", "outgoing", "copy", "moment1", "moment2"]


def _mlp(seed=0, n_in=20, hidden=16, n_out=5, samples=2048):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, n_in))
    w1 = rng.standard_normal((n_in, hidden)) * np.sqrt(2 / (n_in + hidden))
    b1 = rng.standard_normal(hidden) * 0.1
    w2 = rng.standard_normal((hidden, n_out)) * np.sqrt(2 / (hidden + n_out))
    b2 = rng.standard_normal(n_out) * 0.1
    return x, w1, b1, w2, b2


def _relu(z):
    return np.maximum(z, 0.0)


def _widen(p, w1, b1, w2, backend="numpy"):
    """The hidden layer of a 2-layer MLP split by ``p``: incoming kernel, bias, outgoing kernel."""
    w1s, b1s, w2s = split_many([Job(w1, p, 1, "incoming"), Job(b1, p, 0, "bias"), Job(w2, p, 0, "outgoing")],
                               backend=backend)
    return w1s, b1s, w2s


def _shifts(p, w1, w1s):
    """``w1s[:, j] - w1[:, src[j]]``: how far each new unit's incoming weights moved."""
    return w1s - w1[:, p.src]


# -- plans ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(width=6, neurons=[1, 1, 1, 4]),  # unit 1 repeated 3 times: 4 copies; unit 4: 2
    dict(width=5, neurons=[0, 2], copies=3, ratios=[0.5, 0.3, 0.2]),
    dict(width=4, neurons=[3], ratios=[0.7, 0.3]),
    dict(width=4, copies=5, ratios=[0.05, 0.1, 0.15, 0.3, 0.4]),
    dict(width=7, neurons=[2, 2, 5], copies=3),  # 5 copies and 3 copies
])
def test_direction_coefficients_cancel_with_the_ratios(kwargs):
    p = plan(symmetry="direction", **kwargs)
    c = p.direction
    np.testing.assert_allclose(np.bincount(p.src, p.ratio * c, minlength=p.width), 0.0, atol=1e-15)
    counts = p.counts
    assert np.all(c[counts[p.src] == 1] == 0)  # a unit that is not split does not move
    for u in np.flatnonzero(counts > 1):
        cu = c[p.src == u]
        assert len(np.unique(cu)) == counts[u]  # every copy of u at its own place along the direction
        assert cu.max() - cu.min() == pytest.approx(2.0)  # the nudge pattern's spread, whatever the ratios
    if kwargs.get("ratios") is None:  # equal shares: the nudge pattern itself (+1 ... -1)
        k = counts[p.src]
        multi = k > 1
        first = {}
        number = np.array([first.setdefault(s, []).append(j) or len(first[s]) - 1 for j, s in enumerate(p.src)])
        np.testing.assert_allclose(c[multi], 1 - 2 * number[multi] / (k[multi] - 1), atol=1e-15)


def test_direction_and_fresh_plans_and_their_defaults():
    d = plan(4, [1, 3], symmetry="direction")
    assert d.sigma == 0.1 and d.seed == 0 and np.all(d.offset == 0)  # eps defaults to 0.1, kept in sigma
    np.testing.assert_array_equal(d.ratio, [1, 0.5, 1, 0.5, 0.5, 0.5])
    assert plan(4, symmetry="direction", eps=0.3, seed=5).sigma == 0.3
    assert plan(4, symmetry="direction", eps=0).new_width == 8
    f = plan(4, [1, 3, 3], symmetry="fresh")
    assert f.sigma == 1.0 and f.seed == 0 and np.all(f.offset == 0)
    np.testing.assert_array_equal(f.src, [0, 1, 2, 3, 1, 3, 3])
    np.testing.assert_array_equal(f.ratio, [1, 1, 1, 1, 0, 0, 0])  # the original keeps everything
    assert plan(4, symmetry="fresh", sigma=0.5).sigma == 0.5
    # the other symmetries keep their defaults
    assert plan(4).offset[0] == pytest.approx(1e-3) and plan(4, symmetry="noise").sigma == 0.01
    assert plan(4, symmetry="nudge", sigma=None, eps=None).offset[0] == pytest.approx(1e-3)
    # a plan made by hand, embedded, or expanded keeps what it is
    e = f.embed(9, 2)
    assert e.symmetry == "fresh" and e.ratio[f.is_copy.nonzero()[0][0] + 2] == 0
    assert SplitPlan(2, [0, 1, 1], [1.0, 1.0, 0.0], np.zeros(3), "fresh", 1.0, 0).new_width == 3
    assert repr(d).endswith("symmetry='direction')")


def test_fresh_plans_refuse_shares_that_would_change_the_function():
    with pytest.raises(SplitError, match="ratios cannot be given with symmetry='fresh'"):
        plan(3, [0], ratios=[0.5, 0.5], symmetry="fresh")
    with pytest.raises(SplitError, match=r"new unit 1 has ratio 0.5"):
        SplitPlan(2, [0, 1, 1], [1.0, 0.5, 0.5], np.zeros(3), "fresh", 1.0, 0)
    with pytest.raises(SplitError, match="ratios must be positive"):  # zero shares are for fresh units only
        SplitPlan(2, [0, 1, 1], [1.0, 1.0, 0.0], np.zeros(3), "none")
    with pytest.raises(SplitError, match="eps of symmetry='direction' must be at least 0"):
        plan(3, symmetry="direction", eps=-0.1)


# -- every backend gives the reference's numbers ----------------------------------------------------------


def _jobs(x2, x4, p, q):
    """One- and two-axis jobs over every role: a Dense kernel, a bias, a conv kernel, a layer between two splits."""
    n, m2 = p.width, q.width
    assert x2.shape == (m2, n) and x4.shape[-1] == n
    jobs = [Job(x2, p, 1, role) for role in ROLES]
    jobs += [Job(x2[0], p, 0, "bias"), Job(x4, p, 3, "incoming"), Job(x4, p, 3, "moment2"),
             Job(x2, q, 0, "outgoing", also=(p, 1, "incoming")),  # rows first, then the directions
             Job(x2, p, 1, "incoming", also=(q, 0, "outgoing")),  # directions first
             Job(x2, p, 1, "incoming", also=(q, 0, "incoming")),  # draws on both axes
             Job(x2, q, 0, "moment1", also=(p, 1, "moment2")),
             Job(x2.T.copy(), p, 0, "outgoing", also=(q, 1, "bias"))]
    return jobs


def _data(dtype, symmetry, seed=3):
    rng = np.random.default_rng(seed)
    p = plan(37, np.r_[rng.integers(0, 37, 12), [5, 5, 5]], symmetry=symmetry, seed=11,
             **({"eps": 0.3} if symmetry == "direction" else {}))
    q = plan(23, [0, 7, 7, 22], symmetry=symmetry, seed=12)
    x2 = rng.standard_normal((23, 37)).astype(as_dtype(dtype))
    x4 = rng.standard_normal((3, 3, 4, 37)).astype(as_dtype(dtype))
    return _jobs(x2, x4, p, q)


def _close(got, want, dtype):
    """The reference's numbers: bit for bit without draws; within an ulp of the draws (log and cos differ)."""
    got = np.asarray(got)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert_noise_close(got.astype(np.float64), want.astype(np.float64), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetry", ["direction", "fresh"])
def test_numba_gives_the_reference(symmetry, dtype):
    if "numba" not in CPU_BACKENDS:
        pytest.skip("numba is not installed")
    jobs = _data(dtype, symmetry)
    want = split_many(jobs, backend="numpy")
    got = split_many(jobs, backend="numba")
    for g, w, j in zip(got, want, jobs, strict=True):
        _close(g, w, dtype)
        if not (j.role == "incoming" or (j.also and j.also[2] == "incoming")):
            np.testing.assert_array_equal(g, w)  # no draws: bit for bit
    again = split_many(jobs, backend="numba")
    for a, g in zip(again, got, strict=True):
        np.testing.assert_array_equal(a, g)  # deterministic


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetry", ["direction", "fresh"])
def test_cuda_kernel_source_gives_the_reference(host_kernel, monkeypatch, symmetry, dtype):  # noqa: F811
    """cupy_cuda.run with a stand-in CuPy launching kernels/split.cu built with g++, on the tasks of real jobs."""
    from fastsplit._gather import _check, _prepare
    from fastsplit.interop import Native

    launch, threads, items = host_kernel
    fake = FakeCupy(launch, threads, items)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(cupy_cuda, "_kernels", {})
    monkeypatch.setattr(cupy_cuda, "_modules", {})
    monkeypatch.setattr(cupy_cuda, "_fatbin", lambda threads, items: None)
    monkeypatch.setattr(_config, "CUDA_THREADS_PER_BLOCK", threads)
    monkeypatch.setattr(_config, "CUDA_VECTORS_PER_THREAD", items)
    monkeypatch.setattr(_config, "CUDA_MAX_BLOCKS", 3)
    storage = np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)
    tasks, wants = [], []
    for j in _data(dtype, symmetry):
        native = Native(j.x, "numpy", ("cpu", 0))
        task = _prepare(j, native, _check(j, native, 0, False)).task
        want = np.empty_like(task.out)
        _reference.run([dataclasses.replace(task, out=want)])
        task.x = np.ascontiguousarray(task.x.view(storage)).view(FakeCupy.ndarray)
        task.out = np.zeros(task.out.shape, storage).view(FakeCupy.ndarray)
        tasks.append(task)
        wants.append(want)
    assert any(t.noise_by_source for t in tasks) == (symmetry == "direction")
    assert any(t.rows is not None and t.rows.noise_by_source for t in tasks) == (symmetry == "direction")
    cupy_cuda.run(tasks)
    for t, want in zip(tasks, wants, strict=True):
        _close(np.asarray(t.out).view(as_dtype(dtype)), want, dtype)


def test_draws_are_the_generators_at_the_source_index():
    """"direction": copy j of unit u gets ``sigma * c_j * rms(w_u) * gauss(key, (o*n + u)*inner + i)``."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 5))
    p = plan(5, [1, 1, 3], symmetry="direction", eps=0.25, seed=9)
    got = split(w, p, 1, backend="numpy")
    o = np.arange(6)[:, None]
    draws = _noise.gauss(p.noise_key, (o * 5 + p.src[None, :]).astype(np.uint64))
    rms = np.sqrt((w**2).mean(axis=0))
    np.testing.assert_allclose(got, w[:, p.src] + 0.25 * p.direction * rms[p.src] * draws, rtol=1e-15, atol=1e-15)
    f = plan(5, [1, 1, 3], symmetry="fresh", sigma=0.5, seed=9)
    got = split(w, f, 1, backend="numpy")
    m = f.new_width
    draws = _noise.gauss(f.noise_key, (o * m + np.arange(m)[None, :]).astype(np.uint64))
    fresh = f.is_copy
    np.testing.assert_array_equal(got[:, ~fresh], w)
    np.testing.assert_allclose(got[:, fresh], 0.5 * w.std(axis=0)[f.src[fresh]] * draws[:, fresh], rtol=1e-15)


def test_same_seed_same_units_other_seed_other_units(cpu_backend):
    w = np.random.default_rng(2).standard_normal((30, 8)).astype(np.float32)
    for symmetry in ("direction", "fresh"):
        a = split(w, plan(8, [0, 5], symmetry=symmetry, seed=4), backend=cpu_backend)
        b = split(w, plan(8, [0, 5], symmetry=symmetry, seed=4), backend=cpu_backend)
        c = split(w, plan(8, [0, 5], symmetry=symmetry, seed=5), backend=cpu_backend)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a[:, 8:], c[:, 8:])


# -- "direction": the bound -------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, dict(neurons=[1, 1, 1, 4, 7]), dict(ratios=[0.7, 0.3]),
                                    dict(neurons=[2, 9], copies=3, ratios=[0.5, 0.3, 0.2])])
def test_direction_changes_a_tanh_mlp_at_second_order(kwargs):
    x, w1, b1, w2, b2 = _mlp()
    y = np.tanh(x @ w1 + b1) @ w2 + b2
    change = {}
    for eps in (0.1, 0.05, 0.025):
        p = plan(16, symmetry="direction", eps=eps, seed=1, **kwargs)
        w1s, b1s, w2s = _widen(p, w1, b1, w2)
        np.testing.assert_array_equal(b1s, b1[p.src])  # the bias is copied, not offset
        z = x @ w1 + b1
        t = x @ _shifts(p, w1, w1s)  # how far each copy's pre-activation moved
        # the first-order term cancels: sum over the copies of each unit of r_j t_j is 0
        first = np.zeros((x.shape[0], 16))
        np.add.at(first.T, p.src, (p.ratio * t).T)
        assert np.abs(first).max() < 1e-12 * np.abs(t).max()
        # Taylor with Lagrange remainder: |sum_j r_j tanh(z + t_j) - tanh(z)| <= sup|tanh''| / 2 sum_j r_j t_j**2
        gap = np.zeros((x.shape[0], 16))
        np.add.at(gap.T, p.src, (p.ratio * np.tanh(z[:, p.src] + t)).T)
        gap -= np.tanh(z)
        bound = np.zeros((x.shape[0], 16))
        np.add.at(bound.T, p.src, (p.ratio * t**2).T)
        assert np.all(np.abs(gap) <= TANH2 / 2 * bound + 1e-14)
        ys = np.tanh(x @ w1s + b1s) @ w2s + b2
        assert np.all(np.abs(ys - y) <= TANH2 / 2 * bound @ np.abs(w2) + 1e-12)
        change[eps] = np.abs(ys - y)
    for big, small in ((0.1, 0.05), (0.05, 0.025)):  # halving eps quarters the change
        assert 3.5 < change[big].mean() / change[small].mean() < 4.5
        assert 3.2 < change[big].max() / change[small].max() < 4.5


def test_direction_changes_a_relu_mlp_only_where_a_copy_changes_sign():
    x, w1, b1, w2, b2 = _mlp(seed=4)
    y = _relu(x @ w1 + b1) @ w2 + b2
    mean = {}
    for eps in (0.1, 0.05, 0.025):
        p = plan(16, [0, 3, 3, 3, 8, 11, 15], symmetry="direction", eps=eps, seed=2)
        w1s, b1s, w2s = _widen(p, w1, b1, w2)
        ys = _relu(x @ w1s + b1s) @ w2s + b2
        z = x @ w1 + b1
        t = x @ _shifts(p, w1, w1s)
        crossing = np.sign(z[:, p.src]) != np.sign(z[:, p.src] + t)  # (sample, new unit)
        touched = np.zeros((x.shape[0], 16), dtype=bool)
        np.logical_or.at(touched.T, p.src, crossing.T)
        exact = ~touched.any(axis=1)
        assert exact.mean() > 0.5
        np.testing.assert_allclose(ys[exact], y[exact], rtol=0, atol=1e-13)  # linear pieces: exact
        worst = np.zeros((x.shape[0], 16))
        np.add.at(worst.T, p.src, (p.ratio * np.abs(t) * crossing).T)
        assert np.all(np.abs(ys - y) <= worst @ np.abs(w2) + 1e-13)
        mean[eps] = np.abs(ys - y).mean()
    assert 3 < mean[0.1] / mean[0.05] < 5 and 3 < mean[0.05] / mean[0.025] < 5  # O(eps**2) on average


def test_direction_on_both_axes_of_a_middle_layer_keeps_the_second_order():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1024, 12))
    w1, w2, w3 = (rng.standard_normal(s) / np.sqrt(s[0]) for s in ((12, 10), (10, 9), (9, 3)))
    b1, b2 = rng.standard_normal(10) * 0.1, rng.standard_normal(9) * 0.1

    def f(w1, b1, w2, b2, w3):
        return np.tanh(np.tanh(x @ w1 + b1) @ w2 + b2) @ w3

    y = f(w1, b1, w2, b2, w3)
    change = []
    for eps in (0.04, 0.02):
        p = plan(10, [0, 4, 4, 9], symmetry="direction", eps=eps, seed=1)
        q = plan(9, [2, 5, 5], symmetry="direction", eps=eps, seed=2)
        w1s, b1s, w2s, b2s, w3s = split_many([
            Job(w1, p, 1, "incoming"), Job(b1, p, 0, "bias"),
            Job(w2, p, 0, "outgoing", also=(q, 1, "incoming")), Job(b2, q, 0, "bias"), Job(w3, q, 0, "outgoing")])
        change.append(np.abs(f(w1s, b1s, w2s, b2s, w3s) - y).mean())
    assert 3.5 < change[0] / change[1] < 4.5


def test_direction_separates_the_copies_by_about_eps():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((400, 12)) * 0.05 + 0.01  # an incoming kernel of 400 inputs (a small mean)
    for eps in (0.1, 0.3):
        p = plan(12, [2, 2, 2, 7], symmetry="direction", eps=eps, seed=3)
        ws = split(w, p, 1)
        shift = _shifts(p, w, ws)
        c = p.direction
        norm = np.linalg.norm(w[:, p.src], axis=0)
        moved = c != 0
        sep = np.linalg.norm(shift, axis=0)[moved] / norm[moved]
        np.testing.assert_allclose(sep, eps * np.abs(c[moved]), rtol=0.12)  # ||w_j - w_u|| / ||w_u|| ~ eps |c_j|
        assert np.all(shift[:, ~moved] == 0)
        # one direction per unit: every copy's shift is c_j times the same vector
        for u in (2, 7):
            js = np.flatnonzero((p.src == u) & moved)
            d = shift[:, js] / c[js]
            np.testing.assert_allclose(d, np.repeat(d[:, :1], len(js), axis=1), rtol=1e-9, atol=1e-15)
        d2, d7 = shift[:, p.src == 2][:, 0], shift[:, p.src == 7][:, 0]
        assert abs(d2 @ d7) / (np.linalg.norm(d2) * np.linalg.norm(d7)) < 0.2  # units get their own directions
        # a pair of copies ends 2 eps apart
        pair = np.flatnonzero(p.src == 7)
        gap = np.linalg.norm(ws[:, pair[0]] - ws[:, pair[1]]) / np.linalg.norm(w[:, 7])
        assert gap == pytest.approx(2 * eps, rel=0.12)


def test_direction_is_shared_by_the_copies_after_a_split_of_the_rows_too():
    """A two-axis job (the rows split first or second): the copies of a unit still move along one vector."""
    rng = np.random.default_rng(10)
    w = rng.standard_normal((40, 6))
    rows = plan(40, [1, 30, 30], symmetry="none")
    p = plan(6, [0, 4, 4], symmetry="direction", eps=0.2, seed=7)
    plain = split(w, rows, 0, role="outgoing", also=(p, 1, "copy"))
    for job in (Job(w, rows, 0, "outgoing", also=(p, 1, "incoming")), Job(w, p, 1, "incoming", also=(rows, 0, "outgoing"))):
        got = split_many([job])[0]
        shift = got - plain
        c = p.direction
        for u in (0, 4):
            js = np.flatnonzero((p.src == u) & (c != 0))  # the middle one of 3 copies stays (c = 0)
            d = shift[:, js] / c[js]
            np.testing.assert_allclose(d, np.repeat(d[:, :1], len(js), axis=1), rtol=1e-9, atol=1e-15)
        assert np.all(shift[:, c == 0] == 0)


# -- "fresh": exact ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", [np.tanh, _relu], ids=["tanh", "relu"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fresh_units_leave_the_mlp_unchanged(act, dtype, cpu_backend):
    x, w1, b1, w2, b2 = (a.astype(dtype) for a in _mlp(seed=5))
    p = plan(16, [0, 3, 3, 3, 8, 15], symmetry="fresh", seed=6)
    w1s, b1s, w2s = _widen(p, w1, b1, w2, backend=cpu_backend)
    fresh = p.is_copy
    # the originals keep every bit; the fresh units' outgoing rows and biases are zeros
    np.testing.assert_array_equal(w1s[:, ~fresh], w1)
    np.testing.assert_array_equal(b1s[~fresh], b1)
    np.testing.assert_array_equal(w2s[~fresh], w2)
    assert np.all(w2s[fresh] == 0) and np.all(b1s[fresh] == 0)
    assert np.all(w1s[:, fresh] != 0)
    # the next layer's input, summed unit by unit in order: the fresh terms add exact zeros
    h, hs = act(x @ w1 + b1), act(x @ w1s + b1s)
    np.testing.assert_array_equal(hs[:, ~fresh], h)

    def layer(h, w):
        acc = np.zeros((h.shape[0], w.shape[1]), dtype)
        for u in range(w.shape[0]):
            acc += h[:, u : u + 1] * w[u]
        return acc + b2

    np.testing.assert_array_equal(layer(hs, w2s), layer(h, w2))  # bit for bit
    tol = 1e-5 if dtype == "float32" else 1e-13
    np.testing.assert_allclose(hs @ w2s + b2, h @ w2 + b2, rtol=tol, atol=tol)  # BLAS: the order of a sum


def test_fresh_weights_are_at_the_scale_of_the_source_column():
    rng = np.random.default_rng(12)
    scales = np.array([0.02, 0.5, 3.0, 0.1])
    w = rng.standard_normal((500, 4)) * scales + 1.0  # a mean that "fresh" does not copy
    for sigma in (1.0, 0.25):
        p = plan(4, [0, 1, 2, 2], symmetry="fresh", sigma=sigma, seed=1)
        ws = split(w, p, 1)
        fresh = np.flatnonzero(p.is_copy)
        std = w.std(axis=0)[p.src[fresh]]
        np.testing.assert_allclose(ws[:, fresh].std(axis=0), sigma * std, rtol=0.1)
        assert np.all(np.abs(ws[:, fresh].mean(axis=0)) < 0.2 * sigma * std)
        a, b = ws[:, fresh[2]], ws[:, fresh[3]]  # two fresh units of one source differ
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.2


def test_fresh_optimizer_slots_through_the_ratio_powers(cpu_backend):
    """moment1/moment2/outgoing: zero for fresh units, the originals unchanged; copy: the source's."""
    rng = np.random.default_rng(13)
    p = plan(5, [1, 1, 4], symmetry="fresh", seed=2)
    fresh = p.is_copy
    m_in, v_in = rng.standard_normal((7, 5)), rng.random((7, 5))  # producing side (incoming kernel)
    m_out, v_out = rng.standard_normal((5, 3)), rng.random((5, 3))  # consuming side (outgoing kernel)
    got = split_many([Job(m_in, p, 1, "moment1"), Job(v_in, p, 1, "moment2"), Job(m_out, p, 0, "copy"),
                      Job(v_out, p, 0, "copy"), Job(m_out, p, 0, "moment1"), Job(v_out, p, 0, "moment2"),
                      Job(v_in, p, 1, "copy")], backend=cpu_backend)
    for a, x in ((got[0], m_in), (got[1], v_in), (got[6], v_in)):
        np.testing.assert_array_equal(a[:, ~fresh], x)
    assert np.all(got[0][:, fresh] == 0) and np.all(got[1][:, fresh] == 0)  # no history for new weights
    np.testing.assert_array_equal(got[6][:, fresh], v_in[:, p.src[fresh]])
    for a, x in ((got[2], m_out), (got[3], v_out), (got[4], m_out), (got[5], v_out)):
        np.testing.assert_array_equal(a[~fresh], x)
    np.testing.assert_array_equal(got[2][fresh], m_out[p.src[fresh]])  # "copy": the source's momentum
    assert np.all(got[4][fresh] == 0) and np.all(got[5][fresh] == 0)  # "moment1"/"moment2": none


def test_fresh_units_in_a_layer_between_two_fresh_splits(cpu_backend):
    """The kernel between two fresh splits: fresh inputs feed no old unit; fresh units read every input.

    Rows first (the job's order), the fresh columns are drawn over the fresh rows too (fresh units
    reading fresh units); columns first, the fresh rows are then zeroed. Both keep the function: the
    old units never see a fresh input, and a fresh unit's own outputs are multiplied by zero.
    """
    rng = np.random.default_rng(14)
    w = rng.standard_normal((6, 9)).astype(np.float32)
    p, q = plan(6, [2, 5], symmetry="fresh", seed=1), plan(9, [0, 0, 8], symmetry="fresh", seed=2)
    fp, fq = p.is_copy, q.is_copy
    for rows_first in (True, False):
        job = (Job(w, p, 0, "outgoing", also=(q, 1, "incoming")) if rows_first
               else Job(w, q, 1, "incoming", also=(p, 0, "outgoing")))
        got = split_many([job], backend=cpu_backend)[0]
        _close(got, split_many([job], backend="numpy")[0], "float32")
        np.testing.assert_array_equal(got[np.ix_(~fp, ~fq)], w)
        assert np.all(got[np.ix_(fp, ~fq)] == 0)
        assert np.all(got[np.ix_(~fp, fq)] != 0)
        assert np.all(got[np.ix_(fp, fq)] != 0) if rows_first else np.all(got[np.ix_(fp, fq)] == 0)
