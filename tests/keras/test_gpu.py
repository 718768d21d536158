"""Growth with the model's variables in GPU memory (JAX or PyTorch on CUDA): the CuPy kernel runs on
the framework's own device buffers (``test_zero_copy.py`` compares the addresses, on the GPU too),
nothing of weight size is copied to the host, and training goes on. ``test_optim.py`` and
``test_widen.py`` check optimizer transport and function preservation wherever the variables live.

Skipped where the Keras backend keeps its variables in CPU memory. ``FASTSPLIT_GPU_OUT`` (a folder), when
set, receives each profile's copies as JSON for the run's record.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import tempfile

import numpy as np
import pytest
from conftest import BACKEND, data, predict, rel_err

import fastsplit
import fastsplit.keras as fk
from fastsplit import interop

keras = pytest.importorskip("keras")
L = keras.layers


def _device_of_new_variables() -> str:
    v = keras.Variable(np.zeros((2, 2), "float32"))
    return interop.export(v.value).device[0]


def _why_not() -> str | None:
    try:
        if _device_of_new_variables() != "cuda":
            return f"Keras ({BACKEND}) keeps new variables in CPU memory here"
    except Exception as exc:  # no DLPack export for this backend's device
        return f"cannot tell where {BACKEND} keeps variables: {exc}"
    ok, why = fastsplit.backends()["cupy"]
    return None if ok else f"the CuPy backend is not usable: {why}"


WHY = _why_not()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(WHY is not None, reason=str(WHY))]

#: a device-to-host copy this large would be a weight (the model's smallest kernel is 1 MiB); column
#: statistics for the draws of a "fresh" split (8 bytes a unit) stay far below it
D2H_LIMIT = 64 << 10


def model_512(optimizer="adam"):
    """Dense 512 -> Dense 512 -> Dense 512 -> 10 (1 MiB kernels), trained one step with ``optimizer``."""
    inp = keras.Input((512,))
    h = L.Dense(512, activation="relu", name="h1")(inp)
    h = L.Dense(512, activation="tanh", name="h2")(h)
    model = keras.Model(inp, L.Dense(10, name="out")(h))
    model.compile(optimizer=optimizer, loss="mse")
    x, y = data((512,), n=64, out=10)
    model.train_on_batch(x, y)
    return model, x, y


def conv_bn():
    inp = keras.Input((16, 16, 8))
    h = L.Conv2D(32, 3, padding="same", name="conv")(inp)
    h = L.BatchNormalization(name="bn")(h)
    h = L.ReLU()(h)
    h = L.GlobalAveragePooling2D()(h)
    h = L.Dense(24, activation="relu", name="fc")(h)
    model = keras.Model(inp, L.Dense(4, name="out")(h))
    model.compile(optimizer="adam", loss="mse")
    x, y = data((16, 16, 8), n=32, out=4)
    for _ in range(2):
        model.train_on_batch(x, y)
    return model, x, y


def all_variables(model):
    """The float variables: the ones a growth event rewrites (the step counter is an int scalar)."""
    every = list(model.weights) + list(model.optimizer.variables)
    return [v for v in every if "float" in str(v.dtype)]


@pytest.mark.parametrize("build", [model_512, conv_bn])
def test_widen_on_the_gpu_keeps_the_function_and_the_variables_on_the_gpu(build):
    model, x, y = build()
    before = predict(model, x)
    fk.widen(model, {g.producers[0]: None for g in fk.coupled_groups(model) if g.splittable})
    event = fk.history(model)[-1]
    assert event.backend == "cupy"
    assert rel_err(predict(model, x), before) <= 1e-5
    for v in all_variables(model):
        assert interop.export(v.value).device[0] == "cuda", v.path
    loss = [float(model.train_on_batch(x, y)) for _ in range(3)]
    assert np.all(np.isfinite(loss))


def _copies_torch(run) -> tuple[list, list]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as f:
            events = json.load(f)["traceEvents"]
    copies = [{"name": e["name"], "bytes": int(e.get("args", {}).get("bytes", -1))}
              for e in events if e.get("cat") == "gpu_memcpy"]
    kernels = [e["name"] for e in events if e.get("cat") == "kernel"]
    return copies, kernels


_BYTES = re.compile(r"(?:num_bytes|bytes|size)\D{0,3}(\d+)", re.I)


def _copies_jax(run) -> tuple[list, list]:
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            run()
            jax.effects_barrier()
        paths = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)
        assert paths, "the JAX profiler wrote no perfetto trace"
        with gzip.open(paths[0], "rt", encoding="utf-8") as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    copies, kernels = [], []
    for e in events:
        name = str(e.get("name", ""))
        args = e.get("args", {}) or {}
        if re.search(r"memcpy|memset", name, re.I):
            sizes = [int(n) for n in _BYTES.findall(json.dumps(args))]
            copies.append({"name": name, "bytes": max(sizes) if sizes else -1, "args": args})
        elif "fastsplit" in name:
            kernels.append(name)
    return copies, kernels


def _profiled_widen():
    """(profiler, copies, kernels, model, x, outputs before) of one widen of a fresh model, profiled.

    JAX's own profiler first under JAX; PyTorch's (CUPTI sees every CUDA context of the process) where
    the first saw no split kernel.
    """
    tools = [("jax", _copies_jax)] if BACKEND == "jax" else []
    try:
        import torch

        if torch.cuda.is_available():
            tools.append(("torch", _copies_torch))
    except ImportError:
        pass
    assert tools, "no profiler that sees CUDA work"
    for profiler, tool in tools:
        model, x, _ = model_512()
        before = predict(model, x)
        copies, kernels = tool(lambda m=model: fk.widen(m, {"h1": None, "h2": None}))
        if any("fastsplit" in k for k in kernels):
            return profiler, copies, kernels, model, x, before
    return profiler, copies, kernels, model, x, before


def test_no_weight_crosses_to_host_memory_during_a_growth_event():
    profiler, copies, kernels, model, x, before = _profiled_widen()
    out = os.environ.get("FASTSPLIT_GPU_OUT")
    if out:
        with open(os.path.join(out, f"profile_{BACKEND}.json"), "w", encoding="utf-8") as f:
            json.dump({"profiler": profiler, "copies": copies, "kernels": kernels}, f, indent=1, default=str)
    assert any("fastsplit" in k for k in kernels), f"the profile did not see the split kernel: {kernels[:20]}"
    to_host = [c for c in copies if re.search(r"dtoh|d2h|device ?to ?host", c["name"], re.I)]
    assert all(c["bytes"] >= 0 for c in to_host), f"a device-to-host copy of unknown size: {to_host}"
    big = [c for c in to_host if c["bytes"] >= D2H_LIMIT]
    assert not big, f"weights went to host memory: {big}"
    assert rel_err(predict(model, x), before) <= 1e-5


def test_split_on_plateau_grows_inside_fit_on_the_gpu():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 32)).astype("float32")
    y = (x[:, :4].sum(axis=1) > 0).astype("int64")
    model = keras.Sequential([keras.Input((32,)), L.Dense(16, activation="relu", name="hidden"),
                              L.Dense(2, activation="softmax", name="out")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    grow = fk.SplitOnPlateau(monitor="loss", min_delta=10.0, patience=0, max_units=64, verbose=0)
    hist = model.fit(x, y, epochs=4, batch_size=64, callbacks=[grow], verbose=0)
    events = fk.history(model)
    assert events and all(e.backend == "cupy" for e in events)
    assert model.get_layer("hidden").units > 16
    assert np.all(np.isfinite(hist.history["loss"]))
    for v in all_variables(model):
        assert interop.export(v.value).device[0] == "cuda", v.path
