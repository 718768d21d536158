"""Zero copies: the kernel reads the framework's own buffers and the new variables live in the
buffers the kernel wrote (compared by address), in CPU memory or, on a GPU, in device memory."""

from __future__ import annotations

import numpy as np
from conftest import BACKEND, compiled

import fastsplit._core as core
import fastsplit.keras as fk


def address(var):
    """Where the framework keeps the variable's data."""
    if BACKEND == "tensorflow":
        return var._value.read_value()._numpy().ctypes.data
    if BACKEND == "jax":
        return var.value.unsafe_buffer_pointer()
    return var.value.data_ptr()


def buffer(a):
    """The address of a kernel input or output: a numpy array, or a CuPy array on the GPU."""
    return a.ctypes.data if isinstance(a, np.ndarray) else a.data.ptr


def test_weights_never_copied(monkeypatch):
    model, x, y = compiled("mlp")
    variables = [v for v in list(model.weights) + list(model.optimizer.variables) if len(v.shape)]
    old = {address(v): v.path for v in variables}
    seen_in, seen_out = [], []
    real = core.split_many

    def spy(jobs, **kwargs):
        seen_in.append([j.x for j in jobs])
        out = real(jobs, **kwargs)
        seen_out.append(out)
        return out

    monkeypatch.setattr(core, "split_many", spy)
    # h1 only: every tensor is split on one axis, so every kernel output becomes a variable
    fk.widen(model, {"h1": None})
    assert len(seen_in) == 1
    inputs = seen_in[0]
    kinds = {type(a).__module__.split(".")[0] for a in inputs}
    assert kinds in ({"numpy"}, {"cupy"}), kinds
    read = {buffer(a) for a in inputs}
    assert read <= set(old), "the kernel read a copy instead of the framework's buffer"
    assert len(read) == len(inputs)
    written = {buffer(a) for a in seen_out[0]}
    new = {address(v) for v in variables}
    widened = [v for v in variables if address(v) in written]
    # every split tensor (h1 kernel and bias, h2 kernel, their Adam m and v) lives where the kernel wrote it
    assert len(widened) == len(inputs) == 3 * 3
    assert written <= new
    model.train_on_batch(x, y)
