"""fastsplit.compact: compaction plans, and every CPU backend against a written-out reference."""

import numpy as np
import pytest
from fs_testing import CPU_BACKENDS, DTYPES, TOL, as_dtype
from hypothesis import given, settings
from hypothesis import strategies as st

import fastsplit
from fastsplit import CompactPlan, Job, SplitError, compact_plan, plan, split, split_many
from fastsplit.compact import compact, compact_many, concat, identity

ROLES = ["incoming", "bias", "outgoing", "copy", "moment1", "moment2"]


def expected(x, p, axis, role, channels="last"):
    """The compaction written out per unit, independent of fastsplit.compact."""
    x = np.asarray(x)
    axis %= x.ndim
    positions = x.shape[axis] // p.width
    ct = np.float64 if x.dtype == np.float64 else np.float32
    xm = np.moveaxis(x, axis, -1).astype(ct)
    lead = xm.shape[:-1]
    if channels == "last":
        xm = xm.reshape(lead + (positions, p.width))
    else:
        xm = np.swapaxes(xm.reshape(lead + (p.width, positions)), -1, -2)
    cols = {}
    for j, u in enumerate(p.src):
        cols[j] = xm[..., u]
    groups = dict(p.merge)
    for j, u in enumerate(p.src):
        if u in groups and role in ("outgoing", "moment1"):
            cols[j] = xm[..., u] + sum(xm[..., t] for t in groups[u])
        elif u in groups and role == "moment2":
            cols[j] = (np.sqrt(xm[..., u]) + sum(np.sqrt(xm[..., t]) for t in groups[u])) ** 2
    y = np.stack([cols[j] for j in range(p.new_width)], axis=-1)
    if channels == "first":
        y = np.swapaxes(y, -1, -2)
    y = y.reshape(lead + (positions * p.new_width,))
    return np.moveaxis(y, -1, axis).astype(x.dtype)


def close(a, b, dtype):
    rtol, atol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol, atol=atol)


def random_compaction(rng, width):
    units = rng.permutation(width)
    n_groups = int(rng.integers(0, width // 2 + 1))
    merge, i = {}, 0
    for _ in range(n_groups):
        k = int(rng.integers(1, 4))
        if i + k > width - 1:
            break
        merge[int(units[i])] = units[i + 1:i + k].tolist()
        i += k
    rest = units[i:]
    remove = rest[: int(rng.integers(0, len(rest)))]  # keeps at least one
    return compact_plan(width, remove=remove, merge=merge)


# -- plans ------------------------------------------------------------------------------------------------


def test_plan_fields():
    p = compact_plan(8, remove=[6, 1, 1], merge={2: [5, 4], 0: 7})
    assert isinstance(p, CompactPlan)
    assert p.width == 8 and p.new_width == 3
    np.testing.assert_array_equal(p.src, [0, 2, 3])
    np.testing.assert_array_equal(p.keep, p.src)
    assert p.merge == ((0, (7,)), (2, (4, 5)))
    np.testing.assert_array_equal(p.removed, [1, 4, 5, 6, 7])
    np.testing.assert_array_equal(p.twins, [4, 5, 7])
    np.testing.assert_array_equal(p.dropped, [1, 6])
    np.testing.assert_array_equal(p.counts, [1, 0, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(p.offset, np.zeros(3))
    assert not p.is_copy.any() and p.symmetry == "none" and p.sigma == 0 and p.seed is None
    assert not p.is_identity and compact_plan(3).is_identity
    assert p.gather.merge == () and np.array_equal(p.gather.src, p.src)
    assert not p.src.flags.writeable
    np.testing.assert_array_equal(compact_plan(4, remove=[True, False, True, False]).src, [1, 3])
    assert compact_plan(6, merge=[[3, 1], [0, 2, 4]]).merge == ((0, (2, 4)), (3, (1,)))
    assert "new_width=3" in repr(p)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(width=0), "width must be at least 1"),
        (dict(width=4, remove=[4]), "remove index 4 is out of range"),
        (dict(width=4, remove=[-1]), "out of range"),
        (dict(width=4, remove=[0, 1, 2, 3]), "remove all 4 units"),
        (dict(width=2, merge={0: [1]}, remove=[]), None),
        (dict(width=3, merge={0: [1], 1: [2]}), "more than one merge group"),
        (dict(width=3, merge={0: [0]}), "more than one merge group"),
        (dict(width=3, merge={0: [1]}, remove=[1]), "both removed and in a merge group"),
        (dict(width=3, merge={0: [5]}), "merge index 5 is out of range"),
        (dict(width=3, remove=[True, False]), "mask must have length 3"),
        (dict(width=3, remove=[0.5]), "integer indices"),
        (dict(width=3, merge={"a": [1]}), "representative must be an integer"),
    ],
)
def test_bad_plans_are_refused(kwargs, match):
    if match is None:
        assert compact_plan(**kwargs).new_width == 1
        return
    with pytest.raises(SplitError, match=match):
        compact_plan(**kwargs)


def test_plan_constructor_checks():
    with pytest.raises(SplitError, match="at least one"):
        CompactPlan(3, np.zeros(0, dtype=np.int64))
    with pytest.raises(SplitError, match="ascending"):
        CompactPlan(3, [2, 0])
    with pytest.raises(SplitError, match="must be kept"):
        CompactPlan(3, [0], ((1, (2,)),))
    with pytest.raises(SplitError, match="twin 1 .* is kept"):
        CompactPlan(3, [0, 1], ((0, (1,)),))


def test_expand_embed_concat():
    p = compact_plan(3, remove=[1], merge={0: [2]})
    e = p.expand(2)
    np.testing.assert_array_equal(e.src, [0, 1])
    assert e.merge == ((0, (4,)), (1, (5,)))
    m = p.embed(7, 2)
    np.testing.assert_array_equal(m.src, [0, 1, 2, 5, 6])
    assert m.merge == ((2, (4,)),)
    c = concat([identity(2), p, None, identity(1)])
    np.testing.assert_array_equal(c.src, m.src[:-1])
    with pytest.raises(SplitError, match="cannot embed"):
        p.embed(3, 1)


# -- running plans ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("role", ROLES)
def test_every_role_matches_the_written_out_operation(cpu_backend, dtype, role):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 97)).astype(as_dtype(dtype))
    if role == "moment2":
        x = np.abs(x)
    p = compact_plan(97, remove=[7, 8, 20, 33, 60, 61, 62, 90, 91], merge={0: [96, 50], 3: [4]})
    y = compact(x, p, axis=1, role=role, backend=cpu_backend)
    assert y.dtype == x.dtype and y.shape == (5, p.new_width)
    close(y, expected(x, p, 1, role), dtype)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    seed=st.integers(0, 2**31),
    role=st.sampled_from(ROLES),
    dtype=st.sampled_from(DTYPES),
    channels=st.sampled_from(["last", "first"]),
    positions=st.sampled_from([1, 1, 3]),
)
def test_backends_agree_with_the_reference_on_random_shapes(shape, seed, role, dtype, channels, positions):
    rng = np.random.default_rng(seed)
    axis = int(rng.integers(len(shape)))
    width = shape[axis]
    shape[axis] = width * positions
    x = np.abs(rng.standard_normal(shape)).astype(as_dtype(dtype))
    p = random_compaction(rng, width)
    want = expected(x, p, axis, role, channels)
    for backend in CPU_BACKENDS:
        y = compact(x, p, axis, role=role, channels=channels, backend=backend)
        close(y, want, dtype)


