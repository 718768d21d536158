"""Nothing silently wrong: what the core (split, split_many, Job, plan, compact) converts, and what it refuses.

Byte order, strides and alignment of every array a kernel touches; an ``out`` that
overlaps an input or another ``out``; objects and dtypes that are refused before
anything is exported; plan values that are refused when the plan is made. Every
refusal is a SplitError raised before anything is written, so every array passed
in is left as it was. A property test at the end throws random layouts, byte
orders and ``out`` choices at each CPU backend.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from fs_testing import CPU_BACKENDS, TOL
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fastsplit
from fastsplit import CompactPlan, Job, SplitError, SplitPlan, _gather, compact_plan, interop, plan, split, split_many
from fastsplit.compact import compact, compact_many

ROLES = ["incoming", "bias", "outgoing", "copy", "moment1", "moment2"]


def reference(x, p, axis=-1, role="incoming", channels="last", also=None, run=split_many):
    """The numpy backend (fastsplit._reference) on a native, C-contiguous copy of ``x``."""
    x = np.asarray(x)
    xn = np.ascontiguousarray(x.astype(x.dtype.newbyteorder("=")))
    return run([Job(xn, p, axis, role, channels, None, also)], backend="numpy")[0]


def close(got, want):
    rtol, atol = TOL[np.dtype(want.dtype).name]
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=rtol, atol=atol)


def snapshot(*arrays):
    return [None if a is None else np.array(a, copy=True) for a in arrays]


def unchanged(arrays, before):
    for a, b in zip(arrays, before):
        if a is not None:
            np.testing.assert_array_equal(np.asarray(a), b, strict=True)


def unaligned(shape, dtype):
    """A writable C-contiguous array whose data starts one byte past an element boundary."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    raw = np.zeros(n * dtype.itemsize + 1, dtype=np.uint8)
    a = raw[1:].view(dtype).reshape(shape)
    assert n == 0 or not a.flags.aligned
    return a


# -- byte order, strides, alignment ---------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("dtype", [">f2", ">f4", ">f8"])
def test_big_endian_inputs_are_read_in_their_byte_order(cpu_backend, role, dtype):
    x = np.array([[1.0, 2, 3, 4], [-5, 6, 7.5, 8]], dtype)
    before = snapshot(x)
    p = plan(4, [1, 3], symmetry="nudge", eps=0.25)
    y = split(x, p, role=role, backend=cpu_backend)
    assert y.dtype == x.dtype.newbyteorder("=") and y.dtype.isnative  # the result is native
    close(y, reference(x, p, role=role))
    unchanged([x], before)


def test_big_endian_two_axis_and_compact_jobs(cpu_backend):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 6)).astype(">f4")
    before = snapshot(x)
    pa, pb = plan(5, [0, 4], symmetry="none"), plan(6, [2], symmetry="nudge")
    also = (pb, 1, "bias")
    close(split(x, pa, 0, role="outgoing", also=also, backend=cpu_backend),
          reference(x, pa, 0, "outgoing", also=also))
    c = compact_plan(6, remove=[5], merge={0: [3]})
    close(compact(x, c, 1, role="outgoing", backend=cpu_backend), reference(x, c, 1, "outgoing", run=compact_many))
    close(compact(x, c, 1, role="moment2", also=(pa, 0, "moment1"), backend=cpu_backend),
          reference(x, c, 1, "moment2", also=(pa, 0, "moment1"), run=compact_many))
    unchanged([x], before)


def test_big_endian_out_is_refused_before_anything_is_written(cpu_backend):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    out = np.full((2, 5), 7.0, ">f4")
    before = snapshot(x, out)
    with pytest.raises(SplitError, match=r"out has byte order '>f4'"):
        split(x, plan(4, [0]), role="outgoing", out=out, backend=cpu_backend)
    with pytest.raises(SplitError, match=r"job 1: out has byte order"):
        split_many([Job(x, plan(4, [0])), Job(x, plan(4, [0]), out=out)], backend=cpu_backend)
    unchanged([x, out], before)


def test_strided_negative_transposed_and_unaligned_inputs(cpu_backend):
    rng = np.random.default_rng(2)
    base = rng.standard_normal((12, 16))
    p = plan(8, [0, 5, 5], symmetry="nudge")
    ua = unaligned((3, 8), np.float32)
    ua[...] = base[:3, :8]
    for x in (base[::-1, ::-2], base[:8, :8].T, base[::3, 1::2].astype(np.float32), ua,
              np.asfortranarray(base[:, :8]).astype(">f8")[::-1]):
        before = snapshot(x)
        close(split(x, p, axis=1, role="moment2", backend=cpu_backend), reference(x, p, 1, "moment2"))
        unchanged([x], before)


