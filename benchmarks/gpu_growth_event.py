"""One growth event inside ``fit`` on a model of over 100M parameters trained with Adam, timed by phase.

    KERAS_BACKEND=jax python benchmarks/gpu_growth_event.py --out DIR [--small]

An MLP of six Dense(4096) layers (100.7M parameters) trains with Adam on random data; at the end of
epoch 1 ``SplitEvery`` doubles every hidden layer (to 402M parameters, three times that with the Adam
slots) and training goes on for one more epoch. Written to ``DIR/growth_event_<backend>.json``: the
event's phase times (``GrowthEvent.times``), the new bytes, one device-to-device copy of that many
bytes (CuPy, CUDA events, median of 5) for scale, and the step times before and after the event (the
first step after it includes JAX's recompilation). The whole run is done twice in one process and the
second is reported, the first kept beside it: the first event also compiles CuPy's reductions for the
draws' scale (cached on disk after). A throwaway widen first compiles the kernel, so
the figure is a growth event's, not a first call's. ``--small`` (width 64) is a dry run that needs no GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import numpy as np


def copy_ms(nbytes: int) -> float | None:
    """Median time of one device-to-device copy of ``nbytes`` bytes, or None without a usable GPU."""
    try:
        import cupy

        src = cupy.empty(nbytes, dtype=cupy.uint8)
        dst = cupy.empty(nbytes, dtype=cupy.uint8)
    except Exception:
        return None
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(7):
        start.record()
        dst.data.copy_from_device_async(src.data, nbytes)
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    del src, dst
    cupy.get_default_memory_pool().free_all_blocks()
    return float(np.median(times[2:]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--small", action="store_true", help="width 64: a CPU dry run")
    args = ap.parse_args(argv)
    import _tuning
    import keras

    import fastsplit.keras as fk

    tuning = _tuning.apply_env()

    width, layers, samples, batch = (64, 6, 256, 64) if args.small else (4096, 6, 2048, 256)
    warm = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="a"), keras.layers.Dense(2)])
    fk.widen(warm, {"a": None})  # compiles the kernel (NVRTC or Numba) outside the timed event
    del warm
    def one() -> dict:
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((samples, width)).astype("float32")
        y = rng.integers(0, 10, samples)
        inp = keras.Input((width,))
        h = inp
        for k in range(layers):
            h = keras.layers.Dense(width, activation="relu", name=f"d{k}")(h)
        model = keras.Model(inp, keras.layers.Dense(10, name="out")(h))
        model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=keras.losses.SparseCategoricalCrossentropy(True))
        params_before = int(model.count_params())

        class Steps(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.times = []

            def on_train_batch_begin(self, batch, logs=None):
                self.t = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                if logs and "loss" in logs:
                    float(logs["loss"])  # waits for the step
                self.times.append(time.perf_counter() - self.t)

        steps = Steps()
        grow = fk.SplitEvery(1, start_from_epoch=1, layers=[f"d{k}" for k in range(layers)], verbose=0,
                             stop_when_grown=False, max_units=2 * width)
        t0 = time.perf_counter()
        hist = model.fit(x, y, batch_size=batch, epochs=3, callbacks=[steps, grow], verbose=0)
        wall = time.perf_counter() - t0
        events = fk.history(model)
        assert events, "no growth event"
        event = events[0]
        per_epoch = samples // batch
        before, after = steps.times[per_epoch: 2 * per_epoch], steps.times[2 * per_epoch:]
        backend = keras.backend.backend()
        result = {
            "backend": backend,
            "split_backend": event.backend,
            "device": _device(),
            "params_before": params_before,
            "params_after": int(model.count_params()),
            "tensors": event.tensors,
            "bytes_new": event.bytes_new,
            "times_s": event.times,
            "copy_new_bytes_ms": copy_ms(event.bytes_new),
            "step_s_before_median": float(np.median(before)),
            "first_step_after_s": after[0],
            "step_s_after_median": float(np.median(after[1:])) if len(after) > 1 else None,
            "loss": [float(v) for v in hist.history["loss"]],
            "fit_wall_s": wall,
            "events": len(events),
            "cuda_tuning": tuning or "defaults",
        }
        return result
    first = one()  # in a fresh process: CuPy compiles the reductions of the draws' scale on first use
    gc.collect()
    result = {**one(), "first_event_in_the_process": first}
    backend = result["backend"]
    event_times, after = result["times_s"], result["first_step_after_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"growth_event_{backend}.json").write_text(json.dumps(result, indent=1))
    ms = {k: round(v * 1e3, 2) for k, v in event_times.items()}
    print(f"{backend}: {result['params_before'] / 1e6:.1f}M -> {result['params_after'] / 1e6:.1f}M params, "
          f"{result['bytes_new'] / 1e9:.2f} GB new, phases (ms) {ms}, copy of the new bytes "
          f"{result['copy_new_bytes_ms']} ms, step {result['step_s_before_median'] * 1e3:.1f} ms before, "
          f"first after {after * 1e3:.1f} ms", flush=True)
    return result


def _device() -> str:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    except Exception:
        return os.uname().machine + " CPU"


if __name__ == "__main__":
    main()