def test_many_jobs_in_one_call_mixed_with_split_plans(cpu_backend):
    rng = np.random.default_rng(2)
    p = compact_plan(11, remove=[0, 5], merge={1: [9, 10]})
    s = plan(11, [3], symmetry="none")
    xs = [rng.standard_normal(sh).astype("float32") for sh in [(11,), (4, 11), (11, 3), (2, 33)]]
    jobs = [Job(xs[0], p, 0, "bias"), Job(xs[1], p, 1, "incoming"), Job(xs[2], p, 0, "outgoing"),
            Job(xs[3], p, 1, "outgoing", "first"), Job(xs[1], s, 1, "incoming")]
    out = compact_many(jobs, backend=cpu_backend)
    for j, y in zip(jobs[:4], out[:4], strict=False):
        close(y, expected(j.x, p, j.axis, j.role, j.channels), "float32")
    close(out[4], split(xs[1], s, 1, backend="numpy"), "float32")


def test_gather_only_plans_run_through_split_many(cpu_backend):
    x = np.arange(12, dtype="float64").reshape(3, 4)
    p = compact_plan(4, remove=[1, 2])
    for role in ROLES:
        np.testing.assert_array_equal(split(x, p, 1, role=role, backend=cpu_backend), x[:, [0, 3]])
    m = compact_plan(4, merge={0: [1]})
    np.testing.assert_array_equal(split(x, m, 1, role="incoming", backend=cpu_backend), x[:, [0, 2, 3]])
    for role in ("outgoing", "moment1", "moment2"):
        with pytest.raises(SplitError, match="compact_many"):
            split(x, m, 1, role=role, backend=cpu_backend)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_split_then_merge_gives_back_the_original(cpu_backend, dtype):
    """symmetry='none' split with uneven ratios, then merging every copy into its original: the inverse."""
    rng = np.random.default_rng(3)
    n = 13
    s = plan(n, [0, 4, 4, 7, 12], copies=3, symmetry="none")
    groups = {}
    for j in range(n, s.new_width):
        groups.setdefault(int(s.src[j]), []).append(j)
    c = compact_plan(s.new_width, merge=groups)
    np.testing.assert_array_equal(c.src, np.arange(n))
    w_in = rng.standard_normal((5, n)).astype(dtype)
    b = rng.standard_normal(n).astype(dtype)
    w_out = rng.standard_normal((n, 3)).astype(dtype)
    m = rng.standard_normal((5, n)).astype(dtype)
    v = np.abs(rng.standard_normal((5, n))).astype(dtype)
    cases = [(w_in, 1, "incoming"), (b, 0, "bias"), (w_out, 0, "outgoing"), (m, 1, "moment1"), (v, 1, "moment2")]
    grown = split_many([Job(x, s, a, r) for x, a, r in cases], backend=cpu_backend)
    back = compact_many([Job(g, c, a, r) for g, (_, a, r) in zip(grown, cases, strict=False)], backend=cpu_backend)
    for (x, _, _), y in zip(cases, back, strict=False):
        np.testing.assert_allclose(y, x, rtol=1e-6 if dtype == "float32" else 1e-13, atol=0)
    np.testing.assert_array_equal(back[0], w_in)  # copies are bit-identical


