"""Growth under keras.distribution.ModelParallel on JAX host devices: the scenarios of test_sharded.py.

Run as ``python sharded_scenarios.py DEVICES NAME...`` in a fresh process (the device count must be
set before JAX is imported); prints one JSON line per scenario, ``{"name", "ok", "error", ...}``.
Every check is an ``assert`` here: a scenario that returns is one that passed.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

DEVICES = int(sys.argv[1])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"
os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers as L  # noqa: E402

import fastsplit  # noqa: E402
import fastsplit.keras as fk  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_disable_most_optimizations", True)  # tiny models: compile time is all the time
TOL = 1e-5
RNG = np.random.default_rng(0)
X = RNG.standard_normal((16, 8)).astype("float32")
Y = RNG.standard_normal((16, 2)).astype("float32")


def distribute(shape, names, layouts):
    devices = keras.distribution.list_devices("cpu")
    assert len(devices) == DEVICES, devices
    mesh = keras.distribution.DeviceMesh(shape, names, devices)
    lm = keras.distribution.LayoutMap(mesh)
    for k, v in layouts.items():
        lm[k] = v
    batch = "batch" if "batch" in names else None
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=lm, batch_dim_name=batch))


def mlp(width=8):
    m = keras.Sequential([keras.Input((8,)), L.Dense(width, activation="relu", name="h1"),
                          L.Dense(width, activation="tanh", name="h2"), L.Dense(2, name="out")])
    m.compile(keras.optimizers.Adam(0.01), "mse")
    m.train_on_batch(X, Y)
    return m


def variables(model):
    return [v for v in list(model.weights) + list(model.optimizer.variables) if len(v.shape)]


def specs(model):
    return {v.path: tuple(v.value.sharding.spec) for v in variables(model)}


def expected_specs(model):
    """What keras.distribution gives each variable (the optimizer slots follow their variables)."""
    return {v.path: tuple(v._layout.backend_layout.spec) for v in variables(model)}


def check_replicas(model):
    """Every copy of one shard is bit-identical, and every shard is on the device the sharding names."""
    for v in variables(model):
        value = v.value
        want = value.sharding.devices_indices_map(value.shape)
        seen = {}
        for s in value.addressable_shards:
            assert s.index == want[s.device], (v.path, s.device)
            key = str(s.index)
            if key in seen:
                np.testing.assert_array_equal(np.asarray(s.data), seen[key], err_msg=v.path)
            else:
                seen[key] = np.asarray(s.data)


def snapshot(model):
    snap = {v.path: np.array(v.numpy(), copy=True) for v in list(model.weights) + list(model.optimizer.variables)}
    return snap, specs(model)


def assert_same(a, b):
    assert a[1] == b[1]
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        assert a[0][k].shape == b[0][k].shape, k
        np.testing.assert_array_equal(a[0][k], b[0][k], err_msg=k)


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(a).max())


def grow(model, plans, symmetry, x=X):
    """Widen, check function, layouts, replicas and transfers; returns the event as a dict."""
    before = np.asarray(model.predict_on_batch(x))
    layout_before = specs(model)
    event = fk.widen(model, plans, symmetry=symmetry)
    after = np.asarray(model.predict_on_batch(x))
    err = rel(before, after)
    assert err <= TOL, (symmetry, err)
    assert specs(model) == layout_before == expected_specs(model)
    check_replicas(model)
    assert event.transfers, "a sharded event reports its transfers"
    for dev, t in event.transfers.items():
        assert t["received"] == t["ideal"] <= t["gather"], (dev, t)
    return {"err": err, "transfers": event.transfers, "bytes_new": event.bytes_new}


def trains(model, x=X, y=Y):
    loss = model.train_on_batch(x, y)
    assert np.isfinite(loss), loss
    check_replicas(model)
    return float(loss)


# -- scenarios ----------------------------------------------------------------------------------------


def produced():
    """Kernels sharded on the axis they produce: h1 (sharded axis), h2 (consumed axis whole, produced sharded)."""
    distribute((DEVICES,), ["model"], {".*h1/kernel": (None, "model"), ".*h2/kernel": (None, "model")})
    m = mlp(DEVICES * 2)
    w = DEVICES * 2
    out = {}
    for sym in ("none", "fresh"):
        units = list(range(0, w, 2)) + [w - 1] * DEVICES  # a unit split many times: its copies cross shards
        out[sym] = grow(m, {"h1": units, "h2": list(range(w // 2, w)) + [0] * (DEVICES // 2 * 2)}, sym)
        w = int(m.get_layer("h1").units)
    assert tuple(m.get_layer("h1").kernel.shape) == (8, w)
    out["loss"] = trains(m)
    return out


def consumed():
    """Kernels sharded on the axis they consume (batch x model mesh): each producer splits shard by shard."""
    distribute((2, DEVICES // 2), ["batch", "model"],
               {".*h1/kernel": ("model", None), ".*h2/kernel": ("model", None), ".*out/kernel": ("model", None)})
    m = mlp(8)
    out = {s: grow(m, {"h1": [1, 2, 7, 7], "h2": [0, 3, 4, 5]}, s) for s in ("none", "fresh")}
    assert tuple(m.get_layer("h2").kernel.shape) == (16, 16)
    out["loss"] = trains(m)
    return out


def both_axes():
    """A kernel sharded on both of its axes, both split in one event (a two-axis job across shards)."""
    distribute((2, DEVICES // 2), ["batch", "model"],
               {".*h1/kernel": (None, "model"), ".*h2/kernel": ("batch", "model")})
    m = mlp(8)
    out = {s: grow(m, {"h1": [0, 1, 5, 6, 7, 7, 7, 7], "h2": [2, 3, 4, 4]}, s) for s in ("none", "fresh")}
    out["loss"] = trains(m)
    return out


def fit_callback():
    """Growth from a callback inside fit (the live state is in model._jax_state), then fit goes on."""
    distribute((2, DEVICES // 2), ["batch", "model"], {".*h1/kernel": (None, "model"), ".*h2/kernel": ("model", None)})
    m = mlp(8)
    events = []

    class Grow(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                events.append(fk.widen(self.model, {"h1": None, "h2": [0, 1]}))

    hist = m.fit(X, Y, epochs=3, batch_size=8, verbose=0, callbacks=[Grow()])
    assert np.isfinite(hist.history["loss"]).all()
    assert tuple(m.get_layer("h1").kernel.shape) == (8, 16) and tuple(m.get_layer("h2").kernel.shape) == (16, 10)
    assert specs(m) == expected_specs(m)
    check_replicas(m)
    return {"loss": hist.history["loss"], "transfers": events[0].transfers}


def embedding():
    """Embedding table and Dense kernels sharded on the model axis; the embedding width grows."""
    distribute((DEVICES,), ["model"], {".*embeddings": (None, "model"), ".*h/kernel": ("model", None)})
    tokens = RNG.integers(0, 20, size=(16, 5)).astype("int32")
    inp = keras.Input((5,), dtype="int32")
    h = L.Embedding(20, DEVICES * 2, name="emb")(inp)
    h = L.GlobalAveragePooling1D()(h)
    h = L.Dense(DEVICES, activation="relu", name="h")(h)
    m = keras.Model(inp, L.Dense(2, name="out")(h))
    m.compile(keras.optimizers.Adam(0.01), "mse")
    m.train_on_batch(tokens, Y)
    out = {s: grow(m, {"emb": [0, 1] * DEVICES, "h": list(range(DEVICES))}, s, x=tokens) for s in ("none", "fresh")}
    out["loss"] = trains(m, tokens, Y)
    return out


def refusals():
    """A width the mesh cannot shard (on a produced and on a consumed axis), direction across shards, prune of a
    sharded variable: all refused, the model bit-identical, no event recorded."""
    distribute((DEVICES,), ["model"], {".*h1/kernel": (None, "model"), ".*out/kernel": ("model", None)})
    m = mlp(DEVICES * 2)
    snap = snapshot(m)
    messages = {}
    for name, call in {
        "produced": lambda: fk.widen(m, {"h1": [0]}, symmetry="none"),
        "consumed": lambda: fk.widen(m, {"h2": [0, 1, 2]}),
        "direction": lambda: fk.widen(m, {"h1": list(range(DEVICES * 2))}, symmetry="direction"),
        "prune": lambda: fk.prune(m, {"h1": [0]}, data=None),
    }.items():
        try:
            call()
        except fk.GrowthError as exc:
            messages[name] = str(exc)
        else:
            raise AssertionError(f"{name} was not refused")
        assert_same(snap, snapshot(m))
        assert not fk.history(m)
    w = DEVICES * 2
    assert "sequential/h1/kernel" in messages["produced"] and "'model'" in messages["produced"], messages
    assert f"{w + DEVICES}, {w + 2 * DEVICES}" in messages["produced"], messages
    assert "sequential/out/kernel" in messages["consumed"] and f"{w + DEVICES}" in messages["consumed"], messages
    assert "direction" in messages["direction"] and "fresh" in messages["direction"], messages
    assert "sharded" in messages["prune"], messages
    trains(m)
    return messages


def draws():
    """Fresh units on an axis split shard by shard while the other axis is sharded: drawn at the scale of
    the whole source unit (not of the device's rows), independently on each shard, replicas identical."""
    distribute((2, DEVICES // 2), ["batch", "model"], {".*h1/kernel": ("model", None)})
    inp = keras.Input((64,))
    m = keras.Model(inp, L.Dense(2, name="out")(L.Dense(32, activation="relu", name="h1")(inp)))
    m.compile(keras.optimizers.Adam(0.01), "mse")
    k = m.get_layer("h1").kernel
    scale = np.repeat(10.0 ** np.arange(DEVICES // 2), 64 // (DEVICES // 2))[:, None]  # each model shard its own scale
    k.assign((RNG.standard_normal((64, 32)) * scale).astype("float32"))
    source = np.asarray(k.numpy())
    x = RNG.standard_normal((16, 64)).astype("float32")
    event = grow(m, {"h1": None}, "fresh", x=x)
    new = np.asarray(m.get_layer("h1").kernel.numpy())[:, 32:]
    np.testing.assert_array_equal(np.asarray(m.get_layer("h1").kernel.numpy())[:, :32], source)
    ratio = float(new.std() / source.std())
    assert 0.8 < ratio < 1.2, ratio  # the whole column's scale: with per-device scales the small rows stay small
    rows = 64 // (DEVICES // 2)
    small = new[:rows].std() / source[:rows].std()
    assert DEVICES == 2 or small > 3, small
    blocks = [new[i * rows:(i + 1) * rows] / new[i * rows:(i + 1) * rows].std() for i in range(DEVICES // 2)]
    for i in range(1, len(blocks)):
        assert not np.allclose(blocks[0], blocks[i]), "shards draw independently"
    for t in event["transfers"].values():
        assert t["received"] == 0
    # a replicated variable draws exactly as an unsharded split
    r = keras.Sequential([keras.Input((8,)), L.Dense(8, name="r"), L.Dense(2, name="r_out")])
    source = np.asarray(r.get_layer("r").kernel.numpy())
    fk.widen(r, {"r": [0, 3, 3]})
    want = fastsplit.split(source, fastsplit.plan(8, [0, 3, 3], symmetry="fresh"), axis=1, role="incoming")
    np.testing.assert_array_equal(np.asarray(r.get_layer("r").kernel.numpy()), want)
    assert r.get_layer("r").kernel.value.sharding.is_fully_replicated
    return {"ratio": ratio, **event}


def transformer():
    """A transformer block sharded as Keras' recipes do (attention heads, FFN, embedding width on "model"):
    heads, key_dim, FFN and d_model grow in one event."""
    distribute((2, DEVICES // 2), ["batch", "model"], {
        ".*emb/embeddings": (None, "model"),
        ".*mha/(query|key|value)/kernel": (None, "model", None),
        ".*mha/attention_output/kernel": ("model", None, None),
        ".*ffn1/kernel": (None, "model"),
        ".*ffn2/kernel": ("model", None),
    })
    k = DEVICES // 2
    tokens = RNG.integers(0, 30, size=(16, 6)).astype("int32")
    inp = keras.Input((6,), dtype="int32")
    h = L.Embedding(30, 2 * k, name="emb")(inp)
    h = L.Add()([h, L.MultiHeadAttention(num_heads=k, key_dim=4, name="mha")(h, h)])
    f = L.Dense(2 * k, activation="relu", name="ffn1")(h)
    h = L.Add()([h, L.Dense(2 * k, name="ffn2")(f)])
    m = keras.Model(inp, L.Dense(2, name="out")(L.GlobalAveragePooling1D()(h)))
    m.compile(keras.optimizers.Adam(0.01), "mse")
    m.train_on_batch(tokens, Y)
    plans = {"mha/heads": list(range(k)), "mha/key_dim": [0], "ffn1": list(range(2 * k)), "emb": list(range(k))}
    out = {s: grow(m, plans, s, x=tokens) for s in ("none", "fresh")}
    mha = m.get_layer("mha")
    assert (mha.num_heads, tuple(m.get_layer("ffn1").kernel.shape)) == (3 * k, (4 * k, 6 * k))
    assert tuple(m.get_layer("emb").embeddings.shape) == (30, 4 * k)
    out["loss"] = trains(m, tokens, Y)
    return out


SCENARIOS = {f.__name__: f for f in (produced, consumed, both_axes, fit_callback, embedding, refusals, draws,
                                     transformer)}

if __name__ == "__main__":
    for name in sys.argv[2:]:
        t = time.perf_counter()
        try:
            result = {"name": name, "ok": True, **SCENARIOS[name]()}
        except BaseException:
            result = {"name": name, "ok": False, "error": traceback.format_exc()[-4000:]}
        finally:
            keras.distribution.set_distribution(None)
            keras.backend.clear_session()
        result["seconds"] = time.perf_counter() - t
        print("RESULT " + json.dumps(result, default=str), flush=True)