def test_strided_negative_and_unaligned_outs_are_written(cpu_backend):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    p = plan(4, [1], symmetry="none")
    want = reference(x, p, role="outgoing")
    big = np.full((6, 12), np.nan, np.float32)
    for out in (big[::2, ::2][:, :5], big[::-2, 11:6:-1], np.asfortranarray(np.zeros((3, 5), np.float32)),
                unaligned((3, 5), np.float32)):
        got = split(x, p, role="outgoing", out=out, backend=cpu_backend)
        assert got is out
        np.testing.assert_array_equal(out, want)


def test_read_only_out_is_refused(cpu_backend):
    x = np.ones((2, 4), np.float32)
    out = np.zeros((2, 5), np.float32)
    out.setflags(write=False)
    with pytest.raises(SplitError, match="out is read-only"):
        split(x, plan(4, [0]), out=out, backend=cpu_backend)
    np.testing.assert_array_equal(out, 0)


def test_zero_dimensional_and_zero_size_arrays(cpu_backend):
    with pytest.raises(SplitError, match="0-dimensional"):
        split(np.array(1.0, np.float32), plan(1), backend=cpu_backend)
    with pytest.raises(SplitError, match="scalar of type numpy.float32"):
        split(np.float32(1.0), plan(1), backend=cpu_backend)
    p = plan(3, [2])
    for shape, axis in (((0, 3), 1), ((3, 0), 0), ((2, 3, 0), 1), ((0, 3, 0), 1)):
        x = np.zeros(shape, np.float32)
        y = split(x, p, axis=axis, backend=cpu_backend)
        want = list(shape)
        want[axis] = 4
        assert y.shape == tuple(want)
    y = split(np.zeros((4, 0, 2), np.float32), plan(4), axis=0, also=(plan(2), 2, "incoming"), backend=cpu_backend)
    assert y.shape == (8, 0, 4)
    with pytest.raises(SplitError, match="axis 1 has length 0"):
        split(np.zeros((2, 0), np.float32), p, axis=1, backend=cpu_backend)


def test_nan_and_inf_in_the_data_are_copied_faithfully(cpu_backend):
    x = np.array([[np.nan, np.inf, -np.inf, 1.0]], np.float32)
    y = split(x, plan(4, symmetry="none"), role="outgoing", backend=cpu_backend)
    np.testing.assert_array_equal(y, [[np.nan, np.inf / 2, -np.inf, 0.5, np.nan, np.inf, -np.inf, 0.5]])


# -- aliasing ---------------------------------------------------------------------------------------------


def test_out_that_is_the_input_is_refused(cpu_backend):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    before = snapshot(x)
    with pytest.raises(SplitError, match="out overlaps the input x"):
        split(x, plan(4, copies=1), role="outgoing", out=x, backend=cpu_backend)
    unchanged([x], before)


def test_out_overlapping_the_input_is_refused(cpu_backend):
    buf = np.arange(18, dtype=np.float32).reshape(2, 9)
    x, out = buf[:, :4], buf[:, 3:8]
    before = snapshot(buf)
    with pytest.raises(SplitError, match="out overlaps the input"):
        split(x, plan(4, [0]), role="outgoing", out=out, backend=cpu_backend)
    with pytest.raises(SplitError, match="out overlaps the input"):
        compact(buf[:, :5], compact_plan(5, merge={0: [1]}), role="outgoing", out=buf[:, 4:8], backend=cpu_backend)
    with pytest.raises(SplitError, match="out overlaps the input"):  # two axes
        split(buf[:, 2:5], plan(3, [0]), 1, also=(plan(2), 0, "copy"), out=buf.reshape(-1)[:16].reshape(4, 4),
              backend=cpu_backend)
    unchanged([buf], before)


def test_interleaved_but_disjoint_out_is_accepted(cpu_backend, monkeypatch):
    buf = np.zeros((2, 20), np.float32)
    x, out = buf[:, 0:8:2], buf[:, 1:11:2]
    x[...] = [[1, 2, 3, 4], [5, 6, 7, 8]]
    p = plan(4, [3], symmetry="none")
    assert split(x, p, role="outgoing", out=out, backend=cpu_backend) is out
    np.testing.assert_array_equal(out, reference(x, p, role="outgoing"))
    monkeypatch.setattr(_gather, "SHARES_MAX_WORK", 0)  # np.shares_memory cannot tell: counted as overlapping
    with pytest.raises(SplitError, match="out overlaps the input"):
        split(x, p, role="outgoing", out=out, backend=cpu_backend)


