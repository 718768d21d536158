"""One growth event of a GPT-style decoder of >= 100M parameters with Adam, on the CPU, per Keras backend.

The model: a functional pre-LN decoder built from Keras layers (token and position ``Embedding``,
``n_layers`` blocks of ``LayerNormalization`` -> causal ``MultiHeadAttention`` -> residual ->
``LayerNormalization`` -> ``Dense(4 d, gelu)`` -> ``Dense(d)`` -> residual, a final
``LayerNormalization`` and a ``Dense`` head over the vocabulary); by default ``d_model`` 768,
12 heads, 12 layers, vocabulary 12,288, context 128: 104M parameters. It is compiled with Adam
and trained one step, so every Adam slot exists and holds values.

Variants of the event (``FASTSPLIT_LM_VARIANTS``, comma-separated):

- ``ffn``: every block's FFN intermediate doubled (``b<i>_ffn1``: 3072 -> 6144 units);
- ``heads``: every attention layer's heads doubled (``b<i>_attn/heads``: 12 -> 24);
- ``d_model``: the residual stream doubled (768 -> 1536; about 4 GB of new tensors: opt-in).

Target (issue 13): the peak extra memory during the event is <= 1.2x the bytes of the new
weights plus new slots (``GrowthEvent.bytes_new``), measured with tracemalloc (NumPy and
Python allocations) and as the resident set size's peak over its value before the event
(everything, the backend's own allocator included). Reported beside it: the event's time by
phase (``GrowthEvent.times``) and a plain ``np.copyto`` of all the new tensors (same shapes),
measured in the same process.

Keras fixes its backend once per process, so every backend is measured in a subprocess running
this file as a script (``python benchmarks/test_bench_lm_event.py <backend> <variant>`` prints one
JSON line), one after the other (memory). ``pytest benchmarks --benchmark-only -k lm_event``
times the event of the current backend with pytest-benchmark and measures the backends of
``FASTSPLIT_LM_BACKENDS`` (default all three); ``python benchmarks/test_bench_lm_event.py``
writes ``benchmarks/RESULTS_lm_event.md`` (a fragment, merged by hand into RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_bench_keras import PeakRSS, copyto_seconds  # noqa: E402  (one RSS sampler and copy baseline)


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int = int(os.environ.get("FASTSPLIT_LM_VOCAB", "12288"))
    d: int = int(os.environ.get("FASTSPLIT_LM_D", "768"))
    heads: int = int(os.environ.get("FASTSPLIT_LM_HEADS", "12"))
    layers: int = int(os.environ.get("FASTSPLIT_LM_LAYERS", "12"))
    ctx: int = int(os.environ.get("FASTSPLIT_LM_CTX", "128"))
    batch: int = 2


CONFIG = Config()
#: a model of the same structure for the warm-up (JIT compilers, Keras code paths)
SMALL = Config(vocab=64, d=32, heads=4, layers=2, ctx=16)
ROUNDS = int(os.environ.get("FASTSPLIT_LM_ROUNDS", "3"))
VARIANTS = tuple(os.environ.get("FASTSPLIT_LM_VARIANTS", "ffn,heads").split(","))
BACKENDS = tuple(os.environ.get("FASTSPLIT_LM_BACKENDS", "tensorflow,jax,torch").split(","))
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "RESULTS_lm_event.md")


def build(cfg: Config = CONFIG):
    """The compiled decoder after one Adam step, and its batch of tokens. Cost: one training step."""
    import keras
    import numpy as np

    class Positions(keras.layers.Layer):
        """0, 1, ..., ctx - 1 for every sequence of the batch: the input of the position embedding."""

        def call(self, tokens):
            return keras.ops.zeros_like(tokens) + keras.ops.arange(keras.ops.shape(tokens)[1], dtype=tokens.dtype)

    L = keras.layers
    tokens = keras.Input((cfg.ctx,), dtype="int32")
    positions = Positions(name="positions")(tokens)
    h = L.Add(name="embed")([L.Embedding(cfg.vocab, cfg.d, name="tok")(tokens),
                             L.Embedding(cfg.ctx, cfg.d, name="pos")(positions)])
    for i in range(cfg.layers):
        a = L.LayerNormalization(epsilon=1e-5, name=f"b{i}_ln1")(h)
        a = L.MultiHeadAttention(cfg.heads, cfg.d // cfg.heads, name=f"b{i}_attn")(a, a, use_causal_mask=True)
        h = L.Add(name=f"b{i}_res1")([h, a])
        f = L.LayerNormalization(epsilon=1e-5, name=f"b{i}_ln2")(h)
        f = L.Dense(4 * cfg.d, activation="gelu", name=f"b{i}_ffn1")(f)
        f = L.Dense(cfg.d, name=f"b{i}_ffn2")(f)
        h = L.Add(name=f"b{i}_res2")([h, f])
    h = L.LayerNormalization(epsilon=1e-5, name="ln_f")(h)
    model = keras.Model(tokens, L.Dense(cfg.vocab, name="head")(h))
    model.compile(keras.optimizers.Adam(1e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).integers(0, cfg.vocab, (cfg.batch, cfg.ctx)).astype("int32")
    model.train_on_batch(x, x)  # builds and fills the Adam slots
    return model, x


def plans(variant: str, cfg: Config = CONFIG) -> dict:
    """Every unit of the variant's groups split once (``None``): the dimension doubles."""
    if variant == "ffn":
        return {f"b{i}_ffn1": None for i in range(cfg.layers)}
    if variant == "heads":
        return {f"b{i}_attn/heads": None for i in range(cfg.layers)}
    if variant == "d_model":
        return {"tok": None}
    raise ValueError(f"variant must be 'ffn', 'heads' or 'd_model', got {variant!r}")


