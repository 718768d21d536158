"""GPU benchmarks: the CuPy split kernel against a device-to-device copy of the same bytes and ``cupy.take``.

Run with ``make bench`` (or ``pytest benchmarks/test_bench_gpu.py --benchmark-only``)
on a machine with a CUDA GPU; without one the module is skipped with the reason.

Each case is timed for four implementations:

- ``fastsplit``: :func:`fastsplit.backends.cupy_cuda.run` as a split uses it
  (host layout + one small upload + one launch per dtype);
- ``kernel``: the same launches with the layout prepared beforehand (kernel time);
- ``copy``: one ``cudaMemcpy`` device to device of the output's bytes (the roofline);
- ``take``: ``cupy.take`` along the unit axis, one call per tensor, no scaling;
- ``index_select``: ``torch.index_select`` on the same buffers (DLPack, no copy), one call per tensor;
- ``jnp_take``: a jitted ``jnp.take`` on the same buffers (DLPack), one call per tensor; JAX runs on
  its own streams, so its rounds end with ``block_until_ready`` inside the timed region.

The framework gathers neither scale nor add: they do less work than a split, so being ahead of
them is the bar. Without PyTorch or JAX their cases are skipped.

GPU time is measured with CUDA events around each round after synchronising,
warm-up rounds first; ``extra_info`` records the median GPU time and the
bandwidth in GB/s counting bytes read plus bytes written, as the CPU benchmarks do:
input + output bytes for a split (each input read once, each output written once),
2 x the copied bytes for ``copy``.
"""

from __future__ import annotations

import _tuning  # benchmarks/ is on sys.path: pytest and the gpu_* scripts put it there
import numpy as np
import pytest

from fastsplit import _reference, plan
from fastsplit._core import Task, column_runs
from fastsplit.backends import cupy_cuda

cupy = pytest.importorskip("cupy", reason="the GPU benchmarks need CuPy")

_ok, _why = cupy_cuda.available()
if not _ok:
    pytest.skip(f"the GPU benchmarks need a usable CUDA GPU: {_why}", allow_module_level=True)

pytestmark = pytest.mark.gpu
TUNING = _tuning.apply_env()

IMPLS = ["fastsplit", "kernel", "copy", "take", "index_select", "jnp_take"]
POWER = {"incoming": 0, "outgoing": 1, "copy": 0, "moment1": 1, "moment2": 2, "bias": 0}


def _plan(width, new_width, seed=0):
    rng = np.random.default_rng(seed)
    return plan(width, rng.choice(width, new_width - width, replace=False), symmetry="none")


def _task(p, outer, inner, role, dtype):
    """A Task of shape (outer, width, inner) -> (outer, new_width, inner) with random data."""
    storage = np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
    n, m = p.width, p.new_width
    if dtype == "bfloat16":
        x = cupy.random.standard_normal((outer, n, inner), dtype=cupy.float32).view(cupy.uint32)
        x = (x >> 16).astype(cupy.uint16)
    else:
        x = cupy.random.standard_normal((outer, n, inner), dtype=cupy.float32).astype(storage)
    out = cupy.empty((outer, m, inner), dtype=storage)
    power = POWER[role]
    scale = p.ratio**power if power else np.ones(m)
    add = p.offset if role == "bias" else None
    return Task(x=x, out=out, src=np.asarray(p.src), scale=np.ascontiguousarray(scale, dtype=np.float64),
                add=add, noise=None, key=0, dtype=dtype, runs=column_runs(p.src))


def case_dense_incoming(dtype):
    """Dense kernel (4096, 4096) -> (4096, 6144), producing side (inner 1)."""
    return [_task(_plan(4096, 6144), 4096, 1, "incoming", dtype)]


def case_dense_outgoing(dtype):
    """Dense kernel (4096, 4096) -> (6144, 4096), consuming side (scaled rows)."""
    p = _plan(4096, 6144)
    return [_task(p, 1, 4096, "outgoing", dtype)]


def case_conv_incoming(dtype):
    """Conv kernel (3, 3, 512, 512) -> (3, 3, 512, 768), producing side."""
    return [_task(_plan(512, 768), 3 * 3 * 512, 1, "incoming", dtype)]


def case_conv_outgoing(dtype):
    """Conv kernel (3, 3, 512, 512) -> (3, 3, 768, 512), consuming side (axis 2, inner = cout)."""
    return [_task(_plan(512, 768), 3 * 3, 512, "outgoing", dtype)]


def case_flatten_outgoing(dtype):
    """Dense after Flatten of (7, 7, 512): kernel (7*7*512, 1024) as 49 x 512 -> 49 x 768 rows."""
    return [_task(_plan(512, 768), 49, 1024, "outgoing", dtype)]


def case_batched(dtype, layers=12, width=768, new_width=1152):
    """A growth event of a 12-layer MLP: 108 tensors (kernels, biases, Adam slots), 42M parameters."""
    tasks = []
    for k in range(layers):
        p = _plan(width, new_width, seed=k)
        tasks += [_task(p, width, 1, role, dtype) for role in ("incoming", "moment1", "moment2")]
        tasks += [_task(p, 1, 1, role, dtype) for role in ("bias", "moment1", "moment2")]
        tasks += [_task(p, 1, width, role, dtype) for role in ("outgoing", "copy", "copy")]
    return tasks


