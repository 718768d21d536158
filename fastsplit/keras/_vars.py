"""Giving a ``keras.Variable`` a value of a new shape, per Keras backend.

The Keras variable objects stay the same (layers, the optimizer's lists and
the model's trackers keep pointing at them); only the backend value inside
changes. :func:`prepare` builds the new backend value without touching the
variable (it may fail: out of memory), :func:`install` swaps it in and
returns what :func:`restore` needs to undo it (plain attribute writes, which
do not fail).
"""

from __future__ import annotations

import keras

from .. import interop
from ._errors import GrowthError


def backend_name() -> str:
    return keras.backend.backend()


def prepare(var, tensor):
    """The backend value that will hold ``tensor`` (a framework tensor of ``var``'s dtype)."""
    b = backend_name()
    if b == "tensorflow":
        import tensorflow as tf

        old = var._value
        strategy = getattr(old, "_distribute_strategy", None)
        kwargs = dict(
            dtype=var._dtype,
            trainable=var.trainable,
            name=var.name,
            aggregation=var._map_aggregation(var.aggregation),
            synchronization=var._map_synchronization(var.synchronization),
        )
        with tf.init_scope():
            if strategy is not None:
                with strategy.scope():
                    return tf.Variable(tensor, **kwargs)
            return tf.Variable(tensor, **kwargs)
    if b == "jax":
        from keras.src.backend.jax import distribution_lib

        if var._layout is not None:
            return distribution_lib.distribute_tensor(tensor, var._layout)
        return tensor
    if b == "torch":
        import torch
        from keras.src.backend.torch.core import get_device

        p = torch.nn.Parameter(tensor, requires_grad=var.trainable)
        if p.device != torch.device(get_device()):
            p = torch.nn.Parameter(tensor.to(get_device()), requires_grad=var.trainable)
        return p
    raise GrowthError(f"fastsplit.keras supports the tensorflow, jax and torch Keras backends, not {b!r}")


def install(var, value) -> tuple:
    """Put ``value`` (from :func:`prepare`) into ``var``; returns the undo record."""
    undo = (var, var._value, var._shape, var._ndim)
    shape = tuple(int(s) for s in value.shape)
    var._value = value
    var._shape = shape
    var._ndim = len(shape)
    return undo


def restore(undo: tuple) -> None:
    var, value, shape, ndim = undo
    var._value = value
    var._shape = shape
    var._ndim = ndim


def value_of(var):
    """The framework tensor to export (TensorFlow: the tf.Variable's read value is taken by interop).

    A JAX array replicated over several devices (``keras.distribution.DataParallel``)
    exports its first shard, which holds the whole value; a sharded one is refused
    (prune and merge; ``widen`` reads it through :func:`export`).
    """
    b = backend_name()
    if b == "tensorflow":
        return var._value
    value = var.value
    if b == "jax" and len(value.devices()) > 1:
        if not value.sharding.is_fully_replicated:
            raise GrowthError(
                f"variable {var.path} is sharded over {len(value.devices())} devices ({value.sharding.spec}); "
                "fastsplit widens sharded variables but does not prune or merge them yet"
            )
        return value.addressable_shards[0].data
    return value


def export(var, shards: bool = True):
    """``var``'s value as the surgery reads it: an ``interop.Native``, or with ``shards`` a
    ``_shards.Sharded`` for a JAX array on several devices (split shard by shard, each on its device)."""
    if shards and backend_name() == "jax":
        from . import _shards

        if _shards.on_devices(var.value):
            return _shards.Sharded(var.path, var.value)
    return interop.export(value_of(var))


def import_(value, native, new_shape: tuple):
    """The framework tensor of a kernel result ``value`` exported as ``native`` (see :func:`export`)."""
    if not isinstance(native, interop.Native):
        return native.import_(value, new_shape)  # a _shards.Sharded
    return interop.import_(value, native)


def retrack(model) -> None:
    """PyTorch keeps a ParameterDict of every layer's variables: rebuild them after a swap."""
    if backend_name() != "torch":
        return
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if hasattr(layer, "_torch_params"):
            layer._track_variables()


def full(var_or_shape, shape, dtype, fill: float):
    """A framework tensor of ``shape`` filled with ``fill`` (fresh optimizer slots); a JAX variable on several
    devices gets it with its own sharding, each device making its shard."""
    if backend_name() == "jax" and hasattr(var_or_shape, "value"):
        from . import _shards

        if _shards.on_devices(var_or_shape.value):
            return _shards.fill(var_or_shape.value, shape, keras.backend.standardize_dtype(dtype), fill)
    return keras.ops.convert_to_tensor(keras.ops.full(shape, fill, dtype=dtype))