def _shapes(model) -> dict:
    """``{variable path: shape}`` of the weights and the optimizer's variables."""
    out = {f"w:{v.path}": tuple(v.shape) for v in model.weights}
    out.update({f"o:{v.path}": tuple(v.shape) for v in model.optimizer.variables})
    return out


def measure(variant: str, rounds: int = ROUNDS) -> dict:
    """Everything for the current Keras backend and one variant (run in a fresh process)."""
    import keras
    import numpy as np

    import fastsplit.keras as fk

    load_before = os.getloadavg()[0]
    small, xs = build(SMALL)
    fk.widen(small, plans(variant, SMALL))
    small.train_on_batch(xs, xs)
    del small
    gc.collect()

    events, first_step = [], []
    for _ in range(rounds):
        model, x = build()
        before = _shapes(model)
        gc.collect()
        events.append(fk.widen(model, plans(variant)))
        after = _shapes(model)
        if not first_step:  # the retrace of the grown model: once is enough (a minute at this size here)
            t = time.perf_counter()
            model.train_on_batch(x, x)
            first_step.append(time.perf_counter() - t)
        del model
        gc.collect()
    new_shapes = [s for k, s in after.items() if before.get(k) != s]

    # memory, in its own round (tracemalloc slows allocation down); RSS before is taken after the
    # model is built and collected, so it holds the model and its slots, nothing of the event
    model, x = build()
    gc.collect()
    tracemalloc.start()
    with PeakRSS() as rss:
        ev_mem = fk.widen(model, plans(variant))
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_after = rss.peak
    del model
    gc.collect()

    bytes_new = ev_mem.bytes_new
    copy_s, copy_fresh_s = copyto_seconds(new_shapes, rounds=max(rounds, 3))
    warm = events[1:] or events
    phases = {k: float(np.median([e.times.get(k, 0.0) for e in warm])) for k in events[0].times}
    return {
        "keras_backend": keras.backend.backend(),
        "variant": variant,
        "rounds": rounds,
        "fastsplit_backend": events[0].backend,
        "config": dataclasses.asdict(CONFIG),
        "params_before": events[0].params_before,
        "params_after": events[0].params_after,
        "tensors": events[0].tensors,
        "split_calls": events[0].split_calls,
        "bytes_new": bytes_new,
        "bytes_new_shapes": int(sum(4 * int(np.prod(s)) for s in new_shapes)),
        "phases": phases,
        "cold_total_s": events[0].times["total"],
        "copyto_s": copy_s,
        "copyto_fresh_s": copy_fresh_s,
        "first_step_s": float(np.median(first_step)),
        "tracemalloc_peak": traced_peak,
        "rss_extra": rss_after - rss.base,
        "ratio_tracemalloc": traced_peak / bytes_new,
        "ratio_rss": (rss_after - rss.base) / bytes_new,
        "mem_event_s": ev_mem.times["total"],
        "load": [load_before, os.getloadavg()[0]],
    }


