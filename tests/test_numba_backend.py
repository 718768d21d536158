"""The Numba backend against the numpy reference: what is specific to it.

The general comparisons over random plans, shapes and roles are in
test_split.py and run on every CPU backend. Here: bit-exactness per dtype and
role (special values and every 16-bit pattern included), read-only and
non-contiguous inputs, the many-box paths with shrunken tuning constants,
one parallel region per dtype for a batch, Python threads calling at once,
the disk cache, and the noise generator.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from fs_testing import DTYPES, as_dtype

from fastsplit import Job, _config, _noise, _reference, plan, split, split_many
from fastsplit._core import Task, column_runs

nc = pytest.importorskip("fastsplit.backends.numba_cpu", reason="numba is not installed")

ROLES = ["incoming", "bias", "outgoing", "copy", "moment1", "moment2"]

#: (shape, axis, plan width): odd sizes, a unit axis in every position, and a flatten view (3 positions x 97 units)
SHAPES = [((97,), 0, 97), ((33, 97), 1, 97), ((97, 7), 0, 97), ((3, 5, 97, 4), 2, 97), ((2, 3 * 97), 1, 97),
          ((1025, 3), 0, 1025)]


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view(f"u{a.dtype.itemsize}")


def assert_same_bits(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(bits(got), bits(want))


def ulp_apart(got, want):
    """Distance in units in the last place of their dtype (+0 and -0 are 0 apart; NaN must match NaN)."""
    assert np.array_equal(np.isnan(got.astype(np.float64)), np.isnan(want.astype(np.float64)))
    width = 8 * got.dtype.itemsize

    def line(a):  # sign-magnitude bits onto a monotone integer line
        u = bits(a).astype(np.uint64)
        mag = (u & np.uint64((1 << (width - 1)) - 1)).astype(np.int64)
        return np.where(u >> np.uint64(width - 1), -mag, mag)

    apart = np.abs(line(got) - line(want))
    return np.where(np.isnan(got.astype(np.float64)), 0, apart)


def sample(rng, shape, dtype):
    """Normal values over many magnitudes, with zeros of both signs, infinities, NaN and subnormals planted."""
    x = rng.standard_normal(shape) * 10.0 ** rng.integers(-9, 5, size=shape)
    specials = [0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65519.0, 6e-8, -3e-39, 1e-45, 3.3e38, -1e-5]
    flat = x.reshape(-1)
    where = rng.permutation(flat.size)[: min(len(specials), flat.size // 4)]
    flat[where] = specials[: where.size]
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(as_dtype(dtype))


def mixed_plan(width, seed=0, symmetry="nudge", **kw):
    """Units split alone, in pairs, in a run of 20 (a block of copies), and some twice (three copies)."""
    rng = np.random.default_rng(seed)
    run = np.arange(width // 4, width // 4 + 20) % width
    others = np.setdiff1d(rng.integers(0, width, width // 3), run)
    twice = others[: others.size // 4]
    return plan(width, np.concatenate([run, others, twice]), copies=2, symmetry=symmetry, **kw)


@pytest.fixture
def tiny_config(monkeypatch):
    """Boxes of a few bytes, the parallel kernel for any size: the many-box paths on small arrays."""

    def apply(chunk=64, gather_run=_config.CPU_GATHER_RUN):
        monkeypatch.setattr(_config, "CPU_CHUNK_BYTES", chunk)
        monkeypatch.setattr(_config, "CPU_PARALLEL_MIN_BYTES", 0)
        monkeypatch.setattr(_config, "CPU_GATHER_RUN", gather_run)

    return apply


# --------------------------------------------------------------------------- bit-exact against the reference


def test_available_names_numba():
    ok, why = nc.available()
    assert ok and why.startswith("numba ")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("role", ROLES)
def test_every_dtype_and_role_is_bit_exact(dtype, role):
    rng = np.random.default_rng(DTYPES.index(dtype) * 10 + ROLES.index(role))
    for shape, axis, width in SHAPES:
        x = sample(rng, shape, dtype)
        p = mixed_plan(width, seed=len(shape))
        assert_same_bits(split(x, p, axis, role=role, backend="numba"), split(x, p, axis, role=role, backend="numpy"))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_every_16_bit_pattern_is_bit_exact(dtype):
    x = np.arange(1 << 16, dtype=np.uint16).view(as_dtype(dtype)).reshape(256, 256)
    p = plan(256, np.arange(0, 256, 3), ratios=[0.75, 0.25], symmetry="nudge", eps=1e-3)
    for role in ("copy", "outgoing", "moment2", "bias"):
        with np.errstate(invalid="ignore", over="ignore"):
            want = split(x, p, 1, role=role, backend="numpy")
        assert_same_bits(split(x, p, 1, role=role, backend="numba"), want)


def _float32_patterns():
    """Random float32 bit patterns plus the edges of every rounding case of float16 and bfloat16."""
    edges = [0x00000000, 0x00000001, 0x00008000, 0x00018000, 0x33000000, 0x33000001, 0x337FFFFF, 0x38800000,
             0x387FFFFF, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x47800000, 0x7F7FFFFF, 0x7F7F8000, 0x7F800000,
             0x7F800001, 0x7FA00000, 0x7FC00000, 0x7FC00001, 0x7FFFFFFF, 0x3F801000, 0x3F803000, 0x3F808000]
    edges += [e | 0x80000000 for e in edges]
    rng = np.random.default_rng(7)
    return np.concatenate([np.array(edges, dtype=np.uint32), rng.integers(0, 1 << 32, 20000, dtype=np.uint32)])


def test_integer_conversions_match_numpy_and_ml_dtypes():
    """The bit-by-bit float16 conversions (the fallback for CPUs without F16C)."""
    halves = np.arange(1 << 16, dtype=np.uint16)
    widened = np.array([nc._f16_to_f32(np.int64(h)) for h in halves], dtype=np.float32)
    want = halves.view(np.float16).astype(np.float32)
    assert np.array_equal(widened, want, equal_nan=True)  # a NaN's payload does not survive the trip to Python
    assert np.array_equal(np.signbit(widened), np.signbit(want))
    u = _float32_patterns()
    signalling = ((u & 0x7F800000) == 0x7F800000) & ((u & 0x7FFFFF) != 0) & ((u & 0x400000) == 0)
    f = u[~signalling].view(np.float32)  # a float32 argument from Python passes through a double: sNaN turns quiet
    with np.errstate(over="ignore", invalid="ignore"):
        want16 = f.astype(np.float16)
    got16 = np.array([nc._f32_to_f16(v) for v in f]).astype(np.uint16)
    np.testing.assert_array_equal(got16, bits(want16))



@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_kernel_rounds_any_float32_like_numpy(dtype):
    """Rounding inside the kernel (F16C or integer code): 0 + add[j] makes y any float32 we choose.

    Through Task objects, below the executor: plans refuse offsets that are not finite or that the
    tensor's dtype cannot hold, and here they are the point.
    """
    with np.errstate(invalid="ignore"):
        f = _float32_patterns().view(np.float32).astype(np.float64)
    n = f.shape[0]
    x = np.zeros((1, n, 1), dtype=as_dtype(dtype))
    want, got = (Task(x=x, out=np.empty_like(x), src=np.arange(n), scale=np.ones(n), add=f, noise=None, key=0,
                      dtype=dtype) for _ in range(2))
    with np.errstate(over="ignore", invalid="ignore"):
        _reference.run([want])
    nc.run([got])
    assert_same_bits(got.out, want.out)


@pytest.mark.parametrize("chunk", [1, 64, 1000])
@pytest.mark.parametrize("gather_run", [1, 16, 1 << 30])
def test_many_boxes_and_both_run_paths(tiny_config, chunk, gather_run):
    tiny_config(chunk, gather_run)
    rng = np.random.default_rng(chunk + gather_run)
    for dtype in ("float32", "float16"):
        for shape, axis, width in SHAPES:
            x = sample(rng, shape, dtype)
            p = mixed_plan(width, seed=chunk)
            for role in ("bias", "outgoing"):
                want = split(x, p, axis, role=role, backend="numpy")
                assert_same_bits(split(x, p, axis, role=role, backend="numba"), want)


@pytest.mark.parametrize("seed", range(6))
def test_boxes_cover_every_output_element_once(seed):
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, 6))
    outer, m, inner = (rng.integers(0, 9, count) for _ in range(3))
    itemsize = int(rng.choice([2, 4, 8]))
    chunk = int(rng.choice([1, 8, 40, 1000]))
    work, parts, nbytes = nc._boxes(outer, m, inner, itemsize, chunk)
    hits = [np.zeros((o, j, i), dtype=int) for o, j, i in zip(outer, m, inner, strict=True)]
    for t, o0, o1, j0, j1, i0, i1 in work:
        assert o0 < o1 and j0 < j1 and i0 < i1
        assert (o1 - o0) * (j1 - j0) * (i1 - i0) * itemsize <= max(chunk, itemsize)
        hits[t][o0:o1, j0:j1, i0:i1] += 1
    assert all((h == 1).all() for h in hits)
    assert nbytes == int((outer * m * inner).sum()) * itemsize
    assert parts[0] == 0 and parts[-1] == len(work) and np.all(np.diff(parts) > 0)


# --------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("dtype", DTYPES)
def test_read_only_and_non_contiguous_inputs(dtype):
    rng = np.random.default_rng(1)
    base = sample(rng, (40, 2 * 97 + 3), dtype)
    p = mixed_plan(97)
    read_only = base[:, :97].copy()
    read_only.setflags(write=False)
    strided = base[::2, 3::2]  # (20, 97), neither C- nor F-contiguous
    transposed = base[:, :97].T  # (97, 40)
    for x, axis in ((read_only, 1), (strided, 1), (transposed, 0)):
        want = split(x, p, axis, role="outgoing", backend="numpy")
        assert_same_bits(split(x, p, axis, role="outgoing", backend="numba"), want)


def test_read_only_input_through_the_parallel_kernel(tiny_config):
    tiny_config(256)
    x = np.random.default_rng(2).standard_normal((300, 97)).astype(np.float32)
    x.setflags(write=False)
    p = mixed_plan(97)
    assert_same_bits(split(x, p, 1, backend="numba"), split(x, p, 1, backend="numpy"))


def test_writes_into_out():
    x = np.random.default_rng(3).standard_normal((50, 97))
    p = mixed_plan(97)
    out = np.full((50, p.new_width), np.nan)
    assert split(x, p, 1, role="outgoing", backend="numba", out=out) is out
    assert_same_bits(out, split(x, p, 1, role="outgoing", backend="numpy"))


@pytest.mark.parametrize("shape, axis", [((0, 5), 1), ((5, 0), 0), ((0, 5, 3), 1)])
def test_empty_tensors(shape, axis):
    x = np.zeros(shape, dtype=np.float32)
    p = plan(5, [1, 3])
    got = split(x, p, axis, backend="numba")
    assert got.shape == split(x, p, axis, backend="numpy").shape


def test_rejects_what_it_cannot_take():
    p = plan(4, [0])
    x = np.ones((2, 4, 1), dtype=np.float32)

    def task(x, out, dtype="float32"):
        return Task(x, out, p.src, np.ones(5), None, None, 0, dtype, column_runs(p.src))

    with pytest.raises(TypeError):
        nc.run([task(x.tolist(), np.empty((2, 5, 1), np.float32))])
    out = np.empty((2, 5, 1), np.float32)
    out.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        nc.run([task(x, out)])
    with pytest.raises(ValueError, match="dtype"):
        nc.run([task(x, np.empty((2, 5, 1), np.float32), dtype="float64")])
    with pytest.raises(ValueError, match="shapes"):
        nc.run([task(x, np.empty((2, 4, 1), np.float32))])
    wide = plan(40, [0])
    bad_runs = Task(np.ones((2, 40, 1), np.float32), np.empty((2, 41, 1), np.float32), wide.src, np.ones(41),
                    None, None, 0, "float32", np.array([[0, 1, 40], [40, 0, 1]]))  # a block past the input's end
    with pytest.raises(ValueError, match="runs"):
        nc.run([bad_runs])


# --------------------------------------------------------------------------- batches


def test_batch_of_120_is_one_region_per_dtype_and_equals_single_splits(monkeypatch):
    rng = np.random.default_rng(4)
    jobs = []
    dtypes = ["float32"] * 6 + ["float16", "float64", "bfloat16"]
    while len(jobs) < 120:
        width, fan_in, fan_out = (int(v) for v in rng.integers(1, 70, 3))
        dtype = dtypes[len(jobs) // 6 % len(dtypes)]
        p = mixed_plan(width, seed=len(jobs), eps=1e-2)
        kernel, bias, nxt = (sample(rng, s, dtype) for s in ((fan_in, width), (width,), (width, fan_out)))
        jobs += [Job(kernel, p, -1, "incoming"), Job(bias, p, 0, "bias"), Job(nxt, p, 0, "outgoing"),
                 Job(np.abs(kernel), p, -1, "moment2"), Job(nxt, p, 0, "moment1"), Job(kernel, p, -1, "copy")]
    launches = []
    real_launch = nc._launch
    monkeypatch.setattr(nc, "_launch", lambda args, nbytes: (launches.append(args[0].dtype), real_launch(args, nbytes)))
    got = split_many(jobs, backend="numba")
    assert len(launches) == len(set(dtypes))
    for job, g in zip(jobs, got, strict=True):
        single = split(job.x, job.plan, job.axis, role=job.role, backend="numba")
        assert_same_bits(g, single)
        assert_same_bits(g, split(job.x, job.plan, job.axis, role=job.role, backend="numpy"))


# --------------------------------------------------------------------------- noise


@pytest.mark.parametrize("dtype", DTYPES)
def test_noise_is_the_reference_noise(dtype):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((33, 1025)) * 0.1).astype(as_dtype(dtype))
    x[0, :8] = [0.0, -0.0, 0.0, -0.0, 1.0, -1.0, 0.0, -0.0]  # zeros in copied and uncopied columns
    p = plan(1025, np.r_[0:8, rng.integers(0, 1025, 300)], symmetry="noise", sigma=0.5, seed=11)
    got = split(x, p, 1, backend="numba")
    want = split(x, p, 1, backend="numpy")
    assert not np.array_equal(want, split(x, p, 1, role="copy", backend="numpy"))  # the noise is there
    if dtype == "float64":
        # the draw may differ in its last bit (log), which after cancellation is more than an ulp of the sum
        draw = want - split(x, p, 1, role="copy", backend="numpy")
        tol = np.spacing(np.abs(want)) + 2 * np.spacing(np.abs(draw))
        assert np.all(np.abs(got - want) <= tol)
    else:
        assert ulp_apart(got, want).max() <= 1
    assert_same_bits(got, split(x, p, 1, backend="numba"))  # deterministic


def test_noise_with_tiny_boxes(tiny_config):
    tiny_config(24)
    x = np.random.default_rng(6).standard_normal((7, 97, 5)).astype(np.float32)
    p = mixed_plan(97, symmetry="noise", sigma=0.3, seed=3)
    assert ulp_apart(split(x, p, 1, backend="numba"), split(x, p, 1, backend="numpy")).max() <= 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_noise_by_source_is_the_reference_noise(dtype, tiny_config):
    """Draws at the flat index of the element read (``Task.noise_by_source``, symmetry "direction"), many boxes."""
    tiny_config(48)
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((7, 97, 5)) * 0.1).astype(as_dtype(dtype))
    p = mixed_plan(97, symmetry="direction", eps=0.5, seed=4)
    q = mixed_plan(13, seed=5, symmetry="direction", eps=0.3)
    rows = plan(7, [0, 6], symmetry="none")
    small = x[:, :13, :2].copy()
    jobs = [Job(x, p, 1, "incoming"), Job(x[:, :13, 0], q, 1, "incoming"),
            Job(small, q, 1, "incoming", also=(rows, 0, "outgoing")),
            Job(small, rows, 0, "outgoing", also=(q, 1, "incoming")),
            Job((rng.standard_normal((97, 13, 3)) * 0.1).astype(x.dtype), p, 0, "incoming", also=(q, 1, "incoming"))]
    for g, w in zip(split_many(jobs, backend="numba"), split_many(jobs, backend="numpy"), strict=True):
        if dtype == "float64":  # a draw may differ in its last bit (log): allow a few ulps of the draws
            assert np.all(np.abs(g - w) <= 8 * np.spacing(np.abs(w)) + 1e-15)
        else:
            assert ulp_apart(g, w).max() <= 1
    got = split(x, p, 1, backend="numba")
    shift = got.astype(np.float64) - x[:, p.src, :].astype(np.float64)
    c = p.direction
    for u in np.unique(p.src[c != 0])[:5]:  # every copy of a unit moves along the same draws
        js = np.flatnonzero((p.src == u) & (c != 0))
        d = shift[:, js, :] / c[js][None, :, None]
        np.testing.assert_allclose(d, np.repeat(d[:, :1, :], len(js), axis=1), rtol=2e-2, atol=2e-2 * np.abs(d).max())


def test_gauss_wraps_in_uint64():
    keys = [0, _noise.key_from_seed(7), (1 << 64) - 1]
    idxs = [0, 1, (1 << 31) + 3, (1 << 32) + 5, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
    for key in keys:
        want = _noise.gauss(key, np.array(idxs, dtype=np.uint64))
        got = np.array([nc._gauss(np.uint64(key), np.uint64(i)) for i in idxs])
        np.testing.assert_array_max_ulp(got, want, maxulp=2)


# --------------------------------------------------------------------------- threads and the disk cache

_THREADS = """
import os, sys, threading
import numpy as np
import numba
from fastsplit import _config, plan, split
from fastsplit.backends import numba_cpu as nc