def test_jobs_sharing_an_out_are_refused_and_name_the_jobs(cpu_backend):
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2, 3, 4)).astype(np.float32)
    p = plan(4, [2])
    out = np.full((3, 5), 9.0, np.float32)
    before = snapshot(a, b, out)
    with pytest.raises(SplitError, match="job 0: out overlaps the out of job 1"):
        split_many([Job(a, p, out=out), Job(b, p, out=out)], backend=cpu_backend)
    wide = np.full((3, 9), 9.0, np.float32)
    with pytest.raises(SplitError, match="job 1: out overlaps the out of job 2"):
        split_many([Job(a, p), Job(a, p, out=wide[:, :5]), Job(b, p, out=wide[:, 4:])], backend=cpu_backend)
    with pytest.raises(SplitError, match="job 1: out overlaps the input of job 0"):
        split_many([Job(wide[:, :4], p), Job(b, p, out=wide[:, 2:7])], backend=cpu_backend)
    with pytest.raises(SplitError, match="job 2: out overlaps its own input"):
        split_many([Job(a, p), Job(b, p), Job(wide[:, :4], plan(4), out=wide[:, :8])], backend=cpu_backend)
    unchanged([a, b, out], before)
    np.testing.assert_array_equal(wide, 9.0)


def test_inputs_may_overlap_each_other(cpu_backend):
    x = np.random.default_rng(4).standard_normal((3, 6)).astype(np.float32)
    p = plan(4, [1])
    outs = [np.empty((3, 5), np.float32) for _ in range(2)]
    r = split_many([Job(x[:, :4], p, out=outs[0]), Job(x[:, 2:], p, out=outs[1]), Job(x[:, 1:5], p)],
                   backend=cpu_backend)
    np.testing.assert_array_equal(r[0], reference(x[:, :4], p))
    np.testing.assert_array_equal(r[1], reference(x[:, 2:], p))
    np.testing.assert_array_equal(r[2], reference(x[:, 1:5], p))


class _DeviceArray:
    """What the overlap check reads of a CuPy array (``data.ptr``, shape, strides), over numpy memory."""

    def __init__(self, a):
        self.shape, self.strides, self.itemsize, self.size, self.nbytes = a.shape, a.strides, a.itemsize, a.size, a.nbytes
        self.flags = a.flags
        self.data = type("Ptr", (), {"ptr": a.__array_interface__["data"][0]})()


def test_overlap_test_for_cuda_arrays_reads_only_addresses():
    """Without a GPU: the CuPy path (numpy views of the same addresses, never read) agrees with np.shares_memory."""
    buf = np.zeros((6, 40), np.float32)
    pairs = [(buf[:, :10], buf[:, 5:15]), (buf[:, :10], buf[:, 10:20]), (buf[:, 0:20:2], buf[:, 1:21:2]),
             (buf[::-1, :8], buf[2:3, 7:9]), (buf.T, buf[5:, 39:]), (buf[:3], buf[3:])]
    for a, b in pairs:
        assert _gather._shares_memory(_DeviceArray(a), _DeviceArray(b)) == np.shares_memory(a, b)
        lo_a, hi_a = _gather._extent(_DeviceArray(a))
        lo_b, hi_b = _gather._extent(a)
        assert (lo_a, hi_a) == (lo_b, hi_b) and hi_a - lo_a <= buf.nbytes
    assert _gather._extent(_DeviceArray(buf[:0])) is None


def test_torch_out_sharing_the_torch_input_is_refused():
    torch = pytest.importorskip("torch")
    base = torch.arange(18, dtype=torch.float32).reshape(2, 9)
    before = base.clone()
    with pytest.raises(SplitError, match="out overlaps the input"):
        split(base[:, :4], plan(4, [0]), role="outgoing", out=base[:, 3:8])
    with pytest.raises(SplitError, match="job 0: out overlaps the out of job 1"):
        split_many([Job(base[:, :4], plan(4, [0]), out=base[:, 4:9]), Job(base[:, :4], plan(4, [0]), out=base[:, 4:9])])
    assert torch.equal(base, before)


def test_torch_outs_that_cannot_be_written_in_place_are_refused():
    torch = pytest.importorskip("torch")
    x = torch.ones(2, 4)
    for out, match in ((torch.zeros(2, 5, requires_grad=True), "requires grad"),
                       (torch._neg_view(torch.zeros(2, 5)), "negated view")):
        with pytest.raises(SplitError, match=match):
            split(x, plan(4, [0]), out=out)


def test_a_negated_torch_view_is_read_with_its_sign():
    torch = pytest.importorskip("torch")
    t = torch._neg_view(torch.tensor([[1.0, 2.0, 3.0]]))
    y = split(t, plan(3, [0], symmetry="none"), role="outgoing")
    np.testing.assert_array_equal(y.numpy(), [[-0.5, -2.0, -3.0, -0.5]])


# -- what is refused before any export -------------------------------------------------------------------


def _numpy_bad():
    return {
        "list": ([[1.0, 2.0]], "cannot split an object of type builtins.list"),
        "None": (None, "cannot split an object of type builtins.NoneType"),
        "int": (np.ones((1, 2), np.int64), "unsupported dtype int64"),
        "bool": (np.ones((1, 2), bool), "unsupported dtype bool"),
        "complex": (np.ones((1, 2), np.complex64), "unsupported dtype complex64"),
        "str": (np.array([["a", "b"]]), "unsupported dtype str32"),
        "object": (np.array([[1.0, "a"]], dtype=object), "unsupported dtype object"),
        "longdouble": (np.ones((1, 2), np.longdouble), "unsupported dtype"),
        "masked": (np.ma.array([[1.0, 2.0]], mask=[[0, 1]]), "masked array"),
    }


