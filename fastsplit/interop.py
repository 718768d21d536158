"""DLPack in and out of TensorFlow, JAX, PyTorch, NumPy and CuPy.

A framework tensor is exported to the array library of its device (NumPy for
CPU memory, CuPy for CUDA memory) without copying, the kernel writes a fresh
array there, and that array is imported back into the framework, again
without a copy. A framework is only recognised when it is already imported
(its module is in ``sys.modules``), so this module never imports one itself.

Known traps handled here: ``tf.Variable`` does not export (its read value
does); PyTorch refuses tensors that require grad (they are detached) and
exports a negated view (``torch._neg_view``) without its sign (it is resolved
first, a copy); NumPy has no DLPack code for bfloat16 (bfloat16 travels as
16-bit integers and is viewed back as ``ml_dtypes.bfloat16``); TensorFlow
aborts the whole process when asked to export a string tensor.

So :func:`check` looks at what an object is, and at its dtype, before
anything is exported: a list, a 0-d scalar, an integer, boolean, complex,
string or object array, a masked array, a ragged or sparse tensor, or a
symbolic one (a JAX tracer inside ``jax.jit``, a TensorFlow tensor inside
``tf.function``, a ``keras.KerasTensor``) is refused with a
:class:`SplitError` that says what it is. :func:`export` runs the same check
and turns anything the framework's own export still raises into a
``SplitError``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._errors import SplitError

KINDS = ("numpy", "cupy", "torch", "jax", "tensorflow")

#: the element types fastsplit splits
FLOATS = ("float16", "bfloat16", "float32", "float64")

_DL_CPU = 1
_DL_CUDA = 2


@dataclass(frozen=True)
class Native:
    """An exported array and where it came from.

    Attributes:
        array: a ``numpy.ndarray`` or ``cupy.ndarray`` sharing the input's memory.
        kind: the framework of the input, one of :data:`KINDS`.
        device: ``("cpu", 0)`` or ``("cuda", id)``.
        bf16: True when the framework tensor is bfloat16 (the array is viewed
            as ``ml_dtypes.bfloat16`` on the CPU).
    """

    array: Any
    kind: str
    device: tuple
    bf16: bool = False


def _module_root(x) -> str:
    return type(x).__module__.split(".", 1)[0]


def kind_of(x) -> str:
    """The framework of ``x``, or raise :class:`SplitError` for anything else."""
    if isinstance(x, np.ndarray):
        return "numpy"
    root = _module_root(x)
    if root == "cupy" and "cupy" in sys.modules:
        return "cupy"
    if root == "torch" and "torch" in sys.modules:
        return "torch"
    if root in ("jax", "jaxlib") and "jax" in sys.modules:
        return "jax"
    if root == "tensorflow" and "tensorflow" in sys.modules:
        return "tensorflow"
    if root == "keras" and hasattr(x, "value"):
        return kind_of(x.value)
    if root == "keras" and type(x).__name__ == "KerasTensor":
        raise SplitError(f"cannot split a symbolic keras.KerasTensor (shape {tuple(x.shape)}): it holds no values; "
                         "split the variables of a built model instead")
    if isinstance(x, np.generic):
        raise SplitError(f"cannot split a scalar of type numpy.{type(x).__name__}: it has no axis to split")
    raise SplitError(f"cannot split an object of type {type(x).__module__}.{type(x).__qualname__}")


def _np_dtype_name(dt) -> str:
    """``float16``/``float32``/``float64``/``bfloat16`` for the floats fastsplit splits (either byte order)."""
    if dt.kind == "f" and dt.itemsize in (2, 4, 8):
        return f"float{8 * dt.itemsize}"
    return getattr(dt, "name", str(dt))


def _refuse_dtype(name: str, what: str) -> None:
    if name not in FLOATS:
        raise SplitError(f"{what}has unsupported dtype {name}: fastsplit splits float16, bfloat16, float32 and "
                         "float64 tensors")


def check(x, where: str = "", *, out: bool = False) -> str:
    """What ``x`` is, checked without exporting it: its kind (one of :data:`KINDS`).

    Refuses, with a :class:`SplitError` whose message starts with ``where``
    (``"job 3: "``) and names the argument (``x`` or ``out``):
    anything that is not a numpy, CuPy, PyTorch, JAX or TensorFlow array (a
    list, a numpy scalar, a ``keras.KerasTensor``), a dtype other than
    float16, bfloat16, float32 and float64, a masked array (its mask would be
    lost), a ragged or sparse tensor, a tensor without values (a JAX tracer
    inside ``jax.jit``, a TensorFlow tensor inside ``tf.function``), a
    PyTorch tensor off the CPU and CUDA. With ``out=True``, also what cannot
    be written in place: JAX and TensorFlow tensors (immutable), a PyTorch
    tensor that requires grad or is a negated view, a numpy array that is
    read-only or not in native byte order.

    Cost: attribute reads only; nothing is exported or synchronised.
    """
    what = f"{where}{'out' if out else 'x'} "
    if _module_root(x) == "keras" and hasattr(x, "value"):  # a keras.Variable
        x = x.value
    try:
        kind = kind_of(x)
    except SplitError as exc:
        raise SplitError(f"{what.rstrip()}: {exc}") from None
    if kind in ("numpy", "cupy"):
        if isinstance(x, np.ma.MaskedArray):
            raise SplitError(f"{what}is a numpy masked array: its mask would be lost; pass x.filled(...) or x.data")
        _refuse_dtype(_np_dtype_name(x.dtype), what)
        if out and kind == "numpy" and not x.dtype.isnative:
            raise SplitError(f"{what}has byte order {x.dtype.str!r}, not the machine's: fastsplit writes out in "
                             "place and only in native byte order; pass a native array "
                             "(x.astype(x.dtype.newbyteorder('=')))")
        if out and kind == "numpy" and not x.flags.writeable:
            raise SplitError(f"{what}is read-only")
    elif kind == "torch":
        _check_torch(x, what, out)
    elif kind == "jax":
        _check_jax(x, what, out)
    else:
        _check_tensorflow(x, what, out)
    return kind


def _check_torch(x, what: str, out: bool) -> None:
    import torch

    if x.layout != torch.strided:
        raise SplitError(f"{what}is a torch tensor with layout {x.layout}: fastsplit splits dense (strided) tensors; "
                         "pass x.to_dense()")
    _refuse_dtype(str(x.dtype).removeprefix("torch."), what)
    if x.device.type not in ("cpu", "cuda"):
        raise SplitError(f"{what}is a torch tensor on device {x.device}: fastsplit splits CPU and CUDA tensors")
    if out and x.requires_grad:
        raise SplitError(f"{what}requires grad: fastsplit does not write into it behind autograd's back; "
                         "pass out.detach() or a tensor without grad")
    if out and x.is_neg():
        raise SplitError(f"{what}is a negated view (torch._neg_view): it cannot be written in place")


def _check_jax(x, what: str, out: bool) -> None:
    import jax

    if isinstance(x, jax.core.Tracer):
        raise SplitError(f"{what}is a JAX tracer ({type(x).__name__}: inside jax.jit, grad, vmap or another "
                         "transformation): fastsplit works on concrete arrays; call it outside the traced function")
    if out:
        raise SplitError(f"{what}cannot be a jax tensor: those are immutable")
    _refuse_dtype(_np_dtype_name(np.dtype(x.dtype)), what)
    devices = x.devices()
    if len(devices) != 1:
        raise SplitError(f"{what}is a jax array on {len(devices)} devices: fastsplit splits one device's array; "
                         "gather it first")


def _check_tensorflow(x, what: str, out: bool) -> None:
    import tensorflow as tf

    if not isinstance(x, (tf.Tensor, tf.Variable)):
        raise SplitError(f"{what}is a {type(x).__module__}.{type(x).__qualname__}: fastsplit splits dense "
                         "tf.Tensor and tf.Variable values (a ragged or sparse tensor has no dense layout; "
                         "pass x.to_tensor() or tf.sparse.to_dense(x))")
    if out:
        raise SplitError(f"{what}cannot be a tensorflow tensor: those are immutable")
    _refuse_dtype(x.dtype.name, what)  # before any export: TensorFlow aborts the process exporting strings
    if isinstance(x, tf.Variable):
        if not tf.executing_eagerly():
            raise SplitError(f"{what}is a tf.Variable read inside tf.function: fastsplit needs eager values; "
                             "call it outside the traced function")
    elif tf.is_symbolic_tensor(x):
        raise SplitError(f"{what}is a symbolic tensorflow tensor (inside tf.function or a graph): it holds no "
                         "values; call fastsplit outside the traced function")


class _Capsule:
    """Wraps a legacy DLPack capsule so ``from_dlpack`` functions accept it."""

    def __init__(self, capsule, device):
        self._capsule = capsule
        self._device = device

    def __dlpack__(self, *args, **kwargs):  # the consumer's stream/version hints are moot here
        return self._capsule

    def __dlpack_device__(self):
        return self._device


def _bf16_dtype():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def _from_dlpack(obj, device) -> Any:
    if device[0] == "cuda":
        import cupy

        with cupy.cuda.Device(device[1]):
            return cupy.from_dlpack(obj)
    return np.from_dlpack(obj)


def export(x, where: str = "", *, out: bool = False) -> Native:
    """Export ``x`` to NumPy or CuPy without a copy, after :func:`check`.

    A numpy subclass (``np.matrix``, ``np.memmap``) is viewed as a plain
    ndarray; a negated PyTorch view is resolved (a copy; never for ``out``,
    which :func:`check` refuses). Anything the framework's export still
    raises becomes a :class:`SplitError`.

    Cost: no data movement; TensorFlow's export synchronises its device.
    """
    kind = check(x, where, out=out)
    try:
        return _export(x, kind)
    except SplitError:
        raise
    except Exception as exc:  # a framework's own refusal: nothing has been written
        raise SplitError(f"{where}{'out' if out else 'x'} cannot be exported from {kind} ({type(x).__qualname__}): "
                         f"{type(exc).__name__}: {exc}") from exc


def _export(x, kind: str) -> Native:
    if _module_root(x) == "keras" and hasattr(x, "value"):  # a keras.Variable
        x = x.value
    if kind == "numpy":
        return Native(x if type(x) is np.ndarray else x.view(np.ndarray), "numpy", ("cpu", 0))
    if kind == "cupy":
        return Native(x, "cupy", ("cuda", int(x.device.id)))
    if kind == "torch":
        import torch

        t = x.detach()
        if t.is_neg():  # DLPack would carry the values without their sign
            t = t.resolve_neg()
        device = ("cuda", t.device.index or 0) if t.device.type == "cuda" else ("cpu", 0)
        if t.dtype == torch.bfloat16:
            arr = _from_dlpack(t.view(torch.int16), device)
            return Native(arr.view(np.uint16).view(_bf16_dtype()) if device[0] == "cpu" else arr, kind, device, True)
        return Native(_from_dlpack(t, device), kind, device)
    if kind == "jax":
        import jax.numpy as jnp

        dev = next(iter(x.devices()))
        device = ("cuda", dev.id) if dev.platform == "gpu" else ("cpu", 0)
        if dev.platform not in ("cpu", "gpu"):
            raise SplitError(f"cannot split a jax array on platform {dev.platform}")
        if x.dtype == jnp.bfloat16:
            if device[0] == "cpu":
                return Native(np.asarray(x), kind, device, True)
            import jax

            return Native(_from_dlpack(jax.lax.bitcast_convert_type(x, jnp.uint16), device), kind, device, True)
        return Native(_from_dlpack(x, device), kind, device)
    # tensorflow
    import tensorflow as tf

    if isinstance(x, tf.Variable):
        x = x.read_value()
    spec = x.device or ""
    device = ("cuda", int(spec.rsplit(":", 1)[-1])) if ":GPU:" in spec.upper() else ("cpu", 0)
    dl_dev = (_DL_CUDA, device[1]) if device[0] == "cuda" else (_DL_CPU, 0)
    bf16 = x.dtype == tf.bfloat16
    if bf16:
        x = tf.bitcast(x, tf.uint16)
    arr = _from_dlpack(_Capsule(tf.experimental.dlpack.to_dlpack(x), dl_dev), device)
    if bf16 and device[0] == "cpu":
        arr = arr.view(_bf16_dtype())
    return Native(arr, kind, device, bf16)


def import_(arr, like: Native):
    """Bring a NumPy/CuPy result back into the framework ``like`` came from, without a copy."""
    kind = like.kind
    if kind in ("numpy", "cupy"):
        return arr
    if kind == "torch":
        import torch

        if like.bf16:
            return torch.from_dlpack(arr.view(np.int16)).view(torch.bfloat16)
        return torch.from_dlpack(arr)
    if kind == "jax":
        import jax
        import jax.numpy as jnp

        if like.bf16:
            return jax.lax.bitcast_convert_type(jax.dlpack.from_dlpack(arr.view(np.uint16)), jnp.bfloat16)
        return jax.dlpack.from_dlpack(arr)
    import tensorflow as tf

    if like.bf16:
        return tf.bitcast(tf.experimental.dlpack.from_dlpack(arr.view(np.uint16).__dlpack__()), tf.bfloat16)
    return tf.experimental.dlpack.from_dlpack(arr.__dlpack__())
