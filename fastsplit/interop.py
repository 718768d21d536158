"""DLPack in and out of TensorFlow, JAX, PyTorch, NumPy and CuPy.

A framework tensor is exported to the array library of its device (NumPy for
CPU memory, CuPy for CUDA memory) without copying, the kernel writes a fresh
array there, and that array is imported back into the framework, again
without a copy. A framework is only recognised when it is already imported
(its module is in ``sys.modules``), so this module never imports one itself.

Known traps handled here: ``tf.Variable`` does not export (its read value
does); PyTorch refuses tensors that require grad (they are detached); NumPy
has no DLPack code for bfloat16 (bfloat16 travels as 16-bit integers and is
viewed back as ``ml_dtypes.bfloat16``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._errors import SplitError

KINDS = ("numpy", "cupy", "torch", "jax", "tensorflow")

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
    raise SplitError(f"cannot split an object of type {type(x).__module__}.{type(x).__qualname__}")


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


def export(x) -> Native:
    """Export ``x`` to NumPy or CuPy without a copy.

    Cost: no data movement; TensorFlow's export synchronises its device.
    """
    if _module_root(x) == "keras" and hasattr(x, "value"):  # a keras.Variable
        x = x.value
    kind = kind_of(x)
    if kind == "numpy":
        return Native(x, "numpy", ("cpu", 0))
    if kind == "cupy":
        return Native(x, "cupy", ("cuda", int(x.device.id)))
    if kind == "torch":
        import torch

        t = x.detach()
        device = ("cuda", t.device.index or 0) if t.device.type == "cuda" else ("cpu", 0)
        if t.device.type not in ("cpu", "cuda"):
            raise SplitError(f"cannot split a torch tensor on device {t.device}")
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