@pytest.mark.parametrize("name", list(_numpy_bad()))
def test_bad_numpy_inputs_are_refused(name):
    x, match = _numpy_bad()[name]
    with pytest.raises(SplitError, match=match):
        split(x, plan(2))


def _framework_bad():
    """name -> (code that makes ``x`` and maybe ``fn`` (called with the split function), match)."""
    return {
        "tf_string": ("import tensorflow as tf; x = tf.constant([['a', 'b']])", "unsupported dtype string"),
        "tf_string_variable": ("import tensorflow as tf; x = tf.Variable([['a', 'b']])", "unsupported dtype string"),
        "tf_int": ("import tensorflow as tf; x = tf.constant([[1, 2]])", "unsupported dtype int32"),
        "tf_ragged": ("import tensorflow as tf; x = tf.ragged.constant([[1.0, 2.0], [3.0]])", "RaggedTensor"),
        "tf_sparse": ("import tensorflow as tf; x = tf.sparse.SparseTensor([[0, 0]], [1.0], [1, 2])", "SparseTensor"),
        "tf_function": ("import tensorflow as tf\n"
                        "x = tf.constant([[1.0, 2.0]])\n"
                        "fn = lambda split: tf.function(lambda t: split(t))(x)",
                        "symbolic tensorflow tensor"),
        "tf_function_variable": ("import tensorflow as tf\n"
                                 "x = tf.Variable([[1.0, 2.0]])\n"
                                 "fn = lambda split: tf.function(lambda: split(x))()",
                                 "inside tf.function"),
        "torch_sparse": ("import torch; x = torch.eye(2).to_sparse()", "layout torch.sparse_coo"),
        "torch_csr": ("import torch; x = torch.eye(2).to_sparse_csr()", "layout torch.sparse_csr"),
        "torch_int": ("import torch; x = torch.ones(2, 2, dtype=torch.int64)", "unsupported dtype int64"),
        "torch_bool": ("import torch; x = torch.ones(2, 2, dtype=torch.bool)", "unsupported dtype bool"),
        "torch_complex": ("import torch; x = torch.ones(2, 2, dtype=torch.complex64)", "unsupported dtype complex64"),
        "torch_meta": ("import torch; x = torch.empty(2, 2, device='meta')", "device meta"),
        "jax_int": ("import jax.numpy as jnp; x = jnp.ones((2, 2), jnp.int32)", "unsupported dtype int32"),
        "jax_jit": ("import jax, jax.numpy as jnp\n"
                    "x = jnp.ones((2, 2))\n"
                    "fn = lambda split: jax.jit(split)(x)", "JAX tracer"),
        "jax_vmap": ("import jax, jax.numpy as jnp\n"
                     "x = jnp.ones((3, 2))\n"
                     "fn = lambda split: jax.vmap(split)(x)", "JAX tracer"),
        "keras_tensor": ("import keras; x = keras.Input((2,))", "symbolic keras.KerasTensor"),
        "keras_int_variable": ("import keras; x = keras.Variable([[1, 2]])", "unsupported dtype int32"),
    }


#: one subprocess per group: Keras imports TensorFlow anyway
_GROUPS = {"tensorflow": ("tf", "keras"), "torch": ("torch",), "jax": ("jax",)}


@pytest.mark.parametrize("module", list(_GROUPS))
def test_bad_framework_objects_are_refused_in_a_subprocess(module):
    """In subprocesses: before the fix a TensorFlow string tensor aborted the whole process (SIGABRT)."""
    pytest.importorskip(module)
    cases = {k: v for k, v in _framework_bad().items() if k.split("_")[0] in _GROUPS[module]}
    lines = ["import numpy as np", "import fastsplit",
             "split = lambda t: fastsplit.split(t, fastsplit.plan(2, symmetry='none'))"]
    for name, (code, _) in cases.items():
        lines += [f"def case_{name}():", "    fn = None", textwrap.indent(code, "    "),
                  "    return fn(split) if fn is not None else split(x)",
                  "try:", f"    case_{name}()", "except fastsplit.SplitError as exc:",
                  f"    print({name!r}, 'SPLITERROR', exc, flush=True)", "except BaseException as exc:",
                  f"    print({name!r}, 'OTHER', type(exc).__name__, exc, flush=True)", "else:",
                  f"    print({name!r}, 'NO ERROR', flush=True)"]
    proc = subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True, timeout=300)
    got = {}
    for ln in proc.stdout.splitlines():
        name, _, rest = ln.partition(" ")
        got[name.strip("'")] = rest
    for name, (_, match) in cases.items():
        assert name in got, f"{name}: no result (the process ended with {proc.returncode}): {proc.stderr[-1500:]}"
        assert got[name].startswith("SPLITERROR") and match in got[name], f"{name}: {got[name]}"
    assert proc.returncode == 0, proc.stderr[-1500:]


