"""CPU benchmarks: the Numba backend against the numpy reference, the best plain numpy and memcpy.

Run with ``make bench`` (``pytest benchmarks --benchmark-only``). Every case is
float32 and is timed for four implementations, side by side in one run:

- ``numba``: ``fastsplit.split_many(jobs, backend="numba")`` into preallocated
  outputs (``Job.out``), so the whole public path is timed but not the page
  faults of fresh memory;
- ``kernel``: :func:`fastsplit.backends.numba_cpu.run` on Tasks built before
  timing: the backend alone (its numpy tables, the launch and the kernel),
  without ``split_many``'s per-job checks and layout;
- ``reference``: the same call with ``backend="numpy"`` (the oracle);
- ``take``: the best plain numpy: ``np.take(x, src, axis=1, out=out,
  mode="clip")`` on the 3-D view, then an in-place scale where the role scales;
- ``memcpy``: ``np.copyto`` of an array of the outputs' total size (bytes read
  + written = 2 x output bytes), the roofline.

The case ``dense_two_axis`` is a Dense kernel (4096, 4096) split on both axes
(every other unit of its input, role outgoing, and a random half of its
output units, role incoming: (6144, 6144)), timed three ways: ``numba``, one
two-axis job (``Job.also``); ``dense_two_axis_chained`` / ``numba``, the two
chained one-axis ``split_many`` calls through a preallocated intermediate;
and ``memcpy`` of the output's size. Run it alone with
``pytest benchmarks/test_bench_cpu.py --benchmark-only -k two_axis``.

GB/s count the bytes read plus the bytes written (input + output for a split)
and go into ``extra_info``; the terminal summary (benchmarks/conftest.py) prints
medians, GB/s and the ratios. The batched case ``model`` is also timed as one
tensor of the same total size (``model_rows``, ``model_columns``). JIT
compilation is warmed up before any timing; outputs are written once before
timing so no page fault is timed.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from fastsplit import Job, plan, split_many
from fastsplit._core import Task, column_runs

nc = pytest.importorskip("fastsplit.backends.numba_cpu", reason="the CPU benchmarks need numba")

POWER = {"incoming": 0, "bias": 0, "copy": 0, "outgoing": 1, "moment1": 1, "moment2": 2}
IMPLS = ["numba", "kernel", "reference", "take", "memcpy"]
ROUNDS = {"numba": 30, "kernel": 30, "reference": 3, "take": 15, "memcpy": 30}


def _rand(rng, shape):
    return rng.standard_normal(shape, dtype=np.float32)


def _job(x, p, axis, role, channels="last"):
    """A Job with a preallocated, already touched output."""
    axis %= x.ndim
    positions = x.shape[axis] // p.width
    shape = x.shape[:axis] + (positions * p.new_width,) + x.shape[axis + 1 :]
    return Job(x, p, axis, role, channels, out=np.zeros(shape, dtype=x.dtype))


def _half(rng=None, width=4096):
    """Every other unit split in two, or a random half when ``rng`` is given."""
    units = np.arange(0, width, 2) if rng is None else np.sort(rng.permutation(width)[: width // 2])
    return plan(width, units)


def _model(rng):
    """A growth event of 136 tensors, ~38M parameters: 4 Dense and 4 Conv layers, half their units split.

    Per layer: its kernel (incoming) with Adam m and v, its bias with m and v,
    BatchNorm gamma/beta/mean/variance, m and v of gamma and beta, and the next
    layer's kernel (outgoing) with m and v.
    """
    jobs = []
    layers = [((1024, 1024), (1024, 1024))] * 4 + [((3, 3, 256, 256), (3, 3, 256, 256))] * 4
    for shape_in, shape_out in layers:
        width = shape_in[-1]
        p = plan(width, np.sort(rng.permutation(width)[: width // 2]))
        kernel, nxt = _rand(rng, shape_in), _rand(rng, shape_out)
        out_axis = 0 if len(shape_out) == 2 else 2
        jobs += [_job(kernel, p, -1, "incoming"), _job(kernel, p, -1, "moment1"),
                 _job(np.abs(kernel), p, -1, "moment2")]
        bias = _rand(rng, (width,))
        jobs += [_job(bias, p, 0, "bias"), _job(bias, p, 0, "moment1"), _job(np.abs(bias), p, 0, "moment2")]
        jobs += [_job(_rand(rng, (width,)), p, 0, "copy") for _ in range(4)]
        jobs += [_job(bias, p, 0, "moment1"), _job(np.abs(bias), p, 0, "moment2")] * 2
        jobs += [_job(nxt, p, out_axis, "outgoing"), _job(nxt, p, out_axis, "moment1"),
                 _job(np.abs(nxt), p, out_axis, "moment2")]
    return jobs


@functools.cache
def case(name):
    """The jobs of a case (built once per session)."""
    rng = np.random.default_rng(0)
    if name == "dense_strided":  # (4096, 4096) -> (4096, 6144), plan(4096, arange(0, 4096, 2))
        return [_job(_rand(rng, (4096, 4096)), _half(), -1, "incoming")]
    if name == "dense_random":  # the same with a random half of the units
        return [_job(_rand(rng, (4096, 4096)), _half(rng), -1, "incoming")]
    if name == "conv_incoming":  # (3, 3, 512, 512) -> (3, 3, 512, 768)
        return [_job(_rand(rng, (3, 3, 512, 512)), _half(rng, 512), -1, "incoming")]
    if name == "conv_outgoing":  # (3, 3, 512, 512) -> (3, 3, 768, 512), the consumer side
        return [_job(_rand(rng, (3, 3, 512, 512)), _half(rng, 512), 2, "outgoing")]
    if name == "flatten":  # Dense after Flatten of (7, 7, 512): (25088, 1024) -> (37632, 1024)
        return [_job(_rand(rng, (7 * 7 * 512, 1024)), _half(rng, 512), 0, "outgoing")]
    if name == "model":
        return _model(rng)
    if name in ("model_rows", "model_columns"):  # one (rows, 4096) tensor with the parameters of "model"
        total = sum(j.x.size for j in case("model"))
        rows = total // 4096
        if name == "model_rows":  # half its rows split: block copies only, the fastest layout
            return [_job(_rand(rng, (rows, 4096)), _half(rng, rows), 0, "outgoing")]
        return [_job(_rand(rng, (rows, 4096)), _half(rng), -1, "incoming")]  # half its columns: gathers
    raise KeyError(name)


CASES = ["dense_strided", "dense_random", "conv_incoming", "conv_outgoing", "flatten", "model"]


def _nbytes(jobs):
    return sum(j.x.nbytes + j.out.nbytes for j in jobs)


def _views(j):
    """(x3, out3) of a job: the (outer, width, inner) view the backends see."""
    x, p = j.x, j.plan
    axis = j.axis % x.ndim
    outer = int(np.prod(x.shape[:axis], dtype=np.int64)) * (x.shape[axis] // p.width)
    return x.reshape(outer, p.width, -1), j.out.reshape(outer, p.new_width, -1)


def _tasks(jobs):
    """The Tasks ``split_many`` would hand the backend (no noise in these cases)."""
    tasks = []
    for j in jobs:
        x3, out3 = _views(j)
        p, power = j.plan, POWER[j.role]
        scale = p.ratio**power if power else np.ones(p.new_width)
        add = p.offset if j.role == "bias" and np.any(p.offset) else None
        tasks.append(Task(x3, out3, p.src, scale, add, None, 0, "float32", column_runs(p.src)))
    return tasks


def _take_steps(jobs):
    """The 3-D views and factors for the plain numpy version (worked out before timing)."""
    steps = []
    for j in jobs:
        x3, out3 = _views(j)
        p, power = j.plan, POWER[j.role]
        scale = (p.ratio**power).astype(np.float32)[None, :, None] if power else None
        add = p.offset.astype(np.float32)[None, :, None] if j.role == "bias" else None
        steps.append((x3, p.src, out3, scale, add))
    return steps


def _take(steps):
    for x3, src, out3, scale, add in steps:
        np.take(x3, src, axis=1, out=out3, mode="clip")
        if scale is not None:
            out3 *= scale
        if add is not None:
            out3 += add


@pytest.fixture(scope="session", autouse=True)
def _warm_jit():
    """Compile (or load from the disk cache) the Numba kernels before anything is timed."""
    x = np.ones((8, 64), dtype=np.float32)
    split_many([Job(x, plan(64, [1, 2]), -1, "incoming"), Job(x, plan(8, [3]), 0, "bias")], backend="numba")


def _run(benchmark, impl, jobs, fn):
    rounds = ROUNDS[impl]
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1 if impl == "reference" else 2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", CASES)
def test_split(benchmark, record, name, impl):
    benchmark.group = name
    jobs = case(name)
    nbytes = _nbytes(jobs)
    if impl in ("numba", "reference"):
        backend = "numba" if impl == "numba" else "numpy"
        _run(benchmark, impl, jobs, lambda: split_many(jobs, backend=backend))
    elif impl == "kernel":
        tasks = _tasks(jobs)
        _run(benchmark, impl, jobs, lambda: nc.run(tasks))
    elif impl == "take":
        steps = _take_steps(jobs)
        _run(benchmark, impl, jobs, lambda: _take(steps))
    else:
        size = sum(j.out.size for j in jobs)
        src, dst = np.ones(size, dtype=np.float32), np.zeros(size, dtype=np.float32)
        nbytes = 2 * dst.nbytes
        _run(benchmark, impl, jobs, lambda: np.copyto(dst, src))
    record(name, impl, nbytes)


@functools.cache
def _two_axis_case():
    """(x, P, Q, out, intermediate) of ``dense_two_axis``, outputs written once already."""
    rng = np.random.default_rng(1)
    x = _rand(rng, (4096, 4096))
    p, q = _half(), _half(rng)
    out = np.zeros((p.new_width, q.new_width), dtype=np.float32)
    tmp = np.zeros((p.new_width, 4096), dtype=np.float32)
    return x, p, q, out, tmp


def _two_axis_jobs():
    x, p, q, out, tmp = _two_axis_case()
    one = [Job(x, p, 0, "outgoing", out=out, also=(q, 1, "incoming"))]
    first, second = [Job(x, p, 0, "outgoing", out=tmp)], [Job(tmp, q, 1, "incoming", out=out)]
    return one, first, second


@pytest.mark.parametrize("impl", ["one_job", "chained", "memcpy"])
def test_dense_two_axis(benchmark, record, impl):
    """A Dense kernel split on both axes: one two-axis job against two chained calls and memcpy."""
    benchmark.group = "dense_two_axis"
    x, _, _, out, tmp = _two_axis_case()
    one, first, second = _two_axis_jobs()
    nbytes = x.nbytes + out.nbytes
    if impl == "one_job":
        _run(benchmark, "numba", one, lambda: split_many(one, backend="numba"))
        record("dense_two_axis", "numba", nbytes)
    elif impl == "chained":
        def chained():
            split_many(first, backend="numba")
            split_many(second, backend="numba")

        _run(benchmark, "numba", first, chained)
        record("dense_two_axis_chained", "numba", nbytes)  # the same useful bytes; it also writes and reads tmp
    else:
        src, dst = np.ones(out.size, dtype=np.float32), np.zeros(out.size, dtype=np.float32)
        _run(benchmark, "memcpy", one, lambda: np.copyto(dst, src))
        record("dense_two_axis", "memcpy", 2 * dst.nbytes)


def test_dense_two_axis_is_right():
    """The one-job result equals the chained calls' bit for bit."""
    one, first, second = _two_axis_jobs()
    got = split_many(one, backend="numba")[0].copy()
    split_many(first, backend="numba")
    want = split_many(second, backend="numba")[0]
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("impl", ["numba", "kernel"])
@pytest.mark.parametrize("name", ["model_rows", "model_columns"])
def test_model_as_one_tensor(benchmark, record, name, impl):
    """The batched case's parameters as one tensor through Numba: what batching 136 tensors costs.

    ``model_rows`` splits rows (block copies, the fastest layout), ``model_columns``
    splits columns (half the output gathered); the batch holds both kinds.
    """
    benchmark.group = "model"
    jobs = case(name)
    if impl == "numba":
        _run(benchmark, impl, jobs, lambda: split_many(jobs, backend="numba"))
    else:
        tasks = _tasks(jobs)
        _run(benchmark, impl, jobs, lambda: nc.run(tasks))
    record(name, impl, _nbytes(jobs))


def test_split_is_right():
    """The numbers above are for a correct split: the Numba outputs equal the reference's."""
    for name in ("conv_outgoing", "model"):
        jobs = case(name)
        got = [a.copy() for a in split_many(jobs, backend="numba")]
        want = [a.copy() for a in split_many(jobs, backend="numpy")]
        assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
        nc.run(_tasks(jobs))
        assert all(np.array_equal(j.out, w) for j, w in zip(jobs, want, strict=True))
