"""Growth across worker processes: the scenarios of test_multiworker.py, run by one worker each.

Run as ``python multiworker_scenarios.py BACKEND INDEX PORTS OUTDIR NAME...`` (``PORTS`` is
``p0,p1``, loopback ports of the two workers): TensorFlow builds a
``tf.distribute.MultiWorkerMirroredStrategy`` from a loopback ``TF_CONFIG``, JAX calls
``keras.distribution.initialize`` with two CPU processes. Each scenario prints one line
``RESULT {"name", "ok", "error", ...}`` and writes its variables to ``OUTDIR/NAME-wINDEX.npz``;
the test compares the workers' files. Every check that one worker can make alone is an
``assert`` here. Each worker trains on data of its own (seeded by its index), so logs that
agree across workers can only come from reduced metrics.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

BACKEND, INDEX, PORTS, OUT = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4]
NAMES = sys.argv[5:]
os.environ["KERAS_BACKEND"] = BACKEND
if BACKEND == "tensorflow":
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in PORTS]},
                                          "task": {"type": "worker", "index": INDEX}})  # fmt: skip
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers as L  # noqa: E402

import fastsplit  # noqa: E402
import fastsplit.keras as fk  # noqa: E402

if BACKEND == "tensorflow":
    import keras.src.backend.tensorflow.trainer as _trainer
    import tensorflow as tf
    from keras.src import tree

    STRATEGY = tf.distribute.MultiWorkerMirroredStrategy()
    assert STRATEGY.num_replicas_in_sync == 2, STRATEGY.num_replicas_in_sync
    SCOPE = STRATEGY.scope

    # Keras 3.15's fit does not run under MultiWorkerMirroredStrategy (keras-team/keras#20585), before any
    # growth: (1) its symbolic build averages the first input batch over the workers with strategy.reduce,
    # which refuses a tuple of per-replica values; the build needs shapes only, so it takes the local batch;
    # (2) it averages the step's logs over the workers with strategy.reduce(..., axis=0), which fails on a
    # scalar; axis=None averages them the same way (each metric is already summed over every replica).
    def _symbolic_build(model):
        build = model._maybe_symbolic_build

        def local_batch(iterator=None, data_batch=None):
            if iterator is not None:
                for _, _, it in iterator:
                    data_batch = tree.map_structure(lambda v: STRATEGY.experimental_local_results(v)[0], next(it))
                    break
            return build(data_batch=data_batch)

        model._maybe_symbolic_build = local_batch

    _reduce = _trainer.reduce_per_replica

    def _reduce_logs(values, strategy, reduction):
        if reduction == "auto" and _trainer._collective_all_reduce_multi_worker(strategy):
            return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None)
                                      if _trainer._is_per_replica_instance(v) else v, values)  # fmt: skip
        return _reduce(values, strategy, reduction)

    _trainer.reduce_per_replica = _reduce_logs
else:
    import contextlib

    import jax

    jax.config.update("jax_disable_most_optimizations", True)  # tiny models: compiling is most of the time
    keras.distribution.initialize(f"127.0.0.1:{PORTS[0]}", num_processes=2, process_id=INDEX)
    assert jax.process_count() == 2 and len(jax.devices()) == 2, jax.devices()
    _dist = keras.distribution.DataParallel(devices=jax.devices())
    _dist.auto_shard_dataset = False  # each process feeds its own data (its part of every global batch)
    keras.distribution.set_distribution(_dist)
    SCOPE = contextlib.nullcontext

    def _symbolic_build(model):
        pass


RNG = np.random.default_rng(100 + INDEX)  # each worker's own data
X = RNG.standard_normal((32, 6)).astype("float32")
Y = RNG.standard_normal((32, 2)).astype("float32")
FIT = dict(batch_size=8, shuffle=False, verbose=0)


def build():
    with SCOPE():
        keras.utils.set_random_seed(1)  # the same start everywhere (TensorFlow broadcasts it from the chief anyway)
        m = keras.Sequential([keras.Input((6,)), L.Dense(8, activation="tanh", name="h1"),
                              L.Dense(6, activation="tanh", name="h2"), L.Dense(2, name="out")], name="net")  # fmt: skip
        m.compile(keras.optimizers.Adam(0.01, name="adam"), "mse")  # fixed names: the same keys in every dump
    _symbolic_build(m)
    return m


def variables(model):
    return list(model.weights) + list(model.optimizer.variables)


def host(v):
    """This worker's copy of a variable (a JAX array of several processes: its local replica)."""
    if BACKEND == "jax":
        return np.asarray(v.value.addressable_shards[0].data)
    return np.asarray(v)


def dump(model, name):
    np.savez(os.path.join(OUT, f"{name}-w{INDEX}.npz"), **{v.path: host(v) for v in variables(model)})


def widths(model):
    return {n: int(model.get_layer(n).kernel.shape[-1]) for n in ("h1", "h2")}


def forward(model, x=X):
    """The model's function in numpy, from this worker's copy of the weights."""
    w = {v.path.split("/", 1)[1]: host(v) for v in model.weights}
    h = np.tanh(x @ w["h1/kernel"] + w["h1/bias"])
    h = np.tanh(h @ w["h2/kernel"] + w["h2/bias"])
    return h @ w["out/kernel"] + w["out/bias"]


def local_loss(model):
    """The loss on this worker's own data alone (what an unreduced metric would report)."""
    return float(np.mean((forward(model) - Y) ** 2))


class Logs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append({k: float(v) for k, v in (logs or {}).items()})