def test_every_job_is_checked_before_any_is_exported(monkeypatch):
    calls = []
    real = interop.export

    def spy(x, *args, **kwargs):
        calls.append(type(x).__name__)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(interop, "export", spy)
    good = np.ones((2, 4), np.float32)
    with pytest.raises(SplitError, match="job 2: x has unsupported dtype int64"):
        split_many([Job(good, plan(4)), Job(good, plan(4)), Job(np.ones((2, 4), np.int64), plan(4))])
    with pytest.raises(SplitError, match="job 1: out has unsupported dtype int32"):
        split_many([Job(good, plan(4)), Job(good, plan(4), out=np.zeros((2, 8), np.int32))])
    assert calls == []


def test_immutable_outs_are_refused():
    tf = pytest.importorskip("tensorflow")
    with pytest.raises(SplitError, match="immutable"):
        split(np.ones((2, 4), np.float32), plan(4), out=tf.zeros((2, 8)))


# -- plan values ------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")

BAD_PLANS = [
    (dict(eps="0.1"), r"eps must be a real number, got '0.1'"),
    (dict(eps=1e300), r"eps must be finite and at most .* got 1e\+300"),
    (dict(eps=NAN), r"eps must be finite .* got nan"),
    (dict(eps=-INF), r"eps must be finite .* got -inf"),
    (dict(eps=True), r"eps must be a real number, got True"),
    (dict(sigma=INF, symmetry="noise"), r"sigma must be finite .* got inf"),
    (dict(sigma=-0.5), r"sigma must be at least 0.0, got -0.5"),
    (dict(sigma="x"), r"sigma must be a real number, got 'x'"),
    (dict(ratios=["a", "b"]), r"ratios must be an array of real numbers, got dtype <U1"),
    (dict(ratios=[0.5, NAN]), r"ratios must be positive and finite, got \[0.5, nan\]"),
    (dict(ratios=[INF, 0.5]), r"ratios must be positive and finite"),
    (dict(ratios=[0.6, 0.6]), r"ratios must sum to 1, got \[0.6, 0.6\]"),
    (dict(ratios=[True, False]), r"ratios must be an array of real numbers, got dtype bool"),
    (dict(width=2.0), r"width must be an integer, got 2.0"),
    (dict(width=True), r"width must be an integer, got True"),
    (dict(width=-3), r"width must be at least 1, got -3"),
    (dict(width="4"), r"width must be an integer, got '4'"),
    (dict(copies=2.0), r"copies must be an integer, got 2.0"),
    (dict(copies=-1), r"copies must be at least 1, got -1"),
    (dict(seed="x"), r"seed must be an integer, got 'x'"),
    (dict(seed=1.5, symmetry="noise"), r"seed must be an integer, got 1.5"),
    (dict(symmetry=5), r"symmetry must be one of .* got 5"),
    (dict(symmetry=["none"]), r"symmetry must be one of .* got \['none'\]"),
    (dict(neurons=[[0], [1, 2]]), r"neurons must be None, integer indices or a boolean mask"),
    (dict(neurons=[0.5]), r"integer"),
    (dict(eps=-0.1, symmetry="direction"), r"eps of symmetry='direction' must be at least 0, got -0.1"),
    (dict(eps=INF, symmetry="direction"), r"eps must be finite .* got inf"),
    (dict(sigma=-1, symmetry="fresh"), r"sigma must be at least 0.0, got -1"),
    (dict(neurons=[0], ratios=[0.5, 0.5], symmetry="fresh"), r"ratios cannot be given with symmetry='fresh'"),
    (dict(ratios=[0.0, 1.0], symmetry="direction"), r"ratios must be positive and finite, got \[0.0, 1.0\]"),
]


@pytest.mark.parametrize("kwargs, match", BAD_PLANS)
def test_plan_refuses_every_bad_argument_naming_it(kwargs, match):
    kwargs = {"width": 4, **kwargs}
    with pytest.raises(SplitError, match=match):
        plan(**kwargs)