_config.CPU_PARALLEL_MIN_BYTES = 0  # the parallel kernel even for these small arrays
x = np.random.default_rng(0).standard_normal((64, 513)).astype(np.float32)
p = plan(513, np.arange(0, 513, 2))
want = split(x, p, 1, role="outgoing", backend="numpy")
bad = []

def work():
    for _ in range(25):
        if not np.array_equal(split(x, p, 1, role="outgoing", backend="numba"), want):
            bad.append(1)

threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
misses = sum(len(d.stats.cache_misses) for d in (nc._kernel, nc._kernel_serial))
print(numba.threading_layer(), len(bad), misses, "OMP_WAIT_POLICY" in os.environ)
"""


@pytest.mark.parametrize("layer", ["default", "workqueue"])
def test_four_python_threads_at_once_and_disk_cache(layer):
    # a subprocess: with an unsafe layer Numba aborts the whole process rather than raising
    env = dict(os.environ, NUMBA_THREADING_LAYER=layer)
    env.pop("OMP_WAIT_POLICY", None)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_THREADS)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    used, bad, misses, policy_left = proc.stdout.split()
    if layer == "workqueue":
        assert used == "workqueue"  # serialised by the backend's lock
    assert bad == "0"
    assert misses == "0", "the kernels were compiled again instead of loaded from the disk cache"
    assert policy_left == "False"  # CPU_OMP_WAIT_POLICY reached the OpenMP runtime only, not the environment


# --------------------------------------------------------------------------- jobs split on two axes

#: (shape, (axis, width, channels), (axis, width, channels)): a Dense kernel, a conv kernel (units on
#: axes 2 and 3), a Flatten consumer (positions x units on axis 0), units apart (mid > 1) and inner > 1
TWO_SHAPES = [((97, 33), (0, 97, "last"), (1, 33, "last")),
              ((3, 3, 24, 40), (2, 24, "last"), (3, 40, "last")),
              ((5 * 24, 33), (0, 24, "first"), (1, 33, "last")),
              ((7, 4, 5, 3, 9), (1, 4, "last"), (3, 3, "last")),
              ((2, 97, 3, 33, 4), (1, 97, "last"), (3, 33, "last"))]


def _two_axis_jobs(rng, dtype, roles, scale_first=True):
    jobs = []
    for shape, (a1, w1, c1), (a2, w2, c2) in TWO_SHAPES:
        x = sample(rng, shape, dtype)
        p1, p2 = mixed_plan(w1, seed=w1), mixed_plan(w2, seed=w2 + 1)
        r1, r2 = roles
        jobs.append(Job(x, p1, a1, r1, c1, also=(p2, a2, r2, c2)))
        jobs.append(Job(x, p2, a2, r2, c2, also=(p1, a1, r1, c1)))  # the other order
    return jobs


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_axis_jobs_are_bit_exact_for_every_role_pair(dtype):
    rng = np.random.default_rng(40 + DTYPES.index(dtype))
    for r1 in ROLES:
        for r2 in ROLES:
            jobs = _two_axis_jobs(rng, dtype, (r1, r2))
            with np.errstate(invalid="ignore", over="ignore"):
                want = split_many(jobs, backend="numpy")
            for job, g, w in zip(jobs, split_many(jobs, backend="numba"), want, strict=True):
                assert_same_bits(g, w)
                two = split(split(job.x, job.plan, job.axis, role=job.role, channels=job.channels, backend="numba"),
                            *job.also[:2], role=job.also[2], channels=job.also[3], backend="numba")
                assert_same_bits(g, two)  # and what the two calls give


@pytest.mark.parametrize("chunk", [1, 64, 1000])
@pytest.mark.parametrize("gather_run", [1, 16, 1 << 30])
def test_two_axis_many_boxes_and_both_run_paths(tiny_config, chunk, gather_run):
    tiny_config(chunk, gather_run)
    rng = np.random.default_rng(chunk + gather_run)
    for dtype in ("float32", "float16"):
        for roles in (("outgoing", "moment2"), ("bias", "outgoing")):  # the plain path (both orders), add
            jobs = _two_axis_jobs(rng, dtype, roles)
            for g, w in zip(split_many(jobs, backend="numba"), split_many(jobs, backend="numpy"), strict=True):
                assert_same_bits(g, w)


def test_two_axis_jobs_share_the_parallel_region(monkeypatch, tiny_config):
    tiny_config(4096)
    rng = np.random.default_rng(41)
    jobs = _two_axis_jobs(rng, "float32", ("outgoing", "incoming"))
    jobs += [Job(sample(rng, (97, 33), "float32"), mixed_plan(97), 0, "outgoing")]
    launches = []
    real_launch = nc._launch
    monkeypatch.setattr(nc, "_launch", lambda args, nbytes: (launches.append(args[0].dtype), real_launch(args, nbytes)))
    got = split_many(jobs, backend="numba")
    assert len(launches) == 1
    for g, w in zip(got, split_many(jobs, backend="numpy"), strict=True):
        assert_same_bits(g, w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_axis_noise_is_the_reference_noise(dtype, tiny_config):
    tiny_config(512)
    rng = np.random.default_rng(42)
    x = (rng.standard_normal((3, 97, 2, 65)) * 0.1).astype(as_dtype(dtype))
    p = mixed_plan(97, symmetry="noise", sigma=0.5, seed=1)
    q = mixed_plan(65, seed=2, symmetry="noise", sigma=0.3)
    jobs = [Job(x, p, 1, "incoming", also=(q, 3, "incoming")), Job(x, q, 3, "incoming", also=(p, 1, "incoming")),
            Job(x, p, 1, "outgoing", also=(q, -1, "incoming")), Job(x, q, -1, "bias", also=(p, 1, "incoming"))]
    for g, w in zip(split_many(jobs, backend="numba"), split_many(jobs, backend="numpy"), strict=True):
        assert not np.array_equal(w, split(x, p, 1, role="copy", also=(q, 3, "copy"), backend="numpy"))
        if dtype == "float64":  # a draw may differ in its last bit (log): allow a few ulps of the draws
            assert np.all(np.abs(g - w) <= 8 * np.spacing(np.abs(w)) + 1e-15)
        else:
            assert ulp_apart(g, w).max() <= 1


def test_two_axis_task_checks():
    from fastsplit._core import Rows

    p = plan(4, [0])
    x = np.ones((1, 4, 1, 4, 1), dtype=np.float32)
    rows = Rows(p.src, np.ones(5), None, None, 0, True, column_runs(p.src))
    task = Task(x, np.empty((1, 5, 1, 5, 1), np.float32), p.src, np.ones(5), None, None, 0, "float32",
                column_runs(p.src), rows)
    nc.run([task])
    with pytest.raises(ValueError, match="two-axis task shapes"):
        nc.run([Task(x, np.empty((1, 5, 1, 4, 1), np.float32), p.src, np.ones(5), None, None, 0, "float32",
                     column_runs(p.src), rows)])
    bad_rows = Rows(np.array([0, 1, 2, 3, 4]), np.ones(5), None, None, 0, True, None)
    with pytest.raises(ValueError, match="row src indexes outside"):
        nc.run([Task(x, np.empty((1, 5, 1, 5, 1), np.float32), p.src, np.ones(5), None, None, 0, "float32",
                     column_runs(p.src), bad_rows)])