def plateau_callback(backup_dir=None):
    # min_delta is so large that no epoch improves on the first: the model grows at the end of epoch 1,
    # then the cooldown holds it; select=0.5 ranks units by how far their weights moved ("change")
    return fk.SplitOnPlateau(monitor="loss", min_delta=1e3, patience=0, cooldown=10, select=0.5, seed=7,
                             verbose=0, backup_dir=backup_dir)  # fmt: skip


def state(cb):
    plans = [{k: {"src": p.src.tolist(), "seed": getattr(p, "seed", None), "width": int(p.width)}
              for k, p in ev.items()} for ev in cb._plans]  # fmt: skip
    return {"best": cb.best, "wait": cb.wait, "cooldown_counter": cb.cooldown_counter,
            "event_epochs": list(cb.event_epochs), "plans": plans}  # fmt: skip


# ----------------------------------------------------------------------------------------- scenarios
def widen():
    """``widen`` outside ``fit``: every worker calls it with the same plans; then fit goes on."""
    model = build()
    model.fit(X, Y, epochs=1, **FIT)
    before = forward(model)
    event = fk.widen(model, {"h1": None}, symmetry="fresh")
    after = forward(model)
    assert np.abs(after - before).max() <= 1e-5 * np.abs(before).max()
    # TensorFlow: a seed of its own on each worker, since a new variable's value is the chief's
    # (MultiWorkerMirroredStrategy broadcasts initial values) and the workers agree anyway; JAX
    # broadcasts nothing: each process splits its own replica, and only the same plan and seed
    # everywhere keep the replicas equal
    seed = INDEX if BACKEND == "tensorflow" else 3
    fk.widen(model, {"h2": fastsplit.plan(6, [0, 1, 2], symmetry="fresh", seed=seed)})
    hist = model.fit(X, Y, epochs=1, **FIT)
    assert np.isfinite(hist.history["loss"]).all()
    assert widths(model) == {"h1": 16, "h2": 9}, widths(model)
    if BACKEND == "tensorflow":
        for v in variables(model):
            assert isinstance(v._value, tf.distribute.DistributedValues), (v.path, type(v._value))
    else:
        for v in variables(model):
            assert v.value.sharding.is_fully_replicated and len(v.value.sharding.device_set) == 2, v.path
    dump(model, "widen")
    return {"moved": float(np.abs(after - before).max()), "grew": sorted(event.layers)}


def plateau():
    """SplitOnPlateau inside ``fit``: the decision, the units and the draws, per worker."""
    model = build()
    cb, logs = plateau_callback(), Logs()
    model.fit(X, Y, epochs=3, callbacks=[cb, logs], **FIT)
    assert cb.event_epochs == [1], cb.event_epochs
    dump(model, "plateau")
    return {"logs": logs.epochs, "state": state(cb), "widths": widths(model), "local_loss": local_loss(model)}


class Kill(keras.callbacks.Callback):
    """After the growth epoch's checkpoint: dump what is saved, say so, and wait to be killed."""

    def __init__(self, cb, epoch):
        super().__init__()
        self.cb, self.epoch = cb, epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            dump(self.model, "killed")
            with open(os.path.join(OUT, f"killed-w{INDEX}.json"), "w") as f:
                json.dump({"state": state(self.cb), "widths": widths(self.model)}, f)
            open(os.path.join(OUT, f"kill-me-w{INDEX}"), "w").close()
            time.sleep(600)


class Resumed(keras.callbacks.Callback):
    """Listed after BackupAndRestore: what the restarted fit starts from."""

    def __init__(self, cb):
        super().__init__()
        self.cb, self.seen = cb, None

    def on_train_begin(self, logs=None):
        dump(self.model, "resumed")
        self.seen = {"state": state(self.cb), "widths": widths(self.model),
                     "initial_epoch": int(self.model._initial_epoch or 0)}  # fmt: skip


def backup_dir():
    # BackupAndRestore has no multi-worker logic in Keras 3: every worker writes its own checkpoint,
    # so each needs a directory of its own
    return os.path.join(OUT, "backup", f"w{INDEX}")


def resume_kill():
    """First run: grows at epoch 1, BackupAndRestore saves, then both workers are killed."""
    model = build()
    cb = plateau_callback(backup_dir())
    model.fit(X, Y, epochs=3, callbacks=[cb, keras.callbacks.BackupAndRestore(backup_dir()), Kill(cb, 1)], **FIT)
    raise AssertionError("the worker was not killed")


def resume():
    """Second run, a fresh model: the callback widens it to the checkpoint's widths, BackupAndRestore loads it."""
    model = build()
    assert widths(model) == {"h1": 8, "h2": 6}
    cb = plateau_callback(backup_dir())
    seen = Resumed(cb)
    model.fit(X, Y, epochs=3, callbacks=[cb, keras.callbacks.BackupAndRestore(backup_dir()), seen], **FIT)
    assert cb.event_epochs == [1], cb.event_epochs  # no second growth: the cooldown was resumed too
    dump(model, "resume")
    return {**seen.seen, "final_widths": widths(model)}


SCENARIOS = {f.__name__: f for f in (widen, plateau, resume_kill, resume)}

if __name__ == "__main__":
    for name in NAMES:
        try:
            out = {"name": name, "ok": True, "error": "", **(SCENARIOS[name]() or {})}
        except Exception:
            out = {"name": name, "ok": False, "error": traceback.format_exc()[-4000:]}
        print("RESULT " + json.dumps(out), flush=True)