BAD_SPLIT_PLANS = [
    (dict(offset=[NAN, 0, 0]), r"offsets must be finite .* got nan for new unit 0"),
    (dict(offset=[0, 0, INF]), r"offsets must be finite .* got inf for new unit 2"),
    (dict(offset=[0, 1e300, 0]), r"offsets must be finite .* got 1e\+300 for new unit 1"),
    (dict(ratio=[1, NAN, 0.5]), r"ratios must be positive and finite, got nan"),
    (dict(ratio=[1, INF, 0.5]), r"ratios must be positive and finite, got inf"),
    (dict(ratio=[1, 0.5, 0.6]), r"the ratios of the copies of unit 1 sum to 1.1, not 1"),
    (dict(ratio=["1", "0.5", "0.5"]), r"ratio must be an array of real numbers"),
    (dict(offset=[None, 0, 0]), r"offset must be an array of real numbers, got dtype object"),
    (dict(width=2.0), r"width must be an integer, got 2.0"),
    (dict(src=[0.0, 1.0, 1.0]), r"src must be a 1-D integer array"),
    (dict(sigma=NAN), r"sigma must be finite .* got nan"),
    (dict(sigma="0.1"), r"sigma must be a real number, got '0.1'"),
    (dict(seed="x"), r"seed must be an integer, got 'x'"),
    (dict(seed=2.5), r"seed must be an integer, got 2.5"),
    (dict(symmetry=5), r"symmetry must be one of .* got 5"),
    (dict(ratio=[1, 0, 1]), r"ratios must be positive and finite, got 0.0"),
    (dict(ratio=[1, 0.5, 0.5], symmetry="fresh"), r"'fresh' plan gives .* new unit 1 has ratio 0.5"),
    (dict(ratio=[1, 0, 1], symmetry="fresh"), r"'fresh' plan gives .* new unit 1 has ratio 0.0"),
    (dict(ratio=[1, 1, -0.0 - 1e-300], symmetry="fresh"), r"ratios must be non-negative and finite"),
    (dict(ratio=[1, 1, NAN], symmetry="fresh"), r"ratios must be non-negative and finite, got nan"),
]


@pytest.mark.parametrize("kwargs, match", BAD_SPLIT_PLANS)
def test_split_plan_refuses_non_finite_and_wrong_typed_fields(kwargs, match):
    fields = dict(width=2, src=[0, 1, 1], ratio=[1.0, 0.5, 0.5], offset=[0.0, 0.0, 0.0], symmetry="none")
    with pytest.raises(SplitError, match=match):
        SplitPlan(**{**fields, **kwargs})


BAD_COMPACT_PLANS = [
    (dict(width=3.0), r"width must be an integer, got 3.0"),
    (dict(width=False), r"width must be an integer, got False"),
    (dict(remove=[0.5]), r"remove must be None, integer indices or a boolean mask"),
    (dict(remove=[[0], [1, 2]]), r"remove must be None, integer indices or a boolean mask"),
    (dict(merge=[[0, 1.5]]), r"a merge group must be integer indices, got \[0, 1.5\]"),
    (dict(merge=[[0, "a"]]), r"a merge group must be integer indices"),
    (dict(merge={0: 1.5}), r"the twins of 0 must be integers"),
    (dict(merge={0.5: [1]}), r"a merge representative must be an integer, got 0.5"),
    (dict(merge=5), r"merge must be a mapping or a sequence of groups, got 5"),
]


@pytest.mark.parametrize("kwargs, match", BAD_COMPACT_PLANS)
def test_compact_plan_refuses_wrong_typed_arguments(kwargs, match):
    with pytest.raises(SplitError, match=match):
        compact_plan(**{"width": 4, **kwargs})


def test_compact_plan_constructor_refuses_wrong_typed_fields():
    for kwargs, match in ((dict(width=3.0, src=[0]), "width must be an integer"),
                          (dict(width=3, src=[0], merge=[(0, 1.5)]), r"merge entries must be"),
                          (dict(width=3, src=[0], merge=5), r"merge must be a sequence"),
                          (dict(width=3, src=[0], merge=[(0.5, (1,))]), r"merge representative must be an integer")):
        with pytest.raises(SplitError, match=match):
            CompactPlan(**kwargs)


def test_plans_copy_the_callers_arrays():
    ratio = np.array([1.0, 0.5, 0.5])
    p = SplitPlan(2, np.array([0, 1, 1]), ratio, np.zeros(3))
    assert ratio.flags.writeable  # the caller's array is not frozen, nor shared
    ratio[1] = 0.9
    assert p.ratio[1] == 0.5


def test_legitimate_plans_still_work():
    assert plan(np.int64(4), [np.int32(1)], copies=np.int64(3), eps=np.float32(0.01), seed=np.uint8(3),
                symmetry="noise", sigma=0).new_width == 6
    assert plan(2, [1], ratios=np.array([0.25, 0.75]), eps=0).ratio.tolist() == [1.0, 0.25, 0.75]
    assert plan(2, eps=-1e30).offset.min() == -1e30
    assert plan(2, eps=3, sigma=1e3, seed=-5, symmetry="noise").seed == -5
    assert compact_plan(np.int64(4), remove=np.array([True, False, False, False]), merge=[np.array([1, 2])]).new_width == 2


