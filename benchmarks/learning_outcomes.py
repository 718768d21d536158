"""Learning outcomes of growing while training, on the demo's data, over several seeds.

Not a pytest-benchmark: a script that trains ~10 models per seed and writes a
Markdown report.

    .venv/bin/python benchmarks/learning_outcomes.py [--seeds 0 1 2] [--epochs 30] [--out benchmarks/RESULTS_learning.md]  (a fragment, merged by hand into RESULTS.md)

Runs (all: the demo's MLP, Flatten → Dense(units, relu) → Dense(10, softmax),
Adam 1e-3, batch 128, the same epoch budget, no early stopping):

- ``article``: the original two-step experiment: 2 hidden units, doubled once to 4
  at the first epoch whose validation accuracy improves by less than 0.01.
- ``all``: growth from 2 units with ``select="all"`` (doubling), up to 16.
- ``select=0.25, score=S``: selective growth from 2 units (the top quarter of the
  units by score ``S``, at least one) for every score, up to 16.
- ``fixed N``: N hidden units from scratch, N in 2, 4, 8, 16.

Growth runs use the demo's rule: ``SplitOnPlateau(min_delta=0.01, patience=0,
cooldown=2)`` (``cooldown=0`` for ``article``), ``stop_when_grown=False``.
For every growth event the training loss on a fixed 1,000-image slice of the
training set is measured just before and just after the split.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCORES = ("change", "gradient", "optimizer", "activation")


def make_loss_probe(x, y):
    """Two callbacks to put around the grower: the training loss on (x, y) just before and just after a split."""
    import keras

    def loss(model):
        return float(model.evaluate(x, y, batch_size=len(x), verbose=0)[0])

    class Before(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.params, self.loss = int(self.model.count_params()), loss(self.model)

    before = Before()

    class After(keras.callbacks.Callback):
        jumps = []

        def on_train_begin(self, logs=None):
            self.jumps = []

        def on_epoch_end(self, epoch, logs=None):
            if int(self.model.count_params()) != before.params:  # the grower split at this epoch's end
                self.jumps.append({"epoch": epoch + 1, "before": before.loss, "after": loss(self.model)})

    return before, After()


def run(kind, units, data, seed, epochs, select="all", score="change", max_units=16, cooldown=2):
    import keras

    from fastsplit.demo import build_model
    from fastsplit.keras.split_on_plateau import SplitOnPlateau

    (x, y), (xv, yv), (xt, yt) = data
    model = build_model("mlp", units, seed)
    callbacks, jumps = [], None
    grower = None
    if kind == "grow":
        grower = SplitOnPlateau(
            min_delta=0.01, patience=0, cooldown=cooldown, select=select, score=score, max_units=max_units,
            stop_when_grown=False, verbose=0, probe=(xv[:256], yv[:256]),
        )  # fmt: skip
        pre, jumps = make_loss_probe(x[:1000], y[:1000])
        callbacks = [pre, grower, jumps]
    t0 = time.perf_counter()
    hist = model.fit(x, y, validation_data=(xv, yv), epochs=epochs, batch_size=128, verbose=0, callbacks=callbacks)
    wall = time.perf_counter() - t0
    if jumps is not None:
        # the loss probes evaluate the model twice per epoch; take their time out of the wall time
        t_probe = time.perf_counter()
        for _ in range(3):
            model.evaluate(x[:1000], y[:1000], batch_size=1000, verbose=0)  # what one probe costs
        wall -= (time.perf_counter() - t_probe) / 3 * (len(hist.history["loss"]) + len(jumps.jumps))
    test_loss, test_acc = model.evaluate(xt, yt, batch_size=512, verbose=0)
    h = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    width = int(model.get_layer("hidden").kernel.shape[-1])
    out = {
        "units": width,
        "params": int(model.count_params()),
        "test_accuracy": float(test_acc),
        "val_accuracy": h["val_accuracy"][-1],
        "wall_s": wall,
        "epochs": len(h["loss"]),
        "history": h,
    }
    if grower is not None:
        out["events"] = [
            {"epoch": e + 1, "old": ev.layers["hidden"].old_width, "new": ev.layers["hidden"].new_width}
            for e, ev in zip(grower.event_epochs, grower.events, strict=True)
        ]
        out["loss_jumps"] = jumps.jumps
    keras.backend.clear_session()
    return out


def mean_std(vals):
    vals = np.asarray(vals, dtype=float)
    return float(vals.mean()), float(vals.std(ddof=0))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--dataset", default="auto")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS_learning.md"))
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "learning_outcomes.json"))
    p.add_argument("--report-only", action="store_true", help="rewrite --out from --json without training")
    a = p.parse_args(argv)
    if a.report_only:
        saved = json.loads(pathlib.Path(a.json).read_text())
        a.seeds, a.epochs = saved["seeds"], saved["epochs"]
        pathlib.Path(a.out).write_text(report(saved["results"], saved["data"], a))
        return

    import keras

    from fastsplit.demo import load_data, warm_up

    print(f"keras {keras.__version__}, backend {keras.backend.backend()}", flush=True)
    warm = warm_up("mlp")
    print(f"warm-up {warm:.2f} s", flush=True)
    configs = [("article", dict(kind="grow", units=2, max_units=4, cooldown=0))]
    configs.append(("all", dict(kind="grow", units=2, select="all")))
    configs += [(f"select=0.25, score={s}", dict(kind="grow", units=2, select=0.25, score=s)) for s in SCORES]
    configs += [(f"fixed {n}", dict(kind="fixed", units=n)) for n in (2, 4, 8, 16)]
    results = {name: [] for name, _ in configs}
    source = None
    for seed in a.seeds:
        train, val, test, source = load_data(a.dataset, seed)
        for name, cfg in configs:
            t0 = time.perf_counter()
            r = run(data=(train, val, test), seed=seed, epochs=a.epochs, **cfg)
            results[name].append(r)
            print(f"seed {seed} {name:32s} units {r['units']:3d} test {100 * r['test_accuracy']:.2f}% "
                  f"wall {r['wall_s']:.1f}s ({time.perf_counter() - t0:.1f}s with probes)", flush=True)  # fmt: skip
    pathlib.Path(a.json).write_text(json.dumps({"data": source, "epochs": a.epochs, "seeds": a.seeds,
                                                "results": results}, indent=1))  # fmt: skip
    pathlib.Path(a.out).write_text(report(results, source, a))
    print(f"wrote {a.out} and {a.json}")


def report(results, source, a):
    lines = [
        "# Learning outcomes of growing while training",
        "",
        f"Machine: 2-core x86-64 VM, 24 GiB, no GPU. Date: 2026-11-25. Python {platform.python_version()}, "
        f"Keras backend TensorFlow (CPU). Data: {source}.",
        "",
        "Command: `.venv/bin/python benchmarks/learning_outcomes.py "
        f"--seeds {' '.join(map(str, a.seeds))} --epochs {a.epochs}`",
        "",
        f"Every run: the demo's MLP (Flatten → Dense(units, relu) → Dense(10, softmax)), Adam 1e-3, batch 128, "
        f"{a.epochs} epochs, no early stopping; growth by `SplitOnPlateau(min_delta=0.01, patience=0, cooldown=2, "
        "stop_when_grown=False)` (`cooldown=0` for the article's two steps). Mean ± standard deviation over "
        f"{len(a.seeds)} seeds (each seed: its own data shuffle and initialisation). Wall time is `fit` only, "
        "growth events included, the loss probes of the last column taken out; the kernel is warmed up once first.",
        "",
        "| run | final units | params | test accuracy (%) | wall time (s) | growth events | largest training-loss change at a split |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, rs in results.items():
        acc = mean_std([100 * r["test_accuracy"] for r in rs])
        wall = mean_std([r["wall_s"] for r in rs])
        units = sorted({r["units"] for r in rs})
        params = mean_std([r["params"] for r in rs])
        ev = [len(r.get("events", [])) for r in rs]
        jumps = [100 * (j["after"] - j["before"]) / j["before"] for r in rs for j in r.get("loss_jumps", [])]
        jump = f"{max(jumps, key=abs):+.5f}%" if jumps else "–"
        lines.append(
            f"| {name} | {'/'.join(map(str, units))} | {params[0]:,.0f} | {acc[0]:.2f} ± {acc[1]:.2f} | "
            f"{wall[0]:.1f} ± {wall[1]:.1f} | {'/'.join(map(str, ev)) if any(ev) else '–'} | {jump} |"
        )
    art = results["article"]
    lines += ["", "## The article's two steps", "", "The article saw about 68% with 2 units, then 87% with 4, on full MNIST.", ""]
    for r in art:
        va = r["history"]["val_accuracy"]
        if r["events"]:
            e = r["events"][0]["epoch"]
            lines.append(
                f"- 2 units: validation accuracy {100 * va[e - 1]:.1f}% at the epoch that plateaued (epoch {e}); "
                f"4 units: {100 * max(va[e:] or [va[-1]]):.1f}% best after the split "
                f"(test {100 * r['test_accuracy']:.1f}%)"
            )
        else:
            lines.append(f"- no plateau within {len(va)} epochs: {100 * va[-1]:.1f}%")
    lines += ["", "## Goals", ""]
    grown = results["all"]
    final = sorted({r["units"] for r in grown})
    if len(final) == 1 and f"fixed {final[0]}" in results:
        fixed = results[f"fixed {final[0]}"]
        d_acc = mean_std([100 * (g["test_accuracy"] - f["test_accuracy"]) for g, f in zip(grown, fixed, strict=True)])
        d_wall = mean_std([g["wall_s"] - f["wall_s"] for g, f in zip(grown, fixed, strict=True)])
        ok = d_acc[0] >= -0.5 and d_wall[0] < 0
        lines.append(
            f"- Grown (`all`) within 0.5 points of `fixed {final[0]}` from scratch, in less wall time: "
            f"**{'met' if ok else 'missed'}**. Test accuracy difference {d_acc[0]:+.2f} ± {d_acc[1]:.2f} points; "
            f"wall time difference {d_wall[0]:+.1f} ± {d_wall[1]:.1f} s."
        )
    ref = mean_std([100 * r["test_accuracy"] for r in grown])[0]
    ref_params = mean_std([r["params"] for r in grown])[0]
    sel = []
    for s in SCORES:
        rs = results[f"select=0.25, score={s}"]
        acc, params = mean_std([100 * r["test_accuracy"] for r in rs])[0], mean_std([r["params"] for r in rs])[0]
        sel.append(f"`{s}` {acc:.2f}% with {params:,.0f}")
    best = max(
        (mean_std([100 * r["test_accuracy"] for r in results[f"select=0.25, score={s}"]])[0], s) for s in SCORES
    )
    ok = any(
        mean_std([100 * r["test_accuracy"] for r in results[f"select=0.25, score={s}"]])[0] >= ref - 0.5
        and mean_std([r["params"] for r in results[f"select=0.25, score={s}"]])[0] < ref_params
        for s in SCORES
    )
    lines.append(
        f"- Selective growth reaches doubling's accuracy ({ref:.2f}% with {ref_params:,.0f} parameters) with fewer "
        f"parameters: **{'met' if ok else 'missed'}**. Test accuracy and parameters: {'; '.join(sel)}; "
        f"best score `{best[1]}`."
    )
    jumps = [100 * (j["after"] - j["before"]) / j["before"] for rs in results.values() for r in rs
             for j in r.get("loss_jumps", [])]  # fmt: skip
    if jumps:
        lines.append(
            f"- No growth event raises the training loss by more than 1%: **{'met' if max(jumps) <= 1 else 'missed'}**. "
            f"{len(jumps)} events; the largest change is {max(jumps, key=abs):+.5f}% (nudge, eps = 1e-3)."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