def case_big(dtype):
    """One 256 MiB input: Dense kernel (fan, 8192) -> (fan, 12288), fan = 8192 (float32) or 16384 (bfloat16)."""
    fan = (256 << 20) // (8192 * (2 if dtype == "bfloat16" else 4))
    return [_task(_plan(8192, 12288), fan, 1, "incoming", dtype)]


def case_batched_big(dtype):
    """A growth event of three 4096-wide layers to 6144 with Adam slots: 18 tensors, over 1 GB read."""
    return case_batched(dtype, layers=3, width=4096, new_width=6144)


CASES = {
    "dense-4096x4096-to-6144-incoming": case_dense_incoming,
    "dense-4096x4096-to-6144-outgoing": case_dense_outgoing,
    "conv-3x3x512x512-to-768-incoming": case_conv_incoming,
    "conv-3x3x512x512-to-768-outgoing": case_conv_outgoing,
    "flatten-7x7x512x1024-to-768-outgoing": case_flatten_outgoing,
    "batched-108-tensors-42M-params": case_batched,
    "big-256MiB": case_big,
    "batched-18-tensors-1GB": case_batched_big,
}


def _timed(benchmark, fn, nbytes, rounds):
    """Time ``fn`` with CUDA events per round (after warm-up) and record GB/s."""
    stream = cupy.cuda.get_current_stream()
    for _ in range(3):
        fn()
    stream.synchronize()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    gpu_ms = []

    def once():
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        gpu_ms.append(cupy.cuda.get_elapsed_time(start, end))

    warmup = 2
    benchmark.pedantic(once, rounds=rounds, iterations=1, warmup_rounds=warmup)
    ms = float(np.median(gpu_ms[warmup:] or gpu_ms))  # --benchmark-disable runs one round, no warm-up
    benchmark.extra_info.update({
        "bytes_read_plus_written": int(nbytes),
        "gpu_ms_median": ms,
        "GB/s": nbytes / (ms * 1e-3) / 1e9,
        "device": cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode(),
        "tuning": TUNING or "defaults",
    })
    return ms


def _impl(name, tasks):
    """A no-argument callable that runs implementation ``name`` on ``tasks``."""
    if name == "fastsplit":
        return lambda: cupy_cuda.run(tasks)
    if name == "kernel":
        launches = cupy_cuda.prepare(tasks)

        def kernel():
            for launch in launches:
                launch()

        return kernel
    if name == "copy":
        total = sum(t.out.nbytes for t in tasks)
        src = cupy.empty(total, dtype=cupy.uint8)
        dst = cupy.empty(total, dtype=cupy.uint8)
        return lambda: dst.data.copy_from_device_async(src.data, total)
    if name == "take":
        index = [cupy.asarray(t.src) for t in tasks]

        def take():
            for t, idx in zip(tasks, index, strict=True):
                cupy.take(t.x, idx, axis=1, out=t.out)

        return take
    if name == "index_select":
        torch = pytest.importorskip("torch")
        views = [(torch.from_dlpack(_signed(t.x)), torch.from_dlpack(_signed(t.out)),
                  torch.as_tensor(t.src, device=f"cuda:{t.x.device.id}")) for t in tasks]

        def index_select():
            for x, out, idx in views:
                torch.index_select(x, 1, idx, out=out)

        return index_select
    if name == "jnp_take":
        jax = pytest.importorskip("jax")
        jnp = jax.numpy
        take = jax.jit(lambda a, i: jnp.take(a, i, axis=1))
        views = [(jax.dlpack.from_dlpack(t.x), jnp.asarray(t.src)) for t in tasks]

        def jnp_take():
            outs = [take(x, idx) for x, idx in views]
            jax.block_until_ready(outs)

        return jnp_take
    raise ValueError(name)


def _signed(a):
    """PyTorch has no uint16 index_select: bfloat16 storage is viewed as int16 (the same bits)."""
    return a.view(cupy.int16) if a.dtype == cupy.uint16 else a


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_split_bandwidth(benchmark, case, dtype, impl):
    tasks = CASES[case](dtype)
    out_bytes = sum(t.out.nbytes for t in tasks)
    nbytes = 2 * out_bytes if impl == "copy" else out_bytes + sum(t.x.nbytes for t in tasks)
    benchmark.group = f"{case}-{dtype}"
    benchmark.extra_info.update({"case": case, "dtype": dtype, "impl": impl, "tensors": len(tasks),
                                 "params_in": int(sum(t.x.size for t in tasks))})
    rounds = 10 if out_bytes > (128 << 20) else 30
    _timed(benchmark, _impl(impl, tasks), nbytes, rounds)
    if impl in ("fastsplit", "kernel") and dtype == "float32":  # the timed kernel wrote the right thing
        for t in (tasks[0], tasks[-1]):
            want = _reference.gather(cupy.asnumpy(t.x[:2]), t.src, t.scale, t.add)
            np.testing.assert_array_equal(cupy.asnumpy(t.out[:2]), want)