def test_out_and_framework_tensors():
    x = np.random.default_rng(4).standard_normal((3, 6)).astype("float32")
    p = compact_plan(6, remove=[2], merge={0: [5]})
    out = np.empty((3, 4), dtype="float32")
    y = compact(x, p, 1, role="outgoing", out=out)
    assert y is out
    close(out, expected(x, p, 1, "outgoing"), "float32")
    torch = pytest.importorskip("torch")
    t = torch.tensor(x, requires_grad=True)
    yt = compact(t, p, 1, role="outgoing")
    assert isinstance(yt, torch.Tensor)
    close(yt.numpy(), expected(x, p, 1, "outgoing"), "float32")


def test_bad_jobs_write_nothing():
    x = np.ones((3, 6), dtype="float32")
    p = compact_plan(6, merge={0: [5]})
    out = np.full((3, 5), 7.0, dtype="float32")
    with pytest.raises(SplitError, match="job 1"):
        compact_many([Job(x, p, 1, "outgoing", out=out), Job(x, p, 0, "outgoing")])
    assert (out == 7).all()
    with pytest.raises(SplitError, match="role"):
        compact(x, p, 1, role="nope")
    with pytest.raises(SplitError, match="SplitPlan or CompactPlan"):
        split_many([Job(x, "not a plan", 1)])
    assert (x == 1).all()


def test_public_names():
    assert fastsplit.CompactPlan is CompactPlan and fastsplit.compact_plan is compact_plan


# -- jobs compacted on two axes (Job.also) ------------------------------------------------------------------


def compact_twice(x, steps, backend="numpy"):
    """The two calls a two-axis job stands for."""
    (p1, a1, r1, c1), (p2, a2, r2, c2) = steps
    return compact(compact(x, p1, a1, role=r1, channels=c1, backend=backend), p2, a2, role=r2, channels=c2,
                   backend=backend)


def same_bits(a, b):
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a.view(f"u{a.dtype.itemsize}"), b.view(f"u{b.dtype.itemsize}"))


