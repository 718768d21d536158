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
from fs_testing import TOL

from fastsplit import CompactPlan, Job, SplitError, SplitPlan, compact_plan, plan, split, split_many

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
