"""Widening under tf.distribute.MirroredStrategy (2 logical CPUs) and keras.distribution.DataParallel
on JAX (2 host devices). Each runs in a fresh process: the device flags must be set before import."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import BACKEND

MODEL = """
import numpy as np
import keras
from keras import layers as L
import fastsplit.keras as fk

def build():
    m = keras.Sequential([keras.Input((6,)), L.Dense(8, activation="relu", name="h1"),
                          L.Dense(6, activation="relu", name="h2"), L.Dense(2, name="out")])
    m.compile(keras.optimizers.Adam(0.01), "mse")
    return m

rng = np.random.default_rng(0)
x = rng.standard_normal((32, 6)).astype("float32")
y = rng.standard_normal((32, 2)).astype("float32")

class Grow(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            fk.widen(self.model, {"h2": [0, 1]})
"""

TF = MODEL + """
import tensorflow as tf
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    model = build()
model.fit(x, y, epochs=1, batch_size=8, verbose=0)
before = model.predict(x, verbose=0)
fk.widen(model, {"h1": None}, symmetry="none")
assert np.abs(model.predict(x, verbose=0) - before).max() <= 1e-5 * np.abs(before).max()
hist = model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[Grow()])
assert np.isfinite(hist.history["loss"]).all()
variables = list(model.weights) + [v for v in model.optimizer.variables if len(v.shape)]
for v in variables:
    inner = v._value
    assert isinstance(inner, tf.distribute.DistributedValues), (v.path, type(inner))
    vals = [t.numpy() for t in inner.values]
    assert len(vals) == 2 and {t.device.split(":")[-1] for t in inner.values} == {"0", "1"}, v.path
    np.testing.assert_array_equal(vals[0], vals[1], err_msg=v.path)
assert tuple(model.get_layer("h1").kernel.shape) == (6, 16)
assert tuple(model.get_layer("h2").kernel.shape) == (16, 8)
print("OK")
"""

JAX = MODEL + """
import jax
devices = keras.distribution.list_devices("cpu")
assert len(devices) == 2, devices
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
model = build()
model.fit(x, y, epochs=1, batch_size=8, verbose=0)
before = model.predict(x, verbose=0)
fk.widen(model, {"h1": None}, symmetry="none")
assert np.abs(model.predict(x, verbose=0) - before).max() <= 1e-5 * np.abs(before).max()
hist = model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[Grow()])
assert np.isfinite(hist.history["loss"]).all()
for v in list(model.weights) + list(model.optimizer.variables):
    assert len(v.value.devices()) == 2 and v.value.sharding.is_fully_replicated, v.path
assert tuple(model.get_layer("h2").kernel.shape) == (16, 8)
print("OK")
"""


def _run(code, env):
    env = {**os.environ, **env}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute needs the TensorFlow backend")
def test_mirrored_strategy_two_cpus():
    setup = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
"""
    _run(setup + TF, {"KERAS_BACKEND": "tensorflow"})


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution.DataParallel is tested on JAX")
def test_jax_data_parallel_two_devices():
    _run(JAX, {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