@settings(max_examples=60, deadline=None)
@given(
    ndim=st.integers(2, 4),
    seed=st.integers(0, 2**31),
    roles=st.tuples(st.sampled_from(ROLES), st.sampled_from(ROLES)),
    dtype=st.sampled_from(DTYPES),
    channels=st.tuples(st.sampled_from(["last", "first"]), st.sampled_from(["last", "first"])),
    positions=st.tuples(st.sampled_from([1, 1, 3]), st.sampled_from([1, 1, 2])),
    kinds=st.tuples(st.sampled_from(["compact", "compact", "split"]), st.sampled_from(["compact", "compact", "split"])),
)
def test_two_axis_compaction_equals_the_two_calls(ndim, seed, roles, dtype, channels, positions, kinds):
    """Merge groups on either or both axes, in either order, with a split plan (no noise) on the other axis."""
    rng = np.random.default_rng(seed)
    shape = [int(s) for s in rng.integers(1, 8, ndim)]
    a1, a2 = (int(a) for a in rng.choice(ndim, 2, replace=False))
    steps = []
    for k, axis in enumerate((a1, a2)):
        width = shape[axis]
        shape[axis] = width * positions[k]
        if kinds[k] == "compact":
            p = random_compaction(rng, width)
        else:
            p = plan(width, rng.integers(0, width, width), symmetry=str(rng.choice(["none", "nudge"])))
        steps.append((p, axis - ndim if rng.integers(2) else axis, roles[k], channels[k]))
    x = np.abs(rng.standard_normal(shape)).astype(as_dtype(dtype))
    want = compact_twice(x, steps)
    (p1, ax1, r1, c1), also = steps
    for backend in CPU_BACKENDS:
        got = compact(x, p1, ax1, role=r1, channels=c1, also=also, backend=backend)
        same_bits(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_kernel_and_adam_slots_compacted_on_both_axes(cpu_backend, dtype):
    """A Dense kernel that consumes group P and produces group Q, pruned and merged on both axes in one call."""
    rng = np.random.default_rng(5)
    p = compact_plan(13, remove=[3, 8], merge={0: [12, 5], 7: [9]})
    q = compact_plan(11, remove=[10], merge={2: [4], 6: [1, 3]})
    w = rng.standard_normal((13, 11)).astype(as_dtype(dtype))
    m, v = rng.standard_normal((13, 11)).astype(w.dtype), np.abs(rng.standard_normal((13, 11))).astype(w.dtype)
    specs = [(w, "outgoing", "incoming"), (m, "moment1", "moment1"), (v, "moment2", "moment2"),
             (w, "outgoing", "outgoing"), (w, "copy", "incoming")]
    jobs = [Job(x, p, 0, r1, also=(q, 1, r2)) for x, r1, r2 in specs]
    jobs += [Job(x, q, 1, r2, also=(p, 0, r1)) for x, r1, r2 in specs]  # the other order
    got = compact_many(jobs, backend=cpu_backend)
    for job, g in zip(jobs, got, strict=True):
        assert g.shape == (p.new_width, q.new_width)
        same_bits(g, compact_twice(job.x, [(job.plan, job.axis, job.role, "last"), job.also + ("last",)]))
        close(g, compact_twice(job.x, [(job.plan, job.axis, job.role, "last"), job.also + ("last",)],
                               backend=cpu_backend), dtype)


def test_two_axis_merge_next_to_noise_runs_in_two_passes(cpu_backend, monkeypatch):
    """Merging on one axis and drawing noise on the other: two passes through an intermediate, as the docs say."""
    from fastsplit import _gather

    rng = np.random.default_rng(6)
    c = compact_plan(9, remove=[1], merge={0: [4, 5]})
    s = plan(7, [0, 3], symmetry="noise", sigma=0.2, seed=2)
    x = rng.standard_normal((9, 7)).astype("float32")
    calls = []
    real = _gather.execute
    monkeypatch.setattr(_gather, "execute", lambda jobs, **kw: (calls.append(len(jobs)), real(jobs, **kw))[1])
    jobs = [Job(x, c, 0, "outgoing", also=(s, 1, "incoming")), Job(x, s, 1, "incoming", also=(c, 0, "outgoing")),
            Job(x, c, 0, "outgoing", also=(s, 1, "moment1")), Job(x[0], s, 0, "bias")]
    out = np.full((c.new_width, s.new_width), np.nan, dtype="float32")
    jobs[0].out = out
    got = compact_many(jobs, backend=cpu_backend)
    assert calls == [4, 4, 2]  # the call, then two passes: two jobs and the first steps of two, then two
    assert got[0] is out
    for job, g in zip(jobs[:3], got[:3], strict=True):
        close(g, compact_twice(job.x, [(job.plan, job.axis, job.role, "last"), job.also + ("last",)]), "float32")
    close(got[3], split(x[0], s, 0, role="bias", backend="numpy"), "float32")


def test_two_axis_compaction_out_and_bad_jobs(cpu_backend):
    rng = np.random.default_rng(7)
    p, q = compact_plan(6, merge={0: [5]}), compact_plan(5, remove=[1], merge={2: [3]})
    x = rng.standard_normal((6, 5)).astype("float32")
    before = x.copy()
    out = np.asfortranarray(np.full((5, 3), np.nan, dtype="float32"))  # not C-contiguous: copied in at the end
    assert compact(x, p, 0, role="outgoing", also=(q, 1, "outgoing"), out=out, backend=cpu_backend) is out
    same_bits(np.ascontiguousarray(out), compact_twice(x, [(p, 0, "outgoing", "last"), (q, 1, "outgoing", "last")]))
    keep = np.full((5, 3), 7.0, dtype="float32")
    for also, match in [((q, 0, "outgoing"), "job 1: also: axis 0 has length 6"),
                        ((p, 0, "outgoing"), "job 1: the two axes of a job must differ")]:
        with pytest.raises(SplitError, match=match):
            compact_many([Job(x, p, 0, "outgoing", also=(q, 1, "copy"), out=keep), Job(x, p, 0, "outgoing", also=also)],
                         backend=cpu_backend)
        assert (keep == 7).all()
    with pytest.raises(SplitError, match="compact_many"):
        split(x, p, 0, role="copy", also=(q, 1, "moment2"), backend=cpu_backend)
    same_bits(x, before)