def test_bias_offsets_that_the_dtype_cannot_hold_are_refused(cpu_backend):
    p = plan(4, eps=1e5)  # fine for float32, too big for float16
    x16 = np.zeros((2, 4), np.float16)
    out = np.full((2, 8), 3, np.float16)
    with pytest.raises(SplitError, match=r"bias offsets \(up to 1e\+05\) do not fit a float16 tensor"):
        split(x16[0], p, 0, role="bias", out=out[0], backend=cpu_backend)
    np.testing.assert_array_equal(out, 3)
    assert split(x16, p, role="incoming", backend=cpu_backend).shape == (2, 8)  # offsets unused: fine
    np.testing.assert_array_equal(split(np.zeros(4, np.float32), p, 0, role="bias", backend=cpu_backend),
                                  np.array([1e5] * 4 + [-1e5] * 4, np.float32))


# -- the property: the reference result, or SplitError; every input unchanged -----------------------------

DTYPES3 = ["float16", "float32", "float64"]
LAYOUTS = ["contiguous", "fortran", "negative", "sliced", "unaligned"]
OUTS = ["none", "fresh", "fresh_big_endian", "strided", "negative", "unaligned", "x", "overlap", "shared",
        "other_input"]


def _layout(a, layout, rng, base=None):
    """``a``'s values in a new array of the given memory layout."""
    if layout == "contiguous":
        return a.copy()
    if layout == "fortran":
        return np.asfortranarray(a)
    if layout == "negative":
        ax = int(rng.integers(a.ndim))
        return np.flip(np.ascontiguousarray(np.flip(a, ax)), ax)
    if layout == "sliced":
        big = np.zeros(tuple(2 * s + 1 for s in a.shape), a.dtype)
        v = big[tuple(slice(1, None, 2) for _ in a.shape)]
        v[...] = a
        return v
    if layout == "unaligned":
        u = unaligned(a.shape, a.dtype)
        u[...] = a
        return u
    raise AssertionError(layout)


@st.composite
def scenarios(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = np.dtype(draw(st.sampled_from(DTYPES3))).newbyteorder(draw(st.sampled_from("<>")))
    ndim = draw(st.integers(1, 3))
    shape = draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim))
    axis = draw(st.integers(0, ndim - 1))
    width = draw(st.integers(1, 4))
    positions = draw(st.sampled_from([1, 1, 2]))
    shape[axis] = width * positions
    kind = draw(st.sampled_from(["split", "split", "compact"]))
    if kind == "split":
        neurons = draw(st.lists(st.integers(0, width - 1), max_size=3))
        symmetry = draw(st.sampled_from(["none", "nudge", "noise", "asymmetric", "direction", "fresh"]))
        p = plan(width, np.array(neurons, np.int64), copies=draw(st.integers(1, 3)), symmetry=symmetry, eps=0.125,
                 sigma=0.5, seed=draw(st.integers(0, 99)))
    else:
        state = draw(st.lists(st.integers(0, 2), min_size=width, max_size=width))
        state[0] = 0  # unit 0 is kept
        merge = {}
        for u in range(1, width):
            if state[u] == 2:
                merge.setdefault(0, []).append(u)
        p = compact_plan(width, remove=[u for u in range(width) if state[u] == 1], merge=merge or None)
    also = None
    if ndim >= 2 and draw(st.booleans()) and not (kind == "split" and p.symmetry in ("noise", "direction", "fresh")):
        axis2 = draw(st.sampled_from([a for a in range(ndim) if a != axis]))
        w2 = draw(st.integers(1, 3))
        shape[axis2] = w2
        also = (plan(w2, draw(st.lists(st.integers(0, w2 - 1), max_size=2)), symmetry="nudge", eps=0.25), axis2,
                draw(st.sampled_from(ROLES)))
    role = draw(st.sampled_from(ROLES))
    channels = draw(st.sampled_from(["last", "first"]))
    x = _layout((rng.standard_normal(shape) * 4).astype(dtype), draw(st.sampled_from(LAYOUTS)), rng)
    return dict(x=x, p=p, axis=axis, role=role, channels=channels, also=also, kind=kind,
                out=draw(st.sampled_from(OUTS)), rng=rng, two_jobs=draw(st.booleans()))


def _out_shape(x, p, axis, also):
    shape = list(x.shape)
    shape[axis] = shape[axis] // p.width * p.new_width
    if also is not None:
        q, a2 = also[0], also[1]
        shape[a2] = shape[a2] // q.width * q.new_width
    return tuple(shape)