def run_backend(backend: str, variant: str) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), backend, variant], env=env,
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{backend} {variant}: {proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_results(results: list[dict], path: str = RESULTS) -> str:
    c = CONFIG
    lines = [
        "## Keras: one growth event of a GPT-style decoder (issue 13)",
        "",
        f"Functional pre-LN decoder: d_model {c.d}, {c.heads} heads, {c.layers} blocks, FFN {4 * c.d}, vocabulary "
        f"{c.vocab}, context {c.ctx}; Adam, one training step before the event (slots filled). *ffn*: every "
        "FFN intermediate doubled; *heads*: every attention layer's heads doubled; *d_model*: the residual stream "
        f"doubled. CPU, {os.cpu_count()} cores (a shared VM), *n* events on fresh models per backend and "
        "variant, each backend in its own process; `python benchmarks/test_bench_lm_event.py`. Phases are the "
        "medians of events 2..n (`GrowthEvent.times`); *event* is their total without the retrace (which only "
        "drops cached functions; the next step retraces: *first step after*, measured after the first event); *cold* is the first event of the "
        "process (its new arrays land on pages the process has not touched yet). *np.copyto*: all new tensors' "
        "bytes copied into touched memory; *np.empty + copyto*: into fresh memory.",
        "",
        "| Keras backend | variant | n | params | tensors | new bytes | plan | export | kernel | import | variables | "
        "swap | event w/o retrace | np.copyto | cold event | np.empty + copyto | first step after | load |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        p = r["phases"]
        event = p["total"] - p.get("retrace", 0)
        lines.append(
            f"| {r['keras_backend']} | {r['variant']} | {r.get('rounds', ROUNDS)} | {r['params_before'] / 1e6:.1f}M -> "
            f"{r['params_after'] / 1e6:.1f}M | {r['tensors']} | {r['bytes_new'] / 1e9:.2f} GB | "
            f"{p['plan'] * 1e3:.0f} ms | {p['export'] * 1e3:.0f} ms | {p['kernel'] * 1e3:.0f} ms | "
            f"{p['import'] * 1e3:.0f} ms | {p['variables'] * 1e3:.0f} ms | {p['swap'] * 1e3:.0f} ms | "
            f"{event:.2f} s | {r['copyto_s']:.2f} s | {r['cold_total_s']:.2f} s | {r['copyto_fresh_s']:.2f} s | "
            f"{r['first_step_s']:.1f} s | {r['load'][0]:.1f} / {r['load'][1]:.1f} |"
        )
    lines += [
        "",
        "Peak extra memory during the event, relative to the bytes of the new weights plus new slots "
        "(target <= 1.2):",
        "",
        "| Keras backend | variant | new bytes | tracemalloc peak | ratio | RSS peak - RSS before | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['keras_backend']} | {r['variant']} | {r['bytes_new'] / 1e9:.2f} GB | "
            f"{r['tracemalloc_peak'] / 1e9:.2f} GB | {r['ratio_tracemalloc']:.2f} | {r['rss_extra'] / 1e9:.2f} GB | "
            f"{r['ratio_rss']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


@pytest.fixture(scope="module")
def lm_results():
    return [run_backend(b, v) for b in BACKENDS for v in VARIANTS]


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_bench_lm_event_widen(benchmark, variant):
    """pytest-benchmark timing of one event on the current Keras backend (a fresh model per round)."""
    pytest.importorskip("keras")
    import fastsplit.keras as fk

    small, _ = build(SMALL)
    fk.widen(small, plans(variant, SMALL))  # warm-up

    def setup():
        gc.collect()
        return (build()[0], plans(variant)), {}

    event = benchmark.pedantic(fk.widen, setup=setup, rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update({"bytes_new": event.bytes_new, "phases": event.times})


@pytest.mark.slow
def test_bench_lm_event_targets(benchmark, lm_results):
    """Every backend and variant in subprocesses; writes RESULTS_lm_event.md and reports the memory target."""
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the figures come from the subprocesses
    write_results(lm_results)
    for r in lm_results:
        benchmark.extra_info[f"{r['keras_backend']}/{r['variant']}"] = {
            k: r[k] for k in ("bytes_new", "ratio_tracemalloc", "ratio_rss", "copyto_s")}


if __name__ == "__main__":
    if len(sys.argv) > 2:
        print(json.dumps(measure(sys.argv[2])))
    else:
        print(write_results([run_backend(b, v) for b in BACKENDS for v in VARIANTS]))