def _owner(a):
    """The ndarray that owns ``a``'s memory."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _make_out(choice, x, shape, rng):
    """The ``out`` array of one choice: fresh, oddly laid out, or a view of the memory ``x`` lives in."""
    native = x.dtype.newbyteorder("=")
    if choice == "none":
        return None
    if choice == "fresh":
        return np.full(shape, 7, native)
    if choice == "fresh_big_endian":
        return np.full(shape, 7, native.newbyteorder(">"))
    if choice in ("strided", "negative", "unaligned"):
        return _layout(np.full(shape, 7, native), {"strided": "sliced"}.get(choice, choice), rng)
    if choice == "x" and x.shape == shape:
        return x
    raw = _owner(x).ravel(order="K").view(np.uint8)  # every byte of x's buffer
    nbytes = int(np.prod(shape)) * native.itemsize
    if raw.size < nbytes:
        return np.full(shape, 7, native)
    start = 0 if choice == "x" else int(rng.integers(0, raw.size - nbytes + 1))  # may or may not meet x
    return raw[start : start + nbytes].view(native).reshape(shape)


def _check_property(sc, backend):
    x, p, axis, role, channels, also, rng = sc["x"], sc["p"], sc["axis"], sc["role"], sc["channels"], sc["also"], sc["rng"]
    run = compact_many if sc["kind"] == "compact" else split_many
    shape = _out_shape(x, p, axis, also)
    out = _make_out(sc["out"], x, shape, rng)
    x2 = out2 = None
    if sc["two_jobs"] or sc["out"] in ("shared", "other_input"):
        x2 = _layout(np.asarray(rng.standard_normal(x.shape) * 4, x.dtype), "contiguous", rng)
        if sc["out"] == "shared":
            out = np.full(shape, 7, x.dtype.newbyteorder("="))
            out2 = out
        elif sc["out"] == "other_input":  # job 1 writes where job 0 reads
            out, out2 = None, _make_out("x", x, shape, rng)
    jobs = [Job(x, p, axis, role, channels, out, also)]
    if x2 is not None:
        jobs.append(Job(x2, p, axis, role, channels, out2, also))
    arrays = [x, x2, out, out2]
    before = snapshot(*arrays)
    writes = [o for o in (out, out2) if o is not None]
    must_refuse = any(not o.dtype.isnative for o in writes)
    for k, o in enumerate(writes):
        for other in [x, x2] + writes[:k] + writes[k + 1 :]:
            if other is not None and np.shares_memory(o, other):  # nothing to overlap in an empty array
                must_refuse = True
    event(f"out={sc['out']}, must refuse={must_refuse}")
    try:
        results = run(jobs, backend=backend)
    except SplitError:
        unchanged(arrays, before)
        assert must_refuse, "refused a call that has nothing wrong with it"
        return
    assert not must_refuse, "accepted an out that cannot be written in place"
    unchanged([x, x2], before[:2])
    for job, r, o in zip(jobs, results, (out, out2)):
        if o is not None:
            assert r is o
        assert r.dtype.isnative
        close(r, reference(job.x, p, axis, role, channels, also, run=run))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sc=scenarios())
def test_random_layouts_and_outs_give_the_reference_or_split_error(backend, sc):
    _check_property(sc, backend)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from(["float16", "bfloat16", "float32", "float64"]),
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
       out=st.sampled_from(["none", "fresh", "strided", "x", "overlap", "shared"]), role=st.sampled_from(ROLES))
def test_torch_tensors_give_the_reference_or_split_error(seed, dtype, layout, out, role):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    tdt = getattr(torch, dtype)
    base = torch.from_numpy(rng.standard_normal((6, 10)).astype(np.float32)).to(tdt)
    x = {"contiguous": base.reshape(-1)[:12].reshape(3, 4), "transposed": base[:4, :3].t(),
         "sliced": base[::2, 1:9:2]}[layout]
    p = plan(4, [int(rng.integers(4))], symmetry="nudge")
    o = o2 = None
    if out == "fresh":
        o = torch.full((3, 5), 7.0, dtype=tdt)
    elif out == "strided":
        o = torch.full((6, 10), 7.0, dtype=tdt)[::2, ::2]
    elif out == "x":
        o = base.reshape(-1)[:15].reshape(3, 5)
    elif out == "overlap":
        o = base[3:6, 1:6] if layout != "sliced" else base[0:3, 4:9]
    elif out == "shared":
        o = o2 = torch.full((3, 5), 7.0, dtype=tdt)
    jobs = [Job(x, p, role=role, out=o)] + ([Job(x.clone(), p, role=role, out=o2)] if out == "shared" else [])
    before = base.clone()
    must_refuse = out in ("shared",) or (o is not None and out in ("x", "overlap")
                                         and np.shares_memory(interop.export(o).array, interop.export(x).array))
    try:
        results = split_many(jobs)
    except SplitError:
        assert must_refuse
        assert torch.equal(base, before)
        return
    assert not must_refuse
    assert torch.equal(base, before) or out in ("x", "overlap")  # a disjoint out inside base may change base
    want = reference(interop.export(x).array.astype(np.float32), p, role=role)
    got = results[0].float().numpy()
    rtol = 1e-2 if dtype in ("float16", "bfloat16") else 1e-6
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol)


def test_public_split_error_is_the_only_error_type():
    assert fastsplit.SplitError is SplitError and issubclass(SplitError, ValueError)
